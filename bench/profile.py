"""Profile the gateway under load with py-spy: where does a request's time go?

    pip install --target /tmp/pyspy py-spy        # not a project dependency
    .venv/bin/python -m bench.profile --py-spy /tmp/pyspy/bin/py-spy --routes credits,job

Sets the gateway up as `bench.run` does, drives each route with wrk (or the Python loop) while
py-spy samples the gateway process, and prints the functions with the most samples: inclusive
(the function and everything it called) and self (the function's own code). Only samples
of a thread holding the GIL count: that is the Python CPU time a single worker has to spend
(SQLite's own C code releases the GIL and does not show).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.fixtures import Route, gateway_answers, routes, seed_done_jobs
from bench.load import LoadResult
from bench.processes import ProcessGroups, minimal_env
from bench.run import Bench

TOP = 15
SAMPLE_RATE = 250  # per second: enough for a 10 s window, light enough not to skew it much


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy binary")
    parser.add_argument("--routes", default="credits,job")
    parser.add_argument("--mode", choices=("local", "production"), default="local")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks in this directory")
    parser.add_argument(
        "--wall", action="store_true", help="sample every thread, waiting or not (wall time)"
    )
    args = parser.parse_args(argv)
    if not args.py_spy:
        parser.error("py-spy not found: pass --py-spy PATH")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_args = argparse.Namespace(generator=args.generator)
    with ProcessGroups() as procs, tempfile.TemporaryDirectory(prefix="cineweave-prof-") as tmp:
        bench = Bench(procs, Path(tmp), run_args)
        bench.runpod_port = bench.start("runpod", "bench.runpod_stub:app", minimal_env()).port
        mode = bench.mode(args.mode)
        fixtures = mode.fixtures
        gateway = bench.start_gateway(mode)
        seed_done_jobs(gateway.base_url, mode.backend, fixtures)
        gateway_answers(gateway.base_url, fixtures)  # the steady state: URLs saved, tokens cached
        wanted = args.routes.split(",")
        for route in (r for r in routes(fixtures) if r.key in wanted):
            stacks = Path(args.out or tmp) / f"{route.key}.collapsed"
            stacks.parent.mkdir(parents=True, exist_ok=True)
            result = profile_route(args, bench, gateway.pid, gateway.port, route, stacks)
            print(f"\n=== {route.label}, {args.connections} connections: {result.rps:,.0f} req/s")
            print_profile(args, result, stacks)
    return 0


def profile_route(
    args: argparse.Namespace, bench: Bench, pid: int, port: int, route: Route, stacks: Path
) -> LoadResult:
    """Drive the route in a thread while py-spy samples the gateway; the load's result."""
    found: list[LoadResult] = []
    spec = route.spec()

    def drive() -> None:
        found.append(bench.generator.run(port, spec, args.connections, args.duration + 2))

    load = threading.Thread(target=drive)
    load.start()
    # --gil: idle threads (the thread pools wait in C) would otherwise fill the profile.
    mode = ["--idle"] if args.wall else ["--gil"]
    record = [args.py_spy, "record", "--pid", str(pid), *mode, "--nonblocking"]
    record += ["--rate", str(SAMPLE_RATE), "--duration", str(args.duration)]
    bench.procs.run([*record, "--format", "raw", "--output", str(stacks)], minimal_env(), 120)
    load.join()
    return found[0]


@dataclass
class Profile:
    total: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)


def print_profile(args: argparse.Namespace, load: LoadResult, stacks: Path) -> None:
    profile = summarise(stacks.read_text().splitlines())
    total = profile.total or 1
    if args.wall:
        print("    samples are wall time of every thread, waiting included")
    else:
        held = profile.total / (args.duration * SAMPLE_RATE)
        print(f"    ({1e6 / load.rps:,.0f} us a request); the GIL was held {held:.0%} of the time")
    print("--- samples by thread ---")
    for thread, count in profile.threads.most_common():
        print(f"{100 * count / total:5.1f}%  {thread}")
    for title, counts in (("inclusive", profile.inclusive), ("self", profile.own)):
        print(f"--- top {TOP} {title} (server and event-loop plumbing left out) ---")
        for frame, count in counts.most_common(TOP):
            print(f"{100 * count / total:5.1f}%  {frame}")


# Frames every sample of a thread shares: they say nothing about where a request's time goes.
PLUMBING = (
    "click/",
    "<frozen runpy>",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "uvicorn/__main__.py",
    "asyncio/runners.py",
    "threading.py",
    "futures/thread.py",
    "WorkerThread.run (",
)


def summarise(lines: list[str]) -> Profile:
    """GIL samples per function (file and name, any line), inclusive and self, and by thread."""
    profile = Profile()
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        profile.total += count
        profile.threads[_thread_kind(frames)] += count
        profile.own[frames[-1]] += count
        for frame in set(frames):
            if not any(marker in frame for marker in PLUMBING):
                profile.inclusive[frame] += count
    return profile


def _thread_kind(frames: list[str]) -> str:
    """Which of the gateway's threads a stack ran on, told by what it contains."""
    text = ";".join(frames)
    if "WorkerThread.run" in text:
        return "anyio worker threads (FastAPI runs sync `def` dependencies there)"
    if "_worker (futures/thread.py)" in text:
        return "ThreadPoolExecutor threads (the SQLite store's one thread)"
    return "event loop"


def _function(frame: str) -> str:
    # py-spy writes "name (path/to/file.py:123)": keep the name and the file, drop the line.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path else name


if __name__ == "__main__":
    raise SystemExit(main())
