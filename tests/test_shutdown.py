"""SIGTERM drain: the gateway stops taking connections, finishes what is in flight within 8 s,
closes its clients and exits 0, as Cloud Run needs before its SIGKILL 10 s after SIGTERM.

The gateway runs with the Dockerfile's exact CMD, as PID 1 of its own PID namespace (`unshare`),
as in the container. That matters: after a graceful shutdown uvicorn re-raises the signal so a
parent sees "terminated"; PID 1 has no default action for SIGTERM, so there it exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from auth import mint_dev_token
from tests.conftest import bearer
from tests.servers import ROOT, clean_env, free_port, manage, wait_until_healthy
from tests.test_container import ENDPOINT, FakeUpstream, dockerfile_command

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="needs Linux PID namespaces (unshare)"
    ),
]

DRAIN_LIMIT_SECONDS = 8.0  # the CMD's --timeout-graceful-shutdown
SIGKILL_AFTER_SECONDS = 10.0  # Cloud Run
USER = "user_drain"


@dataclass
class Container:
    process: subprocess.Popen[bytes]  # `unshare`, which waits for PID 1 and passes on its status
    pid1: int  # uvicorn, as the host sees it
    port: int
    env: dict[str, str]
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sigterm(self) -> float:
        os.kill(self.pid1, signal.SIGTERM)  # what Cloud Run sends to the container
        return time.monotonic()


def unshare() -> list[str]:
    command = ["unshare", "--pid", "--fork", "--kill-child"]
    # Without root, a user namespace is what allows a new PID namespace.
    return command if os.geteuid() == 0 else [*command, "--user", "--map-root-user"]


def child_pid(parent: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise TimeoutError("unshare started no child")


@contextmanager
def container(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Container]:
    """The gateway as the image runs it: the Dockerfile's CMD, PID 1, real RunPod HTTP."""
    port, data_dir, log = free_port(), tmp_path / "data", tmp_path / "gateway.log"
    env = clean_env(
        GATEWAY_ENV="local",
        LOCAL_DATA_DIR=str(data_dir),
        PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        RUNPOD_API_KEY="rp-test-key",
        RUNPOD_ENDPOINT_ID=ENDPOINT,
        RUNPOD_API_BASE=upstream.runpod_base,
        RECONCILER_ENABLED="false",
        PORT=str(port),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*unshare(), *dockerfile_command()], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        box = Container(process, child_pid(process.pid), port, env, log)
        wait_until_healthy(box.base_url, process)
        yield box
    finally:
        if process.poll() is None:
            process.kill()  # --kill-child takes PID 1 down with it
            process.wait()


def create_job(base_url: str, token: str) -> httpx.Response:
    body = {"prompt": "A slow drone over a neon city", "durationSec": 2, "seed": 7}
    return httpx.post(f"{base_url}/jobs/create", json=body, headers=bearer(token), timeout=30)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class TestDrain:
    def test_request_in_flight_finishes_then_the_process_exits_0(self, tmp_path: Path) -> None:
        with FakeUpstream(run_delay=2.0) as upstream, container(tmp_path, upstream) as box:
            token = mint_dev_token(tmp_path / "data", USER)
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(create_job, box.base_url, token)
                assert upstream.run_started.wait(10), "the create never reached RunPod"
                sent_at = box.sigterm()
                # A real uvicorn closes its socket some time after SIGTERM; nothing to wait on.
                time.sleep(0.5)
                assert refused(box.port), "a new connection was accepted after SIGTERM"
                assert not in_flight.done()  # it really was in flight while we were refused
                response = in_flight.result(timeout=DRAIN_LIMIT_SECONDS)
            exit_code = box.process.wait(timeout=SIGKILL_AFTER_SECONDS)
            drained_in = time.monotonic() - sent_at

        assert response.status_code == 200, response.text
        job_id = response.json()["jobId"]
        print(f"\nDRAIN {drained_in:.2f}s exit={exit_code}")
        assert exit_code == 0
        assert drained_in < DRAIN_LIMIT_SECONDS
        log = box.log.read_text()
        assert "shutdown complete" in log
        assert "Traceback" not in log
        # Consistent afterwards: charged once, the job recorded with RunPod's id, ledger sound.
        assert upstream.calls("POST", "/run") == 1
        shown = manage(box.env, "show", USER)
        assert shown.splitlines()[0] == f"{USER}: 98 credits (starter)"
        assert job_id in shown and "runpod=rp-fake-1" in shown and "queued" in shown
        assert "0 problems" in manage(box.env, "audit")

    def test_a_stuck_request_cannot_hold_it_past_the_sigkill(self, tmp_path: Path) -> None:
        with FakeUpstream(run_delay=60.0) as upstream, container(tmp_path, upstream) as box:
            token = mint_dev_token(tmp_path / "data", USER)
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(create_job, box.base_url, token)
                assert upstream.run_started.wait(10), "the create never reached RunPod"
                sent_at = box.sigterm()
                exit_code = box.process.wait(timeout=SIGKILL_AFTER_SECONDS)
                drained_in = time.monotonic() - sent_at
                with pytest.raises(httpx.HTTPError):
                    in_flight.result(timeout=5).raise_for_status()

        print(f"\nDRAIN {drained_in:.2f}s exit={exit_code}")
        assert exit_code == 0
        assert DRAIN_LIMIT_SECONDS <= drained_in < SIGKILL_AFTER_SECONDS - 0.5
        assert "shutdown complete" in box.log.read_text()
        # Cut off after the charge, the job waits for its webhook or deadline; nothing is lost.
        assert "0 problems" in manage(box.env, "audit")
