"""The framework floor: a minimal aiohttp app that parses a ResolveScan body and answers a constant.

It reads and JSON-decodes the body like the daemon does (msgspec) and returns a fixed
``{id, type, action}``, with no validation, lookup or storage, so the daemon's latency can be
reported next to what aiohttp alone costs on the same machine in the same run. It runs on
uvloop, the event loop the daemon uses.

    .venv/bin/python tests/bench/floor_app.py PORT
"""

from __future__ import annotations

import sys

import msgspec
import uvloop
from aiohttp import web

ANSWER = b'{"id":"floor","type":"SHOPPER","action":"ACCEPT"}'
_DECODER = msgspec.json.Decoder()


async def resolve_scan(request: web.Request) -> web.Response:
    body = await request.read()
    document = _DECODER.decode(body)
    if not isinstance(document, dict):
        return web.Response(status=400)
    return web.Response(body=ANSWER, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/identity/scan", resolve_scan)
    app.router.add_get("/healthz", healthz)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
