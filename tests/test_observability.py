"""Issue 5's two end-to-end checks, on a real gateway writing production's JSON logs.

One scenario runs over real HTTP against `uvicorn main:app`, with the RunPod stand-in in its own
process (so the gateway calls RunPod over a socket, with a real API key): an operator grant, jobs
that finish, fail, are canceled and time out, refusals (401, 402, 403, 404, 413), forged, signed
and tokened webhooks, downloads from presigned URLs, an idempotent retry, trace headers and request
ids, and last a create while RunPod is down (503). Then:

* `/metrics`, scraped and parsed as Prometheus would, must count exactly what happened. Every
  expected number is tallied from the scenario's own requests and the API's answers.
* Every line the process wrote must be Cloud Logging JSON naming its request and trace, and no
  line may hold a secret the scenario used, in plain, URL-encoded or JSON-escaped form.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from logs import TRACE_FIELD
from tests.conftest import TokenFactory, bearer, serve
from tests.servers import GatewayProcess, manage, running_standin
from tests.stores import CONVEX_TEST_KEY, reset_convex
from tests.test_config import COMPLETE, build
from webhooks import sign_body, webhook_token

pytestmark = pytest.mark.e2e

PROJECT = "cineweave-obs-e2e"
CLOUD_TRACE = "105445aa7843bc8bf206b12000100000"
W3C_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GIVEN_REQUEST_ID = "obs-e2e:create.1"
# Quotes, spaces and a fake JSON field: echoed into a line built by hand, it would forge a record.
HOSTILE_REQUEST_ID = 'x", "severity": "CRITICAL", "message": "<script>forged</script>'
USER = "user_obs"
FIRST_PROMPT, FIRST_SECONDS = "A silver drone over a neon skyline", 2
IDEMPOTENCY_KEY = "obs-e2e-first-job"
ENDPOINT = "obs"
# Not 1, so a counter that counted seconds instead of credits would show.
CREDITS_PER_SECOND = 2
# Long enough for the reconciler (after 1 s of silence) to find running jobs to act on.
RENDER_SECONDS = 3.0
JOB_ROUTE = "/jobs/{job_id}"
STORAGE_ROUTE = "/_local/storage/{key:path}"
WEBHOOK_ROUTE = "/webhooks/runpod"
TERMINAL = {"done", "failed", "canceled"}
RUNPOD_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
SEVERITIES = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
# Probes and scrapes that succeed are counted but not logged (metrics.QUIET_ROUTES).
QUIET = {"/healthz", "/metrics"}

Series = tuple[str, str, str]  # method, route template, status


# --- What the scenario did --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request the test sent, as the metrics and the logs should remember it."""

    method: str
    route: str
    status: int
    request_id: str
    trace_id: str | None

    @property
    def series(self) -> Series:
        return (self.method, self.route, str(self.status))


@dataclass(frozen=True)
class Secrets:
    """The deployment's secrets, fresh for each run; `/`, `+` and `=` make encodings differ."""

    webhook: str = field(default_factory=lambda: f"whsec/{secrets.token_urlsafe(24)}+obs=")
    metrics: str = field(default_factory=lambda: f"metrics-{secrets.token_urlsafe(24)}")
    runpod_key: str = field(default_factory=lambda: f"rp_obs_{secrets.token_urlsafe(24)}")


class Scrape:
    """One `/metrics` answer, parsed with prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        return sum(
            value
            for found, have, value in self.samples
            if found == name and labels.items() <= have.items()
        )

    def requests(self) -> Counter[Series]:
        counts: Counter[Series] = Counter()
        for name, labels, value in self.samples:
            if name == "gateway_http_request_duration_seconds_count" and value:
                counts[(labels["method"], labels["route"], labels["status"])] = int(value)
        return counts

    def label_values(self, label: str) -> set[str]:
        return {labels[label] for _, labels, _ in self.samples if label in labels}

    def upstream_calls(self, upstream: str, operation: str, outcome: str = "ok") -> int:
        name = "gateway_upstream_request_duration_seconds_count"
        return int(self.value(name, upstream=upstream, operation=operation, outcome=outcome))


class Scenario:
    """Drives the gateway like its clients and RunPod would, keeping the books as it goes."""

    def __init__(self, gateway: GatewayProcess, standin: str, keys: Secrets) -> None:
        self.gateway = gateway
        self.standin_jobs_url = f"{standin}/{ENDPOINT}/_test/jobs"
        self.keys = keys
        self.http = httpx.Client(base_url=gateway.base_url, timeout=30)
        self.calls: list[Call] = []
        self.leakable: set[str] = {keys.webhook, keys.metrics, keys.runpod_key}
        self.costs: dict[str, int] = {}  # every job created, and what it was charged
        self.runpod_ids: dict[str, str] = {}
        self.final_jobs: dict[str, dict[str, Any]] = {}
        self.auth: dict[str, str] = {}
        self.granted = 0
        self.webhook_failures: Counter[str] = Counter()
        self.hostile_call: Call | None = None

    def call(
        self, method: str, url: str, route: str, trace_id: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        response = self.http.request(method, url, **kwargs)
        request_id = response.headers["x-request-id"]
        self.calls.append(Call(method, route, response.status_code, request_id, trace_id))
        return response

    # --- the story, in order ----------------------------------------------------------

    def run(self) -> None:
        self.grant_and_sign_in()
        self.refusals()
        self.create_and_cancel()
        self.create_and_time_out()
        finished = self.create_jobs_that_run()
        self.settle(list(self.costs))
        self.list_with_a_hostile_request_id()
        self.download(finished)
        self.retry_the_first_create(finished[0])
        self.webhook_repeats(finished)
        self.forged_webhooks(finished[0])
        self.insufficient_credits()

    def grant_and_sign_in(self) -> None:
        self.granted = 12 * CREDITS_PER_SECOND
        manage(self.gateway.env, "grant", USER, str(self.granted), "--reason", "obs e2e")
        token = manage(self.gateway.env, "mint-token", USER)
        self.leakable |= {token, token.rsplit(".", 1)[1]}
        self.auth = {"Authorization": f"Bearer {token}"}
        headers = {**self.auth, "X-Cloud-Trace-Context": f"{CLOUD_TRACE}/1;o=1"}
        response = self.call("GET", "/credits", "/credits", CLOUD_TRACE, headers=headers)
        assert response.json()["credits"] == self.granted
        # The web app's way: the session token in Clerk's cookie.
        cookie = {"Cookie": f"__session={token}"}
        assert self.call("GET", "/credits", "/credits", headers=cookie).status_code == 200

    def refusals(self) -> None:
        token = self.auth["Authorization"].removeprefix("Bearer ")
        forged = token.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(32)
        self.leakable |= {forged, forged.rsplit(".", 1)[1]}
        bad_auth = {"Authorization": f"Bearer {forged}"}
        assert self.call("GET", "/credits", "/credits", headers=bad_auth).status_code == 401
        unknown = f"/jobs/job_{'x' * 16}"
        assert self.call("GET", unknown, JOB_ROUTE, headers=self.auth).status_code == 404
        assert self.call("GET", "/no/such/route", "unmatched").status_code == 404
        # Refused by the body limit before routing: still counted under its route.
        oversized = {"prompt": "x" * 70_000, "durationSec": 1}
        response = self.call(
            "POST", "/jobs/create", "/jobs/create", json=oversized, headers=self.auth
        )
        assert response.status_code == 413
        assert self.call("GET", "/metrics", "/metrics").status_code == 401
        wrong = {"Authorization": f"Bearer {self.keys.metrics[:-1]}"}
        assert self.call("GET", "/metrics", "/metrics", headers=wrong).status_code == 401

    def create(
        self,
        prompt: str,
        seconds: int,
        trace_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        body = {"prompt": prompt, "durationSec": seconds}
        headers = self.auth | (headers or {})
        response = self.call(
            "POST", "/jobs/create", "/jobs/create", trace_id, json=body, headers=headers
        )
        assert response.status_code == 200, response.text
        job_id = response.json()["jobId"]
        self.costs[job_id] = seconds * CREDITS_PER_SECOND
        self.leakable.add(webhook_token(self.keys.webhook, job_id))
        return job_id

    def create_and_cancel(self) -> None:
        job_id = self.create("A lighthouse nobody waits for", 3)
        path = f"/jobs/{job_id}/cancel"
        response = self.call("POST", path, "/jobs/{job_id}/cancel", headers=self.auth)
        assert response.json()["status"] == "canceled", response.text

    def create_and_time_out(self) -> None:
        """RunPod's TIMED_OUT, delivered signed (the stand-in never times out by itself)."""
        job_id = self.create("A glacier, slowly", 2)
        status = {"id": self.runpod_id(job_id), "status": "TIMED_OUT", "input": {"jobId": job_id}}
        response = self.signed_webhook(status)
        assert response.json()["status"] == "failed", response.text

    def create_jobs_that_run(self) -> list[str]:
        """Two that finish, one whose worker fails; two ways of passing a trace."""
        headers = {"X-Request-ID": GIVEN_REQUEST_ID, "Idempotency-Key": IDEMPOTENCY_KEY}
        first = self.create(FIRST_PROMPT, FIRST_SECONDS, None, headers)
        traceparent = {"traceparent": f"00-{W3C_TRACE}-00f067aa0ba902b7-01"}
        second = self.create("A paper boat in the rain", 3, W3C_TRACE, traceparent)
        self.create("This one will [[fail]] at RunPod", 2)
        return [first, second]

    def settle(self, job_ids: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for job_id in job_ids:
            while (job := self.get_job(job_id))["status"] not in TERMINAL:
                assert time.monotonic() < deadline, f"job never settled: {job}"
                time.sleep(0.25)
            self.final_jobs[job_id] = job
            assert job["cost"] == self.costs[job_id]

    def get_job(self, job_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/jobs/{job_id}", JOB_ROUTE, headers=self.auth)
        assert response.status_code == 200, response.text
        return response.json()

    def list_with_a_hostile_request_id(self) -> None:
        headers = {**self.auth, "X-Request-ID": HOSTILE_REQUEST_ID}
        response = self.call("GET", "/jobs", "/jobs", headers=headers)
        self.hostile_call = self.calls[-1]
        assert len(response.json()["jobs"]) == len(self.costs)

    def download(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            url = self.final_jobs[job_id]["r2Url"]
            signature = parse_qs(urlsplit(url).query)["sig"][0]
            self.leakable.add(signature)
            video = self.call("GET", url, STORAGE_ROUTE)
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
            # Still holds the real signature: a tampered URL must not leak it either.
            tampered = url.replace("sig=", "sig=0")
            assert self.call("GET", tampered, STORAGE_ROUTE).status_code == 403

    def retry_the_first_create(self, job_id: str) -> None:
        """A client's retry with the same Idempotency-Key: the first answer, charged once."""
        headers = self.auth | {"Idempotency-Key": IDEMPOTENCY_KEY}
        body = {"prompt": FIRST_PROMPT, "durationSec": FIRST_SECONDS}
        response = self.call("POST", "/jobs/create", "/jobs/create", json=body, headers=headers)
        assert response.json() == {"jobId": job_id}
        assert response.headers["idempotent-replayed"] == "true"

    def webhook_repeats(self, job_ids: list[str]) -> None:
        """Late deliveries of finished jobs, one per proof: 200, and nothing counted twice."""
        done, other = job_ids
        status = {"id": self.runpod_id(done), "status": "COMPLETED", "input": {"jobId": done}}
        assert self.signed_webhook(status).json()["status"] == "done"
        query = {"jobId": other, "token": webhook_token(self.keys.webhook, other)}
        body = {"id": self.runpod_id(other), "status": "COMPLETED"}
        response = self.call("POST", WEBHOOK_ROUTE, WEBHOOK_ROUTE, params=query, json=body)
        assert response.status_code == 200 and response.json()["status"] == "done"

    def forged_webhooks(self, job_id: str) -> None:
        body = json.dumps({"id": self.runpod_id(job_id), "status": "FAILED"}).encode()
        forgeries = {  # reason: (headers, query)
            "bad_signature": ({"X-RunPod-Signature": sign_body("guess", body)}, {}),
            "bad_token": ({}, {"jobId": job_id, "token": "0" * 64}),
            "missing": ({}, {"jobId": job_id}),
        }
        for reason, (headers, query) in forgeries.items():
            response = self.call(
                "POST", WEBHOOK_ROUTE, WEBHOOK_ROUTE, content=body, headers=headers, params=query
            )
            assert response.status_code == 401, response.text
            self.webhook_failures[reason] += 1

    def insufficient_credits(self) -> None:
        balance = self.credits()
        seconds = balance // CREDITS_PER_SECOND + 1
        body = {"prompt": "More than the balance buys", "durationSec": seconds}
        response = self.call("POST", "/jobs/create", "/jobs/create", json=body, headers=self.auth)
        assert response.status_code == 402, response.text

    def create_while_runpod_is_down(self) -> None:
        """RunPod unreachable: a 503, and the job it was charged for failed and refunded."""
        seconds = 1
        body = {"prompt": "Nobody home at RunPod", "durationSec": seconds}
        response = self.call("POST", "/jobs/create", "/jobs/create", json=body, headers=self.auth)
        assert response.status_code == 503, response.text
        listed = self.call("GET", "/jobs", "/jobs", headers=self.auth).json()["jobs"]
        (job,) = [job for job in listed if job["jobId"] not in self.costs]
        assert job["error"]["code"] == "SUBMIT_FAILED"
        self.costs[job["jobId"]] = seconds * CREDITS_PER_SECOND
        assert job["cost"] == self.costs[job["jobId"]]
        self.final_jobs[job["jobId"]] = job
        self.leakable.add(webhook_token(self.keys.webhook, job["jobId"]))

    # --- helpers ----------------------------------------------------------------------

    def credits(self) -> int:
        response = self.call("GET", "/credits", "/credits", headers=self.auth)
        return int(response.json()["credits"])

    def signed_webhook(self, status: dict[str, Any]) -> httpx.Response:
        body = json.dumps(status).encode()
        headers = {"X-RunPod-Signature": sign_body(self.keys.webhook, body)}
        response = self.call("POST", WEBHOOK_ROUTE, WEBHOOK_ROUTE, content=body, headers=headers)
        assert response.status_code == 200, response.text
        return response

    def standin_jobs(self) -> list[dict[str, Any]]:
        # The stand-in's test hook: what RunPod was given, and what became of it.
        headers = {"Authorization": "Bearer obs-test"}
        return httpx.get(self.standin_jobs_url, headers=headers, timeout=10).json()

    def runpod_id(self, job_id: str) -> str:
        if job_id not in self.runpod_ids:
            found = {job["jobId"]: job["id"] for job in self.standin_jobs()}
            self.runpod_ids.update(found)
        return self.runpod_ids[job_id]

    def scrape(self) -> Scrape:
        headers = {"Authorization": f"Bearer {self.keys.metrics}"}
        response = self.call("GET", "/metrics", "/metrics", headers=headers)
        assert response.status_code == 200
        return Scrape(response.text)

    def standin_webhooks(self, timeout: float = 30) -> int:
        """The webhooks RunPod sends (one per job it finished), once it has finished them all."""
        deadline = time.monotonic() + timeout
        jobs = self.standin_jobs()
        while any(job["status"] not in RUNPOD_TERMINAL for job in jobs):
            assert time.monotonic() < deadline, f"RunPod jobs never ended: {jobs}"
            time.sleep(0.2)
            jobs = self.standin_jobs()
        assert len(jobs) == len(self.costs)
        return sum(job["status"] in ("COMPLETED", "FAILED") for job in jobs)

    def wait_for_runpod(self, timeout: float = 30) -> int:
        """Waits until RunPod's webhooks have all been answered (they race the polls), and
        returns how many it sent."""
        sent = self.standin_webhooks()
        mine = sum(call.series == ("POST", WEBHOOK_ROUTE, "200") for call in self.calls)
        deadline = time.monotonic() + timeout
        while self.scrape().requests()[("POST", WEBHOOK_ROUTE, "200")] < mine + sent:
            assert time.monotonic() < deadline, "RunPod's webhooks never arrived"
            time.sleep(0.2)
        return sent


# --- Running it -------------------------------------------------------------------------------


@dataclass
class Observed:
    """A finished scenario: what the test did, and what the gateway's metrics and logs say."""

    scenario: Scenario
    calls: list[Call]  # every request the test sent before the last scrape
    scrape: Scrape
    log_lines: list[str]
    standin_webhooks: int
    uploads: int
    final_credits: int

    @cached_property
    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines]

    def lines_of(self, request_id: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("requestId") == request_id]


def gateway_settings(standin: str, keys: Secrets, store_env: dict[str, str]) -> dict[str, str]:
    return {
        "LOG_FORMAT": "json",
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "METRICS_TOKEN": keys.metrics,
        "RUNPOD_WEBHOOK_SECRET": keys.webhook,
        "RUNPOD_API_BASE": standin,
        "RUNPOD_API_KEY": keys.runpod_key,
        "RUNPOD_ENDPOINT_ID": ENDPOINT,
        "CREDITS_PER_SECOND": str(CREDITS_PER_SECOND),
        # Every credit the user holds is then the operator's grant, made in manage.py's own
        # process; signup grants are counted by this gateway (TestSignupGrant below).
        "SIGNUP_CREDITS": "0",
        # A reconciler that acts during the scenario, so its counts have something to match.
        "RECONCILE_AFTER_SECONDS": "1",
        "RECONCILE_INTERVAL_SECONDS": "0.3",
        **store_env,
    }


def observe(tmp: Path, store_env: dict[str, str]) -> Observed:
    keys = Secrets()
    with ExitStack() as cleanup:
        with running_standin(render_seconds=RENDER_SECONDS, webhook_retry_delay=1.0) as standin:
            gateway = GatewayProcess(tmp / "data", **gateway_settings(standin, keys, store_env))
            # Stopped on the way out, before the log is read, so its last lines are written.
            cleanup.callback(gateway.stop)
            scenario = Scenario(gateway, standin, keys)
            cleanup.callback(scenario.http.close)
            gateway.start()
            scenario.run()
            standin_webhooks = scenario.wait_for_runpod()
        scenario.create_while_runpod_is_down()  # the stand-in has stopped
        final_credits = scenario.credits()
        assert "0 problems" in manage(gateway.env, "audit")
        scrape = scenario.scrape()
    if "CONVEX_DEPLOY_KEY" in store_env:
        scenario.leakable.add(store_env["CONVEX_DEPLOY_KEY"])
    return Observed(
        scenario=scenario,
        calls=scenario.calls[:-1],  # the last scrape cannot count itself
        scrape=scrape,
        log_lines=[line for line in log_file(gateway).read_text().splitlines() if line.strip()],
        standin_webhooks=standin_webhooks,
        # Each stored video, and its poster: the worker PUTs both.
        uploads=sum(1 for path in (tmp / "data" / "objects").rglob("*") if path.is_file()),
        final_credits=final_credits,
    )


def log_file(gateway: GatewayProcess) -> Path:
    # Where GatewayProcess sends the process's stdout and stderr.
    return gateway.data_dir.parent / f"gateway-{gateway.port}.log"


@pytest.fixture(scope="module", params=["sqlite", "convex"])
def observed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Observed:
    """One scenario per store, shared by the checks below."""
    store_env: dict[str, str] = {}
    if request.param == "convex":
        url = request.getfixturevalue("convex_server")
        reset_convex(url)
        store_env = {"CONVEX_URL": url, "CONVEX_DEPLOY_KEY": CONVEX_TEST_KEY}
    return observe(tmp_path_factory.mktemp(f"obs-{request.param}"), store_env)


# --- /metrics ---------------------------------------------------------------------------------


def outcome_of(job: dict[str, Any]) -> str:
    if job["status"] == "failed" and job["error"]["code"] == "TIMED_OUT":
        return "timed_out"
    return str(job["status"])


class TestMetrics:
    def test_every_request_by_route_template_and_status(self, observed: Observed) -> None:
        expected = Counter(call.series for call in observed.calls)
        # What RunPod's side sent: one webhook per finished job, one upload per stored video.
        expected[("POST", WEBHOOK_ROUTE, "200")] += observed.standin_webhooks
        expected[("PUT", STORAGE_ROUTE, "200")] += observed.uploads
        counted = observed.scrape.requests()
        # The start-up health polls: how many depends on how fast the process started.
        assert counted.pop(("GET", "/healthz", "200")) >= 1
        # The worker's progress reports: how many depends on how far each job got before it
        # ended or was canceled (three for a job that ran to the end).
        assert counted.pop(("POST", "/webhooks/runpod/progress", "200")) >= 3
        assert counted == expected

    def test_routes_are_templates_never_raw_paths(self, observed: Observed) -> None:
        routes = observed.scrape.label_values("route")
        assert {JOB_ROUTE, "/jobs/{job_id}/cancel", STORAGE_ROUTE, "unmatched"} <= routes
        raw = [route for route in routes for job_id in observed.scenario.costs if job_id in route]
        assert raw == []
        assert not any(USER in route or "/no/such" in route for route in routes)

    def test_4xx_and_5xx(self, observed: Observed) -> None:
        statuses = [call.status for call in observed.calls]
        assert {401, 402, 403, 404, 413, 503} <= set(statuses)  # the scenario met each refusal
        classes = Counter(f"{status // 100}xx" for status in statuses)
        for name in ("4xx", "5xx"):
            counted = observed.scrape.value("gateway_http_responses_total", **{"class": name})
            assert counted == classes[name], name

    def test_job_outcomes(self, observed: Observed) -> None:
        expected = Counter(outcome_of(job) for job in observed.scenario.final_jobs.values())
        assert set(expected) == {"done", "failed", "canceled", "timed_out"}
        for outcome in ("done", "failed", "canceled", "timed_out"):
            counted = observed.scrape.value("gateway_job_outcomes_total", outcome=outcome)
            assert counted == expected[outcome], outcome

    def test_credits_match_the_ledger_and_the_balance(self, observed: Observed) -> None:
        scenario, scrape = observed.scenario, observed.scrape
        charged = sum(scenario.costs.values())
        refunded = sum(
            scenario.costs[job_id]
            for job_id, job in scenario.final_jobs.items()
            if job["status"] in ("failed", "canceled")
        )
        assert scrape.value("gateway_credits_total", kind="charged") == charged
        assert scrape.value("gateway_credits_total", kind="refunded") == refunded
        # The scenario's only grant was the operator's, by manage.py in a process of its own:
        # an instance's /metrics counts what that instance did.
        assert scrape.value("gateway_credits_total", kind="granted") == 0
        assert observed.final_credits == scenario.granted - charged + refunded

    def test_webhook_verification_failures(self, observed: Observed) -> None:
        for reason in ("missing", "bad_signature", "bad_token"):
            counted = observed.scrape.value(
                "gateway_webhook_verification_failures_total", reason=reason
            )
            assert counted == observed.scenario.webhook_failures[reason], reason

    def test_upstream_latency(self, observed: Observed) -> None:
        scrape, created = observed.scrape, len(observed.scenario.costs)
        jobs = observed.scenario.final_jobs.values()
        unsubmitted = sum((job["error"] or {}).get("code") == "SUBMIT_FAILED" for job in jobs)
        assert scrape.upstream_calls("runpod", "run") == created - unsubmitted
        # A connection refused never left, so it is tried again: at least once per job.
        assert scrape.upstream_calls("runpod", "run", "error") >= unsubmitted >= 1
        assert scrape.upstream_calls("runpod", "cancel") == 1
        assert scrape.upstream_calls("runpod", "status") >= 1  # tokened webhooks ask RunPod
        assert scrape.upstream_calls("r2", "presign_put") == 2 * created  # video and poster
        assert scrape.upstream_calls("r2", "presign_get") >= 1
        done = sum(job["status"] == "done" for job in jobs)
        assert scrape.upstream_calls("r2", "head") >= done
        # Each create, the refused one included, is one store transaction.
        assert scrape.upstream_calls("store", "charge_and_create_job") == created + 1
        assert scrape.upstream_calls("store", "get_job") >= 1
        failed = {
            (labels["upstream"], labels["operation"])
            for name, labels, value in scrape.samples
            if name.endswith("_count") and labels.get("outcome") == "error" and value
        }
        assert failed == {("runpod", "run")}  # only while RunPod was down
        total = scrape.value("gateway_upstream_request_duration_seconds_sum")
        assert total > 0

    def test_reconciler_actions_match_its_log_lines(self, observed: Observed) -> None:
        pattern = re.compile(r"reconciler: job \S+ \(\w+\) -> (\w+)")
        logged = Counter(
            match[1] for line in observed.logs if (match := pattern.fullmatch(line["message"]))
        )
        assert sum(logged.values()) >= 1  # jobs sat unreported for over a second
        for action in set(logged) | observed.scrape.label_values("action"):
            counted = observed.scrape.value("gateway_reconciler_actions_total", action=action)
            assert counted == logged[action], action


class TestSignupGrant:
    async def test_signup_credits_are_counted_as_granted(
        self, settings: Settings, make_token: TokenFactory
    ) -> None:
        async with serve(settings) as client:
            credits = await client.get("/credits", headers=bearer(make_token("user_new")))
            assert credits.status_code == 200
            scraped = Scrape((await client.get("/metrics")).text)
        granted = scraped.value("gateway_credits_total", kind="granted")
        assert granted == settings.effective_signup_credits == credits.json()["credits"]


# --- Logs -------------------------------------------------------------------------------------


def encodings(value: str) -> set[str]:
    """The forms a value takes in a log line: as is, in a URL, inside a JSON string."""
    return {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}


class TestLogs:
    def test_every_line_is_a_cloud_logging_json_object(self, observed: Observed) -> None:
        assert observed.log_lines, "the gateway wrote nothing"
        for text in observed.log_lines:
            line = json.loads(text)
            assert isinstance(line, dict), text
            assert line["severity"] in SEVERITIES and isinstance(line["message"], str), text
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["time"]), text

    def test_one_access_line_per_request(self, observed: Observed) -> None:
        for call in observed.calls:
            lines = [line for line in observed.lines_of(call.request_id) if "httpRequest" in line]
            if call.route in QUIET and call.status < 400:
                assert lines == [], call
                continue
            (line,) = lines
            http = line["httpRequest"]
            assert (http["requestMethod"], http["status"]) == (call.method, call.status), call
            assert re.fullmatch(r"\d+\.\d{6}s", http["latency"]), http
            assert line["route"] == call.route
            assert "?" not in http["requestUrl"]
            assert line["severity"] == ("ERROR" if call.status >= 500 else "INFO")

    def test_trace_ids_name_the_project(self, observed: Observed) -> None:
        traced = [call for call in observed.calls if call.trace_id]
        assert {call.trace_id for call in traced} == {CLOUD_TRACE, W3C_TRACE}
        for call in observed.calls:
            lines = observed.lines_of(call.request_id)
            expected = f"projects/{PROJECT}/traces/{call.trace_id}" if call.trace_id else None
            assert {line.get(TRACE_FIELD) for line in lines} <= {expected}, call

    def test_request_ids(self, observed: Observed) -> None:
        ids = [call.request_id for call in observed.calls]
        assert len(set(ids)) == len(ids), "request ids repeat"
        assert GIVEN_REQUEST_ID in ids
        assert observed.lines_of(GIVEN_REQUEST_ID), "the given request id was not logged"
        assert HOSTILE_REQUEST_ID not in ids
        hostile = observed.scenario.hostile_call
        assert hostile is not None
        assert re.fullmatch(r"[0-9a-f]{32}", hostile.request_id)
        assert observed.lines_of(hostile.request_id)
        assert not any("<script>" in line for line in observed.log_lines)

    def test_no_secret_in_any_line(self, observed: Observed) -> None:
        text = "\n".join(observed.log_lines)
        leaked = [
            form
            for secret in observed.scenario.leakable
            for form in encodings(secret)
            if form in text
        ]
        assert leaked == []

    def test_no_secret_shaped_text_in_any_line(self, observed: Observed) -> None:
        """What a secret the test did not know of would look like: a JWT, a signed query."""
        text = "\n".join(observed.log_lines)
        assert not re.search(r"eyJ[\w-]+\.[\w-]+\.", text)
        assert not re.search(r"(?:sig|token|signature|X-Amz-\w+)=(?!\[redacted\])", text, re.I)
        assert not re.search(r"Bearer\s+(?!\[redacted\])", text)


class TestLogFormat:
    @pytest.mark.parametrize(
        ("values", "json_logs"),
        [
            ({}, False),
            ({"log_format": "json"}, True),
            (COMPLETE, True),
            ({**COMPLETE, "log_format": "text"}, False),
        ],
    )
    def test_json_in_production_text_locally_unless_told(
        self, values: dict[str, str], json_logs: bool
    ) -> None:
        settings = build(**values)
        assert settings.json_logs is json_logs
