"""jobs.py called directly: what RunPod's statuses mean, proof of a job, charge and refund."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from config import Settings
from errors import GatewayError
from jobs import JobService, echoed_job_id, update_from_runpod
from local_storage import LocalStorage
from models import CreateJobRequest, JobStatus
from runpod_client import RunPodClient, RunPodStatus, build_http_client
from sqlite_store import SQLiteStore
from tests.conftest import PUBLIC_BASE, RUNPOD_BASE, RUNPOD_ENDPOINT, WEBHOOK_SECRET
from webhooks import token_is_valid


def status(state: str, output: object = None, error: object = None) -> RunPodStatus:
    payload = {"id": "rp-1", "status": state, "output": output, "error": error}
    return RunPodStatus.from_payload(payload)


class TestUpdateFromRunpod:
    def test_completed_with_its_video_is_done(self) -> None:
        update = update_from_runpod(status("COMPLETED"), output_exists=True)
        assert update is not None and update.status is JobStatus.DONE and update.runpod_id == "rp-1"

    def test_completed_without_a_video_fails(self) -> None:
        update = update_from_runpod(status("COMPLETED"), output_exists=False)
        assert update is not None and update.error_code == "OUTPUT_MISSING"

    @pytest.mark.parametrize(
        ("state", "expected", "code"),
        [
            ("IN_QUEUE", JobStatus.QUEUED, None),
            ("IN_PROGRESS", JobStatus.RUNNING, None),
            ("FAILED", JobStatus.FAILED, "WORKER_FAILED"),
            ("TIMED_OUT", JobStatus.FAILED, "TIMED_OUT"),
            ("CANCELLED", JobStatus.CANCELED, "CANCELED"),
        ],
    )
    def test_each_status(self, state: str, expected: JobStatus, code: str | None) -> None:
        update = update_from_runpod(status(state), output_exists=None)
        assert update is not None and (update.status, update.error_code) == (expected, code)

    def test_an_unknown_status_means_nothing(self) -> None:
        assert update_from_runpod(status("PAUSED"), output_exists=None) is None


class TestEchoedJobId:
    def test_from_the_output(self) -> None:
        assert echoed_job_id(status("COMPLETED", output={"jobId": "job_1"})) == "job_1"

    def test_from_a_contract_error(self) -> None:
        error = '{"jobId": "job_1", "error_message": "CUDA out of memory"}'
        assert echoed_job_id(status("FAILED", error=error)) == "job_1"

    def test_plain_text_error_proves_nothing(self) -> None:
        assert echoed_job_id(status("FAILED", error="Traceback ...")) is None


@pytest.fixture
async def service(
    tmp_path: Path, settings: Settings, runpod_answer: list[httpx.Response]
) -> AsyncIterator[JobService]:
    def answer(request: httpx.Request) -> httpx.Response:
        return runpod_answer[0]

    transport = httpx.MockTransport(answer)
    http = build_http_client(RUNPOD_BASE, RUNPOD_ENDPOINT, "rp-key", transport=transport)
    store = SQLiteStore(tmp_path / "gateway.db", signup_credits=100, default_plan="starter")
    storage = LocalStorage(tmp_path / "objects", b"secret", PUBLIC_BASE)
    yield JobService(settings, store, RunPodClient(http), storage, WEBHOOK_SECRET, PUBLIC_BASE)
    await http.aclose()
    assert await store.audit() == []
    await store.close()


@pytest.fixture
def runpod_answer() -> list[httpx.Response]:
    """What RunPod's `/run` answers; a test replaces it to make RunPod refuse."""
    return [httpx.Response(200, json={"id": "rp-1", "status": "IN_QUEUE"})]


REQUEST = CreateJobRequest.model_validate({"prompt": "A silver drone", "durationSec": 4})


async def credits(service: JobService) -> int:
    return (await service.store.get_or_create_user("user_alice")).credits


class TestCreate:
    async def test_charges_and_records_runpods_id(self, service: JobService) -> None:
        job = await service.create("user_alice", REQUEST)
        assert job.runpod_id == "rp-1" and job.status is JobStatus.QUEUED
        assert await credits(service) == 100 - 4 * service.settings.credits_per_second

    async def test_refused_submission_is_refunded(
        self, service: JobService, runpod_answer: list[httpx.Response]
    ) -> None:
        runpod_answer[0] = httpx.Response(400, json={"error": "bad input"})
        with pytest.raises(GatewayError):
            await service.create("user_alice", REQUEST)
        (job,) = (await service.store.list_jobs("user_alice", 5, None)).jobs
        assert job.status is JobStatus.FAILED and job.error_code == "SUBMIT_FAILED"
        assert await credits(service) == 100


class TestWebhookUrl:
    def test_names_the_job_with_a_token_only_we_can_mint(self, service: JobService) -> None:
        url = httpx.URL(service.webhook_url("job_1"))
        assert str(url).startswith(f"{PUBLIC_BASE}/webhooks/runpod?")
        assert url.params["jobId"] == "job_1"
        assert token_is_valid(WEBHOOK_SECRET, "job_1", url.params["token"])
        assert not token_is_valid("another-secret", "job_1", url.params["token"])
