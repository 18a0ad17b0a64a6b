"""Real processes on loopback for end-to-end tests: a gateway under uvicorn on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# Settings a developer's shell might export; the tests decide every backend themselves.
_SCRUBBED_PREFIXES = ("CLERK_", "RUNPOD_", "R2_", "CONVEX_", "GATEWAY_", "PUBLIC_BASE_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(settings)
    return env


def wait_until_healthy(
    base_url: str, process: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {base_url} did not become healthy")


class GatewayProcess:
    """A real `uvicorn main:app` on a fixed loopback port, which tests may kill and restart."""

    def __init__(self, data_dir: Path, **settings: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.env = clean_env(
            GATEWAY_ENV="local",
            LOCAL_DATA_DIR=str(data_dir),
            PUBLIC_BASE_URL=self.base_url,
            **settings,
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, **overrides: str) -> None:
        data_dir = self.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, **overrides}
        command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
        log = open(data_dir.parent / f"gateway-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until_healthy(self.base_url, self.process)

    def wait_dead(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def running_gateway(data_dir: Path, **settings: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Start `uvicorn main:app` as a real process; yields its base URL and environment."""
    gateway = GatewayProcess(data_dir, **settings)
    gateway.start()
    try:
        yield gateway.base_url, gateway.env
    finally:
        gateway.stop()


@contextmanager
def running_standin(
    render_seconds: float, webhook_retry_delay: float, *, hold_jobs: bool = False
) -> Iterator[str]:
    """The RunPod stand-in in its own process, so it outlives a gateway that is killed."""
    port = free_port()
    command = [
        sys.executable, "local_runpod.py", "--host", "127.0.0.1", "--port", str(port),
        "--render-seconds", str(render_seconds), "--webhook-retry-delay", str(webhook_retry_delay),
        *(["--hold-jobs"] if hold_jobs else []),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=clean_env())
    base = f"http://127.0.0.1:{port}/v2"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{base}/local/health", headers={"Authorization": "Bearer x"})
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def manage(env: dict[str, str], *args: str) -> str:
    """Run an operator command exactly as the README shows it."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


@contextmanager
def running_convex_server() -> Iterator[str]:
    """The real `convex/` functions under convex-test, behind Convex's HTTP API shape."""
    command = ["node", "--import", "tsx", "tests/convex_server/server.mjs", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"convex test server did not start: {line!r}")
        yield f"http://127.0.0.1:{line.split()[1]}"
    finally:
        process.terminate()
        process.wait(timeout=10)
