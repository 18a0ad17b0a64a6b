"""Builders and readers the test modules share: jobs, a small telemetry app, scraped metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from logs import current_request_id
from metrics import Metrics, RequestTelemetryMiddleware, metrics_route
from models import NewJob, new_job_id, object_key_for

PROJECT = "cineweave-prod"
CLOUD_TRACE = "105445aa7843bc8bf206b12000100000"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJ1c2VyX2FsaWNlIn0.c2lnbmF0dXJlLXBhcnQ"
METRICS_TOKEN = "metrics-token-0123456789"
log = logging.getLogger("gateway.test_telemetry")


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
        # What main.py's 500 handler does, plus the request id it is asked to add.
        log.exception("unhandled error on %s", request.url.path)
        body = {"detail": "Internal server error", "code": "INTERNAL_ERROR"}
        return JSONResponse(body, 500, headers={"X-Request-ID": current_request_id() or ""})

    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/metrics", metrics_route(metrics.registry, token), include_in_schema=False)
    app.add_middleware(
        RequestTelemetryMiddleware, metrics=metrics, min_logged_status=min_logged_status
    )
    return app


LogLines = Callable[[], list[dict[str, Any]]]


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "gateway.access"]


def gateway_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The app's own lines, without the test client's httpx line that follows each request."""
    return [line for line in lines if line["logger"].startswith("gateway")]
