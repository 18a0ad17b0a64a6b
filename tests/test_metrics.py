"""metrics.py: the request middleware (ids, timing, access log), HTTP metrics and /metrics."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.openmetrics import exposition as openmetrics

import metrics as metrics_module
from logs import (
    current_request_id,
)
from metrics import LoopHistogram, Metrics
from tests.conftest import LogLines, bearer, serve
from tests.factories import (
    METRICS_TOKEN,
    access_lines,
    all_label_values,
    app_client,
    build_app,
    credits,
    gateway_lines,
    http_count,
    outcomes,
    sample,
)


@pytest.fixture
async def client(metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(build_app(metrics)) as opened:
        yield opened


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
        # The ignore: httpx types header values as str, and sends bytes as they are.
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


class TestLoopHistogram:
    """The hot histograms are the gateway's own (no lock per observation): their exposition must
    be what prometheus_client's Histogram writes for the same observations, in both formats."""

    BUCKETS = (0.005, 0.01, 0.5, 10.0)
    # On a bound (counted in that bound's bucket), between bounds, zero, and past the last.
    OBSERVED = {("GET", "/a"): [0.005, 0.0051, 0.0, 0.3], ("POST", "/b"): [10.0, 11.0, 0.01]}

    @pytest.mark.parametrize("encoder", [generate_latest, openmetrics.generate_latest])
    def test_same_exposition_as_the_library_histogram(self, encoder) -> None:
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        loop = LoopHistogram("h_seconds", "Help.", ("method", "route"), self.BUCKETS, ours)
        library = Histogram(
            "h_seconds", "Help.", ("method", "route"), buckets=self.BUCKETS, registry=theirs
        )
        for labels, amounts in self.OBSERVED.items():
            for amount in amounts:
                loop.labels(*labels).observe(amount)
                library.labels(*labels).observe(amount)
        assert self._samples(ours, encoder) == self._samples(theirs, encoder)
        text = encoder(ours).decode()
        assert 'h_seconds_bucket{le="0.005",method="GET",route="/a"} 2.0' in text
        assert 'h_seconds_count{method="POST",route="/b"} 3.0' in text

    @staticmethod
    def _samples(registry: CollectorRegistry, encoder) -> list[str]:
        # Label order within braces and the `_created` timestamps may differ; nothing else.
        lines = []
        for line in encoder(registry).decode().splitlines():
            match = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)(.*)", line)
            if line.startswith("#") or match is None:
                lines.append(line)
                continue
            name, labels, value, rest = match.groups()
            value = "<created>" if name.endswith("_created") else value
            lines.append(f"{name}{{{','.join(sorted((labels or '').split(',')))}}} {value}{rest}")
        return sorted(lines)

    def test_wrong_label_count_is_refused(self) -> None:
        loop = LoopHistogram("h2_seconds", "Help.", ("method",), self.BUCKETS, CollectorRegistry())
        with pytest.raises(ValueError):
            loop.labels("GET", "/extra")


class TestLoopHistogramCreated:
    def test_the_librarys_switch_for_created_series_holds(self) -> None:
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        prometheus_metrics.disable_created_metrics()
        try:
            loop = LoopHistogram("c_seconds", "Help.", ("route",), (0.1,), ours)
            library = Histogram("c_seconds", "Help.", ("route",), buckets=(0.1,), registry=theirs)
            loop.labels("/a").observe(0.05)
            library.labels("/a").observe(0.05)
            assert "_created" not in generate_latest(ours).decode()
            assert generate_latest(ours) == generate_latest(theirs)
        finally:
            prometheus_metrics.enable_created_metrics()


class TestRequestIds:
    def test_a_forked_child_does_not_repeat_its_parents_ids(self) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its next id, then out at once
            os.write(write_end, f"{metrics_module._REQUEST_IDS.getrandbits(128):032x}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = os.read(read_end, 64).decode()
        os.close(read_end)
        os.close(write_end)
        assert len(child) == 32
        assert child != f"{metrics_module._REQUEST_IDS.getrandbits(128):032x}"
