"""logs.py: trace ids, the JSON and text formatters, redaction and configure_logging."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from logs import (
    TRACEBACK_INDENT,
    CloudLoggingFormatter,
    ConsoleFormatter,
    Redactor,
    configure_logging,
    escape_controls,
    redact,
    request_id_var,
    trace_id_from,
)
from metrics import Metrics
from tests.conftest import PROJECT, LogLines
from tests.factories import (
    CLOUD_TRACE,
    JWT,
    W3C_TRACE,
    access_lines,
    app_client,
    build_app,
    gateway_lines,
    http_count,
)

log = logging.getLogger("gateway.test_logs")


@pytest.fixture
async def client(metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(build_app(metrics)) as opened:
        yield opened


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
        offset = datetime.fromisoformat(entry["time"]).utcoffset()
        assert offset is not None and offset.total_seconds() == 0
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
