"""What operators measure: the `gateway_*` Prometheus metrics, the request middleware, /metrics.

* `RequestTelemetryMiddleware`: one pure ASGI middleware gives each request its id, times it,
  records its metrics and writes its access log line.
* `Metrics`: the `gateway_*` metrics in a registry of their own (one per app, so tests can build
  many apps). instrumented.py times the store, storage and RunPod with them.
"""

from __future__ import annotations

import bisect
import hmac
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from types import TracebackType
from typing import Any, Literal

from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import GatewayError
from logs import (
    CloudLoggingFormatter,
    ConsoleFormatter,
    request_id_var,
    sole_handler,
    trace_id_from,
    trace_id_var,
    valid_request_id,
)
from models import Job, JobStatus

access_log = logging.getLogger("gateway.access")

# --- Metrics ----------------------------------------------------------------------------------

# An API answers in milliseconds; 10 s is the slowest a caller waits (RunPod's client timeout).
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Presigning and SQLite take well under a millisecond; an R2 HEAD with retries can take 30 s.
UPSTREAM_BUCKETS = (0.001, 0.0025, *HTTP_BUCKETS, 30.0)
UNMATCHED_ROUTE = "unmatched"
# The method is the client's to choose: anything else becomes "other", so labels stay bounded.
_METHODS = {m: m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}

JobOutcome = Literal["done", "failed", "canceled", "timed_out"]
CreditKind = Literal["charged", "refunded", "granted"]
WebhookFailureReason = Literal["missing", "bad_signature", "bad_token", "bad_progress_token"]
JOB_OUTCOMES: tuple[JobOutcome, ...] = ("done", "failed", "canceled", "timed_out")
CREDIT_KINDS: tuple[CreditKind, ...] = ("charged", "refunded", "granted")
WEBHOOK_FAILURE_REASONS: tuple[WebhookFailureReason, ...] = (
    "missing",
    "bad_signature",
    "bad_token",
    "bad_progress_token",
)


class LoopHistogram:
    """A labelled histogram observed from the event loop, exposed as prometheus_client's own
    `Histogram` is: the same buckets, `_count`, `_sum` and `_created` series.

    The library's Histogram takes a lock for the sum and another for the bucket on every
    observation: 3.0 µs for a request's, 1.9 µs for a store call's, two per read (issue 13).
    Every observation here comes from the event loop's thread (the storage calls that run in
    threads are timed around the await), so plain numbers do; were one ever made from
    another thread, the worst is a lost count. Exposed through the library's custom-collector
    interface (`collect`), so the registry and both text formats are the library's own.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._bounds = tuple(float(bound) for bound in buckets)
        # The library's own text for a bound ("0.005", "1.0", "+Inf"), as its Histogram writes.
        bounds = (*self._bounds, math.inf)
        self._le = [floatToGoString(bound) for bound in bounds]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], LoopHistogramSeries] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramSeries:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        key = tuple(str(value) for value in values)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = LoopHistogramSeries(self._bounds)
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, series in list(self._series.items()):
            cumulative = itertools.accumulate(series.counts)
            buckets = [(le, float(count)) for le, count in zip(self._le, cumulative, strict=True)]
            family.add_metric(list(key), buckets, series.sum)
            if created_series_enabled():
                labels = dict(zip(self._labelnames, key, strict=True))
                family.samples.append(Sample(f"{self._name}_created", labels, series.created))
        yield family


def created_series_enabled() -> bool:
    """Whether the library writes `_created` series (`PROMETHEUS_DISABLE_CREATED_SERIES`, or
    `disable_created_metrics()`): the library's own switch, read as its metrics read it."""
    return bool(prometheus_metrics._use_created)


class LoopHistogramSeries:
    """One label set's counts: a bucket per bound (`le`, inclusive) and one past the last."""

    __slots__ = ("_bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets count values <= their `le`.
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class Metrics:
    """Every `gateway_*` metric, registered in one registry that belongs to one app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.http_duration = self._histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer a request, by method, route template and status.",
            ("method", "route", "status"),
            HTTP_BUCKETS,
        )
        self.http_responses = self._counter(
            "gateway_http_responses_total", "Responses by status class.", "class"
        )
        self.job_outcomes = self._counter(
            "gateway_job_outcomes_total", "Jobs that reached a final state.", "outcome"
        )
        self.credits = self._counter(
            "gateway_credits_total", "Credits charged, refunded and granted.", "kind"
        )
        self.upstream_duration = self._histogram(
            "gateway_upstream_request_duration_seconds",
            "Time spent in a call to RunPod, storage or the store.",
            ("upstream", "operation", "outcome"),
            UPSTREAM_BUCKETS,
        )
        self.webhook_failures = self._counter(
            "gateway_webhook_verification_failures_total",
            "Webhook calls refused because their proof was missing or wrong.",
            "reason",
        )
        self.reconciler_actions = self._counter(
            "gateway_reconciler_actions_total", "What the reconciler did to stuck jobs.", "action"
        )
        self._prebind()

    def _histogram(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> LoopHistogram:
        return LoopHistogram(name, doc, labels, buckets, self.registry)

    def _counter(self, name: str, doc: str, label: str) -> Counter:
        return Counter(name, doc, (label,), registry=self.registry)

    def _prebind(self) -> None:
        # Every known series exists from the start at 0, so rate() and alerts see the first one.
        classes = ("2xx", "3xx", "4xx", "5xx")
        self._classes = {name: self.http_responses.labels(name) for name in classes}
        self._outcomes = {name: self.job_outcomes.labels(name) for name in JOB_OUTCOMES}
        self._credits = {name: self.credits.labels(name) for name in CREDIT_KINDS}
        self._webhook = {
            name: self.webhook_failures.labels(name) for name in WEBHOOK_FAILURE_REASONS
        }
        # `.labels()` costs a few microseconds; each (method, route, status) is looked up once.
        self._http_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._upstream_series: dict[tuple[str, str, bool], Any] = {}

    # --- HTTP ---------------------------------------------------------------------------

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        series = self._http_series.get(key)
        if series is None:
            series = self._http_series[key] = self._new_http_series(method, route, status)
        series[0].observe(seconds)
        series[1].inc()

    def _new_http_series(self, method: str, route: str, status: int) -> tuple[Any, Any]:
        status_class = f"{status // 100}xx"
        responses = self._classes.get(status_class) or self.http_responses.labels(status_class)
        return self.http_duration.labels(method, route, str(status)), responses

    # --- money and jobs -----------------------------------------------------------------

    def count_credits(self, kind: CreditKind, amount: int) -> None:
        if amount:  # most calls count nothing (no signup grant): skip the counter's lock
            self._credits[kind].inc(amount)

    def count_job_settled(self, job: Job) -> None:
        """A job the store just moved to a final state: its outcome, and its refund if any."""
        if job.status is JobStatus.DONE:
            self._outcomes["done"].inc()
            return
        if job.status is JobStatus.FAILED:
            self._outcomes["timed_out" if job.error_code == "TIMED_OUT" else "failed"].inc()
        elif job.status is JobStatus.CANCELED:
            self._outcomes["canceled"].inc()
        else:
            return
        # The store refunds every failed or canceled job, once, in the same transaction.
        self.count_credits("refunded", job.cost)

    def count_webhook_failure(self, reason: WebhookFailureReason) -> None:
        self._webhook[reason].inc()

    def count_reconciler_action(self, action: str) -> None:
        self.reconciler_actions.labels(action).inc()

    # --- upstreams ----------------------------------------------------------------------

    def time_upstream(self, upstream: str, operation: str) -> UpstreamTimer:
        return UpstreamTimer(self, upstream, operation)

    def observe_upstream(self, upstream: str, operation: str, ok: bool, seconds: float) -> None:
        key = (upstream, operation, ok)
        series = self._upstream_series.get(key)
        if series is None:
            outcome = "ok" if ok else "error"
            series = self._upstream_series[key] = self.upstream_duration.labels(*key[:2], outcome)
        series.observe(seconds)


def upstream_failed(exc: BaseException | None) -> bool:
    """Whether a call failed in the upstream, not merely answered "no" (402, 404, 409...)."""
    if exc is None:
        return False
    return not (isinstance(exc, GatewayError) and exc.status_code < 500)


class UpstreamTimer:
    """Times one upstream call in a `with` block; an exception marks it `error`."""

    __slots__ = ("_metrics", "_upstream", "_operation", "_start")

    def __init__(self, metrics: Metrics, upstream: str, operation: str) -> None:
        self._metrics, self._upstream, self._operation = metrics, upstream, operation
        self._start = 0.0

    def __enter__(self) -> UpstreamTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        elapsed = time.perf_counter() - self._start
        self._metrics.observe_upstream(
            self._upstream, self._operation, not upstream_failed(exc), elapsed
        )


# --- The request middleware -------------------------------------------------------------------

# Probes and scrapes: measured like any route, but a successful one is not worth a log line.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


_REQUEST_IDS = random.Random()  # seeded from os.urandom
# A forked worker (a pre-fork server) must not repeat its parent's ids: `random` reseeds only
# its own global generator after a fork.
os.register_at_fork(after_in_child=_REQUEST_IDS.seed)


class RequestTelemetryMiddleware:
    """Gives each request an id (`X-Request-ID`), then times it, counts it and logs it once.

    Pure ASGI rather than `BaseHTTPMiddleware`, which costs a task per request and buffers
    streamed bodies.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        quiet_routes: Collection[str] = QUIET_ROUTES,
        *,
        min_logged_status: int = 0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.quiet_routes = quiet_routes
        # 400 logs only refusals and failures; every request is still counted and timed.
        self.min_logged_status = min_logged_status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        caller = _CallerHeaders(scope["headers"])
        # 32 hex digits, as uuid4().hex. An id must be unique, not secret (it is echoed in
        # answers and logs): a PRNG seeded from the OS saves a getrandom() call per request.
        request_id = valid_request_id(caller.request_id) or f"{_REQUEST_IDS.getrandbits(128):032x}"
        id_token = request_id_var.set(request_id)
        trace_token = trace_id_var.set(trace_id_from(caller.cloud_trace, caller.traceparent))
        id_header = (b"x-request-id", request_id.encode())
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(scope, status, time.perf_counter() - start, caller.user_agent)
        # Reset only on success: after an exception the app's 500 handler and the server's error
        # log run outside this middleware, in the same task, and should still carry the ids.
        request_id_var.reset(id_token)
        trace_id_var.reset(trace_token)

    def _finish(self, scope: Scope, status: int, elapsed: float, user_agent: str | None) -> None:
        method = _METHODS.get(scope["method"], "other")
        route = route_template(scope)
        self.metrics.observe_http(method, route, status, elapsed)
        if (status < 400 and route in self.quiet_routes) or status < self.min_logged_status:
            return
        level = logging.ERROR if status >= 500 else logging.INFO
        if access_log.isEnabledFor(level):
            log_access(level, scope, status, elapsed, route, user_agent)


class _CallerHeaders:
    """The few request headers telemetry reads, found in one pass over the raw list."""

    __slots__ = ("request_id", "cloud_trace", "traceparent", "user_agent")
    request_id: str | None
    cloud_trace: str | None
    traceparent: str | None
    user_agent: str | None

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.request_id = self.cloud_trace = self.traceparent = self.user_agent = None
        for name, value in headers:
            if name == b"x-request-id":
                self.request_id = value.decode("latin-1")
            elif name == b"x-cloud-trace-context":
                self.cloud_trace = value.decode("latin-1")
            elif name == b"traceparent":
                self.traceparent = value.decode("latin-1")
            elif name == b"user-agent":
                self.user_agent = value.decode("latin-1")


def route_template(scope: Scope) -> str:
    """The matched route's template (`/jobs/{job_id}`), never the raw path: ids are unbounded."""
    route = scope.get("route")
    return getattr(route, "path", None) or _route_before_routing(scope) or UNMATCHED_ROUTE


def _route_before_routing(scope: Scope) -> str | None:
    """The template of a request refused before routing ran (a 413 from the body limit), so it
    is not counted with unknown paths. Only unmatched requests pay for this second look."""
    router = getattr(scope.get("app"), "router", None)
    # An included router is one entry of `router.routes`: its own routes are reached through it.
    # As the router does: the first full match, else the first partial (a 405's route).
    partial = None
    for context in iter_route_contexts(getattr(router, "routes", ())):
        match, _ = context.original_route.matches(scope)
        if match is Match.FULL:
            return context.path
        if match is Match.PARTIAL and partial is None:
            partial = context.path
    return partial


def log_access(
    level: int, scope: Scope, status: int, elapsed: float, route: str, user_agent: str | None
) -> None:
    # The path only: the query string can hold a webhook token or a URL signature.
    path = scope["path"]
    args = (scope["method"], path, status, elapsed * 1000)
    message = ACCESS_FORMAT % args
    handler = sole_handler(access_log, level)
    formatter = handler.formatter if handler is not None else None
    if handler is not None and isinstance(formatter, ConsoleFormatter):
        # Straight to the one handler the logger would reach, formatted as the record would be
        # (tests/test_log_batching.py compares the two): a LogRecord and the logger's walk cost
        # more than the rest of the line (issue 13). The console line has no httpRequest.
        line = formatter.format_fields(level, access_log.name, message, time.time())
        handler.write_line(line, level)
        return
    http_request = http_request_fields(scope, path, status, elapsed, user_agent)
    fields: dict[str, Any] = {"httpRequest": http_request, "route": route}
    if handler is not None and isinstance(formatter, CloudLoggingFormatter):
        handler.write_line(
            formatter.format_fields(level, access_log.name, message, time.time(), fields), level
        )
        return
    access_log.log(level, ACCESS_FORMAT, *args, extra=fields)


def http_request_fields(
    scope: Scope, path: str, status: int, elapsed: float, user_agent: str | None
) -> dict[str, Any]:
    """Cloud Logging's `httpRequest`, which its request view and latency charts read."""
    http_request: dict[str, Any] = {
        "requestMethod": scope["method"],
        "requestUrl": path,
        "status": status,
        "latency": f"{elapsed:.6f}s",
        "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
    }
    if user_agent:
        http_request["userAgent"] = user_agent
    client = scope.get("client")
    if client:
        http_request["remoteIp"] = client[0]
    return http_request


ACCESS_FORMAT = "%s %s %d %.1fms"


# --- /metrics ---------------------------------------------------------------------------------


def bearer_matches(authorization: str | None, expected: bytes) -> bool:
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant-time, so response timing never reveals how much of a guess was right.
    return hmac.compare_digest(credentials.strip().encode(), expected)


def metrics_route(
    registry: CollectorRegistry, token: str | None
) -> Callable[[Request], Awaitable[Response]]:
    """A `/metrics` endpoint for `registry`; with a token it demands `Authorization: Bearer`."""
    expected = token.encode() if token else None

    async def metrics(request: Request) -> Response:
        """This instance's Prometheus metrics."""
        if expected is not None and not bearer_matches(
            request.headers.get("authorization"), expected
        ):
            body = {"detail": "A valid metrics token is required", "code": "UNAUTHORIZED"}
            headers = {"WWW-Authenticate": "Bearer"}
            return JSONResponse(body, status_code=401, headers=headers)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        headers = {"Cache-Control": "no-store"}
        return Response(encode(registry), media_type=content_type, headers=headers)

    return metrics
