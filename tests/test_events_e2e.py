"""Event streams over real HTTP: uvicorn on loopback, read the way a browser's fetch reads them.

One gateway serves the single-instance cases; two gateways sharing a store show that a change
written by one instance reaches a stream held by the other; SIGTERM is sent to a real process.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth import mint_dev_token
from tests.servers import GatewayProcess, running_standin

pytestmark = pytest.mark.e2e

JOB = {"prompt": "A silver drone over a neon skyline", "durationSec": 2}
# Every wait is bounded, so a broken stream fails the test instead of hanging it.
READ = httpx.Timeout(30.0, connect=5.0)


def events(response: httpx.Response) -> Iterator[dict[str, str]]:
    """The stream's events as dicts of their fields; a comment line is `{"comment": ...}`."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif fields:
            yield fields
            fields = {}


def job_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for event in events(response):
        if event.get("event") == "job":
            yield json.loads(event["data"])


def token(gateway: GatewayProcess, user_id: str) -> str:
    return mint_dev_token(gateway.data_dir, user_id, ttl_seconds=600)


def bearer(gateway: GatewayProcess, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(gateway, user_id)}"}


@contextmanager
def client(gateway: GatewayProcess, user_id: str) -> Iterator[httpx.Client]:
    headers = bearer(gateway, user_id)
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=READ) as opened:
        yield opened


def create(http: httpx.Client) -> str:
    created = http.post("/jobs/create", json=JOB)
    assert created.status_code == 200, created.text
    return created.json()["jobId"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        tmp_path_factory.mktemp("events") / "data",
        LOCAL_RENDER_SECONDS="0.5",
        STREAM_KEEPALIVE_SECONDS="0.2",
        STREAM_MAX_SECONDS="4",
        STREAM_POLL_INTERVAL_SECONDS="0.1",
    )
    process.start()
    yield process
    process.stop()


class TestJobStream:
    def test_from_queued_to_done_then_closed(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_watch") as http:
            job_id = create(http)
            with http.stream("GET", f"/jobs/{job_id}/events") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                seen = list(events(response))  # returns only because the stream closes
            answer = http.get(f"/jobs/{job_id}").json()
        jobs = [e for e in seen if e.get("event") == "job"]
        assert json.loads(jobs[0]["data"])["status"] == "queued"
        assert json.loads(jobs[-1]["data"]) == answer  # exactly what GET /jobs/{id} says
        assert answer["status"] == "done" and answer["r2Url"]
        assert all(e.get("event") != "reconnect" for e in seen)
        ids = [int(e["id"]) for e in jobs]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

    def test_running_with_progress_then_done_with_a_poster(self, tmp_path: Path) -> None:
        """What the issue asks one connection to show: queued, running with the worker's
        progress, then done with a playable URL and a poster. A 3 s render keeps `running`
        on screen for several polls, however loaded the machine."""
        slow = GatewayProcess(
            tmp_path / "data", LOCAL_RENDER_SECONDS="3", STREAM_POLL_INTERVAL_SECONDS="0.1"
        )
        slow.start()
        try:
            with client(slow, "user_progress") as http:
                job_id = create(http)
                with http.stream("GET", f"/jobs/{job_id}/events") as response:
                    seen = list(job_events(response))
        finally:
            slow.stop()
        running = [job for job in seen if job["status"] == "running"]
        assert seen[0]["status"] == "queued" and running, [job["status"] for job in seen]
        assert all(0 <= job["progress"] < 1 and job["stage"] for job in running), running
        assert seen[-1]["status"] == "done" and seen[-1]["r2Url"] and seen[-1]["posterUrl"]

    def test_a_finished_job_sends_one_event_and_closes(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_again") as http:
            job_id = create(http)
            with http.stream("GET", f"/jobs/{job_id}/events") as response:
                list(events(response))
            # A reconnect (Last-Event-ID) gets the current state again, and the end.
            headers = {"Last-Event-ID": "1"}
            with http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as response:
                seen = [job["status"] for job in job_events(response)]
        assert seen == ["done"]

    def test_the_session_cookie_works_as_for_eventsource(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_cookie") as http:
            job_id = create(http)
        cookies = {"__session": token(gateway, "user_cookie")}
        with httpx.Client(base_url=gateway.base_url, cookies=cookies, timeout=READ) as browser:
            with browser.stream("GET", f"/jobs/{job_id}/events") as response:
                assert response.status_code == 200
                assert next(job_events(response))["jobId"] == job_id

    def test_another_users_job_is_not_found(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_owner") as http:
            job_id = create(http)
        with client(gateway, "user_stranger") as stranger:
            answer = stranger.get(f"/jobs/{job_id}/events")
        assert answer.status_code == 404
        assert answer.json() == {"detail": "Job not found", "code": "NOT_FOUND"}

    def test_without_a_token_is_unauthorized(self, gateway: GatewayProcess) -> None:
        answer = httpx.get(f"{gateway.base_url}/jobs/events", timeout=READ)
        assert answer.status_code == 401 and answer.json()["code"] == "UNAUTHORIZED"

    def test_head_answers_the_headers_only(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_head") as http:
            answer = http.head("/jobs/events")
        assert answer.status_code == 200 and answer.content == b""
        assert answer.headers["content-type"].startswith("text/event-stream")


class TestUserStream:
    def test_sees_a_job_created_after_it_opened(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_list") as http:
            first = create(http)
            with http.stream("GET", "/jobs/events") as response:
                jobs = job_events(response)
                assert next(jobs)["jobId"] == first  # the current state comes first
                second = create(http)
                statuses = set()
                while ("done", second) not in statuses:
                    job = next(jobs)
                    statuses.add((job["status"], job["jobId"]))
        assert ("queued", second) in statuses

    def test_keepalive_comments_then_a_reconnect_event(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_quiet") as http:
            with http.stream("GET", "/jobs/events") as response:
                seen = list(events(response))  # ends after STREAM_MAX_SECONDS
        assert {"comment": "keepalive"} in seen
        assert seen[-1] == {"event": "reconnect", "data": '{"reason":"timeout"}', "retry": "1000"}

    def test_a_user_may_hold_ten_streams(self, gateway: GatewayProcess) -> None:
        with client(gateway, "user_tabs") as http, ExitStack() as streams:
            for _ in range(10):
                opened = streams.enter_context(http.stream("GET", "/jobs/events"))
                assert opened.status_code == 200
            refused = http.get("/jobs/events")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == {
            "detail": "You already have 10 open event streams",
            "code": "TOO_MANY_STREAMS",
        }


class TestShutdown:
    def test_sigterm_ends_every_stream_and_the_process(self, tmp_path: Path) -> None:
        gateway = GatewayProcess(tmp_path / "data", STREAMS_PER_INSTANCE="3")
        gateway.start()
        try:
            with ExitStack() as stack:
                opened = []
                for user in ("user_a", "user_b", "user_c"):
                    http = stack.enter_context(client(gateway, user))
                    opened.append(stack.enter_context(http.stream("GET", "/jobs/events")))
                full = httpx.get(
                    f"{gateway.base_url}/jobs/events", headers=bearer(gateway, "user_d")
                )
                assert full.status_code == 429 and full.json()["code"] == "TOO_MANY_STREAMS"
                assert gateway.process is not None
                gateway.process.send_signal(signal.SIGTERM)
                finals = [list(events(response))[-1] for response in opened]
            # uvicorn waits for open responses before it exits: it exits because they ended.
            # (It re-raises the SIGTERM it caught, so its parent sees "terminated".)
            assert gateway.wait_dead(timeout=10) == -signal.SIGTERM
            log = (gateway.data_dir.parent / f"gateway-{gateway.port}.log").read_text()
            assert "closing 3 event streams for shutdown" in log
            assert "shutdown complete" in log
        finally:
            gateway.stop()
        assert all(e["event"] == "reconnect" for e in finals)
        assert {e["data"] for e in finals} == {'{"reason":"shutdown"}'}


class TestAcrossInstances:
    """Two gateways, one store: the webhook for a job watched on one is delivered to the other."""

    def test_a_stream_sees_the_webhook_the_other_instance_took(
        self, tmp_path: Path, store_env: dict[str, str]
    ) -> None:
        with running_standin(render_seconds=0.5, webhook_retry_delay=1) as standin:
            shared = {
                "RUNPOD_API_BASE": standin,
                "RUNPOD_API_KEY": "local",
                "RUNPOD_ENDPOINT_ID": "local",
                "RECONCILER_ENABLED": "false",  # only the webhook may move the job
                **store_env,
            }
            watcher = GatewayProcess(tmp_path / "data", **shared)
            receiver = GatewayProcess(tmp_path / "data", **shared)
            try:
                receiver.start()
                # Jobs created on the watcher call back to the receiver (and upload there).
                watcher.start(PUBLIC_BASE_URL=receiver.base_url)
                self.watch_a_job(watcher, receiver)
            finally:
                watcher.stop()
                receiver.stop()

    @staticmethod
    def watch_a_job(watcher: GatewayProcess, receiver: GatewayProcess) -> None:
        with client(watcher, "user_multi") as http:
            job_id = create(http)
            with http.stream("GET", f"/jobs/{job_id}/events") as response:
                statuses = [job["status"] for job in job_events(response)]
        with client(receiver, "user_multi") as other:
            done = other.get(f"/jobs/{job_id}").json()
        assert statuses[0] == "queued" and statuses[-1] == "done"
        assert done["status"] == "done"
        log = (watcher.data_dir.parent / f"gateway-{receiver.port}.log").read_text()
        assert "POST /webhooks/runpod 200" in log  # the receiver, not the watcher, took it
