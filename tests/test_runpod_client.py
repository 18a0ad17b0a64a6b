"""RunPodClient against RunPod's HTTP API, mocked at the transport with respx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from errors import UpstreamError, UpstreamUnavailable
from runpod_client import (
    CONNECT_RETRIES,
    MAX_BACKOFF_SECONDS,
    RunPodClient,
    RunPodError,
    RunPodNotFound,
    RunPodRejected,
    RunPodStatus,
    RunPodSubmitUncertain,
    RunPodUnavailable,
    build_http_client,
)
from tests.servers import free_port

API_BASE = "https://runpod.test/v2"
ENDPOINT = "ep123"
URL = f"{API_BASE}/{ENDPOINT}"
API_KEY = "rp_secret_key_123"
JOB_ID = "c80ffee4-f315-4e25-a146-0f3d98cf024b-u1"
WEBHOOK = "https://gateway.test/webhooks/runpod?jobId=job_1&token=abc"
JOB_INPUT = {"prompt": "a cat", "durationSec": 2, "seed": 7}
BAD_IDS = ["", "../health", "a/b", "a b", "abc\n", "id?x=1", "é", "x" * 129]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with build_http_client(API_BASE, ENDPOINT, API_KEY) as client:
        yield client


@pytest.fixture
def client(http: httpx.AsyncClient, sleeps: list[float]) -> RunPodClient:
    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    # The top of each full-jitter range, so that the backoffs can be asserted exactly.
    return RunPodClient(http, sleep=record_sleep, jitter=lambda low, high: high)


async def submit(client: RunPodClient) -> str:
    return await client.submit(JOB_INPUT, WEBHOOK, execution_timeout_ms=600_000, ttl_ms=86_400_000)


def queued(runpod_id: str = JOB_ID) -> httpx.Response:
    return httpx.Response(200, json={"id": runpod_id, "status": "IN_QUEUE"})


class TestErrors:
    def test_family(self) -> None:
        assert issubclass(RunPodUnavailable, RunPodError)
        assert issubclass(RunPodUnavailable, UpstreamUnavailable)
        assert issubclass(RunPodSubmitUncertain, UpstreamUnavailable)
        # A caller that treats "unavailable" as "nothing happened" must not catch this one.
        assert not issubclass(RunPodSubmitUncertain, RunPodUnavailable)
        assert issubclass(RunPodRejected, UpstreamError)
        assert issubclass(RunPodNotFound, RunPodRejected)

    def test_statuses_and_codes(self) -> None:
        assert (RunPodUnavailable().status_code, RunPodUnavailable().code) == (
            503,
            "UPSTREAM_UNAVAILABLE",
        )
        assert RunPodSubmitUncertain().status_code == 503
        assert (RunPodRejected().status_code, RunPodRejected().code) == (502, "UPSTREAM_ERROR")
        assert RunPodNotFound().status_code == 502

    def test_unavailable_passes_retry_after_on(self) -> None:
        response = httpx.Response(429, headers={"Retry-After": "7"})
        error = RunPodUnavailable.from_response(response)
        assert error.headers["Retry-After"] == "7"


class TestBuildHttpClient:
    async def test_base_url_auth_and_timeout(self, http: httpx.AsyncClient) -> None:
        assert str(http.base_url) == f"{URL}/"
        assert http.headers["Authorization"] == f"Bearer {API_KEY}"
        assert http.timeout == httpx.Timeout(10.0, connect=3.0)

    def test_refuses_an_endpoint_id_that_is_not_url_safe(self) -> None:
        with pytest.raises(ValueError):
            build_http_client(API_BASE, "ep/../x", API_KEY)


class TestSubmit:
    async def test_success(self, client: RunPodClient, respx_mock: respx.MockRouter) -> None:
        route = respx_mock.post(f"{URL}/run").mock(return_value=queued())

        assert await submit(client) == JOB_ID

        request = route.calls.last.request
        assert request.headers["Authorization"] == f"Bearer {API_KEY}"
        assert json.loads(request.content) == {
            "input": JOB_INPUT,
            "webhook": WEBHOOK,
            "policy": {"executionTimeout": 600_000, "ttl": 86_400_000},
        }

    async def test_429_then_success_backs_off(
        self, client: RunPodClient, respx_mock: respx.MockRouter, sleeps: list[float]
    ) -> None:
        route = respx_mock.post(f"{URL}/run").mock(side_effect=[httpx.Response(429), queued()])

        assert await submit(client) == JOB_ID
        assert route.call_count == 2
        assert sleeps == [0.5]

    async def test_429_honours_retry_after_up_to_a_cap(
        self, client: RunPodClient, respx_mock: respx.MockRouter, sleeps: list[float]
    ) -> None:
        respx_mock.post(f"{URL}/run").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "2"}),
                httpx.Response(429, headers={"Retry-After": "3600"}),
                queued(),
            ]
        )

        assert await submit(client) == JOB_ID
        assert sleeps == [2.0, MAX_BACKOFF_SECONDS]

    async def test_429_exhausted_is_unavailable(
        self, client: RunPodClient, respx_mock: respx.MockRouter, sleeps: list[float]
    ) -> None:
        route = respx_mock.post(f"{URL}/run").mock(return_value=httpx.Response(429))

        with pytest.raises(RunPodUnavailable) as caught:
            await submit(client)
        assert caught.value.status_code == 503
        assert route.call_count == 4
        assert sleeps == [0.5, 1.0, 2.0]

    async def test_5xx_is_unavailable_and_never_retried(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        route = respx_mock.post(f"{URL}/run").mock(return_value=httpx.Response(500))

        with pytest.raises(RunPodUnavailable) as caught:
            await submit(client)
        assert caught.value.status_code == 503
        assert route.call_count == 1

    async def test_read_timeout_is_uncertain_and_never_retried(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        route = respx_mock.post(f"{URL}/run").mock(side_effect=httpx.ReadTimeout("read timeout"))

        with pytest.raises(RunPodSubmitUncertain) as caught:
            await submit(client)
        assert caught.value.status_code == 503
        assert route.call_count == 1

    async def test_dropped_connection_is_uncertain(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        error = httpx.RemoteProtocolError("Server disconnected without sending a response.")
        route = respx_mock.post(f"{URL}/run").mock(side_effect=error)

        with pytest.raises(RunPodSubmitUncertain):
            await submit(client)
        assert route.call_count == 1

    @pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("x")])
    async def test_a_connection_that_never_opened_is_unavailable_at_once(
        self, client: RunPodClient, respx_mock: respx.MockRouter, sleeps: list[float], error
    ) -> None:
        # respx stands in for the connection pool, above the transport's own connect retry.
        route = respx_mock.post(f"{URL}/run").mock(side_effect=error)

        with pytest.raises(RunPodUnavailable):
            await submit(client)
        assert route.call_count == 1 and sleeps == []

    async def test_the_transport_retries_the_connect(self) -> None:
        async def no_sleep(seconds: float) -> None:
            raise AssertionError("a connection that never opened is not retried by a loop of ours")

        dead = f"http://127.0.0.1:{free_port()}"
        async with build_http_client(dead, ENDPOINT, API_KEY) as http:
            # The one retry of a connection that never opened is httpcore's, not a loop of ours.
            pool = http._transport._pool  # type: ignore[attr-defined]  # httpcore's pool
            assert pool._retries == CONNECT_RETRIES == 1
            with pytest.raises(RunPodUnavailable):
                await submit(RunPodClient(http, sleep=no_sleep))

    async def test_backoff_has_full_jitter(self, http: httpx.AsyncClient, respx_mock) -> None:
        draws: list[tuple[float, float]] = []
        sleeps: list[float] = []

        async def record_sleep(seconds: float) -> None:
            sleeps.append(seconds)

        def jitter(low: float, high: float) -> float:
            draws.append((low, high))
            return high / 4

        respx_mock.post(f"{URL}/run").respond(429)
        client = RunPodClient(http, sleep=record_sleep, jitter=jitter)
        with pytest.raises(RunPodUnavailable):
            await submit(client)
        assert draws == [(0, 0.5), (0, 1.0), (0, 2.0)]
        assert sleeps == [0.125, 0.25, 0.5]

    async def test_400_is_rejected_without_echoing_the_key(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        body = {"error": f"input is invalid for key {API_KEY}"}
        route = respx_mock.post(f"{URL}/run").mock(return_value=httpx.Response(400, json=body))

        with pytest.raises(RunPodRejected) as caught:
            await submit(client)
        assert caught.value.status_code == 502
        assert "input is invalid" in caught.value.detail
        assert API_KEY not in caught.value.detail
        assert route.call_count == 1

    async def test_malformed_json_is_rejected(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.post(f"{URL}/run").mock(return_value=httpx.Response(200, text="{not json"))

        with pytest.raises(RunPodRejected) as caught:
            await submit(client)
        assert caught.value.status_code == 502

    @pytest.mark.parametrize("body", [{"status": "IN_QUEUE"}, {"id": ""}, {"id": 5}, ["x"]])
    async def test_answer_without_an_id_is_rejected(
        self, client: RunPodClient, respx_mock: respx.MockRouter, body: object
    ) -> None:
        respx_mock.post(f"{URL}/run").mock(return_value=httpx.Response(200, json=body))

        with pytest.raises(RunPodRejected):
            await submit(client)


class TestStatus:
    async def test_parses_payload(self, client: RunPodClient, respx_mock: respx.MockRouter) -> None:
        payload = {
            "id": JOB_ID,
            "status": "COMPLETED",
            "delayTime": 120,
            "executionTime": 3400,
            "output": {"objectKey": "videos/u/j.mp4"},
        }
        route = respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, json=payload)
        )

        status = await client.status(JOB_ID)

        assert status == RunPodStatus(
            id=JOB_ID,
            status="COMPLETED",
            output={"objectKey": "videos/u/j.mp4"},
            error=None,
            input=None,
        )
        assert status.is_terminal
        assert route.calls.last.request.headers["Authorization"] == f"Bearer {API_KEY}"

    async def test_json_string_error_gives_the_message_only(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        error = json.dumps(
            {
                "error_type": "<class 'RuntimeError'>",
                "error_message": "CUDA out of memory",
                "error_traceback": 'Traceback (most recent call last):\n  File "handler.py"',
            }
        )
        payload = {"id": JOB_ID, "status": "FAILED", "error": error}
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, json=payload)
        )

        status = await client.status(JOB_ID)

        assert status.error == "CUDA out of memory"
        assert status.is_terminal

    async def test_dict_error(self, client: RunPodClient, respx_mock: respx.MockRouter) -> None:
        error = {"error_type": "ValueError", "error_message": "bad seed", "error_traceback": "T"}
        payload = {"id": JOB_ID, "status": "FAILED", "error": error}
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, json=payload)
        )

        assert (await client.status(JOB_ID)).error == "bad seed"

    async def test_plain_string_error(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        payload = {"id": JOB_ID, "status": "FAILED", "error": "handler returned an error"}
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, json=payload)
        )

        assert (await client.status(JOB_ID)).error == "handler returned an error"

    async def test_in_progress_is_not_terminal(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        payload = {"id": JOB_ID, "status": "IN_PROGRESS", "output": 0.4}
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, json=payload)
        )

        status = await client.status(JOB_ID)
        assert (status.status, status.output, status.is_terminal) == ("IN_PROGRESS", 0.4, False)

    async def test_404_is_not_found(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(404, json={"error": "request does not exist"})
        )

        with pytest.raises(RunPodNotFound) as caught:
            await client.status(JOB_ID)
        assert caught.value.status_code == 502

    async def test_5xx_is_retried_then_unavailable(
        self, client: RunPodClient, respx_mock: respx.MockRouter, sleeps: list[float]
    ) -> None:
        route = respx_mock.get(f"{URL}/status/{JOB_ID}").mock(return_value=httpx.Response(503))

        with pytest.raises(RunPodUnavailable):
            await client.status(JOB_ID)
        assert route.call_count == 3
        assert sleeps == [0.5, 1.0]

    async def test_timeout_then_success(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        payload = {"id": JOB_ID, "status": "IN_QUEUE"}
        route = respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=payload)]
        )

        assert (await client.status(JOB_ID)).status == "IN_QUEUE"
        assert route.call_count == 2

    @pytest.mark.parametrize("payload", [{"status": "COMPLETED"}, {"id": JOB_ID}, [1], "x"])
    async def test_malformed_payload_is_rejected(
        self, client: RunPodClient, respx_mock: respx.MockRouter, payload: object
    ) -> None:
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, json=payload)
        )

        with pytest.raises(RunPodRejected):
            await client.status(JOB_ID)

    @pytest.mark.parametrize("bad_id", BAD_IDS)
    async def test_bad_id_is_rejected_without_a_request(
        self, client: RunPodClient, respx_mock: respx.MockRouter, bad_id: str
    ) -> None:
        with pytest.raises(RunPodRejected):
            await client.status(bad_id)
        assert respx_mock.calls.call_count == 0


class TestCancel:
    async def test_success(self, client: RunPodClient, respx_mock: respx.MockRouter) -> None:
        route = respx_mock.post(f"{URL}/cancel/{JOB_ID}").mock(
            return_value=httpx.Response(200, json={"id": JOB_ID, "status": "CANCELLED"})
        )

        await client.cancel(JOB_ID)

        assert route.calls.last.request.headers["Authorization"] == f"Bearer {API_KEY}"

    async def test_404_is_not_found(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.post(f"{URL}/cancel/{JOB_ID}").mock(return_value=httpx.Response(404))

        with pytest.raises(RunPodNotFound):
            await client.cancel(JOB_ID)

    async def test_connect_error_is_retried(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        route = respx_mock.post(f"{URL}/cancel/{JOB_ID}").mock(
            side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json={})]
        )

        await client.cancel(JOB_ID)
        assert route.call_count == 2

    async def test_401_is_rejected(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.post(f"{URL}/cancel/{JOB_ID}").mock(return_value=httpx.Response(401))

        with pytest.raises(RunPodRejected) as caught:
            await client.cancel(JOB_ID)
        assert not isinstance(caught.value, RunPodNotFound)

    async def test_bad_id_is_rejected_without_a_request(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        with pytest.raises(RunPodRejected):
            await client.cancel("../run")
        assert respx_mock.calls.call_count == 0


class TestHealth:
    async def test_returns_the_report(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        report = {
            "jobs": {"completed": 3, "failed": 0, "inProgress": 1, "inQueue": 0, "retried": 0},
            "workers": {"idle": 0, "running": 1},
        }
        route = respx_mock.get(f"{URL}/health").mock(return_value=httpx.Response(200, json=report))

        assert await client.health() == report
        assert route.calls.last.request.headers["Authorization"] == f"Bearer {API_KEY}"

    async def test_connect_errors_exhausted_are_unavailable(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        route = respx_mock.get(f"{URL}/health").mock(side_effect=httpx.ConnectError("refused"))

        with pytest.raises(RunPodUnavailable):
            await client.health()
        assert route.call_count == 3

    async def test_non_object_is_rejected(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.get(f"{URL}/health").mock(return_value=httpx.Response(200, json=["ok"]))

        with pytest.raises(RunPodRejected):
            await client.health()


class TestRunPodStatus:
    def test_webhook_payload_keeps_the_input(self) -> None:
        payload = {"id": JOB_ID, "status": "COMPLETED", "input": JOB_INPUT, "webhook": WEBHOOK}

        assert RunPodStatus.from_payload(payload).input == JOB_INPUT

    @pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"])
    def test_terminal_statuses(self, status: str) -> None:
        assert RunPodStatus.from_payload({"id": JOB_ID, "status": status}).is_terminal

    def test_error_without_a_message_never_shows_the_traceback(self) -> None:
        error = json.dumps({"error_traceback": "secret frames"})

        parsed = RunPodStatus.from_payload({"id": JOB_ID, "status": "FAILED", "error": error})
        assert parsed.error == "The worker failed"


class TestHostileAnswers:
    """What RunPod (or anything answering in its place) sends is parsed without a 500."""

    DEEP = b"[" * 10_000 + b"]" * 10_000

    async def test_deeply_nested_status_is_rejected(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(200, content=self.DEEP)
        )
        with pytest.raises(RunPodRejected, match="not JSON"):
            await client.status(JOB_ID)

    async def test_deeply_nested_refusal_keeps_its_status(
        self, client: RunPodClient, respx_mock: respx.MockRouter
    ) -> None:
        respx_mock.get(f"{URL}/status/{JOB_ID}").mock(
            return_value=httpx.Response(400, content=self.DEEP)
        )
        with pytest.raises(RunPodRejected, match="HTTP 400"):
            await client.status(JOB_ID)

    @pytest.mark.parametrize("runpod_id", BAD_IDS[1:])
    def test_an_id_of_another_shape_is_rejected(self, runpod_id: str) -> None:
        with pytest.raises(RunPodRejected, match="unknown shape"):
            RunPodStatus.from_payload({"id": runpod_id, "status": "COMPLETED"})

    def test_deeply_nested_error_string_is_kept_as_text(self) -> None:
        error = "[" * 10_000
        parsed = RunPodStatus.from_payload({"id": JOB_ID, "status": "FAILED", "error": error})
        assert parsed.error == error[:1000]

    def test_lone_surrogates_in_the_error_become_replacement_characters(self) -> None:
        error = json.dumps({"error_message": "CUDA \ud800 out of memory"})
        parsed = RunPodStatus.from_payload({"id": JOB_ID, "status": "FAILED", "error": error})
        assert parsed.error == "CUDA \ufffd out of memory"
        assert parsed.error.encode("utf-8")  # what the store must be able to do with it

    @pytest.mark.parametrize("error", [[1, 2], {"nested": [[]]}, [[[]]] * 3])
    def test_an_error_that_is_not_text_is_not_printed(self, error: object) -> None:
        parsed = RunPodStatus.from_payload({"id": JOB_ID, "status": "FAILED", "error": error})
        assert parsed.error == "The worker failed"

    def test_an_error_nested_past_the_repr_limit(self) -> None:
        error: list[Any] = []
        for _ in range(5000):  # deeper than str() can go: a RecursionError before
            error = [error]
        parsed = RunPodStatus.from_payload({"id": JOB_ID, "status": "FAILED", "error": error})
        assert parsed.error == "The worker failed"
