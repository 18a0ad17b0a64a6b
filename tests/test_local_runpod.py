"""The RunPod stand-in, driven over HTTP; its uploads and webhooks land in a recording app."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import av
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs import echoed_job_id
from local_runpod import create_local_runpod_app, main
from runpod_client import RunPodClient, RunPodNotFound, RunPodStatus, build_http_client
from worker.contract import CONTRACT_VERSION

RECEIVER = "http://receiver.test"
WEBHOOK = f"{RECEIVER}/webhook?jobId=job_1"
OBJECT_KEY = "videos/user_1/job_1.mp4"
AUTH = {"Authorization": "Bearer local-key"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


class Receiver:
    """Plays the bucket and the gateway for the stand-in, and records what reaches them."""

    def __init__(self) -> None:
        self.uploads: dict[str, tuple[str, bytes]] = {}
        self.webhooks: list[dict[str, Any]] = []
        self.upload_status = 200
        self.webhook_answers: list[int] = []  # answered in turn, then 200
        self.app = Starlette(
            routes=[
                Route("/bucket/{key:path}", self._upload, methods=["PUT"]),
                Route("/webhook", self._webhook, methods=["POST"]),
            ]
        )

    async def _upload(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        self.uploads[request.path_params["key"]] = (content_type, await request.body())
        return Response(status_code=self.upload_status)

    async def _webhook(self, request: Request) -> Response:
        self.webhooks.append(await request.json())
        return Response(status_code=self.webhook_answers.pop(0) if self.webhook_answers else 200)


def job_input(duration_sec: int = 1, seed: int = 42, prompt: str = "a red fox") -> dict[str, Any]:
    return {
        "contractVersion": CONTRACT_VERSION,
        "jobId": "job_1",
        "prompt": prompt,
        "imageUrl": None,
        "durationSec": duration_sec,
        "seed": seed,
        "output": {
            "uploadUrl": f"{RECEIVER}/bucket/{OBJECT_KEY}?X-Amz-Signature=abc",
            "objectKey": OBJECT_KEY,
            "contentType": "video/mp4",
        },
    }


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


class SyncASGITransport(httpx.BaseTransport):
    """Hands a synchronous client's requests to an ASGI app, each on an event loop of its own.

    The worker is synchronous, as on RunPod, and calls from its own thread, which has no loop.
    """

    def __init__(self, app: Starlette) -> None:
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return asyncio.run(self._forward(request))

    async def _forward(self, request: httpx.Request) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app)) as client:
            answer = await client.send(request)
            return httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )


@asynccontextmanager
async def running_standin(receiver: Receiver, render_seconds: float) -> AsyncIterator[Starlette]:
    """The stand-in, its webhooks and its worker's uploads landing in the receiver."""
    with httpx.Client(transport=SyncASGITransport(receiver.app)) as uploads:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver.app)) as http:
            app = create_local_runpod_app(
                render_seconds=render_seconds,
                webhook_retry_delay=0,
                http=http,
                worker_client=uploads,
            )
            async with app.router.lifespan_context(app):
                yield app


@pytest.fixture
async def standin(receiver: Receiver) -> AsyncIterator[Starlette]:
    async with running_standin(receiver, render_seconds=0) as app:
        yield app


@pytest.fixture
async def api(standin: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=standin)
    base = "http://runpod.test/v2/ep-local"
    async with httpx.AsyncClient(transport=transport, base_url=base, headers=AUTH) as client:
        yield client


async def run(api: httpx.AsyncClient, body_input: dict[str, Any]) -> str:
    response = await api.post("/run", json={"input": body_input, "webhook": WEBHOOK})
    assert response.status_code == 200
    assert response.json()["status"] == "IN_QUEUE"
    return response.json()["id"]


async def finished(api: httpx.AsyncClient, runpod_id: str) -> dict[str, Any]:
    """Poll `/status` like the gateway would, until the job ends."""
    async with asyncio.timeout(15):
        while True:
            response = await api.get(f"/status/{runpod_id}")
            assert response.status_code == 200
            if response.json()["status"] in TERMINAL:
                return response.json()
            await asyncio.sleep(0.01)


def probe(data: bytes) -> tuple[float, int, int]:
    """Duration in seconds, width and height, as a player would read them."""
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        assert container.duration is not None
        return container.duration / av.time_base, stream.width, stream.height


class TestRun:
    @pytest.mark.asyncio
    async def test_job_renders_uploads_and_completes(
        self, api: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        runpod_id = await run(api, job_input(duration_sec=2))

        status = await finished(api, runpod_id)

        assert status["id"] == runpod_id
        assert status["status"] == "COMPLETED"
        assert status["output"]["objectKey"] == OBJECT_KEY
        assert status["output"]["jobId"] == "job_1"  # the worker contract's echo
        assert {"delayTime", "executionTime"} <= status.keys()
        content_type, data = receiver.uploads[OBJECT_KEY]
        assert content_type == "video/mp4"
        duration, width, height = probe(data)
        assert abs(duration - 2) <= 0.2
        assert (width, height) == (320, 180)

    @pytest.mark.asyncio
    async def test_webhook_carries_status_input_and_webhook(
        self, api: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        runpod_id = await run(api, job_input())

        await eventually(lambda: len(receiver.webhooks) == 1)

        body = receiver.webhooks[0]
        assert (body["id"], body["status"]) == (runpod_id, "COMPLETED")
        assert body["input"] == job_input()
        assert body["webhook"] == WEBHOOK
        assert body["output"]["objectKey"] == OBJECT_KEY

    @pytest.mark.asyncio
    async def test_webhook_is_retried_until_200(
        self, api: httpx.AsyncClient, receiver: Receiver, caplog: pytest.LogCaptureFixture
    ) -> None:
        receiver.webhook_answers = [500, 200]

        await run(api, job_input())

        await eventually(lambda: len(receiver.webhooks) == 2)
        await asyncio.sleep(0.05)
        assert len(receiver.webhooks) == 2
        assert "Gave up" not in caplog.text

    @pytest.mark.asyncio
    async def test_webhook_gives_up_after_three_tries(
        self, api: httpx.AsyncClient, receiver: Receiver, caplog: pytest.LogCaptureFixture
    ) -> None:
        receiver.webhook_answers = [500, 502, 404, 500]

        with caplog.at_level(logging.WARNING, logger="local_runpod"):
            await run(api, job_input())
            await eventually(lambda: "Gave up on the webhook" in caplog.text)

        assert len(receiver.webhooks) == 3

    @pytest.mark.asyncio
    async def test_fail_marker_fails_the_job_echoing_its_id(
        self, api: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        runpod_id = await run(api, job_input(prompt="a fox [[fail]]"))

        status = await finished(api, runpod_id)

        assert status["status"] == "FAILED" and "output" not in status
        error = json.loads(status["error"])
        assert error == {
            "jobId": "job_1",
            "error_type": "WorkerFailure",
            "error_message": "Simulated worker failure: the prompt contains [[fail]]",
        }
        assert receiver.uploads == {}
        await eventually(lambda: len(receiver.webhooks) == 1)
        assert receiver.webhooks[0]["status"] == "FAILED"
        parsed = RunPodStatus.from_payload(receiver.webhooks[0])
        assert parsed.error == error["error_message"] and echoed_job_id(parsed) == "job_1"

    @pytest.mark.asyncio
    async def test_handler_crash_is_reported_as_the_sdk_does_without_echo(
        self, api: httpx.AsyncClient
    ) -> None:
        status = await finished(api, await run(api, job_input(prompt="a fox [[crash]]")))

        assert status["status"] == "FAILED"
        error = json.loads(status["error"])
        # runpod-python's `run_job` reports an escaped exception with exactly these keys.
        sdk_keys = {"error_type", "error_message", "error_traceback", "hostname", "worker_id"}
        assert error.keys() == sdk_keys | {"runpod_version"}
        assert error["error_type"] == "<class 'local_runpod.HandlerCrash'>"
        assert echoed_job_id(RunPodStatus.from_payload(status)) is None

    @pytest.mark.asyncio
    async def test_runs_in_progress_while_rendering(self, receiver: Receiver) -> None:
        async with running_standin(receiver, render_seconds=0.4) as app:
            transport = httpx.ASGITransport(app=app)
            base = "http://runpod.test/v2/ep-local"
            async with httpx.AsyncClient(
                transport=transport, base_url=base, headers=AUTH
            ) as client:
                runpod_id = await run(client, job_input())
                seen: list[dict[str, Any]] = []
                while not seen or seen[-1]["status"] not in TERMINAL:
                    seen.append((await client.get(f"/status/{runpod_id}")).json())
                    await asyncio.sleep(0.02)

        statuses = [body["status"] for body in seen]
        assert list(dict.fromkeys(statuses)) == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
        # While it runs, `output` is the worker's latest progress, as progress_update shows it.
        progress = [body.get("output") for body in seen if body["status"] == "IN_PROGRESS"]
        assert {"progress": 0.8, "stage": "uploading"} in progress

    @pytest.mark.asyncio
    async def test_refused_upload_fails_the_job(
        self, api: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        receiver.upload_status = 403

        status = await finished(api, await run(api, job_input()))

        assert status["status"] == "FAILED"
        error = json.loads(status["error"])
        assert "403" in error["error_message"] and error["jobId"] == "job_1"

    @pytest.mark.asyncio
    async def test_input_without_upload_url_fails_the_job(self, api: httpx.AsyncClient) -> None:
        body_input = job_input()
        del body_input["output"]["uploadUrl"]

        status = await finished(api, await run(api, body_input))

        assert status["status"] == "FAILED"
        error = json.loads(status["error"])
        assert "output.uploadUrl" in error["error_message"] and error["jobId"] == "job_1"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("body", [{"webhook": WEBHOOK}, {"input": "x"}, ["input"]])
    async def test_body_without_input_object_is_400(
        self, api: httpx.AsyncClient, body: object
    ) -> None:
        assert (await api.post("/run", json=body)).status_code == 400


class TestStatus:
    @pytest.mark.asyncio
    async def test_unknown_id_is_404(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/status/no-such-job")

        assert response.status_code == 404

    @pytest.mark.asyncio
    @pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer "}, {"Authorization": "x"}])
    async def test_missing_auth_is_401(self, standin: Starlette, headers: dict[str, str]) -> None:
        transport = httpx.ASGITransport(app=standin)
        async with httpx.AsyncClient(transport=transport, base_url="http://runpod.test") as raw:
            response = await raw.get("/v2/ep-local/status/anything", headers=headers)

        assert response.status_code == 401


class TestCancel:
    @pytest.fixture
    async def slow_api(self, receiver: Receiver) -> AsyncIterator[httpx.AsyncClient]:
        # Long enough to cancel in time, short enough that a job left running would finish
        # (and show up) while the test waits.
        async with running_standin(receiver, render_seconds=0.3) as app:
            transport = httpx.ASGITransport(app=app)
            base = "http://runpod.test/v2/ep-local"
            async with httpx.AsyncClient(
                transport=transport, base_url=base, headers=AUTH
            ) as client:
                yield client

    @pytest.mark.asyncio
    async def test_cancel_stops_the_job(
        self, slow_api: httpx.AsyncClient, receiver: Receiver
    ) -> None:
        runpod_id = await run(slow_api, job_input())

        response = await slow_api.post(f"/cancel/{runpod_id}")

        assert response.json() == {"id": runpod_id, "status": "CANCELLED"}
        # Past when the render would have finished: proves a cancelled render never uploads.
        await asyncio.sleep(0.6)
        status = (await slow_api.get(f"/status/{runpod_id}")).json()
        assert status["status"] == "CANCELLED"
        assert receiver.uploads == {} and receiver.webhooks == []

    @pytest.mark.asyncio
    async def test_cancel_of_a_finished_job_changes_nothing(self, api: httpx.AsyncClient) -> None:
        runpod_id = await run(api, job_input())
        await finished(api, runpod_id)

        response = await api.post(f"/cancel/{runpod_id}")

        assert response.json() == {"id": runpod_id, "status": "COMPLETED"}

    @pytest.mark.asyncio
    async def test_unknown_id_is_404(self, api: httpx.AsyncClient) -> None:
        assert (await api.post("/cancel/no-such-job")).status_code == 404


class TestHealth:
    @pytest.mark.asyncio
    async def test_counts_jobs(self, api: httpx.AsyncClient) -> None:
        await finished(api, await run(api, job_input()))

        report = (await api.get("/health")).json()

        assert report["jobs"]["completed"] == 1
        assert report["workers"] == {"idle": 1, "running": 0}


class TestWithRunPodClient:
    @pytest.mark.asyncio
    async def test_round_trip(self, standin: Starlette, receiver: Receiver) -> None:
        transport = httpx.ASGITransport(app=standin)
        http = build_http_client("http://runpod.test/v2", "ep-local", "local-key", transport)
        async with http:
            client = RunPodClient(http)
            runpod_id = await client.submit(
                job_input(), WEBHOOK, execution_timeout_ms=60_000, ttl_ms=600_000
            )
            async with asyncio.timeout(15):
                while not (status := await client.status(runpod_id)).is_terminal:
                    await asyncio.sleep(0.01)
            report = await client.health()
            with pytest.raises(RunPodNotFound):
                await client.status("no-such-job")

        assert (status.id, status.status) == (runpod_id, "COMPLETED")
        assert status.output["objectKey"] == OBJECT_KEY
        assert report["jobs"]["completed"] == 1
        await eventually(lambda: len(receiver.webhooks) == 1)
        assert RunPodStatus.from_payload(receiver.webhooks[0]).input == job_input()


class TestCommandLine:
    def test_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exited:
            main(["--help"])

        assert exited.value.code == 0
        assert "--render-seconds" in capsys.readouterr().out
