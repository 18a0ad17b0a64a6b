"""Load generators: wrk when it is installed, else a raw-asyncio HTTP/1.1 loop in this process.

Both are closed-loop: each connection sends its next request when the previous answer arrives,
so latency percentiles are those of answered requests at that concurrency (no coordinated-
omission correction). Any answer of 400 or more, and any socket error, counts as an error.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.processes import LOOPBACK, ProcessGroups, minimal_env

LUA_SCRIPT = Path(__file__).resolve().parent / "request.lua"
# Longer than any answer should take: a slow answer must show in p99, not vanish as a timeout.
REQUEST_TIMEOUT_SECONDS = 10
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class RequestSpec:
    """One route's request; requests go round `variants` (header sets, e.g. one per user)."""

    method: str
    path: str
    body: bytes | None = None
    variants: Sequence[dict[str, str]] = field(default_factory=lambda: [{}])


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # CPU seconds the server under test used during the measured seconds (all its threads), and
    # the upstreams it called (production mode's Convex imitation); the harness fills them in.
    cpu_seconds: float = 0.0
    upstream_cpu_seconds: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        """The server's CPU per answered request, in µs: what one core's capacity is made of."""
        return self.cpu_seconds / self.requests * 1e6 if self.requests else float("nan")

    @property
    def upstream_cpu_us(self) -> float:
        return self.upstream_cpu_seconds / self.requests * 1e6 if self.requests else float("nan")


class Generator(Protocol):
    label: str

    def run(self, port: int, spec: RequestSpec, connections: int, seconds: int) -> LoadResult: ...


# --- wrk ----------------------------------------------------------------------------------------


class Wrk:
    """wrk with one thread: on a 2-core machine the server under test needs the other core."""

    def __init__(self, executable: str, procs: ProcessGroups, workdir: Path) -> None:
        self._executable = executable
        self._procs = procs
        self._workdir = workdir
        self.label = f"{_wrk_version(executable)} (1 thread, closed loop, Lua: bench/request.lua)"

    def run(self, port: int, spec: RequestSpec, connections: int, seconds: int) -> LoadResult:
        headers_file = self._workdir / "headers.tsv"
        headers_file.write_text("".join(_header_line(headers) for headers in spec.variants))
        env = minimal_env(
            BENCH_METHOD=spec.method, BENCH_PATH=spec.path, BENCH_HEADERS_FILE=str(headers_file)
        )
        if spec.body is not None:
            env["BENCH_BODY"] = spec.body.decode()
        command = [
            self._executable,
            *("-t1", f"-c{connections}", f"-d{max(1, seconds)}s"),
            *(f"--timeout={REQUEST_TIMEOUT_SECONDS}s", "-s", str(LUA_SCRIPT)),
            f"http://{LOOPBACK}:{port}{spec.path}",
        ]
        output = self._procs.run(command, env, timeout=seconds + 60)
        return _parse_wrk(output)


def _wrk_version(executable: str) -> str:
    # `wrk --version` prints e.g. "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." and exits 1.
    done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10)
    words = (done.stdout or done.stderr).split()
    return " ".join(words[:2]) if words else "wrk"


def _header_line(headers: dict[str, str]) -> str:
    return "\t".join(f"{name}: {value}" for name, value in headers.items()) + "\n"


def _parse_wrk(output: str) -> LoadResult:
    line = next((x for x in output.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    raw = json.loads(line.removeprefix("BENCH_RESULT "))
    errors = sum(raw[name] for name in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=errors,
        p50_ms=raw["p50_us"] / 1000,
        p95_ms=raw["p95_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
    )


# --- The Python fallback -----------------------------------------------------------------------


class PythonLoad:
    """Raw HTTP/1.1 keep-alive over asyncio streams: far cheaper per request than an HTTP client.

    It runs in the harness process and needs more CPU per request than wrk, so on a small
    machine it takes more from the server under test: compare ratios, not absolute numbers.
    """

    label = "python asyncio fallback (raw HTTP/1.1 keep-alive, closed loop; wrk not found)"

    def run(self, port: int, spec: RequestSpec, connections: int, seconds: int) -> LoadResult:
        requests = [_encode_request(spec, headers, port) for headers in spec.variants]
        return _run_loop(_drive(port, requests, connections, seconds))


def _run_loop(coroutine: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _encode_request(spec: RequestSpec, headers: dict[str, str], port: int) -> bytes:
    lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {LOOPBACK}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if spec.body is not None:
        lines.append(f"Content-Length: {len(spec.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (spec.body or b"")


@dataclass
class _Tally:
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0


async def _drive(port: int, requests: list[bytes], connections: int, seconds: int) -> LoadResult:
    tally = _Tally()
    started = time.perf_counter()
    deadline = started + seconds
    workers = [_connection(port, requests, i, deadline, tally) for i in range(connections)]
    await asyncio.gather(*workers)
    return _summarise(tally, time.perf_counter() - started)


async def _connection(
    port: int, requests: list[bytes], offset: int, deadline: float, tally: _Tally
) -> None:
    index = offset
    while time.perf_counter() < deadline:
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            tally.errors += 1
            await asyncio.sleep(0.01)
            continue
        try:
            index = await _exchange_until(reader, writer, requests, index, deadline, tally)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            tally.errors += 1  # the connection broke: count it and open another
        finally:
            writer.close()


async def _exchange_until(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    requests: list[bytes],
    index: int,
    deadline: float,
    tally: _Tally,
) -> int:
    while time.perf_counter() < deadline:
        request = requests[index % len(requests)]
        index += 1
        sent = time.perf_counter_ns()
        writer.write(request)
        status = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_SECONDS)
        tally.latencies_ns.append(time.perf_counter_ns() - sent)
        if status >= 400:
            tally.errors += 1
    return index


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD_BYTES:
        raise ValueError("response head too large")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return int(status_line.split(" ", 2)[1])


def _summarise(tally: _Tally, seconds: float) -> LoadResult:
    ordered = sorted(tally.latencies_ns)

    def percentile_ms(p: float) -> float:
        if not ordered:
            return 0.0
        rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[rank] / 1e6

    return LoadResult(
        requests=len(ordered),
        seconds=seconds,
        errors=tally.errors,
        p50_ms=percentile_ms(50),
        p95_ms=percentile_ms(95),
        p99_ms=percentile_ms(99),
    )


def pick_generator(choice: str, procs: ProcessGroups, workdir: Path) -> Generator:
    """wrk when asked for or found on PATH; the Python loop otherwise (or when asked for)."""
    executable = shutil.which("wrk")
    if choice == "wrk" and executable is None:
        raise SystemExit("--generator wrk: wrk is not installed (make bench installs it)")
    if choice != "python" and executable is not None:
        return Wrk(executable, procs, workdir)
    return PythonLoad()
