"""Builders and readers the test modules share: jobs, a small telemetry app, scraped metrics."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import av
import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from logs import current_request_id
from metrics import Metrics, RequestTelemetryMiddleware, metrics_route
from models import NewJob, new_job_id, object_key_for
from tests.conftest import WEBHOOK_SECRET, AppClient
from webhooks import sign_body

CLOUD_TRACE = "105445aa7843bc8bf206b12000100000"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJ1c2VyX2FsaWNlIn0.c2lnbmF0dXJlLXBhcnQ"
METRICS_TOKEN = "metrics-token-0123456789"
log = logging.getLogger("gateway.test_app")


def new_job(
    user_id: str = "user_alice", cost: int = 5, *, job_id: str | None = None, duration: int = 5
) -> NewJob:
    """A job to charge for: a fresh id unless one is given, its key where the store expects it."""
    job_id = job_id or new_job_id()
    return NewJob(
        job_id=job_id,
        user_id=user_id,
        prompt="a drone over a neon city",
        image_url=None,
        duration_sec=duration,
        seed=7,
        cost=cost,
        object_key=object_key_for(user_id, job_id),
    )


# --- Telemetry ----------------------------------------------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of one scraped sample, read back from the exposition text as Prometheus would."""
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def all_label_values(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {
        value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        for value in found.labels.values()
    }


def http_count(metrics: Metrics, method: str, route: str, status: str) -> float | None:
    labels = {"method": method, "route": route, "status": status}
    return sample(metrics, "gateway_http_request_duration_seconds_count", **labels)


def upstream_count(metrics: Metrics, upstream: str, operation: str, outcome: str) -> float | None:
    labels = {"upstream": upstream, "operation": operation, "outcome": outcome}
    return sample(metrics, "gateway_upstream_request_duration_seconds_count", **labels)


def credits(metrics: Metrics, kind: str) -> float | None:
    return sample(metrics, "gateway_credits_total", kind=kind)


def outcomes(metrics: Metrics) -> dict[str, float | None]:
    names = ("done", "failed", "canceled", "timed_out")
    return {name: sample(metrics, "gateway_job_outcomes_total", outcome=name) for name in names}


def app_client(app: FastAPI) -> httpx.AsyncClient:
    """A client for a small app: an exception the app raises becomes the 500 a server sends."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


def build_app(metrics: Metrics, token: str | None = None, min_logged_status: int = 0) -> FastAPI:
    """A small app shaped like the gateway: a templated route, a failing one, probes, /metrics."""
    app = FastAPI()

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, str]:
        log.info("looking up %s", job_id)
        return {"jobId": job_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the bug")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # What http_errors.py's 500 handler does, plus the request id it is asked to add.
        log.exception("unhandled error on %s", request.url.path)
        body = {"detail": "Internal server error", "code": "INTERNAL_ERROR"}
        return JSONResponse(body, 500, headers={"X-Request-ID": current_request_id() or ""})

    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/metrics", metrics_route(metrics.registry, token), include_in_schema=False)
    app.add_middleware(
        RequestTelemetryMiddleware, metrics=metrics, min_logged_status=min_logged_status
    )
    return app


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "gateway.access"]


def gateway_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The app's own lines, without the test client's httpx line that follows each request."""
    return [line for line in lines if line["logger"].startswith("gateway")]


# --- The API, as a client calls it ------------------------------------------------------------

JOB = {"prompt": "A silver drone flies through neon skyline", "durationSec": 5, "seed": 42}


async def credits_of(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    response = await client.get("/credits", headers=headers)
    assert response.status_code == 200
    return response.json()["credits"]


async def create(client: httpx.AsyncClient, headers: dict[str, str], **changes: Any) -> Any:
    return await client.post("/jobs/create", json={**JOB, **changes}, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and isinstance(body["detail"], str) and body["detail"]
    return body


# Pydantic's own phrasing, which means little to a person using the API.
LIBRARY_WORDING = re.compile(r"Value error|Input should|JSON decode error|^\d+$")


def assert_written_for_people(body: dict[str, Any]) -> None:
    """Each message names its field and reads as a sentence, not as pydantic's output."""
    for error in body["errors"]:
        assert error["message"].startswith(error["field"]), error
        assert not LIBRARY_WORDING.search(error["message"]), error
        assert error["message"] in body["detail"]


def store_object(client: AppClient, key: str, data: bytes = b"mp4") -> None:
    storage = client.app_state["storage"]
    storage.write(key, data)


async def finished_job(client, runpod, headers, runpod_id: str = "rp-1") -> str:
    """A job taken to `done` by a signed COMPLETED webhook, its video in storage."""
    job_id = (await create(client, headers)).json()["jobId"]
    user = (await client.app_state["jobs"].store.find_job(job_id)).user_id
    store_object(client, f"videos/{user}/{job_id}.mp4")
    response = await send_signed(client, completed(job_id, runpod_id))
    assert response.status_code == 200, response.text
    return job_id


def completed(job_id: str, runpod_id: str = "rp-1", status: str = "COMPLETED", **extra: Any):
    return {"id": runpod_id, "status": status, "input": {"jobId": job_id}, **extra}


async def send_signed(client, payload: dict[str, Any], *, secret: str = WEBHOOK_SECRET, t=None):
    raw = json.dumps(payload).encode()
    header = sign_body(secret, raw, t)
    return await client.post(
        "/webhooks/runpod",
        content=raw,
        headers={"x-runpod-signature": header, "content-type": "application/json"},
    )


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def jpeg_size(data: bytes) -> tuple[int, int]:
    """A JPEG's size, decoded with PyAV (FFmpeg's decoder): it must be a real image."""
    with av.open(io.BytesIO(data), "r", format="image2pipe") as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height
