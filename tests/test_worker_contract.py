"""The two halves of the worker contract, tested against each other through its schema.

The gateway submits a job; its RunPod input goes to the real worker handler (in process, the
test pattern, uploading to moto's S3 server through the gateway's own presigned URL); the
worker's answer comes back as RunPod's webhook would bring it. Every field the gateway sends
must be one `WorkerInput` declares (and so one the worker parses), and every field the worker
returns one `WorkerOutput` or `WorkerError` declares, and the gateway's readers (`echoed_job_id`,
the webhook) take what they need from it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from pydantic import BaseModel

from config import Settings
from jobs import echoed_job_id
from models import ProgressRequest
from runpod_client import RunPodStatus
from tests.conftest import (
    PUBLIC_BASE,
    RUNPOD_URL,
    WEBHOOK_SECRET,
    TokenFactory,
    bearer,
    serve,
    settings_on_moto,
)
from tests.factories import jpeg_size
from webhooks import sign_body
from worker.contract import WorkerError, WorkerInput, WorkerOutput
from worker.generator import TestPattern
from worker.handler import Worker

BUCKET = "cineweave-videos"
JOB = {"prompt": "A silver drone flies through neon skyline", "durationSec": 1, "seed": 42}


def declared(model: type[BaseModel]) -> dict[str, Any]:
    """Each wire name the schema declares, with the nested model it holds (if any)."""
    names: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        nested = info.annotation if isinstance(info.annotation, type) else None
        is_model = nested is not None and issubclass(nested, BaseModel)
        names[info.alias or name] = nested if is_model else None
    return names


def undeclared(payload: dict[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """The keys of `payload`, at any depth, that `model` does not declare."""
    fields = declared(model)
    extra = [f"{where}{key}" for key in payload if key not in fields]
    for key, nested in fields.items():
        if nested is not None and isinstance(payload.get(key), dict):
            extra += undeclared(payload[key], nested, f"{where}{key}.")
    return extra


@pytest.fixture
def r2_settings(
    moto_endpoint: str, settings_factory: Callable[..., Settings]
) -> Iterator[Settings]:
    with settings_on_moto(settings_factory, moto_endpoint, BUCKET) as settings:
        yield settings


@pytest.fixture
def runpod(moto_endpoint: str) -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
        # The worker's uploads go to moto for real.
        mock.route(url__startswith=moto_endpoint).pass_through()
        # Its progress POSTs to the gateway are caught here; a test may replay them.
        progress = f"{PUBLIC_BASE}/webhooks/runpod/progress"
        mock.post(url__startswith=progress, name="progress").respond(200)
        yield mock


@pytest.fixture
def worker() -> Iterator[Worker]:
    with httpx.Client(timeout=10.0) as client:
        yield Worker(generator=TestPattern(), client=client, sleep=lambda _: None)


async def submitted_input(
    client: httpx.AsyncClient, runpod: respx.MockRouter, user: dict[str, str]
) -> Any:
    created = await client.post("/jobs/create", json=JOB, headers=user)
    assert created.status_code == 200, created.text
    body = json.loads(runpod.routes[0].calls.last.request.content)
    return created.json()["jobId"], body["input"]


async def webhook(client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
    raw = json.dumps(payload).encode()
    headers = {"x-runpod-signature": sign_body(WEBHOOK_SECRET, raw)}
    return await client.post("/webhooks/runpod", content=raw, headers=headers)


class TestGatewayToWorker:
    async def test_every_field_the_gateway_sends_is_declared_and_parsed(
        self, r2_settings: Settings, runpod: respx.MockRouter, make_token: TokenFactory
    ) -> None:
        async with serve(r2_settings) as client:
            job_id, job_input = await submitted_input(client, runpod, bearer(make_token("u_1")))

        assert undeclared(job_input, WorkerInput) == []
        parsed = WorkerInput.model_validate(job_input)
        assert parsed.job_id == job_id and parsed.to_wire() == job_input

    async def test_the_declared_fields_the_gateway_must_send_are_sent(
        self, r2_settings: Settings, runpod: respx.MockRouter, make_token: TokenFactory
    ) -> None:
        async with serve(r2_settings) as client:
            _, job_input = await submitted_input(client, runpod, bearer(make_token("u_1")))

        required = {f.alias for f in WorkerInput.model_fields.values() if f.is_required()}
        assert required <= set(job_input)
        assert "contractVersion" in required
        # Optional in the schema (an older gateway may leave them out), sent by this one.
        assert job_input["progressUrl"].startswith(f"{PUBLIC_BASE}/webhooks/runpod/progress?")
        assert job_input["output"]["posterUploadUrl"].startswith(r2_settings.r2_endpoint_url)
        assert job_input["output"]["posterContentType"] == "image/jpeg"


class TestWorkerToGateway:
    async def test_a_finished_video_makes_the_job_done(
        self,
        r2_settings: Settings,
        runpod: respx.MockRouter,
        make_token: TokenFactory,
        worker: Worker,
    ) -> None:
        user = bearer(make_token("u_1"))
        async with serve(r2_settings) as client:
            job_id, job_input = await submitted_input(client, runpod, user)
            output = await asyncio.to_thread(worker.handle, {"id": "rp-1", "input": job_input})

            assert undeclared(output, WorkerOutput) == []
            assert WorkerOutput.model_validate(output).job_id == job_id
            completed = {"id": "rp-1", "status": "COMPLETED", "output": output}
            # The echo the gateway binds a RunPod job by, read by the gateway's own reader.
            assert echoed_job_id(RunPodStatus.from_payload(completed)) == job_id
            answered = await webhook(client, completed | {"input": job_input})
            job = (await client.get(f"/jobs/{job_id}", headers=user)).json()

        assert answered.status_code == 200, answered.text
        assert job["status"] == "done" and job["r2Url"]

    async def test_progress_and_the_poster_reach_the_user(
        self,
        r2_settings: Settings,
        runpod: respx.MockRouter,
        make_token: TokenFactory,
        worker: Worker,
    ) -> None:
        # The worker's progress POSTs are caught at the transport, then handed to the gateway
        # as they were sent: every field the worker posts must be one the gateway reads.
        posted = runpod.routes["progress"]
        user = bearer(make_token("u_1"))
        async with serve(r2_settings) as client:
            job_id, job_input = await submitted_input(client, runpod, user)
            output = await asyncio.to_thread(worker.handle, {"id": "rp-1", "input": job_input})
            seen = []
            for call in posted.calls:
                body = json.loads(call.request.content)
                assert undeclared(body, ProgressRequest) == []
                url = call.request.url
                answer = await client.post(url.raw_path.decode(), json=body)
                assert answer.status_code == 200, answer.text
                job = (await client.get(f"/jobs/{job_id}", headers=user)).json()
                seen.append((job["status"], job["stage"]))
            completed = {"id": "rp-1", "status": "COMPLETED", "output": output}
            await webhook(client, completed | {"input": job_input})
            job = (await client.get(f"/jobs/{job_id}", headers=user)).json()

        assert seen == [("running", "started"), ("running", "generating"), ("running", "uploading")]
        assert output["posterUploaded"] is True
        assert job["status"] == "done" and job["posterExpiresAt"] == job["expiresAt"]
        poster = httpx.get(job["posterUrl"], timeout=10)
        assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
        width, height = jpeg_size(poster.content)
        assert 0 < width <= 640 and height > 0

    async def test_a_worker_failure_reaches_the_user_with_its_message(
        self,
        r2_settings: Settings,
        runpod: respx.MockRouter,
        make_token: TokenFactory,
        worker: Worker,
    ) -> None:
        class Failing(TestPattern):
            def generate(self, prompt: str, image: bytes | None, duration: int, seed: int) -> Path:
                raise RuntimeError("The model could not draw that")

        worker.generator = Failing()
        user = bearer(make_token("u_1"))
        async with serve(r2_settings) as client:
            job_id, job_input = await submitted_input(client, runpod, user)
            answer = await asyncio.to_thread(worker.handle, {"id": "rp-1", "input": job_input})
            # runpod-python moves a returned "error" into the status unchanged (rp_job.py).
            error = answer.pop("error")
            assert answer == {}
            assert undeclared(json.loads(error), WorkerError) == []
            assert WorkerError.from_error_string(error).job_id == job_id
            failed = {"id": "rp-1", "status": "FAILED", "error": error, "input": job_input}
            assert echoed_job_id(RunPodStatus.from_payload(failed)) == job_id
            answered = await webhook(client, failed)
            job = (await client.get(f"/jobs/{job_id}", headers=user)).json()

        assert answered.status_code == 200, answered.text
        assert job["status"] == "failed"
        assert job["error"] == {
            "code": "WORKER_FAILED",
            "detail": "The model could not draw that",
        }
