"""EntryMiddleware's shortcut, on a small Starlette app whose own routes answer differently from
the shortcuts: whichever answers shows which path a request took."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from middleware import MAX_BODY_BYTES, MAX_WEBHOOK_BODY_BYTES, EntryMiddleware


class Refused(Exception):
    pass


class RefusedHarder(Refused):
    pass


async def shortcut(request: Request) -> Response:
    what = request.path_params.get("name", "")
    if what == "refused":
        raise RefusedHarder("no")  # handled by its base class's handler, as Starlette would
    if what == "teapot":
        raise HTTPException(418)  # handled by the status's handler
    if what == "bug":
        raise KeyError("bug")  # no handler: the server's error middleware answers 500
    body = await request.body()
    return JSONResponse({"by": "shortcut", "name": what, "bytes": len(body)})


async def framework(request: Request) -> Response:
    return PlainTextResponse(f"framework {request.method} {request.url.path}")


async def on_refused(request: Request, exc: Exception) -> Response:
    return JSONResponse({"handled": type(exc).__name__}, status_code=403)


async def on_teapot(request: Request, exc: Exception) -> Response:
    return JSONResponse({"handled": "teapot"}, status_code=418)


def on_any(request: Request, exc: Exception) -> Response:  # sync, like a handler may be
    return PlainTextResponse("server error", status_code=500)


SHORTCUTS = [
    Route("/fast/{name}", shortcut, methods=["GET"]),
    Route("/webhooks/runpod", shortcut, methods=["POST"]),
]
HANDLERS: dict[Any, Callable[[Request, Exception], Any]] = {
    Refused: on_refused,
    418: on_teapot,
    Exception: on_any,
}


def app_with(shortcuts: list[Route]) -> Starlette:
    routes = [Route("/fast/{name}", framework, methods=["GET", "PUT"])]
    routes.append(Route("/webhooks/runpod", framework, methods=["POST"]))
    entry = Middleware(EntryMiddleware, shortcuts=shortcuts, handlers=HANDLERS)
    return Starlette(routes=routes, middleware=[entry], exception_handlers=HANDLERS)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_with(SHORTCUTS), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


class TestShortcuts:
    async def test_a_full_match_is_answered_by_the_shortcut(self, client) -> None:
        response = await client.get("/fast/one")
        assert response.json() == {"by": "shortcut", "name": "one", "bytes": 0}
        posted = await client.post("/webhooks/runpod", content=b"x" * 1000)
        assert posted.json() == {"by": "shortcut", "name": "", "bytes": 1000}

    async def test_anything_else_goes_on_to_the_app(self, client) -> None:
        # Another method (a partial match) and a trailing slash are the app's routes' to answer.
        assert (await client.put("/fast/one")).text == "framework PUT /fast/one"
        assert (await client.get("/fast/one/")).status_code == 307  # the router's redirect
        without = httpx.ASGITransport(app=app_with([]))
        async with httpx.AsyncClient(transport=without, base_url="http://t") as plain:
            assert (await plain.get("/fast/one")).text == "framework GET /fast/one"

    async def test_head_is_answered_as_get_without_the_body(self, client) -> None:
        get, head = await client.get("/fast/one"), await client.head("/fast/one")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"] != "0"

    async def test_errors_go_to_the_handler_starlette_would_pick(self, client) -> None:
        refused = await client.get("/fast/refused")
        assert (refused.status_code, refused.json()) == (403, {"handled": "RefusedHarder"})
        teapot = await client.get("/fast/teapot")
        assert (teapot.status_code, teapot.json()) == (418, {"handled": "teapot"})
        # `Exception`'s handler is the server error middleware's, as in the app's own stack:
        # it answers, then raises on to the server (the shortcut would have swallowed it).
        bug = await client.get("/fast/bug")
        assert (bug.status_code, bug.text) == (500, "server error")
        raising = httpx.ASGITransport(app=app_with(SHORTCUTS), raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=raising, base_url="http://t") as strict:
            with pytest.raises(KeyError):
                await strict.get("/fast/bug")

    async def test_bodies_over_the_limit_are_refused_before_the_shortcut(self, client) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(MAX_WEBHOOK_BODY_BYTES // 65536 + 1):
                yield b"x" * 65536

        chunked = await client.post("/webhooks/runpod", content=chunks())
        assert chunked.status_code == 413 and chunked.json()["code"] == "PAYLOAD_TOO_LARGE"
        declared = {"content-length": str(MAX_BODY_BYTES + 1)}
        refused = await client.request("GET", "/fast/one", headers=declared)
        assert refused.status_code == 413 and refused.json()["code"] == "PAYLOAD_TOO_LARGE"
