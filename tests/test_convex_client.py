"""convex_client.py's own rules: the wire shape, error mapping and what is safe to retry.

The store semantics are covered by the contract suite against the real functions; these tests
feed `ConvexStore` (through respx) every answer shape a real deployment gives, each taken from
the backend's source (`tests/convex_fixtures.py`), and check the gateway error that comes out.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import respx
from pydantic import SecretStr

from config import Settings
from convex_client import (
    BACKOFF_SECONDS,
    CONNECT_RETRIES,
    MUTATION_ATTEMPTS,
    OUT_OF_DATE_MEMORY_SECONDS,
    QUERY_ATTEMPTS,
    ConvexCommitConflict,
    ConvexFunctionFailed,
    ConvexFunctionsOutOfDate,
    ConvexKeyRefused,
    ConvexStore,
    error_from_response,
)
from errors import GatewayError, InvalidCursor, StoreUnavailable, UpstreamError
from outbound_http import AsyncioTransport
from tests import convex_fixtures as shapes
from tests.conftest import RUNPOD_URL, serve
from tests.convex_fixtures import Answer
from tests.stores import CONVEX_TEST_KEY, reset_convex

URL = "https://happy-animal-123.convex.cloud"
USER = {"userId": "user_a", "credits": 100, "plan": "starter", "createdAt": 1, "updatedAt": 2}
JOB_ID = "job_abcdefghijklmnop"


class Recorder:
    """The store's sleep and clock: records each backoff, never waits on the wall clock."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.now = 1000.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def clock(self) -> float:
        return self.now


@pytest.fixture
def time_source() -> Recorder:
    return Recorder()


@pytest.fixture
async def store(time_source: Recorder) -> AsyncIterator[ConvexStore]:
    http = httpx.AsyncClient(base_url=URL, headers={"Authorization": "Convex prod:secret-key"})
    opened = ConvexStore(http, 100, "starter", sleep=time_source.sleep, clock=time_source.clock)
    yield opened
    await opened.close()


def respond(answer: Answer) -> httpx.Response:
    return httpx.Response(answer.status, content=answer.content())


def success(value: object) -> httpx.Response:
    return httpx.Response(200, json={"status": "success", "value": value})


def assert_gateway_error(error: GatewayError, status: int, code: str) -> None:
    assert (error.status_code, error.code) == (status, code), error


class TestWire:
    @respx.mock
    async def test_request_shape_and_auth(self) -> None:
        settings = Settings(
            _env_file=None, convex_url=URL, convex_deploy_key=SecretStr("prod:secret-key")
        )
        store = ConvexStore.from_settings(settings)
        route = respx.post(f"{URL}/api/query").mock(return_value=success(USER))
        user = await store.get_or_create_user("user_a")
        await store.close()
        assert (user.user_id, user.credits) == ("user_a", 100)
        sent = route.calls.last.request
        assert sent.headers["authorization"] == "Convex prod:secret-key"
        assert json.loads(sent.content) == {
            "path": "gateway:getUser",
            "args": {"userId": "user_a"},
            "format": "convex_encoded_json",
        }

    @respx.mock
    async def test_encoded_error_data_is_decoded(self, store: ConvexStore) -> None:
        """`convex_encoded_json` writes an int64 as `$integer` (little-endian, base64), in
        `errorData` too (`UdfResponse::_error` exports it in the requested format)."""
        seven = base64.b64encode(struct.pack("<q", 7)).decode()
        data = {"code": "NOT_FOUND", "message": "Job not found", "n": {"$integer": seven}}
        body = {"status": "error", "errorMessage": shapes.REDACTED, "errorData": data}
        respx.post(f"{URL}/api/query").respond(200, json=body)
        with pytest.raises(GatewayError) as raised:
            await store.get_job("user_a", JOB_ID)
        assert_gateway_error(raised.value, 404, "NOT_FOUND")

    @respx.mock
    async def test_log_lines_are_ignored(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=respond(shapes.SUCCESS_WITH_LOGS))
        assert await store.find_job(JOB_ID) is None

    @pytest.mark.parametrize(
        "response",
        [
            httpx.Response(200, content=b"<html>"),
            httpx.Response(200, json={"status": "success"}),  # no value
            httpx.Response(200, json={"status": "pending"}),
            httpx.Response(560, json={"status": "success", "value": None}),
        ],
    )
    @respx.mock
    async def test_unknown_shapes_are_502(self, store: ConvexStore, response) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=response)
        with pytest.raises(UpstreamError) as raised:
            await store.find_job(JOB_ID)
        assert_gateway_error(raised.value, 502, "UPSTREAM_ERROR")


BUSINESS = [
    (shape, status)
    for code, (status, message) in shapes.BUSINESS_ERRORS.items()
    for shape in (
        shapes.convex_error(code, message),
        shapes.convex_error(code, message, redacted=False),
        shapes.convex_error(code, message, status=560),
    )
]


class TestBusinessErrors:
    """A ConvexError reaches the user as SQLiteStore raises it: same status, code and detail."""

    @pytest.mark.parametrize(("answer", "status"), BUSINESS, ids=lambda a: getattr(a, "name", ""))
    @respx.mock
    async def test_query(self, store: ConvexStore, answer: Answer, status: int) -> None:
        route = respx.post(f"{URL}/api/query").mock(return_value=respond(answer))
        with pytest.raises(GatewayError) as raised:
            await store.get_job("user_a", JOB_ID)
        data = answer.body["errorData"]
        assert_gateway_error(raised.value, status, data["code"])
        assert raised.value.detail == data["message"]
        assert route.call_count == 1  # a function's answer is final: never retried

    @pytest.mark.parametrize(("answer", "status"), BUSINESS, ids=lambda a: getattr(a, "name", ""))
    @respx.mock
    async def test_mutation(self, store: ConvexStore, answer: Answer, status: int) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(return_value=respond(answer))
        with pytest.raises(GatewayError) as raised:
            await store.cancel_job("user_a", JOB_ID)
        assert_gateway_error(raised.value, status, answer.body["errorData"]["code"])
        assert route.call_count == 1

    @respx.mock
    async def test_too_many_active_jobs_keeps_retry_after(self, store: ConvexStore) -> None:
        answer = shapes.convex_error("TOO_MANY_ACTIVE_JOBS", "busy")
        respx.post(f"{URL}/api/mutation").mock(return_value=respond(answer))
        with pytest.raises(GatewayError) as raised:
            await store.cancel_job("user_a", JOB_ID)
        assert raised.value.headers["Retry-After"] == "10"

    @respx.mock
    async def test_a_retry_after_the_function_knows_is_kept(self, store: ConvexStore) -> None:
        """`fail(code, message, retryAfter)` (convex/model.ts): the oldest pending upload's wait."""
        answer = shapes.convex_error("TOO_MANY_PENDING_UPLOADS", "full", retryAfter=421.0)
        respx.post(f"{URL}/api/query").mock(return_value=respond(answer))
        with pytest.raises(GatewayError) as raised:
            await store.get_job("user_a", JOB_ID)
        assert (raised.value.status_code, raised.value.headers["Retry-After"]) == (429, "421")

    def test_every_code_the_functions_throw_is_covered(self) -> None:
        """The `ErrorCode` union in convex/model.ts is the list `fail(...)` can throw."""
        model = open("convex/model.ts", encoding="utf-8").read()
        union = model.split("export type ErrorCode =")[1].split(";")[0]
        thrown = {part.strip().strip('"') for part in union.split("|") if part.strip()}
        assert thrown == set(shapes.BUSINESS_ERRORS)


class TestPlainErrors:
    @pytest.mark.parametrize(
        "answer",
        [
            shapes.PLAIN_ERROR_PROD,
            shapes.PLAIN_ERROR_DEV,
            shapes.LIMIT_ERROR_DEV,
            shapes.UNKNOWN_CONVEX_ERROR,
        ],
        ids=lambda a: a.name,
    )
    @respx.mock
    async def test_is_502_and_logged_with_the_function(
        self, store: ConvexStore, answer: Answer, caplog: pytest.LogCaptureFixture
    ) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(return_value=respond(answer))
        with caplog.at_level(logging.ERROR, logger="gateway.convex"):
            with pytest.raises(ConvexFunctionFailed) as raised:
                await store.cancel_job("user_a", JOB_ID)
        assert_gateway_error(raised.value, 502, "UPSTREAM_ERROR")
        assert route.call_count == 1
        assert "gateway:cancelJob" in caplog.text

    @respx.mock
    async def test_log_names_the_request_and_the_cause(self, store, caplog) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=respond(shapes.PLAIN_ERROR_DEV))
        with caplog.at_level(logging.ERROR, logger="gateway.convex"):
            with pytest.raises(ConvexFunctionFailed):
                await store.find_job(JOB_ID)
        assert shapes.REQUEST_ID in caplog.text
        assert "Uncaught Error: invariant broken" in caplog.text

    @respx.mock
    async def test_redacted_log_says_so(self, store, caplog) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=respond(shapes.PLAIN_ERROR_PROD))
        with caplog.at_level(logging.ERROR, logger="gateway.convex"):
            with pytest.raises(ConvexFunctionFailed):
                await store.find_job(JOB_ID)
        assert "redacted" in caplog.text and shapes.REQUEST_ID in caplog.text


OUT_OF_DATE = [
    shapes.MISSING_FUNCTION_DEV,
    shapes.WRONG_KIND_DEV,
    shapes.BAD_ARGS_DEV,
    shapes.EXTRA_ARG_DEV,
    shapes.MISSING_FUNCTION_404,
    shapes.WRONG_KIND_404,
]


class TestFunctionsOutOfDate:
    """A missing function, a wrong kind or bad arguments: the deployment is not what we call."""

    @pytest.mark.parametrize("answer", OUT_OF_DATE, ids=lambda a: a.name)
    @respx.mock
    async def test_is_502_logged_and_fails_the_ping(self, store, answer, caplog) -> None:
        route = respx.post(f"{URL}/api/query")
        route.side_effect = [respond(answer), success(None)]
        with caplog.at_level(logging.ERROR, logger="gateway.convex"):
            with pytest.raises(ConvexFunctionsOutOfDate) as raised:
                await store.find_job(JOB_ID)
        assert_gateway_error(raised.value, 502, "UPSTREAM_ERROR")
        assert "gateway:findJob" in caplog.text and "npx convex deploy" in caplog.text
        with pytest.raises(ConvexFunctionsOutOfDate) as ping:
            await store.ping()  # ping itself answers, but the deployment is not what we call
        assert ping.value.detail.startswith("gateway:findJob: ")
        assert "not deployed or out of date" in ping.value.detail

    @respx.mock
    async def test_the_function_working_again_clears_it(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").mock(
            side_effect=[respond(shapes.MISSING_FUNCTION_DEV), success(None), success(None)]
        )
        with pytest.raises(ConvexFunctionsOutOfDate):
            await store.find_job(JOB_ID)
        assert await store.find_job(JOB_ID) is None  # deployed now
        await store.ping()

    @respx.mock
    async def test_it_is_forgotten_after_a_while(self, store, time_source: Recorder) -> None:
        respx.post(f"{URL}/api/query").mock(
            side_effect=[respond(shapes.BAD_ARGS_DEV), success(None), success(None)]
        )
        with pytest.raises(ConvexFunctionsOutOfDate):
            await store.find_job(JOB_ID)
        with pytest.raises(ConvexFunctionsOutOfDate):
            await store.ping()
        time_source.now += OUT_OF_DATE_MEMORY_SECONDS + 1
        await store.ping()

    @pytest.mark.parametrize(
        "answer",
        [shapes.MISSING_FUNCTION_PROD, shapes.MISSING_FUNCTION_DEV, shapes.MISSING_FUNCTION_404],
        ids=lambda a: a.name,
    )
    @respx.mock
    async def test_ping_failing_means_not_deployed(self, store, answer: Answer) -> None:
        """`gateway:ping` cannot throw: even a redacted "Server Error" from it means this."""
        respx.post(f"{URL}/api/query").mock(return_value=respond(answer))
        with pytest.raises(ConvexFunctionsOutOfDate) as raised:
            await store.ping()
        assert "gateway:ping" in raised.value.detail
        assert "not deployed or out of date" in raised.value.detail


class TestKeyRefused:
    @pytest.mark.parametrize(
        "answer",
        [shapes.BAD_ADMIN_KEY, shapes.BAD_DEPLOY_KEY, shapes.OPERATION_NOT_PERMITTED],
        ids=lambda a: a.name,
    )
    @respx.mock
    async def test_is_502_not_retried_and_fails_the_ping(self, store, answer: Answer) -> None:
        route = respx.post(f"{URL}/api/query").mock(return_value=respond(answer))
        with pytest.raises(ConvexKeyRefused) as raised:
            await store.find_job(JOB_ID)
        assert_gateway_error(raised.value, 502, "UPSTREAM_ERROR")
        assert route.call_count == 1
        with pytest.raises(ConvexKeyRefused) as ping:
            await store.ping()
        want = f"Convex refused the deploy key (HTTP {answer.status} {answer.body['code']})"
        assert ping.value.detail == want

    @respx.mock
    async def test_a_code_that_is_not_a_word_is_not_echoed(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").respond(401, json={"code": "<script>", "message": "x"})
        with pytest.raises(ConvexKeyRefused) as raised:
            await store.ping()
        assert raised.value.detail == "Convex refused the deploy key (HTTP 401 no code)"


class TestCommitConflict:
    """OCC retries exhausted: 503, nothing committed, so the mutation may be sent again."""

    @respx.mock
    async def test_mutation_is_retried_with_jittered_backoff(self, store, time_source) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(
            side_effect=[respond(shapes.OCC), success(USER)]
        )
        assert (await store.grant_credits("user_a", 5, "test")).credits == 100
        assert route.call_count == 2
        [slept] = time_source.sleeps
        assert 0 <= slept <= 0.1

    @respx.mock
    async def test_gives_up_with_503(self, store: ConvexStore, time_source: Recorder) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(return_value=respond(shapes.OCC))
        with pytest.raises(ConvexCommitConflict) as raised:
            await store.grant_credits("user_a", 5, "test")
        assert_gateway_error(raised.value, 503, "STORE_UNAVAILABLE")
        assert raised.value.headers["Retry-After"] == "2"  # as SQLite answers a busy file
        assert route.call_count == MUTATION_ATTEMPTS
        assert len(time_source.sleeps) == MUTATION_ATTEMPTS - 1
        assert all(0 <= s <= 0.05 * 2**n for n, s in enumerate(time_source.sleeps, start=1))

    @pytest.mark.parametrize(
        "answer", [shapes.OVERLOADED, shapes.INTERNAL], ids=lambda a: a.name
    )  # fmt: skip
    @respx.mock
    async def test_other_5xx_may_have_committed_so_no_retry(self, store, answer) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(return_value=respond(answer))
        with pytest.raises(StoreUnavailable) as raised:
            await store.grant_credits("user_a", 5, "test")
        assert_gateway_error(raised.value, 503, "STORE_UNAVAILABLE")
        assert route.call_count == 1


class TestOtherRefusals:
    @pytest.mark.parametrize(
        "answer", [shapes.BAD_FORMAT, shapes.BAD_JSON_BODY], ids=lambda a: a.name
    )  # fmt: skip
    @respx.mock
    async def test_400_is_502(self, store: ConvexStore, answer: Answer) -> None:
        route = respx.post(f"{URL}/api/query").mock(return_value=respond(answer))
        with pytest.raises(UpstreamError) as raised:
            await store.find_job(JOB_ID)
        assert_gateway_error(raised.value, 502, "UPSTREAM_ERROR")
        assert route.call_count == 1

    @respx.mock
    @pytest.mark.parametrize(
        "content",
        [
            b"[" * 10_000 + b"]" * 10_000,  # deeper than json.loads goes: a RecursionError
            b'{"status":"success","value":' + b"[" * 900 + b"]" * 900 + b"}",  # and the codec
        ],
    )
    async def test_deeply_nested_answer_is_502(self, store: ConvexStore, content: bytes) -> None:
        respx.post(f"{URL}/api/query").respond(200, content=content)
        with pytest.raises(UpstreamError):
            await store.ping()

    @respx.mock
    async def test_deeply_nested_error_is_still_an_error(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/mutation").respond(401, content=b"[" * 10_000)
        with pytest.raises(UpstreamError, match="HTTP 401"):
            await store.grant_credits("user_a", 1, "test")

    @respx.mock
    @pytest.mark.parametrize("cursor", ["\ud800", "a\nb", "\x00"])
    async def test_an_unprintable_cursor_costs_no_call(
        self, store: ConvexStore, cursor: str
    ) -> None:
        route = respx.post(f"{URL}/api/query").mock(return_value=success(None))
        with pytest.raises(InvalidCursor):
            await store.list_jobs("user_a", 10, cursor)
        assert not route.called


class TestGetOrCreateUser:
    """Reads first, like SQLiteStore: only a user's first call costs a mutation."""

    @respx.mock
    async def test_existing_user_costs_one_query(self, store: ConvexStore) -> None:
        query = respx.post(f"{URL}/api/query").mock(return_value=success(USER))
        mutation = respx.post(f"{URL}/api/mutation").mock(return_value=success(USER))
        user = await store.get_or_create_user("user_a")
        assert (user.user_id, user.credits, user.signup_grant) == ("user_a", 100, 0)
        assert (query.call_count, mutation.call_count) == (1, 0)

    @respx.mock
    async def test_new_user_costs_one_query_then_one_mutation(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=success(None))
        created = {**USER, "signupGrant": 100}
        respx.post(f"{URL}/api/mutation").mock(return_value=success(created))
        user = await store.get_or_create_user("user_a")
        assert (user.credits, user.signup_grant) == (100, 100)
        sent = [(call.request.url.path, json.loads(call.request.content)) for call in respx.calls]
        encoded = "convex_encoded_json"
        assert sent == [
            (
                "/api/query",
                {"path": "gateway:getUser", "args": {"userId": "user_a"}, "format": encoded},
            ),
            (
                "/api/mutation",
                {
                    "path": "gateway:getOrCreateUser",
                    "args": {"userId": "user_a", "signupCredits": 100.0, "plan": "starter"},
                    "format": encoded,
                },
            ),
        ]

    @respx.mock
    async def test_read_is_retried_and_still_needs_no_mutation(self, store: ConvexStore) -> None:
        query = respx.post(f"{URL}/api/query").mock(
            side_effect=[httpx.Response(503), httpx.ReadTimeout("slow"), success(USER)]
        )
        mutation = respx.post(f"{URL}/api/mutation").mock(return_value=success(USER))
        assert (await store.get_or_create_user("user_a")).credits == 100
        assert (query.call_count, mutation.call_count) == (3, 0)

    @respx.mock
    async def test_failed_read_creates_nothing(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").respond(502)
        mutation = respx.post(f"{URL}/api/mutation").mock(return_value=success(USER))
        with pytest.raises(StoreUnavailable):
            await store.get_or_create_user("user_a")
        assert mutation.call_count == 0

    @respx.mock
    async def test_create_is_not_retried_after_sending(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=success(None))
        mutation = respx.post(f"{URL}/api/mutation").mock(side_effect=httpx.ReadTimeout("slow"))
        with pytest.raises(StoreUnavailable):
            await store.get_or_create_user("user_a")
        assert mutation.call_count == 1


class TestErrorDataShapes:
    @pytest.mark.parametrize("code", [["INSUFFICIENT_CREDITS"], {"a": 1}, 7, None])
    def test_a_code_that_is_not_text_is_an_upstream_error(self, code: object) -> None:
        """A list is unhashable: looking it up among the codes must not raise TypeError."""
        body = {"status": "error", "errorMessage": "x", "errorData": {"code": code}}
        mapped = error_from_response(httpx.Response(200, json=body))
        assert isinstance(mapped, UpstreamError) and mapped.status_code == 502

    @respx.mock
    async def test_a_value_nested_too_deep_is_502(self, store: ConvexStore) -> None:
        deep = "[" * 100_000 + "]" * 100_000
        body = '{"status": "success", "value": ' + deep + "}"
        respx.post(f"{URL}/api/query").respond(200, content=body.encode())
        with pytest.raises(UpstreamError) as raised:
            await store.find_job(JOB_ID)
        assert_gateway_error(raised.value, 502, "UPSTREAM_ERROR")


class TestRetries:
    @respx.mock
    async def test_query_is_retried_on_5xx(self, store: ConvexStore, time_source) -> None:
        route = respx.post(f"{URL}/api/query").mock(
            side_effect=[httpx.Response(503), httpx.ReadTimeout("slow"), success(None)]
        )
        assert await store.find_job(JOB_ID) is None
        assert route.call_count == 3
        assert len(time_source.sleeps) == 2

    @respx.mock
    async def test_query_gives_up_with_503(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").respond(502)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert route.call_count == QUERY_ATTEMPTS

    @respx.mock
    async def test_query_is_retried_on_429(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").mock(
            side_effect=[httpx.Response(429), success(None)]
        )
        assert await store.find_job(JOB_ID) is None
        assert route.call_count == 2

    @respx.mock
    async def test_mutation_is_not_retried_after_sending(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(side_effect=httpx.ReadTimeout("slow"))
        with pytest.raises(StoreUnavailable):
            await store.grant_credits("user_a", 5, "test")
        assert route.call_count == 1

    # respx stands in for the connection pool, above the transport's own connect retry: a
    # ConnectError here is a connection that failed to open twice.
    @respx.mock
    async def test_mutation_that_could_not_connect_is_not_posted_again(
        self, store: ConvexStore, time_source
    ) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(StoreUnavailable):
            await store.grant_credits("user_a", 5, "test")
        assert route.call_count == 1 and time_source.sleeps == []

    @respx.mock
    async def test_query_that_could_not_connect_is_posted_at_most_query_attempts(
        self, store: ConvexStore
    ) -> None:
        route = respx.post(f"{URL}/api/query").mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(StoreUnavailable):
            await store.find_job(JOB_ID)
        assert route.call_count == QUERY_ATTEMPTS == 3

    @respx.mock
    async def test_backoff_has_full_jitter(self, store: ConvexStore, time_source) -> None:
        respx.post(f"{URL}/api/query").respond(502)
        for _ in range(20):
            with pytest.raises(StoreUnavailable):
                await store.find_job(JOB_ID)
        firsts, seconds = time_source.sleeps[::2], time_source.sleeps[1::2]
        assert all(0 <= s <= BACKOFF_SECONDS * 2 for s in firsts)
        assert all(0 <= s <= BACKOFF_SECONDS * 4 for s in seconds)
        assert len(set(time_source.sleeps)) > 20  # drawn, not fixed

    async def test_the_transport_retries_a_connection_that_never_opened(self) -> None:
        settings = Settings(_env_file=None, convex_url=URL, convex_deploy_key=SecretStr("k"))
        store = ConvexStore.from_settings(settings)
        transport = store._http._transport
        # Behaviour against a real server: tests/test_outbound_http.py (TestThroughConvexStore).
        assert isinstance(transport, AsyncioTransport)
        assert transport._retries == CONNECT_RETRIES == 1
        await store.close()


class TestProductionConfig:
    def test_convex_settings_select_the_convex_store(self) -> None:
        settings = Settings(_env_file=None, convex_url=URL, convex_deploy_key=SecretStr("k"))
        assert settings.uses_convex
        assert not Settings(_env_file=None, convex_url=URL).uses_convex


# --- through the gateway: what a user sees -----------------------------------------------------

CREATE = {"prompt": "A silver drone flies through neon skyline", "durationSec": 2, "seed": 42}


@pytest.fixture
def runpod_and_convex() -> Iterator[respx.MockRouter]:
    """RunPod through respx; the Convex test server on loopback is reached for real."""
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="127.0.0.1").pass_through()
        mock.post(f"{RUNPOD_URL}/run", name="run").respond(
            200, json={"id": "rp-1", "status": "IN_QUEUE"}
        )
        mock.post(url__regex=rf"{RUNPOD_URL}/cancel/.*").respond(
            200, json={"id": "rp-1", "status": "CANCELLED"}
        )
        yield mock


async def refusals(
    client: httpx.AsyncClient, user: dict[str, str]
) -> list[tuple[int, dict[str, Any]]]:
    """Every business refusal a user can meet, in one scenario: (status, body) for each."""
    first = await client.post("/jobs/create", json=CREATE, headers={**user, "Idempotency-Key": "k"})
    job_id = first.json()["jobId"]
    answers = [
        await client.post("/jobs/create", json=CREATE, headers=user),  # 1 active job: 429
        await client.post(
            "/jobs/create", json={**CREATE, "seed": 7}, headers={**user, "Idempotency-Key": "k"}
        ),  # same key, other body: 409
        await client.get("/jobs/job_doesnotexist0000", headers=user),  # 404
        await client.get("/jobs?cursor=not-a-cursor", headers=user),  # 400
    ]
    assert (await client.post(f"/jobs/{job_id}/cancel", headers=user)).status_code == 200
    answers.append(await client.post(f"/jobs/{job_id}/cancel", headers=user))  # canceled: 409
    answers.append(
        await client.post("/jobs/create", json={**CREATE, "durationSec": 6}, headers=user)
    )  # 5 credits again after the refund: 402
    return [(answer.status_code, answer.json()) for answer in answers]


class TestUsersSeeWhatSQLiteShows:
    """Every business error reaches the user with SQLite's status, code and detail."""

    async def test_same_refusals_on_both_stores(
        self,
        settings_factory: Callable[..., Settings],
        convex_server: str,
        make_token: Callable[..., str],
        runpod_and_convex: respx.MockRouter,
    ) -> None:
        user = {"Authorization": f"Bearer {make_token('user_alice')}"}
        seen = {}
        for kind, extra in [
            ("sqlite", {}),
            ("convex", {"convex_url": convex_server, "convex_deploy_key": CONVEX_TEST_KEY}),
        ]:
            reset_convex(convex_server)
            settings = settings_factory(signup_credits=5, max_concurrent_jobs=1, **extra)
            async with serve(settings) as client:
                seen[kind] = await refusals(client, user)
        assert [(status, body["code"]) for status, body in seen["convex"]] == [
            (429, "TOO_MANY_ACTIVE_JOBS"),
            (409, "IDEMPOTENCY_KEY_REUSED"),
            (404, "NOT_FOUND"),
            (400, "INVALID_CURSOR"),
            (409, "JOB_NOT_CANCELABLE"),
            (402, "INSUFFICIENT_CREDITS"),
        ]
        assert seen["convex"] == seen["sqlite"]

    async def test_commit_conflict_is_503_and_charges_nothing(
        self, settings_factory, convex_server: str, make_token, runpod_and_convex
    ) -> None:
        reset_convex(convex_server)
        user = {"Authorization": f"Bearer {make_token('user_alice')}"}
        settings = settings_factory(convex_url=convex_server, convex_deploy_key=CONVEX_TEST_KEY)
        async with serve(settings) as client:
            assert (await client.get("/credits", headers=user)).json()["credits"] == 100
            occ = {"path": "gateway:chargeAndCreateJob"}  # every try, until the reset
            httpx.post(f"{convex_server}/_test/occ", json=occ).raise_for_status()
            refused = await client.post("/jobs/create", json=CREATE, headers=user)
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "STORE_UNAVAILABLE"
            assert (await client.get("/credits", headers=user)).json()["credits"] == 100
            assert (await client.get("/jobs", headers=user)).json()["jobs"] == []
            assert runpod_and_convex.routes["run"].call_count == 0  # nothing submitted

    async def test_one_conflict_is_retried_and_charges_once(
        self, settings_factory, convex_server: str, make_token, runpod_and_convex
    ) -> None:
        reset_convex(convex_server)
        user = {"Authorization": f"Bearer {make_token('user_alice')}"}
        settings = settings_factory(convex_url=convex_server, convex_deploy_key=CONVEX_TEST_KEY)
        async with serve(settings) as client:
            assert (await client.get("/credits", headers=user)).json()["credits"] == 100
            occ = {"path": "gateway:chargeAndCreateJob", "times": 1}
            httpx.post(f"{convex_server}/_test/occ", json=occ).raise_for_status()
            created = await client.post("/jobs/create", json=CREATE, headers=user)
            assert created.status_code == 200, created.text
            assert (await client.get("/credits", headers=user)).json()["credits"] == 98
            assert len((await client.get("/jobs", headers=user)).json()["jobs"]) == 1
