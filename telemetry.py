"""What operators see: JSON logs Cloud Logging reads, request ids, and Prometheus metrics.

* Logs: one JSON object per line on stdout (`severity`, `message`, `time`, `httpRequest`, the
  request's id and Cloud Trace id), human-readable text locally. Every line passes through
  `Redactor` last, so tokens, JWTs and URL signatures never reach a log, whoever wrote the line.
* `RequestTelemetryMiddleware`: one pure ASGI middleware gives each request its id, times it,
  records its metrics and writes its access log line.
* `Metrics`: the `gateway_*` metrics in a registry of their own (one per app, so tests can build
  many apps), plus wrappers that time the store, storage and RunPod and count credits and job
  outcomes as the store reports them, so no other module needs to know about metrics.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from errors import GatewayError
from models import IdempotencyClaim, Job, JobPage, JobStatus, NewJob, StatusUpdate, User
from r2_client import ObjectStorage
from store import Store

T = TypeVar("T")

access_log = logging.getLogger("gateway.access")

# --- Request context --------------------------------------------------------------------------

# Set by the middleware for the duration of a request; every log line of the request reads them.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
trace_id_var: ContextVar[str | None] = ContextVar("trace_id", default=None)

# A caller's id is echoed into logs and a response header: accept only a short, plain token.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
_NO_TRACE = "0" * 32  # W3C: an all-zero trace id is invalid


def current_request_id() -> str | None:
    """The id of the request being handled, for a response header or an error body."""
    return request_id_var.get()


def valid_request_id(value: str | None) -> str | None:
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


def trace_id_from(cloud_trace: str | None, traceparent: str | None) -> str | None:
    """The Cloud Trace id: `X-Cloud-Trace-Context: TRACE/SPAN;o=1`, else W3C `traceparent`."""
    if cloud_trace:
        candidate = cloud_trace.split("/", 1)[0].strip()
        if _TRACE_ID.fullmatch(candidate) and candidate != _NO_TRACE:
            return candidate.lower()
    if traceparent:
        parts = traceparent.strip().split("-")
        if len(parts) >= 4 and _TRACE_ID.fullmatch(parts[1]) and parts[1] != _NO_TRACE:
            return parts[1].lower()
    return None


# --- Redaction --------------------------------------------------------------------------------

# What can follow in a URL, in plain text or inside a JSON string. The patterns below stay
# linear in the line's length: a caller controls some logged text (paths, user agents).
_URL_CHAR = r"[^\s\"'<>\\]"
_QUERY_CHAR = r"[^\s\"'<>\\?]"
_SECRET_KEY = r"(?:token|sig|X-Amz-Signature|X-Amz-Credential)="
_SECRETS = re.compile(
    r"(?P<scheme>\bBearer\s+)[^\s\"'\\,;]+"
    r"|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    # A whole query string goes when any part is secret: its other parts (X-Amz-Date, expires,
    # jobId) say nothing useful without it.
    rf"|\?{_QUERY_CHAR}*?{_SECRET_KEY}{_URL_CHAR}*"
    # The same keys outside a URL, e.g. a logged form body or parameter list.
    rf"|(?P<key>{_SECRET_KEY})[^&\s\"'<>\\]+",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


def _redacted(match: re.Match[str]) -> str:
    if match["scheme"]:
        return match["scheme"] + REDACTED
    if match["key"]:
        return match["key"] + REDACTED
    return "?" + REDACTED if match[0].startswith("?") else "[jwt]"


def _may_hold_secret(text: str) -> bool:
    """Whether `text` holds what every secret form above contains: most lines hold none, and
    this check costs a twentieth of running the pattern."""
    lowered = text.lower()
    return (
        "bearer" in lowered
        or "eyj" in lowered
        or "token=" in lowered
        or "sig=" in lowered
        or "x-amz-" in lowered
    )


class Redactor:
    """Removes secrets from a finished log line: known values first, then secret-shaped text."""

    # Shorter values would match ordinary words ("local" is the stand-in's API key).
    MIN_SECRET_CHARS = 8

    def __init__(self, known_secrets: Iterable[str | None] = ()) -> None:
        values = {value for value in known_secrets if value and len(value) >= self.MIN_SECRET_CHARS}
        # Longest first, so a secret that contains another is removed whole.
        self._known = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._known:
            if value in text:
                text = text.replace(value, REDACTED)
        return _SECRETS.sub(_redacted, text) if _may_hold_secret(text) else text


redact = Redactor()


# --- Log formatting ---------------------------------------------------------------------------

TRACE_FIELD = "logging.googleapis.com/trace"
_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per record, in the shape Cloud Logging and Error Reporting read."""

    def __init__(self, project_id: str | None = None, redactor: Redactor = redact) -> None:
        super().__init__()
        self._trace_prefix = f"projects/{project_id}/traces/" if project_id else None
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "time": rfc3339(record.created),
            "logger": record.name,
        }
        self._add_request_context(entry)
        for name in ("httpRequest", "route"):
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        stack_trace = self._stack_trace(record)
        if stack_trace:
            entry["stack_trace"] = stack_trace
        return self._redact(_dumps(entry))

    def _add_request_context(self, entry: dict[str, Any]) -> None:
        request_id = request_id_var.get()
        if request_id is not None:
            entry["requestId"] = request_id
        trace_id = trace_id_var.get()
        if trace_id is not None and self._trace_prefix is not None:
            entry[TRACE_FIELD] = self._trace_prefix + trace_id

    def _stack_trace(self, record: logging.LogRecord) -> str | None:
        # Error Reporting groups errors by this text; it must be Python's own traceback format.
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
            return record.exc_text
        return self.formatStack(record.stack_info) if record.stack_info else None


def _dumps(entry: dict[str, Any]) -> str:
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:  # text orjson refuses (lone surrogates): the slower encoder escapes it
        return json.dumps(entry, default=str)


# What could end a line or rewrite a terminal when written raw: C0 and C1 controls (newline,
# carriage return, ESC), Unicode's line and paragraph separators, the bidi overrides, and lone
# surrogates (which a UTF-8 stdout cannot even write).
_UNSAFE_IN_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Every line of a traceback is indented: only a record's own first line starts at column 0.
TRACEBACK_INDENT = "    "


def escape_controls(text: str) -> str:
    """`text` on one line, its control characters written as escapes (`\\n`, `\\x1b`)."""
    if not _UNSAFE_IN_TEXT.search(text):
        return text
    return _UNSAFE_IN_TEXT.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class ConsoleFormatter(logging.Formatter):
    """Plain text for a terminal, with the request id when there is one.

    One record is one line, whatever its fields hold: a path with an encoded newline
    (`/x%0A{"severity":"CRITICAL"}`) must not write a second, forged line. A traceback follows
    on lines of its own, each escaped and indented, so none can pass for a record.
    """

    def __init__(self, redactor: Redactor = redact) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        record.request_tag = f" [{request_id}]" if request_id else ""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        lines = [escape_controls(self.formatMessage(record))]
        lines += [TRACEBACK_INDENT + escape_controls(line) for line in self._trace_lines(record)]
        return self._redact("\n".join(lines))

    def _trace_lines(self, record: logging.LogRecord) -> list[str]:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        text = "\n".join(filter(None, [record.exc_text, record.stack_info]))
        return text.splitlines() if text else []


class _CurrentStdout:
    """Writes to whatever `sys.stdout` is now, so a test runner swapping it never breaks logging."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


HANDLER_NAME = "gateway-stdout"


class SecondTracebackFilter(logging.Filter):
    """Drops uvicorn's copy of a request's traceback.

    An exception that escapes a request is logged by the app's 500 handler, then re-raised and
    logged again by uvicorn; Error Reporting would count every error twice. The request id still
    being set means it passed the middleware, and so the app's handler.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        duplicate = str(record.msg).startswith("Exception in ASGI application")
        return not (duplicate and request_id_var.get() is not None)


def configure_logging(
    json_logs: bool,
    project_id: str | None = None,
    *,
    known_secrets: Iterable[str | None] = (),
    level: int = logging.INFO,
) -> None:
    """Route every log (ours, uvicorn's, libraries') through one redacting stdout handler.

    Safe to call again: it replaces only what it installed before.
    """
    redactor = Redactor(known_secrets)
    formatter = (
        CloudLoggingFormatter(project_id, redactor) if json_logs else ConsoleFormatter(redactor)
    )
    _install_root_handler(formatter, level)
    _route_uvicorn_logs()
    # httpx logs every request URL at INFO; the upstream metrics say the same without the noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _install_root_handler(formatter: logging.Formatter, level: int) -> None:
    handler = logging.StreamHandler(_CurrentStdout())
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # No line shows the thread, process or source line: skip looking them up for every record
    # (the logging HOWTO's "Optimization" section; the frame walk alone is a few µs a line).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]


def _route_uvicorn_logs() -> None:
    # uvicorn's loggers have their own plain-text handlers: send their lines through ours instead.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    server_errors = logging.getLogger("uvicorn.error")
    for old in [f for f in server_errors.filters if isinstance(f, SecondTracebackFilter)]:
        server_errors.removeFilter(old)
    server_errors.addFilter(SecondTracebackFilter())
    # uvicorn's access line carries the query string (webhook tokens, URL signatures); ours
    # replaces it. Start uvicorn with --no-access-log as well.
    logging.getLogger("uvicorn.access").disabled = True


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
WebhookFailureReason = Literal["missing", "bad_signature", "bad_token"]
JOB_OUTCOMES: tuple[JobOutcome, ...] = ("done", "failed", "canceled", "timed_out")
CREDIT_KINDS: tuple[CreditKind, ...] = ("charged", "refunded", "granted")
WEBHOOK_FAILURE_REASONS: tuple[WebhookFailureReason, ...] = (
    "missing",
    "bad_signature",
    "bad_token",
)


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
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

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
        return UpstreamTimer(self.upstream_duration, upstream, operation)

    def observe_upstream(self, upstream: str, operation: str, ok: bool, seconds: float) -> None:
        outcome = "ok" if ok else "error"
        self.upstream_duration.labels(upstream, operation, outcome).observe(seconds)


def upstream_failed(exc: BaseException | None) -> bool:
    """Whether a call failed in the upstream, not merely answered "no" (402, 404, 409...)."""
    if exc is None:
        return False
    return not (isinstance(exc, GatewayError) and exc.status_code < 500)


class UpstreamTimer:
    """Times one upstream call in a `with` block; an exception marks it `error`."""

    __slots__ = ("_histogram", "_upstream", "_operation", "_start")

    def __init__(self, histogram: Histogram, upstream: str, operation: str) -> None:
        self._histogram, self._upstream, self._operation = histogram, upstream, operation
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
        outcome = "error" if upstream_failed(exc) else "ok"
        elapsed = time.perf_counter() - self._start
        self._histogram.labels(self._upstream, self._operation, outcome).observe(elapsed)


# --- The request middleware -------------------------------------------------------------------

# Probes and scrapes: measured like any route, but a successful one is not worth a log line.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


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
        # The same 32 hex digits as uuid4().hex, without building a UUID object per request.
        request_id = valid_request_id(caller.request_id) or os.urandom(16).hex()
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
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", None)
    return None


def log_access(
    level: int, scope: Scope, status: int, elapsed: float, route: str, user_agent: str | None
) -> None:
    # The path only: the query string can hold a webhook token or a URL signature.
    path = scope["path"]
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
    access_log.log(
        level,
        "%s %s %d %.1fms",
        scope["method"],
        path,
        status,
        elapsed * 1000,
        extra={"httpRequest": http_request, "route": route},
    )


# --- Upstream wrappers ------------------------------------------------------------------------


class InstrumentedStore:
    """A `Store` that times every call and counts the credits and outcomes the store reports.

    Counting follows the store's answers, not our intentions: a refund is counted when
    `apply_status` says the job changed, so a webhook delivered three times counts once.
    """

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks: the wrapped store's extras pass through.
        if name in ("_store", "_metrics"):
            raise AttributeError(name)
        return getattr(self._store, name)

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        with self._metrics.time_upstream("store", operation):
            return await call

    async def find_user(self, user_id: str) -> User | None:
        return await self._timed("find_user", self._store.find_user(user_id))

    async def get_or_create_user(self, user_id: str) -> User:
        user = await self._timed("get_or_create_user", self._store.get_or_create_user(user_id))
        # Non-zero only on the one answer that created the user: each signup counts once.
        self._metrics.count_credits("granted", user.signup_grant)
        return user

    async def grant_credits(self, user_id: str, amount: int, reason: str) -> User:
        call = self._store.grant_credits(user_id, amount, reason)
        user = await self._timed("grant_credits", call)
        self._metrics.count_credits("granted", amount + user.signup_grant)
        return user

    async def charge_and_create_job(
        self, new: NewJob, max_active: int, idempotency_key: str | None = None
    ) -> Job:
        call = self._store.charge_and_create_job(new, max_active, idempotency_key)
        job = await self._timed("charge_and_create_job", call)
        self._metrics.count_credits("granted", job.signup_grant)
        self._metrics.count_credits("charged", job.cost)
        return job

    async def record_runpod_id(self, job_id: str, runpod_id: str) -> Job:
        call = self._store.record_runpod_id(job_id, runpod_id)
        return await self._timed("record_runpod_id", call)

    async def apply_status(self, job_id: str, update: StatusUpdate) -> tuple[Job, bool]:
        job, changed = await self._timed("apply_status", self._store.apply_status(job_id, update))
        if changed:
            self._metrics.count_job_settled(job)
        return job, changed

    async def cancel_job(self, user_id: str, job_id: str) -> Job:
        job = await self._timed("cancel_job", self._store.cancel_job(user_id, job_id))
        self._metrics.count_job_settled(job)
        return job

    async def get_job(self, user_id: str, job_id: str) -> Job:
        return await self._timed("get_job", self._store.get_job(user_id, job_id))

    async def find_job(self, job_id: str) -> Job | None:
        return await self._timed("find_job", self._store.find_job(job_id))

    async def find_job_by_runpod_id(self, runpod_id: str) -> Job | None:
        call = self._store.find_job_by_runpod_id(runpod_id)
        return await self._timed("find_job_by_runpod_id", call)

    async def list_jobs(self, user_id: str, limit: int, cursor: str | None) -> JobPage:
        return await self._timed("list_jobs", self._store.list_jobs(user_id, limit, cursor))

    async def save_download_url(self, job_id: str, url: str, expires_at: int) -> None:
        call = self._store.save_download_url(job_id, url, expires_at)
        await self._timed("save_download_url", call)

    async def ledger_totals(self) -> dict[str, dict[str, int]]:
        return await self._timed("ledger_totals", self._store.ledger_totals())

    async def claim_idempotency_key(
        self, user_id: str, key: str, fingerprint: str, now: int, ttl_ms: int, stale_ms: int
    ) -> IdempotencyClaim:
        call = self._store.claim_idempotency_key(user_id, key, fingerprint, now, ttl_ms, stale_ms)
        return await self._timed("claim_idempotency_key", call)

    async def complete_idempotency_key(
        self, user_id: str, key: str, status_code: int, body: str
    ) -> None:
        call = self._store.complete_idempotency_key(user_id, key, status_code, body)
        await self._timed("complete_idempotency_key", call)

    async def release_idempotency_key(self, user_id: str, key: str) -> None:
        call = self._store.release_idempotency_key(user_id, key)
        await self._timed("release_idempotency_key", call)

    async def purge_idempotency_keys(self, before: int, limit: int) -> int:
        call = self._store.purge_idempotency_keys(before, limit)
        return await self._timed("purge_idempotency_keys", call)

    async def claim_stale_jobs(self, stale_before: int, now: int, limit: int) -> list[Job]:
        call = self._store.claim_stale_jobs(stale_before, now, limit)
        return await self._timed("claim_stale_jobs", call)

    async def claim_job_check(self, job_id: str, stale_before: int, now: int) -> Job | None:
        call = self._store.claim_job_check(job_id, stale_before, now)
        return await self._timed("claim_job_check", call)

    async def audit(self) -> list[str]:
        return await self._timed("audit", self._store.audit())

    async def ping(self) -> None:
        await self._timed("ping", self._store.ping())

    async def close(self) -> None:
        await self._store.close()


class InstrumentedStorage:
    """An `ObjectStorage` whose HEADs and presigns are timed as upstream `r2`."""

    def __init__(self, storage: ObjectStorage, metrics: Metrics, upstream: str = "r2") -> None:
        self._storage = storage
        self._metrics = metrics
        self._upstream = upstream

    def __getattr__(self, name: str) -> Any:
        if name in ("_storage", "_metrics", "_upstream"):
            raise AttributeError(name)
        return getattr(self._storage, name)

    def presign_get(self, key: str, ttl_seconds: int) -> str:
        with self._metrics.time_upstream(self._upstream, "presign_get"):
            return self._storage.presign_get(key, ttl_seconds)

    def presign_put(self, key: str, ttl_seconds: int, content_type: str) -> str:
        with self._metrics.time_upstream(self._upstream, "presign_put"):
            return self._storage.presign_put(key, ttl_seconds, content_type)

    async def exists(self, key: str) -> bool:
        with self._metrics.time_upstream(self._upstream, "head"):
            return await self._storage.exists(key)

    async def close(self) -> None:
        await self._storage.close()


RUNPOD_OPERATIONS = frozenset(
    {"run", "runsync", "status", "cancel", "health", "stream", "retry", "purge-queue"}
)


def runpod_operation(path: str) -> str:
    """`/v2/<endpoint>/status/<runpod id>` -> `status`: the verb, never the id."""
    for segment in reversed(path.rstrip("/").rsplit("/", 2)[-2:]):
        if segment in RUNPOD_OPERATIONS:
            return segment
    return "other"


class InstrumentedTransport(httpx.AsyncBaseTransport):
    """Times each HTTP exchange until the response headers arrive (RunPod's bodies are small).

    `error` means no answer, or an HTTP status of 400 or more.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        metrics: Metrics,
        upstream: str = "runpod",
        operation_of: Callable[[str], str] = runpod_operation,
    ) -> None:
        self._inner = inner
        self._metrics = metrics
        self._upstream = upstream
        self._operation_of = operation_of

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        operation = self._operation_of(request.url.path)
        start = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._observe(operation, False, start)
            raise
        self._observe(operation, response.status_code < 400, start)
        return response

    def _observe(self, operation: str, ok: bool, start: float) -> None:
        elapsed = time.perf_counter() - start
        self._metrics.observe_upstream(self._upstream, operation, ok, elapsed)

    async def aclose(self) -> None:
        await self._inner.aclose()


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
