"""BENCHMARKS.md: the machine, the results as ratios to the baseline, the goals, and the scale."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.results import GOALS, Measurement, Results, ratio
from bench.scale import scale_on_paper

PERCENTILES = (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"))
# Each pair's measured seconds are cut into this many slices, the two servers alternating.
SLICES = 3


def slicing(duration: int) -> tuple[int, int]:
    """How many slices, of how many whole seconds, a run of `duration` seconds is measured in."""
    slices = SLICES if duration >= SLICES else 1
    return slices, duration // slices


def _slices_text(duration: int) -> str:
    slices, seconds = slicing(duration)
    if slices == 1:
        return f"{seconds} s measured"
    return f"{slices} alternating slices of {seconds} s measured"


# A run where more than this share of requests failed measured an error path, not the route.
MAX_ERROR_SHARE = 0.01


SERVER_PACKAGES = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools")


def machine(server_python: Path | None = None) -> list[list[str]]:
    """What the numbers were measured on."""
    python = server_python or Path(sys.executable)
    return [
        ["CPUs (`nproc`)", str(len(os.sched_getaffinity(0)))],
        ["CPU model", _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "?"],
        ["memory", _memory()],
        ["kernel", platform.release()],
        ["Python", platform.python_version()],
        ["servers' Python", _shown(python)],
        ["packages", ", ".join(_versions(python, *SERVER_PACKAGES))],
    ]


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _proc_field(path: str, name: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def _memory() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal") or "0 kB"
    return f"{int(total.split()[0]) / 1024**2:.1f} GiB"


def _versions(python: Path, *names: str) -> list[str]:
    """The versions installed where `python` runs: the servers' venv, not the harness's."""
    script = (
        "import sys\nfrom importlib import metadata\nfor name in sys.argv[1:]:\n"
        "    try: print(name, metadata.version(name))\n"
        "    except metadata.PackageNotFoundError: pass"
    )
    out = subprocess.run(
        [str(python), "-c", script, *names], capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")[:-1]


def _shown(python: Path) -> str:
    root = Path(__file__).resolve().parent.parent
    absolute = python.absolute()
    return f"`{absolute.relative_to(root) if absolute.is_relative_to(root) else absolute}`"


def _num(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}×"


# --- Tables -------------------------------------------------------------------------------------


def goals_table(results: Results) -> list[str]:
    rows = ["| goal | target | measured (by connections) | met |", "| --- | --- | --- | --- |"]
    for goal in GOALS:
        values = goal.values(results)
        measured = ", ".join(_x(v) if k == "all" else f"{k}: {_x(v)}" for k, v in values.items())
        met = {True: "met", False: "**not met**", None: "not measured"}[goal.met(results)]
        if goal.target is None and measured:
            met = "no goal"
        rows.append(f"| {goal.label} | {goal.target_text} | {measured or '-'} | {met} |")
    return rows


def load_table(results: Results, mode: str) -> list[str]:
    header = "| route | conns | gateway req/s | baseline req/s | req/s ratio |"
    divider = "| --- | ---: | ---: | ---: | ---: |"
    for name, _ in PERCENTILES:
        header += f" {name} ms gateway / baseline (ratio) |"
        divider += " ---: |"
    header += " CPU µs/request gateway / baseline (requests per CPU-second ratio) |"
    divider += " ---: |"
    if mode == "production":
        header += " Convex imitation CPU µs/request gateway / baseline |"
        divider += " ---: |"
    rows = [header + " errors gateway / baseline |", divider + " ---: |"]
    rows += [_load_row(m) for m in results.measurements if m.mode == mode]
    return rows


def _load_row(m: Measurement) -> str:
    cells = [
        m.label,
        str(m.connections),
        _num(m.gateway.rps),
        _num(m.baseline.rps),
        _x(m.rps_ratio),
    ]
    for _, field in PERCENTILES:
        gateway, baseline = getattr(m.gateway, field), getattr(m.baseline, field)
        cells.append(f"{gateway:.2f} / {baseline:.2f} ({_x(m.latency_ratio(field))})")
    cells.append(f"{_num(m.gateway.cpu_us)} / {_num(m.baseline.cpu_us)} ({_x(m.cpu_ratio)})")
    if m.mode == "production":
        cells.append(f"{_num(m.gateway.upstream_cpu_us)} / {_num(m.baseline.upstream_cpu_us)}")
    cells.append(f"{_errors(m.gateway.errors, m.gateway.requests)} / {m.baseline.errors}")
    return "| " + " | ".join(cells) + " |"


def _errors(errors: int, requests: int) -> str:
    suspect = requests and errors / requests > MAX_ERROR_SHARE
    return f"**{errors}**" if suspect else str(errors)


def process_table(results: Results) -> list[str]:
    rows = ["| mode | measure | gateway | baseline | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    for mode in results.cold_start:
        samples = results.cold_start[mode]
        gateway, baseline = (results.median_cold_start(mode, n) for n in ("gateway", "baseline"))
        label = f"cold start to first 200 on /healthz, median of {len(samples['gateway'])} (ms)"
        spread = f"{label}; all: {_samples(samples['gateway'])} / {_samples(samples['baseline'])}"
        rows.append(_process_row(mode, spread, gateway * 1000, baseline * 1000, 0))
        for label, values in (
            ("RSS right after start, VmHWM (MiB)", results.start_rss.get(mode)),
            ("peak RSS after the load, VmHWM (MiB)", results.peak_rss.get(mode)),
        ):
            if values:
                gateway, baseline = values["gateway"] / 1024, values["baseline"] / 1024
                rows.append(_process_row(mode, label, gateway, baseline, 1))
    return rows


def _samples(seconds: list[float]) -> str:
    return ", ".join(f"{value * 1000:.0f}" for value in seconds)


def create_cpu_table(results: Results) -> list[str]:
    """Create has no ratio goal: its CPU per request, and what one core sustains with it."""
    rows = [
        "| mode | conns | gateway CPU µs/request | creates per CPU-second | creates/s measured |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode in results.modes:
        for m in results.for_route("create", mode):
            per_second = 1e6 / m.gateway.cpu_us if m.gateway.cpu_us else math.nan
            cells = (mode, str(m.connections), _num(m.gateway.cpu_us), _num(per_second))
            rows.append("| " + " | ".join(cells) + f" | {_num(m.gateway.rps)} |")
    return rows


def _process_row(mode: str, label: str, gateway: float, baseline: float, digits: int) -> str:
    cells = (
        mode,
        label,
        _num(gateway, digits),
        _num(baseline, digits),
        _x(ratio(gateway, baseline)),
    )
    return "| " + " | ".join(cells) + " |"


# --- The document -------------------------------------------------------------------------------


def render(results: Results, plot: Path | None, output: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "The gateway as a ratio to the limit it runs on: a bare FastAPI app answering a constant",
        "JSON body, both under uvicorn with the same settings, measured in the same run.",
        "This file is written by `make bench` (`bench/run.py`); edit the harness, not this file.",
        "The raw numbers land in `bench/out/results.json`; `.venv/bin/python -m bench.run",
        "--render-only` writes this file and the plot again from them.",
        "",
        "## Run",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in results.machine),
        f"| date | {results.date} |",
        f"| command | {results.command} |",
        f"| load generator | {results.generator} |",
        f"| per run | {results.warmup} s warm-up, then {_slices_text(results.duration)} |",
        f"| connections | {', '.join(map(str, results.connections))} |",
        f"| load average (1 min) before / after | {_load(results.load_average)} |",
        "",
        "## Goals",
        "",
        *goals_table(results),
        "",
        "A goal not met stands with a measured account of what holds it back in",
        "[bench/PROFILE.md](bench/PROFILE.md#what-holds-each-goal-back).",
        "",
        "## Results",
        "",
    ]
    for mode in results.modes:
        table = load_table(results, mode)
        lines += [f"### {mode.capitalize()} mode", "", *MODE_TEXT[mode], "", *table, ""]
    lines += [
        "### Create: CPU per request",
        "",
        *CREATE_TEXT,
        "",
        *create_cpu_table(results),
        "",
        "### Cold start and memory",
        "",
        *process_table(results),
        "",
    ]
    if plot is not None:
        lines += [f"![latency percentiles vs baseline]({_relative(plot, output)})", ""]
    lines += streams_section(Path(__file__).parent / "STREAMS.md", output)
    lines += METHOD + [""] + scale_on_paper(results)
    return "\n".join(lines) + "\n"


def streams_section(streams: Path, output: Path) -> list[str]:
    """The latest `make bench-streams` table, so that every load figure is in this one file.

    A separate run (it needs 1,000 connections, not wrk): its own date and machine are in
    bench/STREAMS.md, which this section names.
    """
    if not streams.exists():
        return []
    table = [line for line in streams.read_text().splitlines() if line.startswith("|")]
    return [
        "### Event streams",
        "",
        f"From the latest `make bench-streams` ([bench/STREAMS.md]({_relative(streams, output)}),",
        "its own run and date): 1,000 open streams on one instance in local mode.",
        "",
        *table,
        "",
    ]


def _load(values: list[float]) -> str:
    # Before the run it should be near 0; after, it includes the run's own ~2 busy processes.
    return " / ".join(f"{value:.2f}" for value in values) or "n/a"


def _relative(path: Path, output: Path) -> str:
    try:
        return str(path.resolve().relative_to(output.resolve().parent))
    except ValueError:
        return str(path)


MODE_TEXT = {
    "local": [
        "SQLite store, local storage, the dev token issuer; the baseline answers at once.",
    ],
    "production": [
        "`GATEWAY_ENV=production`: the Convex store behind the Convex imitation, moto's S3 server",
        "as R2, an RS256 key as Clerk's. The baseline makes one `gateway:getUser` query to the",
        "same imitation per request. The imitation (convex-test in node, one call at a time)",
        "spends more CPU per call than either server, shares their two cores, and sets both",
        "servers' req/s: their req/s ratio says more about the imitation than the gateway.",
        "Requests per CPU-second (the inverse of each server's own CPU per request) is what one",
        "Cloud Run vCPU sustains whatever the upstream, and the production goals are judged on",
        "it; req/s is reported beside it.",
    ],
}

CREATE_TEXT = [
    "No ratio goal: a create makes two or three outbound calls (two store transactions or",
    "Convex mutations and RunPod's `/run`), and the GPU fleet, not the gateway, bounds how many",
    "jobs can start. Creates per CPU-second is what one fully busy core sustains.",
]

METHOD = [
    "## How it is measured",
    "",
    "- Every process on 127.0.0.1, each on a free port, each in its own process group: the",
    "  gateway (`uvicorn main:app`, 1 worker), the baseline (`uvicorn bench.baseline:app`), both",
    "  with `--loop uvloop --http httptools --no-access-log --log-level warning`, and a RunPod",
    "  stand-in (`bench/runpod_stub.py`, raw ASGI) that answers `/run` with `IN_QUEUE` at once and",
    "  sends no webhooks, so RunPod's cost is next to nothing.",
    "- Both servers run from `.venv-serve`, a venv with `requirements.txt` only, as the",
    "  container ships (`make bench` builds it): the dev venv's extras would change what the",
    "  gateway imports (httpx loads its command-line tool when rich and click are installed).",
    "- Local mode: SQLite store, local video storage and the dev token issuer in a temporary",
    "  `LOCAL_DATA_DIR`, in a scratch working directory (no `.env` is read). Its baseline answers",
    "  each route's method and path with that route's gateway answer, encoded once at start.",
    "- Production mode (`bench/production.py`): `GATEWAY_ENV=production`, the reconciler off.",
    "  The store is Convex behind the project's Convex imitation",
    "  (`tests/convex_server/server.mjs`: the real `convex/` functions under convex-test, with",
    "  the transaction limits on); R2 is",
    "  moto's S3 server; Clerk is an RS256 key in `CLERK_JWT_KEY`, whose tokens the bench mints.",
    "  Its baseline is the same bare app plus one upstream call per request: a `gateway:getUser`",
    "  query to the same imitation through one `httpx.AsyncClient` with the gateway's Convex",
    "  client settings, its transport (`outbound_http.py`) and limits included. Each gateway",
    "  read makes exactly one Convex call too (getUser, getJob, findJob).",
    "- The fixtures are the same in both modes: credits granted to the users before the load",
    "  (SQLite directly, or the `grantCredits` mutation), and 20 jobs created through the API",
    "  and finished like real ones (the video stored, a signed `COMPLETED` webhook; in production",
    "  the gateway HEADs it on moto). `GET /jobs` returns that page of 20 done jobs, and",
    "  `GET /jobs/{id}` one of them with its download URL (already saved: the steady state).",
    "  Session tokens are verified once, then cached.",
    "- `POST /jobs/create` runs with `MAX_CONCURRENT_JOBS=1000000` and a billion credits per",
    "  user, and goes round 256 users: with one user, the create transaction would count",
    "  thousands of that user's queued jobs, which the production limit of 5 never allows.",
    "  Each create costs one store transaction (or Convex mutation) to charge, one HTTP call to",
    "  the stand-in and one transaction (or mutation) to record RunPod's id. It runs last in each",
    "  mode, so no other route reads a store it has grown.",
    "- `POST /webhooks/runpod` is signed (`X-RunPod-Signature` from `jobs.sign_body`, signed",
    "  afresh before every run for the 300 s tolerance) and reports `IN_PROGRESS` for a job that",
    "  is already done: verified, looked up, answered 200, nothing changed (the late-delivery",
    "  path, not a state change).",
    "- Requests to both servers carry the same headers and bodies, and both send the same bytes.",
    "- Every route and concurrency runs on the gateway and the baseline back to back, each",
    "  after its own warm-up, in 3 slices that alternate (ABBAAB), so drift and a burst of",
    "  load from elsewhere hit both alike. Requests and CPU are summed over the slices; each",
    "  latency percentile is the median of the slices'.",
    "- wrk and the fallback are closed-loop: latency is per answered request at that",
    "  concurrency. An answer of 400 or more counts as an error; a bold count means more than",
    "  1% failed and the row measured an error path.",
    "- CPU per request: the server process's user and system time (all its threads, from",
    "  `/proc/<pid>/stat`, 10 ms ticks) over the measured seconds, divided by the requests it",
    "  answered. Requests per CPU-second is its inverse: what one fully busy core serves.",
    "  In production mode the Convex imitation's CPU is shown the same way.",
    "- Cold start: from spawning `python -m uvicorn` to the first 200 on `/healthz`, polled every",
    "  5 ms, gateway and baseline alternating. RSS: `VmHWM` from `/proc/<pid>/status`.",
    "- The load generator shares the machine with the server under test: on 2 cores, wrk's one",
    "  thread takes one core while the server takes the other (and, in production mode, the",
    "  imitation takes its share). A load average above ~0.5 before the run means other work",
    "  shared the machine too; compare ratios, not req/s.",
    "- Where the gateway's time goes: `python -m bench.profile` samples it with py-spy under",
    "  the same load, and `python -m bench.client_cost` prices one outbound HTTP call;",
    "  [bench/PROFILE.md](bench/PROFILE.md) has the latest findings.",
    "- Open event streams (memory per stream, store reads, CPU, change-to-event delay): `make",
    "  bench-streams` writes [bench/STREAMS.md](bench/STREAMS.md).",
]
