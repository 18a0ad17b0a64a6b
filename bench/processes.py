"""The processes a benchmark starts: each in its own process group, all ended on the way out."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# The baseline and the gateway run under exactly these server settings.
SERVER_FLAGS = (
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
)
STOP_GRACE_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 60.0
HEALTH_POLL_SECONDS = 0.005


@dataclass
class Server:
    """A uvicorn process serving one app on loopback."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    started_at: float  # time.perf_counter() just before the process was spawned
    ready_after: float = 0.0  # seconds from spawning to the first 200 on /healthz

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def minimal_env(**settings: str) -> dict[str, str]:
    """Only what a Python process needs, plus `settings`: no developer setting leaks in."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    env.update(settings)
    return env


def uvicorn_command(app: str, port: int, python: Path | None = None) -> list[str]:
    # `--app-dir` lets the process run in a scratch directory, where no `.env` is read.
    command = [str(python or sys.executable), "-m", "uvicorn", app, "--app-dir", str(ROOT)]
    return [*command, "--host", LOOPBACK, "--port", str(port), *SERVER_FLAGS]


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The status of one plain GET, or None when nothing answers (raw socket: no client cost)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(request)
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


class ProcessGroups:
    """Starts processes in their own sessions and kills every group it started on exit.

    A process group per child means a Ctrl-C here never reaches a child half-way, and killing
    the group also ends anything the child spawned. SIGTERM becomes SystemExit, so `finally`
    blocks (and `__exit__`) run when `make` or a CI runner stops the harness.
    """

    def __init__(self, server_python: Path | None = None) -> None:
        # The interpreter (and so the venv) the servers run on; the harness's own by default.
        self.server_python = server_python
        self._processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []

    def __enter__(self) -> ProcessGroups:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # A shell starts background jobs with SIGINT ignored; Ctrl-C must still stop a run.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in reversed(self._processes):
            stop(process)
        self._processes.clear()

    def spawn(
        self, command: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append(process)
        return process

    def start_server(
        self,
        name: str,
        app: str,
        env: Mapping[str, str],
        cwd: Path,
        log: Path,
        port: int | None = None,
    ) -> Server:
        """Start `uvicorn app` on `port` (or a free one); returns once `/healthz` answers 200."""
        port = port or free_port()
        started_at = time.perf_counter()
        command = uvicorn_command(app, port, self.server_python)
        process = self.spawn(command, env, cwd, log)
        server = Server(name, process, port, started_at)
        server.ready_after = wait_until_healthy(server, log)
        return server

    def run(self, command: Sequence[str], env: Mapping[str, str], timeout: float) -> str:
        """Run a short-lived tool (wrk) to completion in its own group; returns its stdout."""
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._processes.append(process)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            self.stop(process)
        if process.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({process.returncode}): {err.decode()[-500:]}")
        return out.decode()

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop(process)
        if process in self._processes:
            self._processes.remove(process)


def wait_until_healthy(server: Server, log: Path) -> float:
    """Seconds from spawning to the first 200 on `/healthz`."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}; see {log}")
        if http_status(server.port, "/healthz") == 200:
            return time.perf_counter() - server.started_at
        time.sleep(HEALTH_POLL_SECONDS)
    raise TimeoutError(f"{server.name} did not answer /healthz; see {log}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is still there after a grace period."""
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # start_new_session: the group id is the child's pid
    except ProcessLookupError:
        pass


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far, in KiB."""
    return _status_field(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise LookupError(f"{name} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU the process (all its threads) has used so far."""
    # Fields after the command name, which is in parentheses and may hold spaces: utime is the
    # 12th and stime the 13th of them (proc(5) numbers them 14 and 15 from the pid).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until something accepts connections on `port` (an upstream with no `/healthz`)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}; see {log}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}; see {log}")
