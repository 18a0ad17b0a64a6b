"""What a benchmark run found, and the goals it is judged by (ratios to the baseline)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

from bench.load import LoadResult


@dataclass(frozen=True)
class Measurement:
    """One route at one concurrency, gateway and baseline measured back to back."""

    route: str
    label: str
    connections: int
    gateway: LoadResult
    baseline: LoadResult

    @property
    def rps_ratio(self) -> float:
        return ratio(self.gateway.rps, self.baseline.rps)

    def latency_ratio(self, percentile: str) -> float:
        return ratio(getattr(self.gateway, percentile), getattr(self.baseline, percentile))


@dataclass
class Results:
    generator: str
    duration: int
    warmup: int
    connections: list[int]
    measurements: list[Measurement] = field(default_factory=list)
    # Seconds from spawning the process to its first 200 on /healthz, one per repetition.
    cold_start: dict[str, list[float]] = field(default_factory=dict)
    # KiB: VmHWM right after start (median over the cold starts) and after the whole load.
    start_rss: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    # The 1-minute load average before and after: other work on the machine skews both servers.
    load_average: list[float] = field(default_factory=list)
    # Where and how it ran, kept with the numbers so a report can be rendered again later.
    machine: list[list[str]] = field(default_factory=list)
    date: str = ""
    command: str = ""

    def median_cold_start(self, name: str) -> float:
        return statistics.median(self.cold_start[name])

    def for_route(self, route: str) -> list[Measurement]:
        return [m for m in self.measurements if m.route == route]


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
        )
        for m in raw.pop("measurements")
    ]
    return Results(**raw, measurements=measurements)


def ratio(gateway: float, baseline: float) -> float:
    return gateway / baseline if baseline else float("nan")


@dataclass(frozen=True)
class Goal:
    """A ratio the gateway must reach: `at_least` for throughput, else at most (latency, cost)."""

    label: str
    metric: str  # "rps" or "p99_ms" of a route, or "cold_start" / "peak_rss"
    target: float
    route: str | None = None

    @property
    def at_least(self) -> bool:
        return self.metric == "rps"

    @property
    def target_text(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.target:.2f}×"

    def values(self, results: Results) -> dict[str, float]:
        """The ratio per concurrency (e.g. {"64": 0.81}), or one value under "all"."""
        if self.route is None:
            return {"all": _process_ratio(self.metric, results)}
        found = results.for_route(self.route)
        if self.metric == "rps":
            return {str(m.connections): m.rps_ratio for m in found}
        return {str(m.connections): m.latency_ratio(self.metric) for m in found}

    def met(self, results: Results) -> bool | None:
        values = list(self.values(results).values())
        if not values:
            return None
        if self.at_least:
            return all(value >= self.target for value in values)
        return all(value <= self.target for value in values)


def _process_ratio(metric: str, results: Results) -> float:
    if metric == "cold_start":
        if not results.cold_start:
            return float("nan")
        return ratio(results.median_cold_start("gateway"), results.median_cold_start("baseline"))
    if not results.peak_rss:
        return float("nan")
    return ratio(results.peak_rss["gateway"], results.peak_rss["baseline"])


GOALS = (
    Goal("GET /credits req/s", "rps", 0.70, "credits"),
    Goal("GET /credits p99", "p99_ms", 1.5, "credits"),
    Goal("GET /jobs/{id} req/s", "rps", 0.70, "job"),
    Goal("GET /jobs/{id} p99", "p99_ms", 1.5, "job"),
    Goal("POST /jobs/create req/s", "rps", 0.35, "create"),
    Goal("POST /webhooks/runpod (signed) req/s", "rps", 0.5, "webhook"),
    Goal("cold start (median)", "cold_start", 1.5),
    Goal("peak RSS after load", "peak_rss", 1.5),
)
