"""What the gateway holds before the load: users with credits, tokens, and finished jobs.

Locally, users and credits are written to the gateway's SQLite store before it starts (production
mode grants them through Convex: bench/production.py); the finished jobs go through the API like
real ones (create, the video lands in storage, a signed COMPLETED webhook), so `GET /jobs/{id}`
serves a done job with its download URL.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from auth import ensure_dev_key, mint_dev_token
from bench.load import RequestSpec
from models import object_key_for
from sqlite_store import SQLiteStore
from webhooks import sign_body

USER = "user_bench"
# Create requests go round many users. In production MAX_CONCURRENT_JOBS (5) keeps a user's
# active jobs few, and the create transaction counts them; one user with thousands of queued
# jobs would make every create slower than it ever is in production.
CREATOR_COUNT = 256
CREDITS = 1_000_000_000
SEEDED_JOBS = 20  # one full page of `GET /jobs`
# Tokens must outlive the whole run, including a slow machine's.
TOKEN_TTL_SECONDS = 6 * 3600
CREATE_BODY = json.dumps(
    {
        "prompt": "A silver drone flies through neon skyline",
        "imageUrl": None,
        "durationSec": 5,
        "seed": 42,
    },
    separators=(",", ":"),
).encode()
JSON = "application/json"


@dataclass
class Fixtures:
    """The prepared state the routes are measured against."""

    secret: str
    token: str
    creator_tokens: list[str]
    done_job_id: str = ""
    done_runpod_id: str = ""


def gateway_settings(data_dir: Path, port: int, runpod_port: int, secret: str) -> dict[str, str]:
    """The gateway's environment: local mode, RunPod at the stand-in, the job limit out of reach."""
    return {
        "GATEWAY_ENV": "local",
        "LOCAL_DATA_DIR": str(data_dir),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "RUNPOD_API_KEY": "bench",
        "RUNPOD_ENDPOINT_ID": "bench",
        "RUNPOD_API_BASE": f"http://127.0.0.1:{runpod_port}/v2",
        "RUNPOD_WEBHOOK_SECRET": secret,
        # Thousands of creates per run: the per-user limit (5) must not answer 429 instead.
        "MAX_CONCURRENT_JOBS": "1000000",
    }


def creator_ids() -> list[str]:
    return [f"user_bench_create_{index:03d}" for index in range(CREATOR_COUNT)]


def prepare_store(data_dir: Path) -> Fixtures:
    """Grant credits and mint tokens before the gateway starts."""
    creators = creator_ids()
    asyncio.run(_grant_credits(data_dir / "gateway.db", [USER, *creators]))
    ensure_dev_key(data_dir)
    return Fixtures(
        secret=secrets.token_urlsafe(32),
        token=_token(data_dir, USER),
        creator_tokens=[_token(data_dir, user) for user in creators],
    )


def _token(data_dir: Path, user_id: str) -> str:
    return mint_dev_token(data_dir, user_id, ttl_seconds=TOKEN_TTL_SECONDS)


async def _grant_credits(db_path: Path, users: list[str]) -> None:
    store = SQLiteStore(db_path, signup_credits=0, default_plan="starter")
    try:
        for user_id in users:
            await store.grant_credits(user_id, CREDITS, "benchmark")
    finally:
        await store.close()


# --- Finished jobs, through the API -------------------------------------------------------------


class Backend(Protocol):
    """Where a mode keeps what the API does not show: RunPod's id of a job, and the videos."""

    def runpod_id_of(self, job_id: str) -> str: ...

    def store_video(self, job_id: str) -> None: ...


@dataclass(frozen=True)
class LocalBackend:
    data_dir: Path

    def runpod_id_of(self, job_id: str) -> str:
        return runpod_id_of(self.data_dir, job_id)

    def store_video(self, job_id: str) -> None:
        _store_video(self.data_dir, job_id)


def seed_done_jobs(base_url: str, backend: Backend, fixtures: Fixtures) -> None:
    """Create `SEEDED_JOBS` jobs and finish each with a stored video and a signed webhook."""
    headers = {"Authorization": f"Bearer {fixtures.token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client:
        for _ in range(SEEDED_JOBS):
            job_id = _create(client)
            runpod_id = backend.runpod_id_of(job_id)
            backend.store_video(job_id)
            _complete(client, fixtures.secret, job_id, runpod_id)
    fixtures.done_job_id, fixtures.done_runpod_id = job_id, runpod_id


def _create(client: httpx.Client) -> str:
    response = client.post("/jobs/create", content=CREATE_BODY, headers={"Content-Type": JSON})
    response.raise_for_status()
    return str(response.json()["jobId"])


def runpod_id_of(data_dir: Path, job_id: str) -> str:
    """The id the stand-in gave the job: the API does not show it, the store does."""
    uri = f"file:{data_dir / 'gateway.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        row = db.execute("SELECT runpod_id FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None or not row[0]:
        raise RuntimeError(f"job {job_id} has no RunPod id")
    return str(row[0])


def _store_video(data_dir: Path, job_id: str) -> None:
    # The gateway only checks that the object exists; the bytes need not be a real MP4.
    path = data_dir / "objects" / object_key_for(USER, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42 benchmark placeholder")


def _complete(client: httpx.Client, secret: str, job_id: str, runpod_id: str) -> None:
    body = webhook_body(job_id, runpod_id, "COMPLETED")
    headers = {"X-RunPod-Signature": sign_body(secret, body), "Content-Type": JSON}
    response = client.post("/webhooks/runpod", content=body, headers=headers)
    response.raise_for_status()
    if response.json().get("status") != "done":
        raise RuntimeError(f"job {job_id} did not finish: {response.text}")


def webhook_body(job_id: str, runpod_id: str, status: str) -> bytes:
    payload = {"id": runpod_id, "status": status, "input": {"jobId": job_id}}
    return json.dumps(payload, separators=(",", ":")).encode()


# --- The measured routes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    key: str
    label: str
    # Called before every run: the webhook's signature must be fresh (300 s tolerance).
    spec: Callable[[], RequestSpec]


def routes(fixtures: Fixtures) -> list[Route]:
    auth = [{"Authorization": f"Bearer {fixtures.token}"}]
    creators = [
        {"Authorization": f"Bearer {t}", "Content-Type": JSON} for t in fixtures.creator_tokens
    ]
    job_path = f"/jobs/{fixtures.done_job_id}"
    # A late progress report for a finished job: verified, looked up, answered 200, no change.
    late = webhook_body(fixtures.done_job_id, fixtures.done_runpod_id, "IN_PROGRESS")

    def signed_webhook() -> RequestSpec:
        headers = {"X-RunPod-Signature": sign_body(fixtures.secret, late), "Content-Type": JSON}
        return RequestSpec("POST", "/webhooks/runpod", late, [headers])

    return [
        Route("credits", "GET /credits", lambda: RequestSpec("GET", "/credits", None, auth)),
        Route("job", "GET /jobs/{id}", lambda: RequestSpec("GET", job_path, None, auth)),
        Route("jobs", "GET /jobs", lambda: RequestSpec("GET", "/jobs", None, auth)),
        Route("webhook", "POST /webhooks/runpod (signed)", signed_webhook),
        # Last: each create adds a job, and the runs before it should not read a grown store.
        Route(
            "create",
            "POST /jobs/create",
            lambda: RequestSpec("POST", "/jobs/create", CREATE_BODY, creators),
        ),
    ]


def gateway_answers(base_url: str, fixtures: Fixtures) -> dict[str, object]:
    """One answer per route, for the baseline to send back byte for byte; also warms caches."""
    answers: dict[str, object] = {}
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for route in routes(fixtures):
            spec = route.spec()
            response = client.request(
                spec.method, spec.path, content=spec.body, headers=spec.variants[0]
            )
            response.raise_for_status()
            answers[route.key] = response.json()
    return answers
