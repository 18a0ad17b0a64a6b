"""`make bench`: the gateway measured as a ratio to a bare FastAPI app, into BENCHMARKS.md.

    .venv/bin/python -m bench.run                 # the full run: about 7 minutes
    .venv/bin/python -m bench.run --quick --output /tmp/b.md --plot /tmp/b.png

Starts a RunPod stand-in; then, for each mode, the gateway (seeded) and its baseline on loopback,
drives every route at each concurrency on both in alternating order, and measures cold starts;
then writes the tables, the goals and a plot. Local mode runs on SQLite; production mode on the
Convex imitation and moto's S3 server (bench/production.py), against a baseline that makes one
upstream call per request. Every process it starts is ended on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.fixtures import (
    Backend,
    Fixtures,
    LocalBackend,
    Route,
    gateway_answers,
    gateway_settings,
    prepare_store,
    routes,
    seed_done_jobs,
)
from bench.load import Generator, LoadResult, pick_generator
from bench.plot import write_plot
from bench.processes import (
    ROOT,
    ProcessGroups,
    Server,
    cpu_seconds,
    free_port,
    minimal_env,
    peak_rss_kib,
)
from bench.report import goals_table, machine, now_utc, render, slicing
from bench.results import MODES, Measurement, Results, results_from_json, results_to_json

DEFAULT_DURATION = 10
DEFAULT_WARMUP = 2
DEFAULT_CONNECTIONS = (1, 16, 64)
# 11: the median of 5 moved by 0.3x between runs of the same code on this shared machine.
DEFAULT_COLD_STARTS = 11
ROUTE_KEYS = ("credits", "job", "jobs", "webhook", "create")
# Production mode leaves out `GET /jobs`: one Convex query like the other reads, and 72 s more.
PRODUCTION_ROUTE_KEYS = ("credits", "job", "webhook", "create")
LOG_TAIL_LINES = 20
# Above this 1-minute load average something else is using a core the measurement needs.
BUSY_LOAD_AVERAGE = 0.5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n")[0])
    duration = int(os.environ.get("BENCH_DURATION", DEFAULT_DURATION))
    parser.add_argument("--duration", type=int, default=duration, help="seconds measured per run")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="seconds, 0 for none")
    parser.add_argument("--connections", type=_ints, default=list(DEFAULT_CONNECTIONS))
    parser.add_argument("--routes", type=_route_keys, default=list(ROUTE_KEYS))
    parser.add_argument("--cold-starts", type=int, default=DEFAULT_COLD_STARTS)
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="local,production")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--server-python",
        # absolute(), not resolve(): a venv's python is a symlink out of the venv.
        type=lambda text: Path(text).absolute(),
        default=None,
        help="the Python the servers run on (default: this one); `make bench` passes a venv "
        "with requirements.txt only, as the container ships",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 s per run, 1 connection, no warm-up: a smoke run"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "latency.png")
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "out" / "results.json",
        help="where the raw numbers are kept (default bench/out/results.json, not committed)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: write the report and plot again from --results",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.connections, args.cold_starts = 1, 0, [1], 1
    if args.duration < 1 or args.warmup < 0 or args.cold_starts < 1:
        parser.error("--duration and --cold-starts must be at least 1, --warmup at least 0")
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"modes are {MODES}")
    return modes


def _route_keys(text: str) -> list[str]:
    keys = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(keys) - set(ROUTE_KEYS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown routes {sorted(unknown)}; use {ROUTE_KEYS}")
    return keys


@dataclass
class Mode:
    """One mode's world: its fixtures, where it keeps videos, and how its servers are set."""

    name: str
    fixtures: Fixtures
    backend: Backend
    gateway_env: Callable[[int], dict[str, str]]  # by the gateway's port
    baseline_env: dict[str, str] = field(default_factory=dict)
    upstream_pids: list[int] = field(default_factory=list)  # their CPU is reported per request


class Bench:
    """One benchmark run in a scratch directory: the servers, the fixtures, the measurements."""

    def __init__(self, procs: ProcessGroups, scratch: Path, args: argparse.Namespace) -> None:
        self.procs, self.args = procs, args
        self.scratch = scratch
        self.data_dir = scratch / "data"
        # Servers run here, not in the repo: the gateway must not read a developer's `.env`.
        self.cwd = scratch / "cwd"
        self.logs = scratch / "logs"
        for directory in (self.data_dir, self.cwd, self.logs):
            directory.mkdir()
        self.generator: Generator = pick_generator(args.generator, procs, scratch)
        self.runpod_port = 0

    def run(self) -> Results:
        load_before = os.getloadavg()[0]
        if load_before > BUSY_LOAD_AVERAGE:
            print(
                f"warning: load average {load_before:.2f} before the run: other work will skew it"
            )
        self.runpod_port = self.start("runpod", "bench.runpod_stub:app", minimal_env()).port
        args = self.args
        results = Results(self.generator.label, args.duration, args.warmup, args.connections)
        print(f"load generator: {results.generator}", flush=True)
        for name in args.modes:
            self.run_mode(self.mode(name), results)
        results.load_average = [load_before, os.getloadavg()[0]]
        return results

    def mode(self, name: str) -> Mode:
        if name == "local":
            fixtures = prepare_store(self.data_dir)
            return Mode(
                name,
                fixtures,
                LocalBackend(self.data_dir),
                lambda port: gateway_settings(
                    self.data_dir, port, self.runpod_port, fixtures.secret
                ),
            )
        from bench.production import start_upstreams

        print("production: starting the Convex imitation and moto's S3 server ...", flush=True)
        upstreams = start_upstreams(self.procs, self.cwd, self.logs)
        fixtures = upstreams.prepare()
        return Mode(
            name,
            fixtures,
            upstreams,
            lambda port: upstreams.settings(port, self.runpod_port, fixtures.secret),
            upstreams.baseline_settings(),
            [upstreams.convex_pid],
        )

    def run_mode(self, mode: Mode, results: Results) -> None:
        print(f"{mode.name} mode:", flush=True)
        gateway = self.start_gateway(mode)
        print("seeding: finished jobs through the API ...", flush=True)
        seed_done_jobs(gateway.base_url, mode.backend, mode.fixtures)
        bodies = self.scratch / f"baseline_bodies_{mode.name}.json"
        bodies.write_text(json.dumps(gateway_answers(gateway.base_url, mode.fixtures)))
        mode.baseline_env["BENCH_BASELINE_BODIES"] = str(bodies)
        baseline = self.start_baseline(mode)
        keys = self.args.routes
        if mode.name == "production":
            keys = [key for key in keys if key in PRODUCTION_ROUTE_KEYS]
        selected = [route for route in routes(mode.fixtures) if route.key in keys]
        results.measurements += self.measure_load(mode, gateway, baseline, selected)
        results.peak_rss[mode.name] = {
            "gateway": peak_rss_kib(gateway.pid),
            "baseline": peak_rss_kib(baseline.pid),
        }
        self.procs.stop(gateway.process)
        self.procs.stop(baseline.process)
        self.measure_cold_starts(mode, results)

    # --- servers ------------------------------------------------------------------------------

    def start(self, name: str, app: str, env: dict[str, str], port: int | None = None) -> Server:
        log = self.logs / f"{name}.log"
        return self.procs.start_server(name, app, env, self.cwd, log, port=port)

    def start_gateway(self, mode: Mode) -> Server:
        port = free_port()
        return self.start("gateway", "main:app", minimal_env(**mode.gateway_env(port)), port)

    def start_baseline(self, mode: Mode) -> Server:
        return self.start("baseline", "bench.baseline:app", minimal_env(**mode.baseline_env))

    # --- load ---------------------------------------------------------------------------------

    def measure_load(
        self, mode: Mode, gateway: Server, baseline: Server, selected: list[Route]
    ) -> list[Measurement]:
        found: list[Measurement] = []
        for route in selected:
            for connections in self.args.connections:
                measured = self.measure_pair(mode, (gateway, baseline), route, connections)
                found.append(
                    Measurement(
                        route.key,
                        route.label,
                        connections,
                        measured["gateway"],
                        measured["baseline"],
                        mode.name,
                    )
                )
                _print_pair(found[-1])
        return found

    def measure_pair(
        self, mode: Mode, servers: tuple[Server, Server], route: Route, connections: int
    ) -> dict[str, LoadResult]:
        """Both servers, in `SLICES` alternating slices (ABBAAB): a burst of load from elsewhere
        on the shared machine falls on one slice of one server, and each latency percentile, the
        median of the slices', leaves it out; requests and CPU are summed over all slices."""
        slices, seconds = slicing(self.args.duration)
        taken: dict[str, list[LoadResult]] = {server.name: [] for server in servers}
        for index in range(slices):
            order = servers if index % 2 == 0 else servers[::-1]
            for server in order:
                warm = index == 0 and self.args.warmup > 0
                taken[server.name].append(
                    self.drive(mode, server, route, connections, seconds, warm)
                )
        return {name: combined(results) for name, results in taken.items()}

    def drive(
        self, mode: Mode, server: Server, route: Route, connections: int, seconds: int, warm: bool
    ) -> LoadResult:
        if warm:
            self.generator.run(server.port, route.spec(), connections, self.args.warmup)
        spec = route.spec()
        before = cpu_seconds(server.pid), _cpu_of(mode.upstream_pids)
        result = self.generator.run(server.port, spec, connections, seconds)
        # wrk's own start and exit fall inside this window; the server is idle for both.
        return replace(
            result,
            cpu_seconds=cpu_seconds(server.pid) - before[0],
            upstream_cpu_seconds=_cpu_of(mode.upstream_pids) - before[1],
        )

    # --- cold starts --------------------------------------------------------------------------

    def measure_cold_starts(self, mode: Mode, results: Results) -> None:
        print(f"cold starts: {self.args.cold_starts} of each ...", flush=True)
        ready: dict[str, list[float]] = {"gateway": [], "baseline": []}
        start_rss: dict[str, list[int]] = {"gateway": [], "baseline": []}
        for repetition in range(self.args.cold_starts):
            order = ("gateway", "baseline") if repetition % 2 == 0 else ("baseline", "gateway")
            for name in order:
                server = (
                    self.start_gateway(mode) if name == "gateway" else self.start_baseline(mode)
                )
                ready[name].append(server.ready_after)
                start_rss[name].append(peak_rss_kib(server.pid))
                self.procs.stop(server.process)
        results.cold_start[mode.name] = ready
        results.start_rss[mode.name] = {
            name: sorted(values)[len(values) // 2] for name, values in start_rss.items()
        }


def combined(results: list[LoadResult]) -> LoadResult:
    """Slices of one server's run as one: counts and CPU summed, each percentile the median of
    the slices' (so p50 and p99 may come from different slices)."""
    return LoadResult(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        errors=sum(r.errors for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p95_ms=statistics.median(r.p95_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        cpu_seconds=sum(r.cpu_seconds for r in results),
        upstream_cpu_seconds=sum(r.upstream_cpu_seconds for r in results),
    )


def _cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _print_pair(m: Measurement) -> None:
    for name, result in (("gateway", m.gateway), ("baseline", m.baseline)):
        print(
            f"  {m.label:32} c={m.connections:<3} {name:8} {result.rps:9,.0f} req/s"
            f"  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
            flush=True,
        )
    print(
        f"  {'':32} ratio req/s {m.rps_ratio:.2f}  p99 {m.latency_ratio('p99_ms'):.2f}"
        f"  CPU µs/request {m.gateway.cpu_us:.0f} / {m.baseline.cpu_us:.0f}",
        flush=True,
    )


def command_text(argv: Sequence[str]) -> str:
    """The command as run, and the make target that ran it (the Makefile sets BENCH_COMMAND)."""
    python = Path(sys.executable)
    shown = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    command = f"`{shlex.join([str(shown), '-m', 'bench.run', *argv])}`"
    target = os.environ.get("BENCH_COMMAND")
    return f"`{target}`, which runs {command}" if target else command


def _print_logs(logs: Path) -> None:
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print(f"--- {log.name} (last {LOG_TAIL_LINES} lines) ---", *tail, sep="\n", file=sys.stderr)


def write_outputs(results: Results, args: argparse.Namespace) -> None:
    plot = args.plot if write_plot(results, args.plot) else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results, plot, args.output))
    print("\n".join(["", "Goals (ratios to the baseline):", *goals_table(results), ""]))
    print(f"wrote {args.output}" + (f" and {plot}" if plot else ""))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render_only:
        results = results_from_json(args.results.read_text())
    else:
        results = measure(args)
        results.machine = machine(args.server_python)
        results.date, results.command = now_utc(), command_text(argv)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(results_to_json(results))
    write_outputs(results, args)
    return 0


def measure(args: argparse.Namespace) -> Results:
    with (
        ProcessGroups(args.server_python) as procs,
        tempfile.TemporaryDirectory(prefix="cineweave-bench-") as tmp,
    ):
        scratch = Path(tmp)
        try:
            return Bench(procs, scratch, args).run()
        except Exception:
            _print_logs(scratch / "logs")
            raise


if __name__ == "__main__":
    sys.exit(main())
