"""bench/latency.png: latency percentiles of each route against the baseline, by concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bench.results import Results

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# (label, LoadResult field, line style, marker): one look per percentile, one colour per server.
PERCENTILES = (
    ("p50", "p50_ms", "-", "o"),
    ("p95", "p95_ms", "--", "^"),
    ("p99", "p99_ms", ":", "s"),
)
SERVERS = (("gateway", "tab:red"), ("baseline", "tab:blue"))


def write_plot(results: Results, path: Path) -> bool:
    """Write the PNG; False (and a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render straight to the file
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (make bench installs it): no plot")
        return False
    routes = list(dict.fromkeys((m.mode, m.route) for m in results.measurements))
    columns = 3
    rows = -(-(len(routes) + 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    flat = list(axes.flat)
    for axis, route in zip(flat, routes, strict=False):
        _latency_panel(axis, results, route)
    _ratio_panel(flat[len(routes)], results, routes)
    for axis in flat[len(routes) + 1 :]:
        axis.set_visible(False)
    figure.suptitle(f"CineWeave gateway vs bare FastAPI ({results.generator.split(' (')[0]})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _latency_panel(axis: Axes, results: Results, route: tuple[str, str]) -> None:
    found = results.for_route(route[1], route[0])
    conns = [m.connections for m in found]
    for server, colour in SERVERS:
        for name, field, style, marker in PERCENTILES:
            values = [getattr(getattr(m, server), field) for m in found]
            axis.plot(conns, values, style, color=colour, marker=marker, label=f"{server} {name}")
    axis.set_title(f"{route[0]}: {found[0].label}", fontsize=10)
    _log_connections(axis, conns)
    _log_values(axis, "latency (ms)")
    axis.legend(fontsize=7, ncol=2)


def _ratio_panel(axis: Axes, results: Results, routes: list[tuple[str, str]]) -> None:
    for mode, route in routes:
        found = results.for_route(route, mode)
        conns = [m.connections for m in found]
        style = "-" if mode == "local" else "--"
        ratios = [m.latency_ratio("p99_ms") for m in found]
        axis.plot(conns, ratios, style, marker="o", label=f"{mode}: {route}")
    axis.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="goal for GETs: 1.5×")
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_title("p99 latency ratio (gateway / baseline)")
    _log_connections(axis, [m.connections for m in results.measurements])
    _log_values(axis, "ratio")
    axis.legend(fontsize=7, loc="best")


def _log_values(axis: Axes, label: str) -> None:
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axis.set_yscale("log")
    # Plain numbers (0.5, 2, 10) read faster than powers of ten at these small ranges.
    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.set_ylabel(label)


def _log_connections(axis: Axes, conns: list[int]) -> None:
    ticks = sorted(set(conns))
    if len(ticks) > 1:
        axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(c) for c in ticks])
    axis.set_xlabel("connections")
    axis.grid(True, which="both", alpha=0.3)
