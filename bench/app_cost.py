"""The cost of one request inside the app alone: the gateway's ASGI app against the baseline's.

    .venv/bin/python -m bench.app_cost               # wall time
    .venv/bin/python -m bench.app_cost --clock cpu   # CPU time: steadier on a shared machine

Calls each app directly with in-memory ASGI requests: no sockets, no uvicorn, no load
generator. Each figure is the fastest of several repeats of a batch, so it holds steady on a
shared machine where the HTTP benchmark drifts, and it isolates what the gateway's own code
adds to the framework's. The gateway runs as in `make bench`: local mode, seeded, RunPod stand-in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.fixtures import (
    CREATE_BODY,
    JSON,
    USER,
    Fixtures,
    gateway_settings,
    prepare_store,
    runpod_id_of,
    webhook_body,
)
from bench.processes import ProcessGroups, minimal_env
from models import object_key_for
from webhooks import sign_body

App = Any  # an ASGI app; FastAPI's own type would tie this tool to its internals
BATCH = 2000
REPEATS = 7
CONCURRENCY = (1, 16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.app_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH, help="requests per timed batch")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="batches; the fastest counts")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (all its threads): steadier on a busy machine",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with ProcessGroups() as procs, tempfile.TemporaryDirectory(prefix="cineweave-cost-") as tmp:
        scratch = Path(tmp)
        data_dir, logs = scratch / "data", scratch / "logs"
        logs.mkdir()
        fixtures = prepare_store(data_dir)
        runpod = procs.start_server(
            "runpod", "bench.runpod_stub:app", minimal_env(), scratch, logs / "runpod.log"
        )
        # The gateway reads its settings when `main` is imported: set them first.
        os.environ.update(gateway_settings(data_dir, 8000, runpod.port, fixtures.secret))
        # The gateway logs to whatever sys.stdout is: /dev/null here, so a terminal's speed is
        # not measured (as a server, its lines go to a pipe or a file). Results go to the real one.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            _run(measure_all(args, fixtures, data_dir))
    return 0


def show(line: str) -> None:
    print(line, file=sys.__stdout__, flush=True)


def _run(coroutine: Any) -> None:
    import uvloop  # the servers under test run on uvloop too

    uvloop.run(coroutine)


async def measure_all(args: argparse.Namespace, fixtures: Fixtures, data_dir: Path) -> None:
    from bench.baseline import app as baseline
    from main import app as gateway

    show(
        f"{'route':16} {'conns':>5} {'gateway us':>11} {'baseline us':>12} {'added us':>9}"
        f" {'ratio':>6}"
    )
    async with gateway.router.lifespan_context(gateway) as gateway_state:
        async with baseline.router.lifespan_context(baseline) as baseline_state:
            job_id = await seed_done_job(gateway, gateway_state or {}, fixtures, data_dir)
            for label, request in measured_requests(fixtures, data_dir, job_id):
                for connections in CONCURRENCY:
                    apps = ((gateway, gateway_state or {}), (baseline, baseline_state or {}))
                    ours, bare = await costs(apps, request, connections, args)
                    show(
                        f"{label:16} {connections:5} {ours:11.1f} {bare:12.1f} {ours - bare:9.1f}"
                        f" {bare / ours:5.2f}x"
                    )


def measured_requests(fixtures: Fixtures, data_dir: Path, job_id: str) -> list[tuple[str, Request]]:
    """The reads, and the signed COMPLETED webhook sent again for the done job (as the bench
    sends it: each one a replay the store finds unchanged)."""
    auth = {"Authorization": f"Bearer {fixtures.token}"}
    done = webhook_body(job_id, runpod_id_of(data_dir, job_id), "COMPLETED")
    signed = {"X-RunPod-Signature": sign_body(fixtures.secret, done), "Content-Type": JSON}
    return [
        ("GET /credits", ("GET", "/credits", auth, b"")),
        ("GET /jobs/{id}", ("GET", f"/jobs/{job_id}", auth, b"")),
        ("GET /jobs", ("GET", "/jobs", auth, b"")),
        ("POST /webhooks", ("POST", "/webhooks/runpod", signed, done)),
    ]


async def seed_done_job(
    app: App, state: Mapping[str, Any], fixtures: Fixtures, data_dir: Path
) -> str:
    """One job through create, its video and a signed COMPLETED webhook."""
    headers = {"Authorization": f"Bearer {fixtures.token}", "Content-Type": JSON}
    status, body = await call(app, state, ("POST", "/jobs/create", headers, CREATE_BODY))
    job_id = json.loads(body)["jobId"]
    video = data_dir / "objects" / object_key_for(USER, job_id)
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"benchmark placeholder")
    done = webhook_body(job_id, runpod_id_of(data_dir, job_id), "COMPLETED")
    signed = {"X-RunPod-Signature": sign_body(fixtures.secret, done), "Content-Type": JSON}
    status, body = await call(app, state, ("POST", "/webhooks/runpod", signed, done))
    if status != 200 or json.loads(body)["status"] != "done":
        raise RuntimeError(f"seeding failed: {status} {body!r}")
    return str(job_id)


Request = tuple[str, str, dict[str, str], bytes]


async def costs(
    apps: Sequence[tuple[App, Mapping[str, Any]]],
    request: Request,
    connections: int,
    args: argparse.Namespace,
) -> list[float]:
    """Microseconds per request for each app: the fastest batch, `connections` requests in
    flight. The apps' batches alternate, so a burst of load on the shared machine falls on
    both rather than on whichever app was being measured then."""
    for app, state in apps:
        status, body = await call(app, state, request)
        if status != 200:
            raise RuntimeError(f"{request[1]} answered {status}: {body!r}")
    best = [float("inf")] * len(apps)
    for _ in range(args.repeats):
        for index, (app, state) in enumerate(apps):
            batch = await timed_batch(app, state, request, connections, args)
            best[index] = min(best[index], batch)
    return [value * 1e6 for value in best]


async def timed_batch(
    app: App, state: Mapping[str, Any], request: Request, connections: int, args: argparse.Namespace
) -> float:
    """Seconds per request over one batch of `args.batch` requests."""
    per_worker = args.batch // connections

    async def worker() -> None:
        for _ in range(per_worker):
            await call(app, state, request)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    started = clock()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return float((clock() - started) / (per_worker * connections))


async def call(app: App, state: Mapping[str, Any], request: Request) -> tuple[int, bytes]:
    method, path, headers, body = request
    answer: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    await app(_scope(method, path, headers, state), receive, send)
    return answer["status"], answer["body"]


def _scope(
    method: str, path: str, headers: dict[str, str], state: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        # As uvicorn does: each request gets a shallow copy of the lifespan's state.
        "state": dict(state),
    }


if __name__ == "__main__":
    raise SystemExit(main())
