"""The gateway's ASGI middleware: body limits, HEAD answered as GET, the hot routes' shortcut,
and CORS."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import get_route_path, is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from config import Settings
from http_errors import error_body

MAX_BODY_BYTES = 64 * 1024
MAX_WEBHOOK_BODY_BYTES = 1024 * 1024
# A worker's upload to the local storage stand-in: a 10 s 320x180 clip is well under 5 MiB.
MAX_LOCAL_UPLOAD_BYTES = 512 * 1024 * 1024


# --- The gateway's entry: body limits, HEAD, and the hot routes' shortcut -------------------


class EntryMiddleware:
    """The body limit, HEAD answered as GET, and the hot routes' shortcut, as one ASGI layer.

    One layer, not three: each is a coroutine and often a `send` wrapper per request, and inside
    a request code costs 2-4x what it costs in a tight loop (issue 13, bench/PROFILE.md).

    * **Body limit.** Bodies over the route's limit get a 413 before they are read into memory.
    * **HEAD** answers as GET would, headers and all, without the body (RFC 9110 §9.3.2).
      FastAPI's routes answer only the methods they name, and naming HEAD on each would list a
      HEAD operation per route in the OpenAPI schema. Routes that have no GET still refuse it
      (405, with their `Allow`).
    * **Shortcuts.** A request that one of `shortcuts` (Starlette routes, each with a
      `Request -> Response` endpoint) fully matches is answered by that endpoint here, past
      the app's exception middleware, FastAPI's exit stack, the router and the route's own
      wrapper: 10-15 µs of a hot read in-app. The endpoint's exceptions go to the handlers the
      exception middleware would pick (`handlers`, the app's); those it leaves to the server's
      error middleware (`Exception`, 500, anything unhandled) propagate there as they did.
      Whatever no shortcut fully matches, a 405 or a trailing slash included, goes on to the
      app, whose routes then answer it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        shortcuts: Sequence[Route] = (),
        handlers: Mapping[Any, ExceptionHandler] | None = None,
    ) -> None:
        self.app = app
        self.shortcuts = tuple(shortcuts)
        # Exact paths are found by a dict lookup; a path with parameters is matched in order.
        self._exact = {route.path: route for route in shortcuts if not route.param_convertors}
        self._templated = tuple(route for route in shortcuts if route.param_convertors)
        self._handlers = _ExceptionHandlers(handlers or {})

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
        guard = None
        if chunked or scope.get("http_version") not in _FRAMED_VERSIONS:
            # HTTP/1 framing bounds any other body: the server reads exactly Content-Length
            # bytes, and a request with neither header has none (RFC 9112 §6.3). Only a
            # chunked body (or another protocol's) can outgrow what it declared.
            guard = _BodyGuard(receive, send, limit)
            receive, send = guard.receive, guard.send
        if scope["method"] == "HEAD":
            scope, send = _head_as_get(scope, send)
        app = self._app_for(scope)
        try:
            await app(scope, receive, send)
        except Exception:
            if guard is None or not guard.overflowed:
                raise
        if guard is not None and guard.overflowed:
            await _send_too_large(guard.unguarded_send, limit)

    def _app_for(self, scope: Scope) -> ASGIApp:
        """The shortcut when one fully matches `scope` (which then carries its route, as the
        router's match would), else the app."""
        route = self._exact.get(get_route_path(scope))  # the path past any root path, as routes
        for candidate in self._templated if route is None else (route,):
            match, child_scope = candidate.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                return self._answer
        return self.app

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await scope["endpoint"](request)
        except Exception as exc:
            handler = self._handlers.find(exc)
            if handler is None:
                raise
            answer = await self._handlers.run(handler, request, exc)
            if answer is not None:
                await answer(scope, receive, send)
            exc.__traceback__ = None  # as Starlette: a reused exception would collect tracebacks
            return
        await response(scope, receive, send)


class _ExceptionHandlers:
    """The app's exception handlers, picked and run as Starlette's ExceptionMiddleware does.

    Follows starlette/_exception_handler.py (`wrap_app_handling_exceptions`, whose lookup it
    calls) and FastAPI's `build_middleware_stack`, which copies the app's handlers when it
    builds the stack (this layer is built with it) and leaves `Exception` and 500 to the server
    error middleware: an HTTPException by its status first, then the nearest class in the
    exception's MRO. FastAPI's `app.exception_handlers` always holds an HTTPException handler.
    The shortcut's endpoint returns its response before sending anything, so no response has
    started when a handler runs.
    """

    def __init__(self, handlers: Mapping[Any, ExceptionHandler]) -> None:
        kept = {key: value for key, value in handlers.items() if key not in (500, Exception)}
        self._by_status = {key: value for key, value in kept.items() if isinstance(key, int)}
        self._by_class = {key: value for key, value in kept.items() if not isinstance(key, int)}

    def find(self, exc: Exception) -> ExceptionHandler | None:
        handler = None
        if isinstance(exc, HTTPException):
            handler = self._by_status.get(exc.status_code)
        return handler or _lookup_exception_handler(self._by_class, exc)

    @staticmethod
    async def run(handler: ExceptionHandler, request: Request, exc: Exception) -> Response | None:
        if is_async_callable(handler):
            response: Response | None = await handler(request, exc)  # type: ignore[arg-type]
        else:
            response = await run_in_threadpool(handler, request, exc)  # type: ignore[arg-type]
        return response


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
        self._receive, self.unguarded_send, self._limit = receive, send, limit
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
            await self.unguarded_send(message)


async def _send_too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body("PAYLOAD_TOO_LARGE", f"Request body is larger than {limit} bytes")
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _head_as_get(scope: Scope, send: Send) -> tuple[Scope, Send]:
    """A HEAD request's scope as a GET's, and a `send` that drops the body."""

    async def send_headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            # Content-Length stays as GET's: it says what a GET would send (§8.6).
            message = {**message, "body": b""}
        await send(message)

    # The mark lets an endless answer (an event stream, events.py) end at its headers.
    return {**scope, "method": "GET", "gateway.head": True}, send_headers_only


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
