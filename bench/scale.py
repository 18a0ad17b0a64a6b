"""The "Scale on paper" section: what N jobs a minute costs in instances, Convex calls and RunPod.

The gateway's CPU cost per request comes from this run; everything else is an assumption,
named here once so the arithmetic can be redone when one of them is known better.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

from bench.results import Results

JOBS_PER_MINUTE = (60, 600, 3000, 6000)
SECONDS_PER_MONTH = 30 * 86_400

# --- Assumptions: check each against production metrics and the current plans -----------------
JOB_SECONDS = 60.0  # submit to done: RunPod queue plus the render of one clip
POLL_SECONDS = 2.0  # the web app polls GET /jobs/{id} this often until the job ends
POLLS_PER_JOB = JOB_SECONDS / POLL_SECONDS + 1  # ... plus the poll that sees `done`
CREDITS_READS_PER_JOB = 1  # the app refreshes the balance after each create
CONVEX_RTT_MS = 30.0  # Cloud Run to Convex and back, per function call
CONVEX_QUERY_MS = 10.0  # time a query holds one of the deployment's concurrent slots
CONVEX_MUTATION_MS = 25.0  # time a mutation holds a slot (writes, OCC retries)
RUNPOD_RUN_MS = 300.0  # one POST /run round trip
R2_HEAD_MS = 40.0  # one HEAD on the video, on a COMPLETED webhook
CLOUD_RUN_CONCURRENCY = 80  # requests one instance takes at once (Cloud Run's default)
CLOUD_RUN_CPU_TARGET = 0.6  # Cloud Run scales out at about 60% CPU
CLOUD_RUN_MAX_INSTANCES = 100  # the service's default max-instances
# RunPod serverless `/run`: 1000 requests per 10 s and 200 in flight, per endpoint.
RUNPOD_RUN_PER_SECOND = 1000 / 10
RUNPOD_RUN_IN_FLIGHT = 200
# Convex runs a fixed number of functions at once per deployment, queries and mutations each:
# 16 on Free/Starter (S16), 256 on Professional (S256). Monthly call quotas are billed, not
# enforced as throttles.
CONVEX_SLOTS = {"Starter (S16)": 16, "Professional (S256)": 256}

# Store calls per job, from main.py and jobs.py:
#   create: chargeAndCreateJob + recordRunpodId (2 mutations)
#   signed webhook: findJob (query) + applyStatus (mutation), and an R2 HEAD when COMPLETED
#   GET /jobs/{id}: getJob (query); saveDownloadUrl (mutation) once per done job per 23 h
#   GET /credits: getUser (query); a user's very first call also runs getOrCreateUser, once per
#   user rather than per job, so it is left out
MUTATIONS_PER_JOB = 2 + 1 + 1
QUERIES_PER_JOB = POLLS_PER_JOB + 1 + CREDITS_READS_PER_JOB


@dataclass(frozen=True)
class CpuCost:
    """Gateway CPU milliseconds per request, from this run, at its most connections."""

    create: float
    webhook: float
    poll: float
    credits: float
    measured: bool = True  # the server's own CPU in production mode, else 1 / req/s locally

    def per_job(self) -> float:
        return (
            self.create
            + self.webhook
            + POLLS_PER_JOB * self.poll
            + CREDITS_READS_PER_JOB * self.credits
        )


def cpu_cost(results: Results) -> CpuCost | None:
    """Production mode's CPU per request when measured; else local mode's 1 / req/s (one
    saturated core serves `rps` requests a second), which leaves out every Convex call."""
    measured = "production" in results.modes
    costs: dict[str, float] = {}
    for route in ("create", "webhook", "job", "credits"):
        found = results.for_route(route, "production" if measured else "local")
        if not found:
            return None
        busiest = max(found, key=lambda m: m.connections)
        if measured:
            costs[route] = busiest.gateway.cpu_us / 1000
        else:
            costs[route] = 1000 / busiest.gateway.rps if busiest.gateway.rps else math.nan
    return CpuCost(costs["create"], costs["webhook"], costs["job"], costs["credits"], measured)


def in_flight_ms_per_job() -> float:
    """Wall time a job's requests hold Cloud Run slots, mostly waiting on Convex and RunPod."""
    create = 2 * CONVEX_RTT_MS + RUNPOD_RUN_MS
    webhook = 2 * CONVEX_RTT_MS + R2_HEAD_MS
    return create + webhook + (POLLS_PER_JOB + CREDITS_READS_PER_JOB) * CONVEX_RTT_MS


def instances(jobs_per_second: float, cost: CpuCost) -> int:
    cores = jobs_per_second * cost.per_job() / 1000
    by_cpu = math.ceil(cores / CLOUD_RUN_CPU_TARGET)
    slots = jobs_per_second * in_flight_ms_per_job() / 1000
    by_concurrency = math.ceil(slots / CLOUD_RUN_CONCURRENCY)
    return max(1, by_cpu, by_concurrency)


def load_row(jobs_per_minute: int, cost: CpuCost | None) -> str:
    rate = jobs_per_minute / 60
    requests = rate * (2 + POLLS_PER_JOB + CREDITS_READS_PER_JOB)
    mutations, queries = rate * MUTATIONS_PER_JOB, rate * QUERIES_PER_JOB
    slots_q = queries * CONVEX_QUERY_MS / 1000
    slots_m = mutations * CONVEX_MUTATION_MS / 1000
    cells = [
        f"{jobs_per_minute:,}",
        f"{requests:,.0f}",
        str(instances(rate, cost)) if cost else "n/a",
        f"{mutations:,.0f}",
        f"{queries:,.0f}",
        f"{slots_q:.1f} / {slots_m:.1f}",
        f"{(mutations + queries) * SECONDS_PER_MONTH / 1e6:,.0f} M",
        f"{rate * 10:,.0f} of 1000",
        f"{rate * JOB_SECONDS:,.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def limits(cost: CpuCost | None) -> list[tuple[str, float]]:
    """Each hard limit and the jobs a minute at which it binds."""
    found = [
        ("RunPod `/run`: 1000 per 10 s per endpoint", RUNPOD_RUN_PER_SECOND * 60),
        (
            "RunPod `/run`: 200 in flight per endpoint",
            RUNPOD_RUN_IN_FLIGHT / (RUNPOD_RUN_MS / 1000) * 60,
        ),
    ]
    for plan, slots in CONVEX_SLOTS.items():
        per_job_q = QUERIES_PER_JOB * CONVEX_QUERY_MS / 1000
        per_job_m = MUTATIONS_PER_JOB * CONVEX_MUTATION_MS / 1000
        found.append((f"Convex {plan}: {slots} concurrent queries", slots / per_job_q * 60))
        found.append((f"Convex {plan}: {slots} concurrent mutations", slots / per_job_m * 60))
    if cost is not None:
        jobs_per_second = _max_jobs_for_instances(cost)
        label = f"Cloud Run: {CLOUD_RUN_MAX_INSTANCES} instances (max-instances default)"
        found.append((label, jobs_per_second * 60))
    return sorted(found, key=lambda item: item[1])


def _max_jobs_for_instances(cost: CpuCost) -> float:
    by_cpu = CLOUD_RUN_MAX_INSTANCES * CLOUD_RUN_CPU_TARGET * 1000 / cost.per_job()
    by_slots = CLOUD_RUN_MAX_INSTANCES * CLOUD_RUN_CONCURRENCY * 1000 / in_flight_ms_per_job()
    return min(by_cpu, by_slots)


def scale_on_paper(results: Results) -> list[str]:
    cost = cpu_cost(results)
    return [
        "## Scale on paper",
        "",
        *_wrapped(ASSUMPTIONS),
        "",
        *_wrapped(PER_JOB),
        "",
        *_wrapped(_cost_text(cost)),
        "",
        "| jobs/min | gateway req/s | Cloud Run instances | Convex mutations/s |"
        " Convex queries/s | Convex slots busy (queries / mutations) | Convex calls/month |"
        " RunPod `/run` per 10 s | GPU workers busy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(load_row(n, cost) for n in JOBS_PER_MINUTE),
        "",
        "Where each limit binds (jobs per minute, lowest first):",
        "",
        "| limit | binds at jobs/min |",
        "| --- | ---: |",
        *(f"| {label} | {_rounded(value)} |" for label, value in limits(cost)),
        "",
        *AT_THE_LIMIT,
    ]


def _wrapped(paragraph: str) -> list[str]:
    return textwrap.wrap(paragraph, width=96, break_on_hyphens=False)


def _rounded(value: float) -> str:
    # Three significant figures: the assumptions are not worth more.
    return f"{float(f'{value:.3g}'):,.0f}"


def _cost_text(cost: CpuCost | None) -> str:
    if cost is None:
        return "This run measured too few routes to price a job's gateway time."
    prices = (
        f" create {cost.create:.2f} ms, webhook {cost.webhook:.2f} ms, poll {cost.poll:.2f} ms,"
        f" credits {cost.credits:.2f} ms; one job with its {POLLS_PER_JOB:.0f} polls:"
        f" {cost.per_job():.1f} ms."
    )
    if cost.measured:
        return (
            "Gateway CPU per request, measured in production mode at this run's busiest"
            " concurrency (the process's CPU time over its answered requests, Convex calls"
            " included):" + prices + " The webhook measured is the late-delivery path (one"
            " findJob); a state change adds an applyStatus mutation and, when COMPLETED, an"
            " R2 HEAD: read the instance counts as good to about 1.5×."
        )
    return (
        "Gateway time per request, from this run's busiest concurrency in local mode (one"
        " process, 1 / req/s):" + prices + " In production every store call is an HTTP call"
        " to Convex, which this leaves out: read the instance counts as good to 2× either way."
    )


ASSUMPTIONS = (
    f"Assumed, to be checked against production metrics: a job takes {JOB_SECONDS:.0f} s from"
    f" submit to done; the web app polls `GET /jobs/{{id}}` every {POLL_SECONDS:.0f} s until then"
    f" ({POLLS_PER_JOB:.0f} polls a job) and reads `GET /credits` once per job; Convex is"
    f" {CONVEX_RTT_MS:.0f} ms away and holds a slot {CONVEX_QUERY_MS:.0f} ms per query and"
    f" {CONVEX_MUTATION_MS:.0f} ms per mutation; RunPod `/run` takes {RUNPOD_RUN_MS:.0f} ms; a"
    f" Cloud Run instance has 1 vCPU, takes {CLOUD_RUN_CONCURRENCY} requests at once and scales"
    f" out at {CLOUD_RUN_CPU_TARGET:.0%} CPU. Convex limits assumed from its published plans:"
    " 16 concurrent queries and 16 concurrent mutations on Free/Starter (S16), 256 each on"
    " Professional (S256); monthly function calls are billed beyond the included amount (1M on"
    " Starter) rather than throttled. **Check these against the current plan** before relying"
    " on them."
)

PER_JOB = (
    f"Per job: {MUTATIONS_PER_JOB} Convex mutations (create = chargeAndCreateJob +"
    " recordRunpodId; webhook = applyStatus, after a findJob query, plus an R2 HEAD; one"
    f" saveDownloadUrl per done job per 23 h) and {QUERIES_PER_JOB:.0f} queries (one getJob"
    " per poll, the webhook's findJob, and `GET /credits`'s getUser; only a user's first"
    " `GET /credits` adds a getOrCreateUser mutation, once per user, not counted here)."
    " Instances are the larger of the CPU bound and the concurrency bound."
)

GPU_WORKERS = (
    "GPU workers are not a rate limit but usually bind first: each busy worker serves"
    f" {60 / JOB_SECONDS:.0f} job a minute at {JOB_SECONDS:.0f} s a job, so the endpoint's max"
    " workers (a quota and a budget) caps throughput. Past it, RunPod keeps jobs `IN_QUEUE` (up"
    " to `RUNPOD_JOB_TTL_SECONDS`): nothing fails, but every queued job keeps being polled, so"
    " Convex queries grow with the queue."
)

AT_THE_LIMIT = [
    *_wrapped(GPU_WORKERS),
    "",
    "What the gateway does when it reaches a limit:",
    "",
    "- RunPod `/run` answers 429: `runpod_client.submit` backs off (honouring `Retry-After`,",
    "  at most 5 s a wait, 4 attempts), then the create answers 503 `UPSTREAM_UNAVAILABLE`",
    "  with `Retry-After`; the job is marked failed (`SUBMIT_FAILED`), which refunds it in the",
    "  same store transaction. A `/run` that may have reached RunPod is never resent.",
    "- One user at `MAX_CONCURRENT_JOBS` (5) queued or running jobs: create answers 429",
    "  `TOO_MANY_ACTIVE_JOBS` with `Retry-After`, before any charge or RunPod call. This caps",
    "  what one user can push at the shared limits.",
    "- Convex answers 429 or 5xx (its concurrency is full, or it is down): queries are retried",
    "  3 times with backoff, mutations only if the request never left; then the request answers",
    "  503 `UPSTREAM_UNAVAILABLE`. A create whose charge failed has charged nothing.",
    "- Cloud Run at max-instances queues requests at its front end and then refuses them",
    "  (429) before they reach the gateway.",
    "",
    "The levers, cheapest first: poll less often (or back off while `queued`), since polls are",
    "most of the traffic and the Convex queries; a Professional Convex plan; more RunPod",
    "endpoints (the `/run` limit is per endpoint) and more max workers.",
]
