"""A RunPod stand-in that costs next to nothing, so the gateway's upstream drops out of the ratio.

    uvicorn bench.runpod_stub:app --port 9000

`POST /v2/bench/run` answers `{"id": "<unique>", "status": "IN_QUEUE"}` at once and never sends a
webhook; `GET /healthz` answers 200; anything else is 404. A raw ASGI app: no framework, no JSON
parsing, so a load test measures the gateway rather than this.
"""

from __future__ import annotations

import itertools
import os

from starlette.types import Receive, Scope, Send

RUN_PATH = "/v2/bench/run"
_JSON_HEADERS = [(b"content-type", b"application/json")]
_next_id = itertools.count(1)
# The pid keeps ids unique if the stand-in is restarted against the same gateway store.
_ID_PREFIX = f"bench-{os.getpid()}-"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http":
        await _drain_body(receive)
        status, body = _answer(scope["method"], scope["path"])
        await _respond(send, status, body)


def _answer(method: str, path: str) -> tuple[int, bytes]:
    if method == "POST" and path == RUN_PATH:
        runpod_id = f"{_ID_PREFIX}{next(_next_id)}"
        return 200, b'{"id":"%s","status":"IN_QUEUE"}' % runpod_id.encode()
    if method == "GET" and path == "/healthz":
        return 200, b'{"status":"ok"}'
    return 404, b'{"error":"request does not exist"}'


async def _drain_body(receive: Receive) -> None:
    # The gateway's /run body (about 1 KB) must be consumed before answering on keep-alive.
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
