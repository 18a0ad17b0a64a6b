"""GET /credits and GET /jobs/{id} are served twice: by a fast Starlette route that the entry
layer answers first (middleware.py), and by their FastAPI route (the schema's). The two must
answer alike, byte for byte, whatever the request: an app built with `fast_reads_first=False`
is the reference every answer is held to.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from jobs import rendered_answer
from logs import CloudLoggingFormatter, ConsoleFormatter
from main import create_app
from middleware import EntryMiddleware
from models import Job, JobResponse, JobStatus
from tests.conftest import PROJECT, bearer, with_lifespan_state
from tests.factories import finished_job

# A fixed id, so the two answers' X-Request-ID and log lines can be compared whole.
REQUEST_ID = {"X-Request-ID": "twin-check"}
UNKNOWN_JOB = "/jobs/job_abcdefghijklmnop"


@asynccontextmanager
async def twins(settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A client of the gateway as it ships, and one of the same gateway without its fast reads,
    both on the same store."""
    async with AsyncExitStack() as stack:
        clients = []
        for fast in (True, False):
            app = create_app(settings, fast_reads_first=fast)
            # Else the comparison below would hold the framework's routes to themselves.
            assert bool(entry_layer(app).shortcuts) is fast
            state = await stack.enter_async_context(app.router.lifespan_context(app))
            assert state is not None  # the gateway's lifespan always yields its state
            transport = httpx.ASGITransport(app=with_lifespan_state(app, dict(state)))
            client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
            client.app_state = state  # type: ignore[attr-defined]
            clients.append(await stack.enter_async_context(client))
        yield clients[0], clients[1]


def entry_layer(app: FastAPI) -> EntryMiddleware:
    """The entry layer of the middleware stack the app serves with, as FastAPI builds it."""
    layer = app.build_middleware_stack()
    while not isinstance(layer, EntryMiddleware):
        layer = layer.app  # type: ignore[attr-defined]
    return layer


class LogCapture:
    """The lines one formatter writes while the twins answer, with their clock readings masked."""

    def __init__(self, formatter: logging.Formatter) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)

    def take(self) -> list[str]:
        text = self.stream.getvalue()
        self.stream.seek(0)
        self.stream.truncate()
        text = re.sub(r'"time":"[^"]+"|^\S+ \S+ ', "<time>", text, flags=re.M)
        return re.sub(r"\d+\.\d+(ms|s)\b", r"<elapsed>\1", text).splitlines()


@pytest.fixture(params=["json", "console"])
def log_lines(request: pytest.FixtureRequest) -> Any:
    json_mode = request.param == "json"
    capture = LogCapture(CloudLoggingFormatter(PROJECT) if json_mode else ConsoleFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture.handler)
    root.setLevel(logging.INFO)
    yield capture
    root.removeHandler(capture.handler)
    root.setLevel(level)


Call = Callable[[httpx.AsyncClient], Any]


async def assert_twins_agree(
    fast: httpx.AsyncClient, framework: httpx.AsyncClient, call: Call, logs: LogCapture
) -> httpx.Response:
    logs.take()
    ours = await call(fast)
    our_lines = logs.take()
    theirs = await call(framework)
    assert (ours.status_code, ours.headers.multi_items(), ours.content) == (
        theirs.status_code,
        theirs.headers.multi_items(),
        theirs.content,
    )
    assert our_lines == logs.take() and our_lines  # the access line, at least
    return ours


def get(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Call:
    return lambda client: client.request(method, path, headers={**REQUEST_ID, **(headers or {})})


class TestTwinRoutes:
    async def test_ok_answers(self, settings, runpod, alice, log_lines) -> None:
        async with twins(settings) as (fast, framework):
            done = await finished_job(fast, runpod, alice)
            queued = (await fast.post("/jobs/create", json=JOB_BODY, headers=alice)).json()
            for path in ("/credits", f"/jobs/{done}", f"/jobs/{queued['jobId']}"):
                response = await assert_twins_agree(fast, framework, get(path, alice), log_lines)
                assert response.status_code == 200, response.text
            assert response.json()["status"] == "queued"
            job = (await fast.get(f"/jobs/{done}", headers=alice)).json()
            assert job["status"] == "done" and job["r2Url"]

    @pytest.mark.parametrize("path", ["/credits", UNKNOWN_JOB])
    async def test_refused_sessions(self, settings, make_token, path, log_lines) -> None:
        expired = bearer(make_token("user_alice", ttl=-120))
        cases = [
            None,
            {"Authorization": "Bearer not-a-jwt"},
            {"Authorization": "Basic dXNlcjpwYXNz"},
            expired,
            bearer(make_token("user with spaces")),
        ]
        async with twins(settings) as (fast, framework):
            for headers in cases:
                call = get(path, headers)
                response = await assert_twins_agree(fast, framework, call, log_lines)
                assert response.status_code == 401, (headers, response.text)
                assert response.json()["code"] == "UNAUTHORIZED"

    async def test_jobs_not_found(self, settings, runpod, alice, bob, log_lines) -> None:
        async with twins(settings) as (fast, framework):
            bobs = (await fast.post("/jobs/create", json=JOB_BODY, headers=bob)).json()["jobId"]
            for path in (UNKNOWN_JOB, "/jobs/not-an-id", f"/jobs/{bobs}", "/jobs/create"):
                response = await assert_twins_agree(fast, framework, get(path, alice), log_lines)
                assert response.status_code == 404, (path, response.text)
                assert response.json()["code"] == "NOT_FOUND"

    async def test_head_and_other_methods(self, settings, runpod, alice, log_lines) -> None:
        async with twins(settings) as (fast, framework):
            job = (await fast.post("/jobs/create", json=JOB_BODY, headers=alice)).json()["jobId"]
            for path in ("/credits", f"/jobs/{job}", UNKNOWN_JOB):
                head = get(path, alice, method="HEAD")
                response = await assert_twins_agree(fast, framework, head, log_lines)
                assert response.content == b"" and int(response.headers["content-length"]) > 0
                for method in ("PUT", "DELETE", "PATCH"):
                    call = get(path, alice, method=method)
                    response = await assert_twins_agree(fast, framework, call, log_lines)
                    if method == "DELETE" and path != "/credits":
                        # DELETE /jobs/{id} is a route of its own: the fast GET must let it by.
                        assert response.status_code in (404, 409), response.text
                        continue
                    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
            response = await assert_twins_agree(fast, framework, get("/credits/"), log_lines)
            assert response.status_code == 307

    async def test_store_down(self, settings_factory, make_token, log_lines) -> None:
        from tests.servers import free_port

        dead = settings_factory(convex_url=f"http://127.0.0.1:{free_port()}", convex_deploy_key="k")
        alice = bearer(make_token("user_alice"))
        async with twins(dead) as (fast, framework):
            for path in ("/credits", UNKNOWN_JOB):
                response = await assert_twins_agree(fast, framework, get(path, alice), log_lines)
                assert response.status_code == 503 and response.headers["retry-after"]
                assert response.json()["code"] == "STORE_UNAVAILABLE"


JOB_BODY = {"prompt": "A silver drone flies through a neon skyline", "durationSec": 5, "seed": 42}


class TestRenderedAnswer:
    """GET /jobs/{id} sends a job's answer rendered once per version of the job (jobs.py)."""

    def test_each_version_of_a_job_is_rendered_from_that_version(self) -> None:
        job = Job(
            job_id="job_render",
            user_id="user_alice",
            status=JobStatus.RUNNING,
            prompt="a boat",
            image_url=None,
            duration_sec=5,
            seed=7,
            cost=5,
            object_key="videos/user_alice/job_render.mp4",
            created_at=1_764_498_000_000,
            updated_at=1_764_498_001_000,
            progress=0.25,
            stage="render",
        )
        later = replace(job, progress=0.5, updated_at=job.updated_at + 1000)
        for version in (job, later, job):
            expected = JobResponse.from_job(version).model_dump_json(by_alias=True).encode()
            assert rendered_answer(version) == expected
        assert b'"progress":0.25' in rendered_answer(job)
        assert b'"progress":0.5' in rendered_answer(later)
        # An equal job read again (a new object) is the same answer, from the cache.
        assert rendered_answer(replace(job)) is rendered_answer(job)
