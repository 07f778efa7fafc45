"""Helper upstream for the benchmark, run on the load core: an OAuth2 token endpoint
that counts its calls, and an upload sink that counts bytes.

    python tests/bench/aux_server.py PORT TOKEN_LIFETIME_S
"""

import asyncio
import itertools
import sys
import time

from aiohttp import web

TOKEN_DELAY_S = 0.02  # a token endpoint is a network round trip away


def build(lifetime: float) -> web.Application:
    counts = {"token": 0, "token_times": [], "upload_bytes": 0}  # times: CLOCK_MONOTONIC, as the harness reads it
    serial = itertools.count(1)

    async def token(request: web.Request) -> web.Response:
        await request.read()
        counts["token"] += 1
        counts["token_times"].append(time.monotonic())
        await asyncio.sleep(TOKEN_DELAY_S)
        return web.json_response({"access_token": f"bench-access-token-{next(serial):06d}", "token_type": "Bearer",
                                  "expires_in": lifetime})

    async def upload(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        counts["upload_bytes"] += n
        return web.json_response({"received": n})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_route("*", "/v1/upload", upload)
    app.router.add_get("/stats", stats)
    return app


if __name__ == "__main__":
    web.run_app(build(float(sys.argv[2])), host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None, backlog=4096)
