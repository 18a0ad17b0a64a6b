"""The gateway's ASGI middleware: body limits, HEAD answered as GET, and CORS."""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import Settings
from http_errors import error_body

MAX_BODY_BYTES = 64 * 1024
MAX_WEBHOOK_BODY_BYTES = 1024 * 1024
# A worker's upload to the local storage stand-in: a 10 s 320x180 clip is well under 5 MiB.
MAX_LOCAL_UPLOAD_BYTES = 512 * 1024 * 1024


# --- Body limits ------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Refuses bodies over the route's limit (413) before they are read into memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def limit_for(path: str) -> int:
        if path == "/webhooks/runpod":
            return MAX_WEBHOOK_BODY_BYTES
        if path.startswith("/_local/storage/"):
            return MAX_LOCAL_UPLOAD_BYTES
        return MAX_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared, chunked = _framing(scope["headers"])
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_too_large(send, limit)
            return
        if not chunked and scope.get("http_version") in _FRAMED_VERSIONS:
            # HTTP/1 framing bounds the body: the server reads exactly Content-Length bytes, and
            # a request with neither header has none (RFC 9112 §6.3). Only a chunked body can
            # outgrow what it declared, so only it needs counting (a read saves 2 wrappers).
            await self.app(scope, receive, send)
            return
        guard = _BodyGuard(receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.overflowed:
                raise
        if guard.overflowed:
            await _send_too_large(send, limit)


_FRAMED_VERSIONS = frozenset({"1.0", "1.1"})


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bool]:
    """The declared Content-Length, and whether any Transfer-Encoding is named."""
    declared, encoded = None, False
    for name, value in headers:
        if name == b"content-length":
            declared = value
        elif name == b"transfer-encoding":
            encoded = True
    return declared, encoded


class _BodyGuard:
    """Counts a streamed body; past the limit it ends the body and silences the app's answer.

    Raising from `receive` would not do: the framework turns any error while parsing a body into
    its own 400, so the 413 is sent from here once the app has given up.
    """

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self._limit = receive, send, limit
        self._received = 0
        self.overflowed = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                self.overflowed = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if not self.overflowed:
            await self._send(message)


async def _send_too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body("PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- HEAD -------------------------------------------------------------------------------------


class HeadAsGetMiddleware:
    """HEAD answers as GET would, headers and all, without the body (RFC 9110 §9.3.2).

    FastAPI's routes answer only the methods they name, and naming HEAD on each would list a
    HEAD operation per route in the OpenAPI schema. Routes that have no GET still refuse it
    (405, with their `Allow`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                # Content-Length stays as GET's: it says what a GET would send (§8.6).
                message = {**message, "body": b""}
            await send(message)

        # The mark lets an endless answer (an event stream, events.py) end at its headers.
        head_as_get = {**scope, "method": "GET", "gateway.head": True}
        await self.app(head_as_get, receive, send_headers_only)


# --- CORS ---


class GatewayCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in the gateway's error shape, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        detail = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        kept = {k: v for k, v in response.headers.items() if k not in _BODY_HEADERS}
        return JSONResponse(error_body("CORS_REFUSED", detail), 400, headers=kept)


_BODY_HEADERS = ("content-length", "content-type")


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Lets the listed browser origins call the API; outside the body limit, so 413s carry it."""
    if not settings.cors_allow_origins:
        return  # no CORS headers at all: only same-origin pages may read answers
    app.add_middleware(
        GatewayCORSMiddleware,
        allow_origins=settings.cors_allow_origins,
        # DELETE: the web app deletes jobs (`DELETE /jobs/{id}`).
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
        # Without these a page cannot read a request id to report, or when to retry.
        expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed"],
        max_age=600,  # 10 min: few preflights, yet a removed origin stops working soon
    )
