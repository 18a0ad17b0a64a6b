"""Logs, request ids, redaction and metrics, each on a small app or a real store of its own."""

from __future__ import annotations

import inspect
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from config import Settings
from errors import InsufficientCredits, JobNotCancelable, StoreUnavailable
from local_storage import LocalStorage
from models import JobStatus, NewJob, StatusUpdate
from runpod_client import RunPodClient, RunPodNotFound, RunPodUnavailable, build_http_client
from store import SQLiteStore, Store
from telemetry import (
    TRACEBACK_INDENT,
    CloudLoggingFormatter,
    ConsoleFormatter,
    InstrumentedStorage,
    InstrumentedStore,
    InstrumentedTransport,
    Metrics,
    Redactor,
    RequestTelemetryMiddleware,
    configure_logging,
    current_request_id,
    escape_controls,
    metrics_route,
    redact,
    request_id_var,
    runpod_operation,
    trace_id_from,
)
from tests.conftest import RUNPOD_URL, TokenFactory, bearer, serve

PROJECT = "cineweave-prod"
CLOUD_TRACE = "105445aa7843bc8bf206b12000100000"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJ1c2VyX2FsaWNlIn0.c2lnbmF0dXJlLXBhcnQ"
METRICS_TOKEN = "metrics-token-0123456789"
log = logging.getLogger("gateway.test_telemetry")


# --- Helpers ----------------------------------------------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of one scraped sample, read back from the exposition text as Prometheus would."""
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def all_label_values(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {
        value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        for value in found.labels.values()
    }


def http_count(metrics: Metrics, method: str, route: str, status: str) -> float | None:
    labels = {"method": method, "route": route, "status": status}
    return sample(metrics, "gateway_http_request_duration_seconds_count", **labels)


def upstream_count(metrics: Metrics, upstream: str, operation: str, outcome: str) -> float | None:
    labels = {"upstream": upstream, "operation": operation, "outcome": outcome}
    return sample(metrics, "gateway_upstream_request_duration_seconds_count", **labels)


def credits(metrics: Metrics, kind: str) -> float | None:
    return sample(metrics, "gateway_credits_total", kind=kind)


def outcomes(metrics: Metrics) -> dict[str, float | None]:
    names = ("done", "failed", "canceled", "timed_out")
    return {name: sample(metrics, "gateway_job_outcomes_total", outcome=name) for name in names}


def build_app(metrics: Metrics, token: str | None = None, min_logged_status: int = 0) -> FastAPI:
    """A small app shaped like the gateway: a templated route, a failing one, probes, /metrics."""
    app = FastAPI()

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, str]:
        log.info("looking up %s", job_id)
        return {"jobId": job_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("the bug")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # What main.py's 500 handler does, plus the request id it is asked to add.
        log.exception("unhandled error on %s", request.url.path)
        body = {"detail": "Internal server error", "code": "INTERNAL_ERROR"}
        return JSONResponse(body, 500, headers={"X-Request-ID": current_request_id() or ""})

    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/metrics", metrics_route(metrics.registry, token), include_in_schema=False)
    app.add_middleware(
        RequestTelemetryMiddleware, metrics=metrics, min_logged_status=min_logged_status
    )
    return app


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def client(metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(metrics), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as opened:
        yield opened


LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_logs() -> Iterator[LogLines]:
    """Every log line, as the JSON formatter writes it for Cloud Logging."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(CloudLoggingFormatter(PROJECT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def access_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "gateway.access"]


def gateway_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The app's own lines, without the test client's httpx line that follows each request."""
    return [line for line in lines if line["logger"].startswith("gateway")]


class TestAccessLogErrorsOnly:
    """ACCESS_LOG=errors: lines for refusals and failures only; every request is still counted."""

    async def test_only_answers_of_400_and_up_are_logged(
        self, metrics: Metrics, json_logs: LogLines
    ) -> None:
        app = build_app(metrics, min_logged_status=400)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as c:
            assert (await c.get("/jobs/job_1")).status_code == 200
            assert (await c.get("/nowhere")).status_code == 404
            assert (await c.get("/boom")).status_code == 500
        logged = [
            (line["httpRequest"]["status"], line["severity"]) for line in access_lines(json_logs())
        ]
        assert logged == [(404, "INFO"), (500, "ERROR")]
        counted = metrics.registry.get_sample_value(
            "gateway_http_request_duration_seconds_count",
            {"method": "GET", "route": "/jobs/{job_id}", "status": "200"},
        )
        assert counted == 1

    async def test_the_setting_reaches_the_gateway(
        self, settings_factory, make_token, json_logs: LogLines
    ) -> None:
        from tests.conftest import bearer, serve

        headers = bearer(make_token("user_quiet"))
        async with serve(settings_factory(access_log="errors")) as client:
            assert (await client.get("/credits", headers=headers)).status_code == 200
            assert (
                await client.get("/jobs/job_doesnotexist00", headers=headers)
            ).status_code == 404
        logged = [line["httpRequest"]["status"] for line in access_lines(json_logs())]
        assert logged == [404]


# --- Request ids ------------------------------------------------------------------------------


class TestRequestId:
    async def test_valid_id_is_kept(self, client: httpx.AsyncClient, json_logs: LogLines) -> None:
        response = await client.get("/jobs/job_1", headers={"X-Request-ID": "req-1:a.b_C"})
        assert response.headers["X-Request-ID"] == "req-1:a.b_C"
        assert {line["requestId"] for line in gateway_lines(json_logs())} == {"req-1:a.b_C"}

    @pytest.mark.parametrize(
        "given", ["", "has space", "x" * 129, "<script>", "id\u00e9", "a/b", "a;b"]
    )
    async def test_invalid_id_is_replaced(self, client: httpx.AsyncClient, given: str) -> None:
        headers = {"X-Request-ID": given.encode("utf-8")}
        response = await client.get("/jobs/job_1", headers=headers)  # type: ignore[arg-type]
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])

    async def test_generated_when_missing_and_unique(self, client: httpx.AsyncClient) -> None:
        first = (await client.get("/jobs/job_1")).headers["X-Request-ID"]
        second = (await client.get("/jobs/job_1")).headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second

    async def test_every_line_of_the_request_carries_it(
        self, client: httpx.AsyncClient, json_logs: LogLines
    ) -> None:
        response = await client.get("/jobs/job_1")
        lines = gateway_lines(json_logs())
        assert [line["message"] for line in lines][0] == "looking up job_1"
        assert len(lines) == 2
        assert all(line["requestId"] == response.headers["X-Request-ID"] for line in lines)

    async def test_not_left_behind_after_the_request(self, client: httpx.AsyncClient) -> None:
        await client.get("/jobs/job_1")
        assert current_request_id() is None

    async def test_500_carries_the_id_and_logs_the_stack_but_never_returns_it(
        self, client: httpx.AsyncClient, json_logs: LogLines
    ) -> None:
        response = await client.get("/boom", headers={"X-Request-ID": "req-500"})
        assert response.status_code == 500
        assert response.headers["X-Request-ID"] == "req-500"
        assert "Traceback" not in response.text and "the bug" not in response.text
        [error] = [line for line in json_logs() if "stack_trace" in line]
        assert error["requestId"] == "req-500" and error["severity"] == "ERROR"
        assert error["stack_trace"].startswith("Traceback (most recent call last):")
        assert error["stack_trace"].rstrip().endswith("RuntimeError: the bug")

    async def test_lifespan_passes_through(self, metrics: Metrics) -> None:
        app = build_app(metrics)
        async with app.router.lifespan_context(app):
            pass  # the middleware only wraps http scopes; a lifespan must still start and stop


# --- Trace ids --------------------------------------------------------------------------------


class TestTraceId:
    def test_cloud_trace_context(self) -> None:
        assert trace_id_from(f"{CLOUD_TRACE}/1;o=1", None) == CLOUD_TRACE

    def test_traceparent(self) -> None:
        assert trace_id_from(None, f"00-{W3C_TRACE}-00f067aa0ba902b7-01") == W3C_TRACE

    def test_cloud_header_wins_when_both_are_sent(self) -> None:
        traceparent = f"00-{W3C_TRACE}-00f067aa0ba902b7-01"
        assert trace_id_from(f"{CLOUD_TRACE}/1", traceparent) == CLOUD_TRACE

    @pytest.mark.parametrize(
        ("cloud", "traceparent"),
        [
            ("not-hex/1", None),
            ("abc/1", None),
            ("0" * 32 + "/1", None),
            (None, "00-" + "0" * 32 + "-00f067aa0ba902b7-01"),
            (None, "garbage"),
            (None, None),
        ],
    )
    def test_malformed_headers_give_none(self, cloud: str | None, traceparent: str | None) -> None:
        assert trace_id_from(cloud, traceparent) is None

    async def test_log_lines_name_the_trace(
        self, client: httpx.AsyncClient, json_logs: LogLines
    ) -> None:
        await client.get("/jobs/job_1", headers={"X-Cloud-Trace-Context": f"{CLOUD_TRACE}/7;o=1"})
        expected = f"projects/{PROJECT}/traces/{CLOUD_TRACE}"
        lines = gateway_lines(json_logs())
        assert [line["logging.googleapis.com/trace"] for line in lines] == [expected] * 2

    async def test_log_lines_name_a_w3c_trace(
        self, client: httpx.AsyncClient, json_logs: LogLines
    ) -> None:
        headers = {"traceparent": f"00-{W3C_TRACE}-00f067aa0ba902b7-01"}
        await client.get("/jobs/job_1", headers=headers)
        expected = f"projects/{PROJECT}/traces/{W3C_TRACE}"
        lines = gateway_lines(json_logs())
        assert {line["logging.googleapis.com/trace"] for line in lines} == {expected}

    def test_no_trace_field_without_a_project(self) -> None:
        formatter = CloudLoggingFormatter(project_id=None)
        record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "hello", None, None)
        assert "logging.googleapis.com/trace" not in json.loads(formatter.format(record))


# --- The JSON formatter -----------------------------------------------------------------------


def format_json(message: str, *args: Any, level: int = logging.INFO, **extra: Any) -> Any:
    record = logging.LogRecord("gateway.jobs", level, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return json.loads(CloudLoggingFormatter(PROJECT).format(record))


class TestJsonFormatter:
    def test_fields_cloud_logging_reads(self) -> None:
        entry = format_json("job %s moved to %s", "job_1", "done", level=logging.WARNING)
        assert entry["severity"] == "WARNING"
        assert entry["message"] == "job job_1 moved to done"
        assert entry["logger"] == "gateway.jobs"
        assert entry["time"].endswith("Z")
        assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0
        assert "requestId" not in entry and "stack_trace" not in entry

    @pytest.mark.parametrize(
        ("level", "severity"),
        [(logging.DEBUG, "DEBUG"), (logging.INFO, "INFO"), (logging.ERROR, "ERROR")]
        + [(logging.CRITICAL, "CRITICAL"), (25, "DEFAULT")],
    )
    def test_severity_from_level(self, level: int, severity: str) -> None:
        assert format_json("x", level=level)["severity"] == severity

    def test_exception_becomes_stack_trace(self) -> None:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(CloudLoggingFormatter(PROJECT))
        logger = logging.getLogger("gateway.test_telemetry.exc")
        logger.addHandler(handler)
        try:
            raise ValueError("bad value")
        except ValueError:
            logger.exception("it broke")
        finally:
            logger.removeHandler(handler)
        entry = json.loads(stream.getvalue())
        assert entry["message"] == "it broke" and entry["severity"] == "ERROR"
        assert "ValueError: bad value" in entry["stack_trace"]

    async def test_access_line(self, client: httpx.AsyncClient, json_logs: LogLines) -> None:
        headers = {"User-Agent": "RunPod/1.0"}
        await client.get("/jobs/job_1?jobId=job_1&token=abc123secret", headers=headers)
        [line] = access_lines(json_logs())
        request = line["httpRequest"]
        assert request["requestMethod"] == "GET"
        assert request["requestUrl"] == "/jobs/job_1"  # never the query string
        assert request["status"] == 200
        assert re.fullmatch(r"\d+\.\d{6}s", request["latency"])
        assert request["userAgent"] == "RunPod/1.0"
        assert request["remoteIp"] == "127.0.0.1"
        assert line["route"] == "/jobs/{job_id}" and line["severity"] == "INFO"
        assert "abc123secret" not in json.dumps(json_logs())

    async def test_5xx_access_line_is_an_error(
        self, client: httpx.AsyncClient, json_logs: LogLines
    ) -> None:
        await client.get("/boom")
        [line] = access_lines(json_logs())
        assert line["severity"] == "ERROR" and line["httpRequest"]["status"] == 500

    async def test_probes_are_counted_but_not_logged(
        self, client: httpx.AsyncClient, metrics: Metrics, json_logs: LogLines
    ) -> None:
        await client.get("/healthz")
        await client.get("/metrics")
        assert access_lines(json_logs()) == []
        assert http_count(metrics, "GET", "/healthz", "200") == 1

    def test_console_format_is_plain_text_and_redacted(self) -> None:
        record = logging.LogRecord(
            "gateway", logging.INFO, __file__, 1, "calling %s", (f"Bearer {JWT}",), None
        )
        text = ConsoleFormatter().format(record)
        assert "INFO gateway: calling Bearer [redacted]" in text and "eyJ" not in text


# --- Log injection in the text format ---------------------------------------------------------

FORGED = '{"severity":"CRITICAL","message":"forged"}'
# A text record starts with its timestamp; anything else must be an indented continuation.
RECORD_START = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} [A-Z]+ ")


@pytest.fixture
def text_lines() -> Iterator[Callable[[], list[str]]]:
    """Every physical line the text (console) formatter writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: stream.getvalue().splitlines()
    root.removeHandler(handler)
    root.setLevel(level)


def assert_no_forged_lines(lines: list[str]) -> None:
    for line in lines:
        assert RECORD_START.match(line) or line.startswith(TRACEBACK_INDENT), line


class TestTextLogInjection:
    @pytest.mark.parametrize(
        "path",
        [f"/jobs/x%0A{FORGED}", f"/jobs/x%0D%0A{FORGED}", "/jobs/x%E2%80%A8forged", "/x%0A"],
    )
    async def test_access_line_stays_one_line(self, client, text_lines, path) -> None:
        await client.get(path)
        lines = text_lines()
        assert all(RECORD_START.match(line) for line in lines), lines  # no traceback here
        [access] = [line for line in lines if "gateway.access" in line]
        assert ": GET /" in access

    async def test_escapes_are_readable(self, client, text_lines) -> None:
        await client.get("/jobs/x%0A%1B%5B31mred%09tab")
        [line] = [line for line in text_lines() if "gateway.access" in line]
        assert "GET /jobs/x\\n\\x1b[31mred\\ttab 200" in line

    async def test_internal_error_line_and_traceback(self, client, text_lines) -> None:
        await client.get(f"/boom%0A{FORGED}")  # an unknown route: 404, one line
        log.error("job %s failed", f"x\n{FORGED}", exc_info=ValueError(f"bad\n{FORGED}"))
        lines = text_lines()
        assert_no_forged_lines(lines)
        assert not [line for line in lines if line.startswith("{")]
        error = [line for line in lines if "job x" in line]
        assert error == [error[0]] and error[0].endswith(f"job x\\n{FORGED} failed")
        assert f"{TRACEBACK_INDENT}ValueError: bad" in lines

    def test_every_field_is_escaped(self, text_lines) -> None:
        # A logger name or an argument from a library: the whole line is escaped, not only ours.
        logging.getLogger("gateway.evil\nname").warning("%s", "\u2028\ud800\x85")
        [line] = text_lines()
        assert line.endswith("gateway.evil\\nname: \\u2028\\ud800\\x85")

    def test_plain_text_is_untouched(self) -> None:
        assert escape_controls("GET /jobs 200 1.2ms é ✓") == "GET /jobs 200 1.2ms é ✓"


# --- Redaction --------------------------------------------------------------------------------

WEBHOOK_LINE = (
    "HTTP Request: POST https://gateway.test/webhooks/runpod?jobId=job_Xk3v9QyL0aPz7wRt"
    '&token=9f86d081884c7d659a2feaa0c55ad015 "HTTP/1.1 200 OK"'
)
PRESIGNED = (
    "https://acct.r2.cloudflarestorage.com/videos/u/job_1.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261125%2Fauto%2Fs3%2Faws4_request&X-Amz-Date=20261125T1"
    "&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=5d672d79c15b13162d9279b0855c"
)
LOCAL_URL = "http://127.0.0.1:8000/_local/storage/videos/u/job_1.mp4?expires=1764000000&sig=ab12cd"


class TestRedaction:
    @pytest.mark.parametrize(
        ("line", "secrets", "kept"),
        [
            (WEBHOOK_LINE, ["9f86d081884c7d", "jobId=job_"], "/webhooks/runpod?[redacted]"),
            (f"Authorization: Bearer {JWT}", [JWT, "eyJ"], "Authorization: Bearer [redacted]"),
            (f"GET {PRESIGNED} failed", ["5d672d79c1", "AKIAEXAMPLE"], "job_1.mp4?[redacted] fail"),
            (f"upload to {LOCAL_URL}", ["ab12cd", "expires="], "job_1.mp4?[redacted]"),
            (f"decoded {JWT} ok", ["eyJ", "c2lnbmF0dXJl"], "decoded [jwt] ok"),
            ("url=https://x.test/a?X-Amz-Credential=AKIA1 end", ["AKIA1"], "/a?[redacted] end"),
            ("params: token=abc&x=1", ["abc"], "token=[redacted]&x=1"),
            ("Bearer rpa_ABCDEF0123456789", ["rpa_ABCDEF"], "Bearer [redacted]"),
        ],
    )
    def test_secret_forms(self, line: str, secrets: list[str], kept: str) -> None:
        redacted = redact(line)
        assert kept in redacted
        assert not [secret for secret in secrets if secret in redacted]

    def test_ordinary_text_is_untouched(self) -> None:
        line = "GET /jobs?limit=20&cursor=abc 200: what? nothing secret, signup=100"
        assert redact(line) == line

    def test_known_secret_values(self) -> None:
        redactor = Redactor(["convex-deploy-key|xyz", "short", None])
        assert redactor("key is convex-deploy-key|xyz!") == "key is [redacted]!"
        assert redactor("short stays") == "short stays"

    def test_json_stays_valid(self) -> None:
        entry = format_json("fetched %s and %s", PRESIGNED, f"Bearer {JWT}")
        assert entry["message"] == "fetched https://acct.r2.cloudflarestorage.com/videos/u/" + (
            "job_1.mp4?[redacted] and Bearer [redacted]"
        )

    def test_stack_traces_are_redacted(self) -> None:
        try:
            raise RuntimeError(f"upstream refused {LOCAL_URL}")
        except RuntimeError as exc:
            record = logging.LogRecord(
                "gateway", logging.ERROR, __file__, 1, "x", None, (type(exc), exc, None)
            )
        entry = json.loads(CloudLoggingFormatter().format(record))
        assert "?[redacted]" in entry["stack_trace"] and "ab12cd" not in entry["stack_trace"]

    async def test_httpx_request_line(self, json_logs: LogLines) -> None:
        """httpx logs each URL at INFO: the line itself, through our formatter, holds no token."""
        httpx_logger = logging.getLogger("httpx")
        level = httpx_logger.level
        httpx_logger.setLevel(logging.INFO)
        transport = httpx.MockTransport(lambda request: httpx.Response(200))
        try:
            async with httpx.AsyncClient(transport=transport) as http:
                await http.post("https://gateway.test/webhooks/runpod?jobId=job_1&token=s3cr3t")
        finally:
            httpx_logger.setLevel(level)
        [line] = [line for line in json_logs() if line["logger"] == "httpx"]
        assert line["message"].startswith("HTTP Request: POST https://gateway.test/webhooks/")
        assert "?[redacted]" in line["message"] and "s3cr3t" not in line["message"]

    @pytest.mark.parametrize("hostile", ["?" * 100_000, "eyJ" * 33_000, "a?" * 50_000])
    def test_long_hostile_text_is_fast(self, hostile: str) -> None:
        # Callers control paths and user agents: redaction must stay linear in the line's length
        # (a backtracking pattern takes minutes here; a linear one, milliseconds).
        start = time.perf_counter()
        redact(hostile + " token=x")
        assert time.perf_counter() - start < 1.0


# --- configure_logging ------------------------------------------------------------------------


@pytest.fixture
def saved_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back afterwards."""
    root = logging.getLogger()
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx")
    loggers = [logging.getLogger(name) for name in names]
    state = [(lg.handlers[:], lg.filters[:], lg.propagate, lg.disabled, lg.level) for lg in loggers]
    root_state = (root.handlers[:], root.level)
    lookups = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    yield
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing = lookups
    for logger, (handlers, filters, propagate, disabled, level) in zip(loggers, state, strict=True):
        logger.handlers[:], logger.filters[:] = handlers, filters
        logger.propagate, logger.disabled = propagate, disabled
        logger.setLevel(level)
    root.handlers[:] = root_state[0]
    root.setLevel(root_state[1])


class TestConfigureLogging:
    def test_json_lines_on_stdout(
        self, saved_logging: None, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(True, PROJECT, known_secrets=["rp-api-key-0123456789"])
        configure_logging(True, PROJECT, known_secrets=["rp-api-key-0123456789"])  # idempotent
        logging.getLogger("gateway").info("key rp-api-key-0123456789 at ?token=abc")
        [line] = capsys.readouterr().out.splitlines()
        entry = json.loads(line)
        assert entry["message"] == "key [redacted] at ?[redacted]"

    def test_uvicorn_second_traceback_is_dropped_inside_a_request(
        self, saved_logging: None, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(True)
        server_log = logging.getLogger("uvicorn.error")
        token = request_id_var.set("req-1")
        try:
            server_log.error("Exception in ASGI application\n", exc_info=RuntimeError("x"))
            server_log.error("something else went wrong")
        finally:
            request_id_var.reset(token)
        server_log.error("Exception in ASGI application\n", exc_info=RuntimeError("y"))
        messages = [json.loads(line)["message"] for line in capsys.readouterr().out.splitlines()]
        assert messages == ["something else went wrong", "Exception in ASGI application\n"]

    def test_quiets_uvicorn_access_and_httpx(self, saved_logging: None) -> None:
        configure_logging(False)
        assert logging.getLogger("uvicorn.access").disabled
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("uvicorn.error").propagate
        assert logging.getLogger("uvicorn").handlers == []


# --- HTTP metrics -----------------------------------------------------------------------------


class TestHttpMetrics:
    async def test_route_template_not_raw_path(
        self, client: httpx.AsyncClient, metrics: Metrics
    ) -> None:
        await client.get("/jobs/job_aaaaaaaaaaaa")
        await client.get("/jobs/job_bbbbbbbbbbbb")
        assert http_count(metrics, "GET", "/jobs/{job_id}", "200") == 2
        assert not [value for value in all_label_values(metrics) if "job_a" in value]

    async def test_unmatched_route(self, client: httpx.AsyncClient, metrics: Metrics) -> None:
        await client.get("/no/such/thing/123")
        assert http_count(metrics, "GET", "unmatched", "404") == 1

    async def test_unknown_method_is_other(
        self, client: httpx.AsyncClient, metrics: Metrics
    ) -> None:
        response = await client.request("BREW", "/jobs/job_1")
        assert response.status_code == 405
        assert http_count(metrics, "other", "/jobs/{job_id}", "405") == 1

    async def test_status_classes(self, client: httpx.AsyncClient, metrics: Metrics) -> None:
        await client.get("/jobs/job_1")
        await client.get("/jobs/job_2")
        await client.get("/nope")
        await client.get("/boom")
        assert sample(metrics, "gateway_http_responses_total", **{"class": "2xx"}) == 2
        assert sample(metrics, "gateway_http_responses_total", **{"class": "4xx"}) == 1
        assert sample(metrics, "gateway_http_responses_total", **{"class": "5xx"}) == 1
        assert http_count(metrics, "GET", "/boom", "500") == 1

    def test_known_series_start_at_zero(self, metrics: Metrics) -> None:
        assert outcomes(metrics) == {"done": 0, "failed": 0, "canceled": 0, "timed_out": 0}
        assert [credits(metrics, kind) for kind in ("charged", "refunded", "granted")] == [0] * 3
        reasons = ("missing", "bad_signature", "bad_token")
        name = "gateway_webhook_verification_failures_total"
        assert [sample(metrics, name, reason=reason) for reason in reasons] == [0] * 3

    def test_webhook_failures_and_reconciler_actions(self, metrics: Metrics) -> None:
        metrics.count_webhook_failure("bad_token")
        metrics.count_webhook_failure("bad_token")
        metrics.count_reconciler_action("failed_stuck_job")
        name = "gateway_webhook_verification_failures_total"
        assert sample(metrics, name, reason="bad_token") == 2
        assert sample(metrics, name, reason="missing") == 0
        assert sample(metrics, "gateway_reconciler_actions_total", action="failed_stuck_job") == 1

    def test_each_app_has_its_own_registry(self) -> None:
        first, second = Metrics(), Metrics()
        first.count_credits("granted", 5)
        assert credits(first, "granted") == 5 and credits(second, "granted") == 0


# --- /metrics ---------------------------------------------------------------------------------


class TestMetricsEndpoint:
    async def test_open_without_a_token(self, client: httpx.AsyncClient) -> None:
        await client.get("/jobs/job_1")
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'route="/jobs/{job_id}"' in response.text

    @pytest.fixture
    async def guarded(self, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=build_app(metrics, token=METRICS_TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
            yield http

    @pytest.mark.parametrize(
        "authorization",
        [None, "Bearer wrong", f"Basic {METRICS_TOKEN}", METRICS_TOKEN, f"Bearer {METRICS_TOKEN}x"],
    )
    async def test_token_required(self, guarded: httpx.AsyncClient, authorization: str) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        response = await guarded.get("/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json() == {
            "detail": "A valid metrics token is required",
            "code": "UNAUTHORIZED",
        }
        assert response.headers["WWW-Authenticate"] == "Bearer"

    @pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
    async def test_right_token(self, guarded: httpx.AsyncClient, scheme: str) -> None:
        response = await guarded.get(
            "/metrics", headers={"Authorization": f"{scheme} {METRICS_TOKEN}"}
        )
        assert response.status_code == 200
        assert "gateway_http_request_duration_seconds" in response.text

    async def test_openmetrics_when_asked(self, client: httpx.AsyncClient) -> None:
        accept = "application/openmetrics-text; version=1.0.0"
        response = await client.get("/metrics", headers={"Accept": accept})
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")


# --- The store --------------------------------------------------------------------------------


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "gateway.db", signup_credits=100, default_plan="starter")
    yield store
    await store.close()


@pytest.fixture
def store(sqlite: SQLiteStore, metrics: Metrics) -> InstrumentedStore:
    return InstrumentedStore(sqlite, metrics)


def new_job(job_id: str, cost: int = 5, user_id: str = "user_alice") -> NewJob:
    return NewJob(
        job_id=job_id,
        user_id=user_id,
        prompt="A silver drone",
        image_url=None,
        duration_sec=cost,
        seed=42,
        cost=cost,
        object_key=f"videos/{user_id}/{job_id}.mp4",
    )


FAILED = StatusUpdate(JobStatus.FAILED, "WORKER_FAILED", "boom")


class TestInstrumentedStore:
    async def test_charge(self, store: InstrumentedStore, metrics: Metrics) -> None:
        await store.charge_and_create_job(new_job("job_000000000001", cost=5), 5)
        await store.charge_and_create_job(new_job("job_000000000002", cost=3), 5)
        assert credits(metrics, "charged") == 8
        assert upstream_count(metrics, "store", "charge_and_create_job", "ok") == 2

    async def test_refused_charge_counts_nothing(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        with pytest.raises(InsufficientCredits):
            await store.charge_and_create_job(new_job("job_000000000001", cost=500), 5)
        assert credits(metrics, "charged") == 0
        # The store answered: a refusal is not an upstream failure.
        assert upstream_count(metrics, "store", "charge_and_create_job", "ok") == 1

    async def test_refund_counted_once_whatever_the_repeats(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        job = await store.charge_and_create_job(new_job("job_000000000001", cost=5), 5)
        results = [await store.apply_status(job.job_id, FAILED) for _ in range(3)]
        assert [changed for _, changed in results] == [True, False, False]
        assert credits(metrics, "refunded") == 5
        assert outcomes(metrics) == {"done": 0, "failed": 1, "canceled": 0, "timed_out": 0}
        assert upstream_count(metrics, "store", "apply_status", "ok") == 3
        totals = await store.ledger_totals()
        assert totals["user_alice"]["refunds"] == credits(metrics, "refunded")

    async def test_timed_out(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job("job_000000000001", cost=4), 5)
        update = StatusUpdate(JobStatus.FAILED, "TIMED_OUT", "too slow")
        await store.apply_status(job.job_id, update)
        assert outcomes(metrics) == {"done": 0, "failed": 0, "canceled": 0, "timed_out": 1}
        assert credits(metrics, "refunded") == 4

    async def test_done(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job("job_000000000001"), 5)
        await store.record_runpod_id(job.job_id, "rp-1")
        for status in (JobStatus.RUNNING, JobStatus.DONE, JobStatus.DONE, JobStatus.FAILED):
            await store.apply_status(job.job_id, StatusUpdate(status))
        assert outcomes(metrics) == {"done": 1, "failed": 0, "canceled": 0, "timed_out": 0}
        assert credits(metrics, "refunded") == 0

    async def test_cancel(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job("job_000000000001", cost=6), 5)
        await store.cancel_job("user_alice", job.job_id)
        with pytest.raises(JobNotCancelable):
            await store.cancel_job("user_alice", job.job_id)
        await store.apply_status(job.job_id, FAILED)
        assert outcomes(metrics) == {"done": 0, "failed": 0, "canceled": 1, "timed_out": 0}
        assert credits(metrics, "refunded") == 6
        assert upstream_count(metrics, "store", "cancel_job", "ok") == 2

    async def test_grant(self, store: InstrumentedStore, metrics: Metrics) -> None:
        await store.get_or_create_user("user_alice")
        granted = credits(metrics, "granted")
        user = await store.grant_credits("user_alice", 50, "support ticket 123")
        assert user.credits == 150
        assert credits(metrics, "granted") == granted + 50

    async def test_grant_to_a_new_user_counts_its_signup_too(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        user = await store.grant_credits("user_alice", 50, "support ticket 123")
        assert credits(metrics, "granted") == user.credits == 100 + 50

    async def test_signup_counted_once_from_a_read(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        await store.get_or_create_user("user_alice")
        await store.get_or_create_user("user_alice")
        await store.charge_and_create_job(new_job("job_000000000001"), 5)
        assert credits(metrics, "granted") == 100

    async def test_signup_counted_once_from_a_charge(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        await store.charge_and_create_job(new_job("job_000000000001"), 5)
        await store.charge_and_create_job(new_job("job_000000000002"), 5)
        await store.get_or_create_user("user_alice")
        assert credits(metrics, "granted") == 100
        totals = await store.ledger_totals()
        assert totals["user_alice"]["grants"] == credits(metrics, "granted")

    async def test_refused_first_charge_grants_nothing(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        with pytest.raises(InsufficientCredits):
            await store.charge_and_create_job(new_job("job_000000000001", cost=500), 5)
        assert credits(metrics, "granted") == 0
        await store.get_or_create_user("user_alice")  # the refusal left the signup to this call
        assert credits(metrics, "granted") == 100

    async def test_reads_are_timed(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job("job_000000000001"), 5)
        await store.get_or_create_user("user_alice")
        await store.get_job("user_alice", job.job_id)
        await store.find_job(job.job_id)
        await store.find_job_by_runpod_id("rp-none")
        await store.list_jobs("user_alice", 10, None)
        await store.save_download_url(job.job_id, "https://x.test/v.mp4", 1)
        await store.ping()
        operations = ("get_or_create_user", "get_job", "find_job", "find_job_by_runpod_id")
        operations += ("list_jobs", "save_download_url", "ping")
        assert [upstream_count(metrics, "store", op, "ok") for op in operations] == [1] * 7

    def test_wraps_every_store_method(self) -> None:
        """A method missing here would pass through `__getattr__` untimed and uncounted."""
        protocol = [name for name in vars(Store) if not name.startswith("_")]
        assert "apply_status" in protocol
        for name in protocol:
            assert name in vars(InstrumentedStore), name
            wrapped = inspect.signature(getattr(Store, name)).parameters
            assert list(inspect.signature(getattr(InstrumentedStore, name)).parameters) == list(
                wrapped
            ), name

    async def test_idempotency_key_reaches_the_store(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        claim = await store.claim_idempotency_key("user_alice", "key-1", "fp", 1, 60_000, 1_000)
        assert claim.outcome == "claimed"
        job = await store.charge_and_create_job(new_job("job_000000000001"), 5, "key-1")
        again = await store.claim_idempotency_key("user_alice", "key-1", "fp", 2, 60_000, 1_000)
        assert again.job_id == job.job_id  # the store linked the key to the job
        assert credits(metrics, "charged") == 5
        assert upstream_count(metrics, "store", "claim_idempotency_key", "ok") == 2

    async def test_reconciler_calls_are_timed(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        job = await store.charge_and_create_job(new_job("job_000000000001"), 5)
        [stale] = await store.claim_stale_jobs(job.created_at + 1, job.created_at + 2, 10)
        assert stale.job_id == job.job_id
        assert await store.claim_job_check(job.job_id, 0, job.created_at + 3) is None
        assert await store.purge_idempotency_keys(0, 10) == 0
        assert await store.audit() == []
        operations = ("claim_stale_jobs", "claim_job_check", "purge_idempotency_keys", "audit")
        assert [upstream_count(metrics, "store", op, "ok") for op in operations] == [1] * 4

    async def test_extras_pass_through(self, store: InstrumentedStore, sqlite: SQLiteStore) -> None:
        assert store.path == sqlite.path
        assert store.signup_credits == 100
        with pytest.raises(AttributeError):
            store.no_such_attribute  # noqa: B018

    async def test_store_failure_is_an_upstream_error(self, metrics: Metrics) -> None:
        class DownStore:
            async def ping(self) -> None:
                raise StoreUnavailable("The job store is unavailable")

        store = InstrumentedStore(DownStore(), metrics)  # type: ignore[arg-type]
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert upstream_count(metrics, "store", "ping", "error") == 1


class TestSignupGrantsOverHttp:
    """The gateway counts a new user's signup credits as granted, whichever call creates them."""

    JOB = {"prompt": "A silver drone", "durationSec": 5, "seed": 42}

    @pytest.fixture
    async def gateway(self, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
        with respx.mock(assert_all_called=False) as runpod:
            runpod.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
            async with serve(settings) as client:
                yield client

    @staticmethod
    async def granted(gateway: httpx.AsyncClient) -> float:
        text = (await gateway.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for found in family.samples:
                if found.name == "gateway_credits_total" and found.labels == {"kind": "granted"}:
                    return found.value
        raise AssertionError("gateway_credits_total{kind='granted'} is not served")

    async def create(self, gateway: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await gateway.post("/jobs/create", json=self.JOB, headers=headers)
        assert response.status_code == 200, response.text

    async def credits(self, gateway: httpx.AsyncClient, headers: dict[str, str]) -> int:
        response = await gateway.get("/credits", headers=headers)
        assert response.status_code == 200, response.text
        return int(response.json()["credits"])

    async def test_first_credits_then_create(
        self, gateway: httpx.AsyncClient, settings: Settings, make_token: TokenFactory
    ) -> None:
        alice = bearer(make_token("user_alice"))
        signup = settings.effective_signup_credits
        assert signup > 0 and await self.granted(gateway) == 0
        assert await self.credits(gateway, alice) == signup
        assert await self.granted(gateway) == signup
        await self.credits(gateway, alice)
        await self.create(gateway, alice)
        assert await self.granted(gateway) == signup

    async def test_first_create_then_credits(
        self, gateway: httpx.AsyncClient, settings: Settings, make_token: TokenFactory
    ) -> None:
        bob = bearer(make_token("user_bob"))
        signup = settings.effective_signup_credits
        await self.create(gateway, bob)
        assert await self.granted(gateway) == signup
        await self.create(gateway, bob)
        await self.credits(gateway, bob)
        assert await self.granted(gateway) == signup


# --- Storage ----------------------------------------------------------------------------------


class TestInstrumentedStorage:
    async def test_head_and_presign_are_timed(self, tmp_path: Path, metrics: Metrics) -> None:
        local = LocalStorage(tmp_path / "objects", b"secret", "http://127.0.0.1:8000")
        storage = InstrumentedStorage(local, metrics)
        key = "videos/user_alice/job_000000000001.mp4"
        assert "sig=" in storage.presign_put(key, 60, "video/mp4")
        assert not await storage.exists(key)
        storage.write(key, b"mp4")  # the stand-in's own method passes through
        assert await storage.exists(key)
        assert "sig=" in storage.presign_get(key, 60)
        assert upstream_count(metrics, "r2", "head", "ok") == 2
        assert upstream_count(metrics, "r2", "presign_put", "ok") == 1
        assert upstream_count(metrics, "r2", "presign_get", "ok") == 1
        await storage.close()


# --- RunPod -----------------------------------------------------------------------------------


def runpod_answers(request: httpx.Request) -> httpx.Response:
    """A RunPod endpoint as httpx's MockTransport serves it."""
    path = request.url.path
    if path.endswith("/run"):
        return httpx.Response(200, json={"id": "3f6c1a2e-77aa-4b1e-9d7e-1c2b3a4d5e6f-u1"})
    if "/status/" in path:
        runpod_id = path.rsplit("/", 1)[1]
        return httpx.Response(200, json={"id": runpod_id, "status": "IN_PROGRESS"})
    if "/cancel/" in path:
        return httpx.Response(404, json={"error": "job not found"})
    return httpx.Response(200, json={"jobs": {}, "workers": {}})


async def no_sleep(seconds: float) -> None:
    return None


def runpod_client(transport: httpx.AsyncBaseTransport, metrics: Metrics) -> RunPodClient:
    http = build_http_client(
        "https://runpod.test/v2",
        "ep123",
        "rp-key",
        transport=InstrumentedTransport(transport, metrics),
    )
    return RunPodClient(http, sleep=no_sleep)


class TestInstrumentedTransport:
    async def test_operations_not_ids(self, metrics: Metrics) -> None:
        client = runpod_client(httpx.MockTransport(runpod_answers), metrics)
        runpod_id = await client.submit(
            {"jobId": "job_1"}, "https://g.test/w", execution_timeout_ms=1, ttl_ms=1
        )
        await client.status(runpod_id)
        await client.health()
        with pytest.raises(RunPodNotFound):
            await client.cancel(runpod_id)
        assert upstream_count(metrics, "runpod", "run", "ok") == 1
        assert upstream_count(metrics, "runpod", "status", "ok") == 1
        assert upstream_count(metrics, "runpod", "health", "ok") == 1
        assert upstream_count(metrics, "runpod", "cancel", "error") == 1
        assert not [value for value in all_label_values(metrics) if "3f6c1a2e" in value]

    async def test_unreachable_is_an_error_per_attempt(self, metrics: Metrics) -> None:
        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        client = runpod_client(httpx.MockTransport(refuse), metrics)
        with pytest.raises(RunPodUnavailable):
            await client.status("3f6c1a2e-u1")
        assert upstream_count(metrics, "runpod", "status", "error") == 3

    @pytest.mark.parametrize(
        ("path", "operation"),
        [
            ("/v2/ep123/run", "run"),
            ("/v2/ep123/runsync", "runsync"),
            ("/v2/ep123/status/3f6c1a2e-u1", "status"),
            ("/v2/ep123/cancel/3f6c1a2e-u1", "cancel"),
            ("/v2/ep123/health", "health"),
            ("/v2/status/health", "health"),
            ("/v2/ep123/purge-queue/", "purge-queue"),
            ("/v2/ep123/something/else", "other"),
            ("/", "other"),
        ],
    )
    def test_operation_names(self, path: str, operation: str) -> None:
        assert runpod_operation(path) == operation
