"""The access line written straight through the stdout handler, and info lines flushed in batches.

The direct line must be the line the logging path writes, redaction included; batching must never
keep a line past a warning, the loop's end, the app's shutdown or a flush at exit.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import time
from collections.abc import Iterator

import pytest

from logs import (
    BatchedStreamHandler,
    CloudLoggingFormatter,
    ConsoleFormatter,
    Redactor,
    flush_logs,
    request_id_var,
    sole_handler,
)
from tests.conftest import PROJECT, serve

KNOWN_SECRET = "whsec-known-secret-value"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyX2FsaWNlIn0.c2lnbmF0dXJl"


class FlushedStream(io.StringIO):
    """A stream that remembers what had been flushed: what a reader of the pipe would have."""

    flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


@pytest.fixture
def only_handler() -> Iterator[BatchedStreamHandler]:
    """The root logger with one batched handler, as configure_logging leaves it in a server
    (pytest's own capturing handlers set aside for the test)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    handler = BatchedStreamHandler(FlushedStream())
    root.setLevel(logging.INFO)
    yield handler
    root.handlers = saved
    root.setLevel(level)


def alone(handler: BatchedStreamHandler) -> None:
    # In the test's body: pytest adds its capturing handler for each phase, after fixtures.
    logging.getLogger().handlers = [handler]


def masked(text: str) -> list[str]:
    text = re.sub(r'"time":"[^"]+"|^\S+ \S+ ', "<time>", text, flags=re.M)
    return re.sub(r"\d+\.\d+(ms|s)\b", r"<elapsed>\1", text).splitlines()


class TestDirectAccessLine:
    @pytest.mark.parametrize("json_mode", [True, False])
    async def test_same_line_as_the_logging_path(
        self, settings, alice, only_handler, json_mode
    ) -> None:
        redactor = Redactor([KNOWN_SECRET])
        formatter = (
            CloudLoggingFormatter(PROJECT, redactor) if json_mode else ConsoleFormatter(redactor)
        )
        only_handler.setFormatter(formatter)
        alone(only_handler)
        stream = only_handler.stream
        # Secrets in the path and the user agent: the formatter's redaction must run on both.
        headers = {**alice, "User-Agent": f"probe {KNOWN_SECRET} {JWT}", "X-Request-ID": "r-1"}
        path = f"/jobs/{JWT}{KNOWN_SECRET}"
        async with serve(settings) as client:
            assert sole_handler(logging.getLogger("gateway.access"), logging.INFO) is only_handler
            assert (await client.get(path, headers=headers)).status_code == 404
            direct = masked(stream.getvalue())[-1]
            # A second handler: the record now takes the logging path, to both handlers.
            logged = io.StringIO()
            second = logging.StreamHandler(logged)
            second.setFormatter(formatter)
            logging.getLogger().addHandler(second)
            assert sole_handler(logging.getLogger("gateway.access"), logging.INFO) is None
            assert (await client.get(path, headers=headers)).status_code == 404
            logging.getLogger().removeHandler(second)
        assert [direct] == masked(logged.getvalue()) == masked(stream.getvalue())[-2:-1]
        assert "404" in direct and KNOWN_SECRET not in direct and JWT not in direct
        assert ("userAgent" in direct) is json_mode and "[redacted]" in direct

    def test_not_direct_when_a_filter_or_another_handler_is_on_the_way(self, only_handler):
        access = logging.getLogger("gateway.access")
        alone(only_handler)
        handler: logging.Handler = only_handler  # `is` below would narrow the fixture's name
        assert sole_handler(access, logging.INFO) is handler
        only_handler.setLevel(logging.WARNING)
        assert sole_handler(access, logging.INFO) is None
        only_handler.setLevel(logging.NOTSET)
        access.addFilter(quiet := logging.Filter("other"))
        assert sole_handler(access, logging.INFO) is None
        access.removeFilter(quiet)
        logging.getLogger("gateway").addHandler(extra := logging.NullHandler())
        assert sole_handler(access, logging.INFO) is None
        logging.getLogger("gateway").removeHandler(extra)


class TestFormatFields:
    """`format_fields` (the access line's path) must write what `format` writes for the same
    record, to the character: time, level, request id, escapes and redaction."""

    MESSAGES = [
        "GET /credits 200 0.1ms",
        f"GET /jobs/{JWT} 404 1.0ms",
        f'GET /x%0A{{"severity":"CRITICAL"}}\n{KNOWN_SECRET} 404 0.2ms',
        "GET /caf\u00e9/\u202e\ud800 404 0.3ms",
        "GET /?token=abc&sig=def 401 0.1ms",
    ]
    # Second boundaries and rounding edges of the millisecond field.
    CREATED = [1_764_498_000.0, 1_764_498_000.0005, 1_764_498_000.9996, 1_764_498_059.123456]

    @pytest.mark.parametrize("json_mode", [True, False])
    @pytest.mark.parametrize("level", [logging.INFO, logging.ERROR, 25])
    @pytest.mark.parametrize("request_id", [None, "r-1"])
    def test_same_text_as_format(self, json_mode, level, request_id) -> None:
        redactor = Redactor([KNOWN_SECRET])
        token = request_id_var.set(request_id)
        try:
            for message in self.MESSAGES:
                for created in self.CREATED:
                    fields = {"httpRequest": {"requestUrl": message, "status": 404}, "route": "/x"}
                    entry = logging.LogRecord("gateway.access", level, "", 0, message, None, None)
                    entry.created, entry.msecs = created, int((created - int(created)) * 1000) + 0.0
                    if json_mode:
                        cloud = CloudLoggingFormatter(PROJECT, redactor)
                        entry.__dict__.update(fields)
                        fast = cloud.format_fields(level, entry.name, message, created, fields)
                        assert fast == cloud.format(entry)
                    else:
                        console = ConsoleFormatter(redactor)
                        fast = console.format_fields(level, entry.name, message, created)
                        assert fast == console.format(entry)
                        # The cached second against the standard library's own clock text.
                        assert fast.startswith(logging.Formatter().formatTime(entry) + " ")
                    assert KNOWN_SECRET not in fast and "\n" not in fast
        finally:
            request_id_var.reset(token)

    def test_the_cached_second_follows_the_clock(self) -> None:
        formatter = ConsoleFormatter()
        first = formatter.format_fields(logging.INFO, "gateway", "a", 1_764_498_000.999)
        second = formatter.format_fields(logging.INFO, "gateway", "a", 1_764_498_001.0)
        plain = logging.Formatter()
        for line, created in ((first, 1_764_498_000.999), (second, 1_764_498_001.0)):
            entry = logging.LogRecord("gateway", logging.INFO, "", 0, "a", None, None)
            entry.created, entry.msecs = created, int((created - int(created)) * 1000) + 0.0
            assert line.startswith(plain.formatTime(entry) + " INFO gateway: a")


def record(level: int, text: str) -> logging.LogRecord:
    return logging.LogRecord("gateway", level, __file__, 1, text, None, None)


class TestBatchedFlushing:
    async def test_info_waits_for_the_loop_then_is_flushed(self) -> None:
        stream = FlushedStream()
        handler = BatchedStreamHandler(stream)
        handler.handle(record(logging.INFO, "first"))
        handler.handle(record(logging.INFO, "second"))
        assert stream.flushed == ""  # batched: no write() to the pipe per line
        while stream.flushed == "":  # the loop's scheduled flush, within FLUSH_DELAY_SECONDS
            await asyncio.sleep(0.01)
        assert stream.flushed == "first\nsecond\n"

    @pytest.mark.parametrize("level", [logging.WARNING, logging.ERROR, logging.CRITICAL])
    async def test_warnings_and_errors_flush_at_once(self, level) -> None:
        stream = FlushedStream()
        handler = BatchedStreamHandler(stream)
        handler.handle(record(logging.INFO, "before"))
        handler.handle(record(level, "now"))
        assert stream.flushed == "before\nnow\n"

    def test_outside_a_loop_every_line_flushes(self) -> None:
        stream = FlushedStream()
        BatchedStreamHandler(stream).handle(record(logging.INFO, "start-up"))
        assert stream.flushed == "start-up\n"

    def test_a_closed_loop_does_not_strand_lines(self, only_handler) -> None:
        stream = only_handler.stream
        alone(only_handler)

        async def log_info(text: str) -> None:
            only_handler.handle(record(logging.INFO, text))

        asyncio.run(log_info("in the first loop"))  # its flush was due on a loop now closed
        assert stream.flushed == ""
        only_handler.handle(record(logging.INFO, "after it closed"))
        assert stream.flushed == "in the first loop\nafter it closed\n"

        async def log_and_wait() -> None:
            await log_info("in a second loop")
            while "second" not in stream.flushed:
                await asyncio.sleep(0.01)

        asyncio.run(log_and_wait())  # a flush is scheduled again on the new loop
        only_handler.handle(record(logging.INFO, "held"))  # outside a loop: flushed at once
        flush_logs()
        assert stream.flushed.endswith("in a second loop\nheld\n")

    async def test_a_thread_s_line_flushes_at_once(self) -> None:
        stream = FlushedStream()
        handler = BatchedStreamHandler(stream)
        handler.handle(record(logging.INFO, "on the loop"))  # a flush is now due on this loop
        await asyncio.to_thread(handler.handle, record(logging.INFO, "from a thread"))
        # The loop may be busy, or about to stop: a thread does not wait for its flush.
        assert stream.flushed == "on the loop\nfrom a thread\n"

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
    async def test_a_forked_child_does_not_wait_for_the_parent_s_flush(self) -> None:
        stream = FlushedStream()
        handler = BatchedStreamHandler(stream)
        handler.handle(record(logging.INFO, "in the parent"))  # a flush is due on this loop
        pid = os.fork()
        if pid == 0:  # the child: the parent's loop never runs here
            handler.handle(record(logging.INFO, "in the child"))
            os._exit(0 if stream.flushed == "in the parent\nin the child\n" else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stream.flushed == ""  # the parent's line still waits for its loop's flush

    def test_a_stopped_loop_s_flush_is_not_waited_for(self, only_handler) -> None:
        stream = only_handler.stream
        alone(only_handler)
        stopped = asyncio.new_event_loop()

        async def log_info(text: str) -> None:
            only_handler.handle(record(logging.INFO, text))

        try:
            stopped.run_until_complete(log_info("on a loop that then stops"))
            assert stream.flushed == ""  # its flush is due on a loop that no longer runs

            async def log_and_wait() -> None:
                await log_info("on the next loop")
                while "next" not in stream.flushed:  # flushed by this loop, in time
                    await asyncio.sleep(0.01)

            asyncio.run(asyncio.wait_for(log_and_wait(), timeout=5))
            assert stream.flushed == "on a loop that then stops\non the next loop\n"
        finally:
            stopped.close()

    async def test_shutdown_flushes_the_last_lines(self, settings, alice, only_handler) -> None:
        only_handler.setFormatter(ConsoleFormatter())
        alone(only_handler)
        async with serve(settings) as client:
            assert (await client.get("/credits", headers=alice)).status_code == 200
        flushed = only_handler.stream.flushed
        assert "GET /credits 200" in flushed and "shutdown complete" in flushed


class TestFormatFieldsClock:
    """A formatter told to write UTC (`converter`) or its own `datefmt` keeps that on the fast
    path too."""

    @pytest.mark.parametrize("setting", ["gmtime", "datefmt"])
    def test_a_configured_clock_is_kept(self, setting) -> None:
        formatter = ConsoleFormatter()
        if setting == "gmtime":
            formatter.converter = time.gmtime
        else:
            formatter.datefmt = "%H:%M:%S"
        created = 1_764_498_000.25
        entry = logging.LogRecord("gateway.access", logging.INFO, "", 0, "m", None, None)
        entry.created, entry.msecs = created, 250.0
        assert formatter.format_fields(logging.INFO, entry.name, "m", created) == formatter.format(
            entry
        )
