"""What a benchmark run found, and the goals it is judged by (ratios to the baseline)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

from bench.load import LoadResult

# Local: SQLite, local storage, the dev issuer. Production: GATEWAY_ENV=production on the Convex
# imitation, moto's S3 server as R2 and an RS256 key as Clerk's; its baseline makes one upstream
# call per request to the same imitation.
MODES = ("local", "production")


@dataclass(frozen=True)
class Measurement:
    """One route at one concurrency, gateway and baseline measured back to back."""

    route: str
    label: str
    connections: int
    gateway: LoadResult
    baseline: LoadResult
    mode: str = "local"

    @property
    def rps_ratio(self) -> float:
        return ratio(self.gateway.rps, self.baseline.rps)

    @property
    def cpu_ratio(self) -> float:
        """Requests one core serves, gateway over baseline: the inverse of their CPU per request."""
        return ratio(self.baseline.cpu_us, self.gateway.cpu_us)

    def latency_ratio(self, percentile: str) -> float:
        return ratio(getattr(self.gateway, percentile), getattr(self.baseline, percentile))


@dataclass
class Results:
    generator: str
    duration: int
    warmup: int
    connections: list[int]
    measurements: list[Measurement] = field(default_factory=list)
    # By mode, then server: seconds from spawning the process to its first 200 on /healthz.
    cold_start: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # By mode, then server, KiB: VmHWM right after start (median over the cold starts) and
    # after the whole load.
    start_rss: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_rss: dict[str, dict[str, int]] = field(default_factory=dict)
    # The 1-minute load average before and after: other work on the machine skews both servers.
    load_average: list[float] = field(default_factory=list)
    # Where and how it ran, kept with the numbers so a report can be rendered again later.
    machine: list[list[str]] = field(default_factory=list)
    date: str = ""
    command: str = ""

    def median_cold_start(self, mode: str, name: str) -> float:
        return statistics.median(self.cold_start[mode][name])

    def for_route(self, route: str, mode: str = "local") -> list[Measurement]:
        return [m for m in self.measurements if m.route == route and m.mode == mode]

    @property
    def modes(self) -> list[str]:
        return [mode for mode in MODES if any(m.mode == mode for m in self.measurements)]


def results_to_json(results: Results) -> str:
    return json.dumps(asdict(results), indent=1)


def results_from_json(text: str) -> Results:
    raw = json.loads(text)
    measurements = [
        Measurement(
            m["route"],
            m["label"],
            m["connections"],
            LoadResult(**m["gateway"]),
            LoadResult(**m["baseline"]),
            m.get("mode", "local"),
        )
        for m in raw.pop("measurements")
    ]
    return Results(**raw, measurements=measurements)


def ratio(gateway: float, baseline: float) -> float:
    return gateway / baseline if baseline else float("nan")


@dataclass(frozen=True)
class Goal:
    """A ratio the gateway must reach: `at_least` for throughput, else at most (latency, cost).

    A goal without a target is only reported (production's webhook, its RSS).
    """

    label: str
    metric: str  # "rps", "cpu" or "p99_ms" of a route, or "cold_start" / "peak_rss"
    target: float | None
    route: str | None = None
    mode: str = "local"

    @property
    def at_least(self) -> bool:
        return self.metric in ("rps", "cpu")

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "reported"
        return f"{'≥' if self.at_least else '≤'} {self.target:.2f}×"

    def values(self, results: Results) -> dict[str, float]:
        """The ratio per concurrency (e.g. {"64": 0.81}), or one value under "all"."""
        if self.route is None:
            return {"all": _process_ratio(self.metric, self.mode, results)}
        found = results.for_route(self.route, self.mode)
        if self.metric == "rps":
            return {str(m.connections): m.rps_ratio for m in found}
        if self.metric == "cpu":
            return {str(m.connections): m.cpu_ratio for m in found}
        return {str(m.connections): m.latency_ratio(self.metric) for m in found}

    def met(self, results: Results) -> bool | None:
        values = [v for v in self.values(results).values() if v == v]  # NaN: not measured
        if not values or self.target is None:
            return None
        if self.at_least:
            return all(value >= self.target for value in values)
        return all(value <= self.target for value in values)


def _process_ratio(metric: str, mode: str, results: Results) -> float:
    if metric == "cold_start":
        if mode not in results.cold_start:
            return float("nan")
        return ratio(
            results.median_cold_start(mode, "gateway"), results.median_cold_start(mode, "baseline")
        )
    rss = results.peak_rss.get(mode)
    if not rss:
        return float("nan")
    return ratio(rss["gateway"], rss["baseline"])


# Issue 13. Create has no ratio goal: it must make two or three outbound calls, and the GPU
# fleet bounds how many jobs start; its CPU per request is reported instead.
GOALS = (
    Goal("local: GET /credits req/s", "rps", 0.80, "credits"),
    Goal("local: GET /credits p99", "p99_ms", 1.5, "credits"),
    Goal("local: GET /jobs/{id} req/s", "rps", 0.80, "job"),
    Goal("local: GET /jobs/{id} p99", "p99_ms", 1.5, "job"),
    Goal("local: POST /webhooks/runpod (signed) req/s", "rps", 0.6, "webhook"),
    Goal("local: cold start (median)", "cold_start", 1.5),
    Goal("local: peak RSS after load", "peak_rss", 1.5),
    Goal("production: GET /credits, requests per CPU-second", "cpu", 0.70, "credits", "production"),
    # Reported, not judged: the Convex imitation, not either server, sets these (report.py).
    Goal("production: GET /credits req/s", "rps", None, "credits", "production"),
    Goal("production: GET /jobs/{id}, requests per CPU-second", "cpu", 0.70, "job", "production"),
    Goal("production: GET /jobs/{id} req/s", "rps", None, "job", "production"),
    Goal(
        "production: POST /webhooks/runpod, requests per CPU-second",
        "cpu",
        None,
        "webhook",
        "production",
    ),
    Goal("production: POST /webhooks/runpod req/s", "rps", None, "webhook", "production"),
    Goal("production: cold start (median)", "cold_start", 1.5, mode="production"),
    Goal("production: peak RSS after load", "peak_rss", None, mode="production"),
)
