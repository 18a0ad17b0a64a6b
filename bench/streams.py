"""1,000 open event streams on one gateway on loopback: what they cost and how fast news arrives.

    make bench-streams        (writes bench/STREAMS.md and bench/out/streams.json)

One gateway in local mode (SQLite, the in-process RunPod stand-in). The client is raw asyncio
sockets, not httpx, so that a thousand connections cost the client little on the same 2 cores:

1. memory: the gateway's RSS before and after opening the streams (one `GET /jobs/events` per
   user, 1,000 users), per stream;
2. idle: for a window with every stream open and nothing happening, the store reads per second
   (the gateway's own `/metrics`, operation `jobs_updated_since`) and the gateway's CPU;
3. news: jobs created at a steady rate by some of those users, rendered and finished by the
   stand-in, whose webhook moves them to done. Each `job` event's delay is its arrival time
   minus the job's `updatedAt` (the moment the store wrote the change); p50, p99, max;
4. shutdown: SIGTERM with every stream open; the time until the last stream has ended and
   until the process has exited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from auth import mint_dev_token
from bench.processes import cpu_seconds, rss_kib
from tests.servers import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
STREAM_READS = ("gateway_upstream_request_duration_seconds", "jobs_updated_since")


@dataclass
class Stream:
    """One open `GET /jobs/events`, read as chunked SSE off a raw socket."""

    user_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    delays_ms: list[float] = field(default_factory=list)
    ended_at: float | None = None


async def open_stream(port: int, user_id: str, token: str) -> Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"GET /jobs/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    writer.write(request.encode())
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{user_id}: {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # the headers
    return Stream(user_id, reader, writer)


async def read_events(stream: Stream) -> None:
    """Every chunk until the stream ends; each `job` event's delay since its write."""
    buffer = b""
    while size_line := await stream.reader.readline():
        size = int(size_line.strip() or b"0", 16)
        chunk = await stream.reader.readexactly(size + 2)
        if size == 0:
            break
        buffer += chunk[:-2].replace(b"\r\n", b"\n")  # the events' lines end in CRLF
        *events, buffer = buffer.split(b"\n\n")
        arrived = time.time() * 1000
        for event in events:
            record_delay(stream, event, arrived)
    stream.ended_at = time.perf_counter()


def record_delay(stream: Stream, event: bytes, arrived_ms: float) -> None:
    lines = event.decode().split("\n")
    if "event: job" not in lines:
        return
    data = next(line[len("data: ") :] for line in lines if line.startswith("data: "))
    updated = datetime.fromisoformat(json.loads(data)["updatedAt"].replace("Z", "+00:00"))
    stream.delays_ms.append(arrived_ms - updated.timestamp() * 1000)


def metric(base_url: str, name: str, operation: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_count" and sample.labels.get("operation") == operation:
                total += sample.value
    return total


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def create_jobs(base_url: str, tokens: list[str], rate: float) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for token in tokens:
            headers = {"Authorization": f"Bearer {token}"}
            body = {"prompt": "bench", "durationSec": 1}
            answer = await client.post("/jobs/create", json=body, headers=headers)
            answer.raise_for_status()
            await asyncio.sleep(1 / rate)


async def measure(args: argparse.Namespace, gateway: GatewayProcess) -> dict[str, Any]:
    assert gateway.process is not None
    pid, base = gateway.process.pid, gateway.base_url
    users = [f"user_s{i:04d}" for i in range(args.streams)]
    tokens = [mint_dev_token(gateway.data_dir, user, ttl_seconds=3600) for user in users]
    httpx.get(
        f"{base}/credits", headers={"Authorization": f"Bearer {tokens[0]}"}
    ).raise_for_status()
    rss_before = rss_kib(pid)
    streams: list[Stream] = []
    for start in range(0, len(users), 100):  # in batches, as a crowd of clients would arrive
        batch = zip(users[start : start + 100], tokens[start : start + 100], strict=True)
        streams += await asyncio.gather(*(open_stream(gateway.port, u, t) for u, t in batch))
    readers = [asyncio.create_task(read_events(stream)) for stream in streams]
    await asyncio.sleep(2)  # let the first events and allocations settle
    rss_open = rss_kib(pid)

    reads0, cpu0, t0 = metric(base, *STREAM_READS), cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(args.idle_seconds)
    reads1, cpu1, t1 = metric(base, *STREAM_READS), cpu_seconds(pid), time.perf_counter()

    cpu2, t2 = cpu_seconds(pid), time.perf_counter()
    await create_jobs(base, tokens[: args.jobs], args.rate)
    await asyncio.sleep(args.settle_seconds)  # the last jobs render and finish
    cpu3, t3 = cpu_seconds(pid), time.perf_counter()
    delays = [d for stream in streams for d in stream.delays_ms]

    signalled = time.perf_counter()
    gateway.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*readers), timeout=30)
    last_stream_end = max(s.ended_at or signalled for s in streams) - signalled
    exit_code = await asyncio.to_thread(gateway.process.wait, 30)
    exited = time.perf_counter() - signalled
    for stream in streams:
        stream.writer.close()
    return {
        "streams": len(streams),
        "rss_before_kib": rss_before,
        "rss_open_kib": rss_open,
        "kib_per_stream": (rss_open - rss_before) / len(streams),
        "idle_seconds": t1 - t0,
        "idle_store_reads_per_second": (reads1 - reads0) / (t1 - t0),
        "idle_cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
        "jobs": args.jobs,
        "job_rate_per_second": args.rate,
        "busy_cpu_percent": 100 * (cpu3 - cpu2) / (t3 - t2),
        "events": len(delays),
        "delay_ms_p50": statistics.median(delays) if delays else None,
        "delay_ms_p99": percentile(delays, 0.99) if delays else None,
        "delay_ms_max": max(delays) if delays else None,
        "sigterm_last_stream_ended_s": last_stream_end,
        "sigterm_process_exited_s": exited,
        "exit_code": exit_code,
        "poll_interval_s": args.poll_interval,
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    mib = f"{r['rss_before_kib'] / 1024:.1f} MiB / {r['rss_open_kib'] / 1024:.1f} MiB"
    delays = f"{r['delay_ms_p50']:.0f} / {r['delay_ms_p99']:.0f} / {r['delay_ms_max']:.0f} ms"
    busy = f"{r['jobs']} jobs ran ({r['job_rate_per_second']}/s created, rendered, finished)"
    sigterm = f"{r['sigterm_last_stream_ended_s']:.2f} s / {r['sigterm_process_exited_s']:.2f} s"
    reads = f"{r['idle_store_reads_per_second']:.2f} (poll interval {r['poll_interval_s']} s)"
    return [
        ("open streams (`GET /jobs/events`, one per user)", str(r["streams"])),
        ("gateway RSS before / with the streams open", mib),
        ("memory per open stream", f"{r['kib_per_stream']:.1f} KiB"),
        ("store reads per second, idle, all streams together", reads),
        ("gateway CPU, idle with every stream open", f"{r['idle_cpu_percent']:.1f} % of a core"),
        (f"gateway CPU while {busy}", f"{r['busy_cpu_percent']:.1f} % of a core"),
        ("`job` events received", str(r["events"])),
        ("change -> event delay, p50 / p99 / max", delays),
        ("SIGTERM -> last stream ended / process exited", sigterm),
    ]


def report(result: dict[str, Any], command: str) -> str:
    table = "\n".join(f"| {label} | {value} |" for label, value in rows(result))
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}"
    return f"""# Event streams under load

Written by `{command}` (bench/streams.py); edit the harness, not this file. Raw numbers:
`bench/out/streams.json`. {when}, one gateway in local mode (SQLite, the in-process
RunPod stand-in) on loopback, on a 2-CPU machine shared with other work: read the figures as
orders of magnitude.

| what | measured |
| --- | --- |
{table}

The delay runs from the store write (the job's `updatedAt`: its creation, or the webhook that
finished it) to the event's arrival at the client: about half the poll interval on average,
plus the read and the rendering. The store reads are one per interval, whatever the number of
streams. The busy CPU includes the stand-in's rendering of each test video.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="jobs created per second")
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "STREAMS.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "out" / "streams.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        gateway = GatewayProcess(
            Path(scratch) / "data",
            LOCAL_RENDER_SECONDS="1",
            STREAMS_PER_INSTANCE=str(args.streams + 100),
            STREAM_POLL_INTERVAL_SECONDS=str(args.poll_interval),
            MAX_CONCURRENT_JOBS="1000",
            ACCESS_LOG="errors",
        )
        gateway.start()
        try:
            result = asyncio.run(measure(args, gateway))
        finally:
            gateway.stop()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    args.output.write_text(report(result, "make bench-streams"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
