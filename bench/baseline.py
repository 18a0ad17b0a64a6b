"""The limit the gateway is measured against: bare FastAPI endpoints returning constant JSON.

    uvicorn bench.baseline:app --loop uvloop --http httptools --no-access-log --log-level warning

Each route has the gateway's method and path and answers with a constant body. `make bench`
passes the gateway's own answers (`BENCH_BASELINE_BODIES`, a JSON file keyed by route) so both
send the same bytes; the bodies are encoded once, so the baseline does routing and nothing else.
"""

from __future__ import annotations

import json
import os
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


def create_app() -> FastAPI:
    bodies = load_bodies()
    app = FastAPI(title="bench baseline")

    def constant(name: str) -> Response:
        return Response(content=bodies[name], media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/credits")
    async def credits() -> Response:
        return constant("credits")

    @app.get("/jobs")
    async def list_jobs() -> Response:
        return constant("jobs")

    @app.post("/jobs/create")
    async def create_job() -> Response:
        return constant("create")

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> Response:
        return constant("job")

    @app.post("/webhooks/runpod")
    async def runpod_webhook() -> Response:
        return constant("webhook")

    return app


app = create_app()
