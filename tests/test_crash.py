"""kill -9 at each step of a job's life, restart, and account for every credit.

Real processes: the gateway under uvicorn (armed to SIGKILL itself at one named step), the
RunPod stand-in in its own process (it outlives the gateway, as RunPod would), and the store
(a SQLite file, or the Convex test server). After each scenario every job must be terminal
within the reconcile window, every RunPod job must be tied to a gateway job, and the ledger
audit must pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import GatewayProcess, manage, running_standin

pytestmark = pytest.mark.e2e

JOB: dict[str, Any] = {"prompt": "crash test", "durationSec": 2}
TERMINAL = {"done", "failed", "canceled"}


HELD = "held"


@pytest.fixture
def standin(request: pytest.FixtureRequest) -> Iterator[str]:
    # Rendering takes long enough for a killed gateway to be back before the upload, even on a
    # loaded machine (a restart there took over 6 s); the upload, the webhook and its retries
    # (9 + 2 x 3 s) still end before a job's deadline (RUNPOD_JOB_TTL_SECONDS + 10 s = 20 s).
    # A test that must not depend on that race asks for HELD jobs and releases them itself.
    if getattr(request, "param", None) == HELD:
        with running_standin(render_seconds=1, webhook_retry_delay=3, hold_jobs=True) as base:
            yield base
        return
    with running_standin(render_seconds=9, webhook_retry_delay=3) as base:
        yield base


def release(standin: str) -> None:
    answer = httpx.post(f"{standin}/local/_test/release", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 200


@pytest.fixture
def gateway(tmp_path: Path, standin: str, store_env: dict[str, str]) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        tmp_path / "data",
        RUNPOD_API_BASE=standin,
        RUNPOD_API_KEY="local",
        RUNPOD_ENDPOINT_ID="local",
        # Short windows so a lost job settles within the test: checked after 1 s of silence,
        # expired 10 s + grace after creation.
        RECONCILE_AFTER_SECONDS="1",
        RECONCILE_INTERVAL_SECONDS="0.3",
        RUNPOD_JOB_TTL_SECONDS="10",
        **store_env,
    )
    yield process
    process.stop()


def headers(gateway: GatewayProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {manage(gateway.env, 'mint-token', 'user_crash')}"}


def create_and_die(gateway: GatewayProcess, auth: dict[str, str]) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{gateway.base_url}/jobs/create", json=JOB, headers=auth, timeout=30)
    assert gateway.wait_dead() == -9


def settled_jobs(
    gateway: GatewayProcess, auth: dict[str, str], timeout: float = 45
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{gateway.base_url}/jobs", headers=auth).json()["jobs"]
        if jobs and all(job["status"] in TERMINAL for job in jobs):
            return jobs
        time.sleep(0.3)  # real processes render real videos: poll, there is no clock to move
    raise TimeoutError(f"jobs never settled: {jobs}")


def credits(gateway: GatewayProcess, auth: dict[str, str]) -> int:
    return httpx.get(f"{gateway.base_url}/credits", headers=auth).json()["credits"]


def standin_jobs(standin: str) -> list[dict[str, Any]]:
    return httpx.get(f"{standin}/local/_test/jobs", headers={"Authorization": "Bearer x"}).json()


def assert_books_balance(gateway: GatewayProcess, standin: str) -> None:
    assert "0 problems" in manage(gateway.env, "audit")
    shown = manage(gateway.env, "show", "user_crash")
    for runpod_job in standin_jobs(standin):
        assert f"runpod={runpod_job['id']}" in shown, f"RunPod job without a record: {runpod_job}"


class TestCrashDuringCreate:
    def test_after_the_charge(self, gateway: GatewayProcess, standin: str) -> None:
        gateway.start(GATEWAY_CRASH_POINT="after_charge")
        auth = headers(gateway)
        create_and_die(gateway, auth)
        gateway.start()
        # Nothing reached RunPod; the job cannot be shown safe to resubmit, so it is failed
        # and refunded once it is past any deadline RunPod could still have run it by.
        (job,) = settled_jobs(gateway, auth)
        assert (job["status"], job["error"]["code"]) == ("failed", "DEADLINE_EXCEEDED")
        assert credits(gateway, auth) == 100
        assert standin_jobs(standin) == []
        assert_books_balance(gateway, standin)

    @pytest.mark.parametrize("standin", [HELD], indirect=True)
    def test_after_runpod_accepted(self, gateway: GatewayProcess, standin: str) -> None:
        # The worker uploads to the gateway (local storage), so it must not run while the
        # gateway is down: a restart on a loaded CI machine outlasted a 9 s render and the
        # upload's retries. The job waits in RunPod's queue until the gateway is back, as a
        # job can on RunPod; the deadline is long enough for the slowest restart seen.
        slow = {"RUNPOD_JOB_TTL_SECONDS": "60"}
        gateway.start(GATEWAY_CRASH_POINT="after_submit", **slow)
        auth = headers(gateway)
        create_and_die(gateway, auth)
        gateway.start(**slow)
        release(standin)
        # RunPod runs the job anyway; its webhook names our job, and the id gets recorded.
        (job,) = settled_jobs(gateway, auth)
        assert job["status"] == "done", job
        assert credits(gateway, auth) == 100 - JOB["durationSec"]
        video = httpx.get(job["r2Url"])
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        assert_books_balance(gateway, standin)


class TestCrashDuringWebhook:
    def test_webhook_redelivered_after_restart(self, gateway: GatewayProcess, standin: str):
        gateway.start(GATEWAY_CRASH_POINT="during_webhook")
        auth = headers(gateway)
        created = httpx.post(f"{gateway.base_url}/jobs/create", json=JOB, headers=auth)
        assert created.status_code == 200
        assert gateway.wait_dead(timeout=30) == -9
        gateway.start()
        (job,) = settled_jobs(gateway, auth)
        assert job["jobId"] == created.json()["jobId"] and job["status"] == "done"
        assert credits(gateway, auth) == 100 - JOB["durationSec"]
        assert_books_balance(gateway, standin)
