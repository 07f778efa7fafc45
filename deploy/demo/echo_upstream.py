"""A tiny echo API for the quick start: answers with what it received (as an upstream
that echoes request headers would), so you can see the injected secret arrive
- and see the leak guard redact it on the way back."""

import json
import sys

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    auth = request.headers.get("Authorization", "")
    print(f"echo API received {request.method} {request.raw_path} with Authorization: "
          f"{auth[:13]}... ({len(auth)} chars)", flush=True)
    return web.json_response({
        "method": request.method,
        "path": request.raw_path,
        "headers": dict(request.headers),
        "body": body.decode(errors="replace"),
    })


app = web.Application()
app.router.add_route("*", "/{tail:.*}", echo)
if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 9999, print=None)
