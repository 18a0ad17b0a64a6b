"""The limit the gateway is measured against: bare FastAPI endpoints returning constant JSON.

    uvicorn bench.baseline:app --loop uvloop --http httptools --no-access-log --log-level warning

Each route has the gateway's method and path and answers with a constant body. `make bench`
passes the gateway's own answers (`BENCH_BASELINE_BODIES`, a JSON file keyed by route) so both
send the same bytes; the bodies are encoded once, so the baseline does routing and nothing else.

With `BENCH_UPSTREAM_URL` set (production mode), every route first makes one upstream call, as the
gateway's reads make one Convex call each: a `gateway:getUser` query for `BENCH_UPSTREAM_USER`
through one shared `httpx.AsyncClient` built as `ConvexStore.from_settings` builds the gateway's
(its transport, `outbound_http.AsyncioTransport`, included).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response

# Shapes and sizes like the gateway's answers, for running this app on its own.
_JOB: dict[str, Any] = {
    "jobId": "job_Xk3v9QyL0aPz7wRt",
    "status": "done",
    "r2Url": "http://127.0.0.1:8000/_local/storage/videos/user_bench/job_Xk3v9QyL0aPz7wRt.mp4"
    "?expires=1795000000&sig=" + "0" * 64,
    "expiresAt": "2026-11-26T12:30:00.000Z",
    "durationSec": 5,
    "prompt": "A silver drone flies through neon skyline",
    "imageUrl": None,
    "seed": 42,
    "cost": 5,
    "createdAt": "2026-11-25T12:29:50.120Z",
    "updatedAt": "2026-11-25T12:29:58.402Z",
    "error": None,
}
DEFAULT_BODIES: dict[str, Any] = {
    "credits": {"credits": 75, "plan": "starter"},
    "job": _JOB,
    "jobs": {"jobs": [_JOB] * 20, "nextCursor": None},
    "create": {"jobId": "job_Xk3v9QyL0aPz7wRt"},
    "webhook": {"jobId": "job_Xk3v9QyL0aPz7wRt", "status": "done"},
}


def load_bodies() -> dict[str, bytes]:
    """Each route's body, encoded once: from `BENCH_BASELINE_BODIES` when set."""
    path = os.environ.get("BENCH_BASELINE_BODIES")
    bodies = dict(DEFAULT_BODIES)
    if path:
        bodies.update(json.loads(Path(path).read_text()))
    return {name: json.dumps(body, separators=(",", ":")).encode() for name, body in bodies.items()}


UpstreamCall = Callable[[], Awaitable[None]]


async def _no_call() -> None:
    return None


@asynccontextmanager
async def _upstream(url: str | None) -> AsyncIterator[UpstreamCall]:
    """One upstream call per request, or none: the call the baseline adds to each answer."""
    if not url:
        yield _no_call
        return
    # Imported only here: the local baseline is FastAPI alone, the production one adds httpx.
    import httpx

    from outbound_http import AsyncioTransport

    key = os.environ.get("BENCH_UPSTREAM_KEY", "")
    body = {
        "path": "gateway:getUser",
        "args": {"userId": os.environ.get("BENCH_UPSTREAM_USER", "user_bench")},
        "format": "convex_encoded_json",
    }
    # The same client settings as ConvexStore.from_settings (convex_client.py): keep them equal.
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers={"Authorization": f"Convex {key}"},
        timeout=httpx.Timeout(10.0, connect=3.0),
        # The gateway's transport and CONVEX_LIMITS: the ratio prices the gateway's own work,
        # not a cheaper client on one side.
        transport=AsyncioTransport(
            retries=1, limits=httpx.Limits(max_connections=100, max_keepalive_connections=100)
        ),
    ) as client:

        async def call() -> None:
            response = await client.post("/api/query", json=body)
            response.raise_for_status()

        yield call


def create_app() -> FastAPI:
    bodies = load_bodies()
    upstream: list[UpstreamCall] = [_no_call]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _upstream(os.environ.get("BENCH_UPSTREAM_URL")) as call:
            upstream[0] = call
            yield

    app = FastAPI(title="bench baseline", lifespan=lifespan)

    async def constant(name: str) -> Response:
        await upstream[0]()
        return Response(content=bodies[name], media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/credits")
    async def credits() -> Response:
        return await constant("credits")

    @app.get("/jobs")
    async def list_jobs() -> Response:
        return await constant("jobs")

    @app.post("/jobs/create")
    async def create_job() -> Response:
        return await constant("create")

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> Response:
        return await constant("job")

    @app.post("/webhooks/runpod")
    async def runpod_webhook() -> Response:
        return await constant("webhook")

    return app


app = create_app()
