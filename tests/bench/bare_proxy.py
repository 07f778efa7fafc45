"""The floor: a bare aiohttp reverse proxy with no features at all.

``/<anything>/<rest>`` goes to ``UPSTREAM/<rest>`` with one injected header; the
answer is streamed back. Same event loop as credproxy (uvloop when installed),
so the comparison is Python to Python.

    python tests/bench/bare_proxy.py PORT UPSTREAM_URL
"""

import asyncio
import sys

import aiohttp
from aiohttp import web

HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
NOT_FORWARDED = HOP | {"host", "content-length", "authorization"}


def make_handler(session: aiohttp.ClientSession, upstream: str):
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        rest = request.raw_path.split("/", 2)[2] if request.raw_path.count("/") >= 2 else ""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        headers["Authorization"] = "Bearer bench-upstream-key"
        body = request.content if request.body_exists else None
        async with session.request(request.method, f"{upstream}/{rest}", headers=headers, data=body,
                                   allow_redirects=False) as up:
            out = web.StreamResponse(status=up.status, reason=up.reason,
                                     headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    return handler


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
                                    trust_env=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
    runner = web.ServerRunner(web.Server(make_handler(session, upstream.rstrip("/")), auto_decompress=False),
                              access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    else:
        uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
