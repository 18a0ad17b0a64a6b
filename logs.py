"""What operators read: request context, redaction, and the log formatters Cloud Logging reads.

One JSON object per line on stdout (`severity`, `message`, `time`, `httpRequest`, the request's id
and Cloud Trace id), human-readable text locally. Every line passes through `Redactor` last, so
tokens, JWTs and URL signatures never reach a log, whoever wrote the line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

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
        fields = {name: record.__dict__.get(name) for name in ("httpRequest", "route")}
        return self.format_fields(
            record.levelno,
            record.name,
            record.getMessage(),
            record.created,
            fields,
            self._stack_trace(record),
        )

    def format_fields(
        self,
        level: int,
        logger: str,
        message: str,
        created: float,
        fields: dict[str, Any],
        stack_trace: str | None = None,
    ) -> str:
        """The line `format` writes for a record with these values, without building the record:
        the access line comes straight here (metrics.log_access)."""
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(level, "DEFAULT"),
            "message": message,
            "time": rfc3339(created),
            "logger": logger,
        }
        self._add_request_context(entry)
        for name, value in fields.items():
            if value is not None:
                entry[name] = value
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


CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
_LEVEL_NAMES = {level: logging.getLevelName(level) for level in _SEVERITY}


def _level_name(level: int) -> str:
    return _LEVEL_NAMES.get(level) or logging.getLevelName(level)


class ConsoleFormatter(logging.Formatter):
    """Plain text for a terminal, with the request id when there is one.

    One record is one line, whatever its fields hold: a path with an encoded newline
    (`/x%0A{"severity":"CRITICAL"}`) must not write a second, forged line. A traceback follows
    on lines of its own, each escaped and indented, so none can pass for a record.
    """

    def __init__(self, redactor: Redactor = redact) -> None:
        super().__init__(CONSOLE_FORMAT)
        self._redact = redactor
        # (second, its text) as one value: a thread formatting a record at a second boundary
        # must never pair one second's number with another's text.
        self._stamp = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        record.request_tag = f" [{request_id}]" if request_id else ""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        lines = [escape_controls(self.formatMessage(record))]
        lines += [TRACEBACK_INDENT + escape_controls(line) for line in self._trace_lines(record)]
        return self._redact("\n".join(lines))

    def format_fields(self, level: int, logger: str, message: str, created: float) -> str:
        """The line `format` writes for a record with these values and no traceback, without
        building the record: the access line comes straight here (metrics.log_access)."""
        request_id = request_id_var.get()
        tag = f" [{request_id}]" if request_id else ""
        stamp = self._clock_text(created)
        return self._redact(
            escape_controls(f"{stamp} {_level_name(level)} {logger}{tag}: {message}")
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        return self._timestamp(record.created)

    def _clock_text(self, created: float) -> str:
        """What `formatTime` writes for a record made at `created`."""
        if self.datefmt is None and self.converter is time.localtime:
            return self._timestamp(created)
        msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
        record = logging.makeLogRecord({"created": created, "msecs": msecs})
        return super().formatTime(record, self.datefmt)

    def _timestamp(self, created: float) -> str:
        """`logging.Formatter.formatTime`'s default text (`2026-11-30 10:29:43,415`), its
        strftime done once a second rather than once a line."""
        second = int(created)
        cached_second, text = self._stamp
        if second != cached_second:
            text = time.strftime(self.default_time_format, time.localtime(created))
            self._stamp = (second, text)
        # What LogRecord computes as `msecs`, formatted as `default_msec_format` does.
        return f"{text},{int((created - second) * 1000):03d}"

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
# How long an info line may wait in stdout's buffer. One flush (a write() to the pipe) per line
# was 8 µs of a 40 µs access line (issue 13); batched, a SIGKILL loses at most this much.
FLUSH_DELAY_SECONDS = 0.05
_forks = 0  # forks since import, as seen in this process


def _count_fork() -> None:
    """In a forked child a flush due in the parent never comes: the next line asks again."""
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes info lines together, at most `FLUSH_DELAY_SECONDS` later.

    Warnings and errors flush at once, and so does any line written outside a running event
    loop (start-up, shutdown, a worker thread, after the loop closed). `flush()` itself is
    immediate: `logging.shutdown()` calls it at exit, and the lifespan calls `flush_logs()`.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._flush_due_on: asyncio.AbstractEventLoop | None = None
        self._flush_due_for: tuple[int, int] = (0, 0)  # the thread, and the forks before

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record), record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_record(self, record: logging.LogRecord) -> None:
        """`record`, formatted and written as `handle` would, without the logger's walk."""
        with self.lock:  # type: ignore[union-attr]
            self.emit(record)

    def write_line(self, text: str, level: int) -> None:
        """A line already formatted (`format_fields`), written as `emit` writes a record's."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write(text, level)
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": text, "levelno": level}))

    def _write(self, text: str, level: int) -> None:
        self.stream.write(text + self.terminator)
        if level >= logging.WARNING:
            self.flush()
            return
        if self._flush_due_here():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        # A flush due on a loop that no longer runs (one since closed, in tests) never comes,
        # or not soon: schedule one on this loop.
        self._flush_due_on = loop
        self._flush_due_for = (threading.get_ident(), _forks)
        loop.call_later(FLUSH_DELAY_SECONDS, self._scheduled_flush)

    def _flush_due_here(self) -> bool:
        """Whether a flush is due on the loop running this very line: then it comes.

        Asked before `get_running_loop()`, which on Python 3.11 makes a getpid() system call
        each time, one per request for the access line (issue 13). The same thread, no fork
        since, and a loop still running: the line is written on that loop. Another thread's
        line, or a forked child's, goes on to the full check (and a thread's flushes at once).
        """
        due = self._flush_due_on
        return (
            due is not None
            and self._flush_due_for == (threading.get_ident(), _forks)
            and due.is_running()
        )

    def _scheduled_flush(self) -> None:
        self._flush_due_on = None
        self.flush()


def sole_handler(logger: logging.Logger, level: int) -> BatchedStreamHandler | None:
    """The handler a `level` record of `logger` goes to, when it goes to that one alone with no
    filter on the way: the access line may then be written straight through it. Else None (a
    test's capturing handler, a filter): the record takes the logging path."""
    if logger.disabled or logger.filters:
        return None
    current = logger
    while not current.handlers:
        if not current.propagate or current.parent is None:
            return None
        current = current.parent
    handlers = current.handlers
    if current.parent is not None or len(handlers) != 1:
        return None
    handler = handlers[0]
    if not isinstance(handler, BatchedStreamHandler) or handler.filters or level < handler.level:
        return None
    return handler


def flush_logs() -> None:
    """Write out every line the root logger's handlers still hold (before the process ends)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


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
    handler = BatchedStreamHandler(_CurrentStdout())
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
    logging._srcfile = None


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
