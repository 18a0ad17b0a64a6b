"""convex_client.py's own rules: the wire shape, error mapping and what is safe to retry.

The store semantics are covered by the contract suite against the real functions; these tests
use respx to produce the answers a real deployment gives and convex-test does not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from config import Settings
from convex_client import ConvexConflict, ConvexStore, error_from_response
from errors import (
    InsufficientCredits,
    InvalidCursor,
    InvalidRequest,
    JobNotCancelable,
    NotFound,
    TooManyActiveJobs,
    UpstreamError,
    UpstreamUnavailable,
)

URL = "https://happy-animal-123.convex.cloud"
USER = {"userId": "user_a", "credits": 100, "plan": "starter", "createdAt": 1, "updatedAt": 2}


@pytest.fixture
async def store() -> AsyncIterator[ConvexStore]:
    settings = Settings(_env_file=None, convex_url=URL, convex_deploy_key="prod:secret-key")
    opened = ConvexStore.from_settings(settings)
    yield opened
    await opened.close()


def function_error(code: str, message: str = "nope") -> httpx.Response:
    body = {"status": "error", "errorMessage": "Uncaught ConvexError", "errorData": {"code": code}}
    body["errorData"]["message"] = message
    return httpx.Response(560, json=body)


def success(value: object) -> httpx.Response:
    return httpx.Response(200, json={"status": "success", "value": value, "logLines": []})


class TestWire:
    @respx.mock
    async def test_request_shape_and_auth(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").mock(return_value=success(USER))
        user = await store.get_or_create_user("user_a")
        assert (user.user_id, user.credits) == ("user_a", 100)
        sent = route.calls.last.request
        assert sent.headers["authorization"] == "Convex prod:secret-key"
        assert json.loads(sent.content) == {
            "path": "gateway:getUser",
            "args": {"userId": "user_a"},
            "format": "json",
        }

    @respx.mock
    async def test_unknown_success_shape_is_502(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").respond(200, content=b"<html>")
        with pytest.raises(UpstreamError):
            await store.ping()

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
        assert sent == [
            (
                "/api/query",
                {"path": "gateway:getUser", "args": {"userId": "user_a"}, "format": "json"},
            ),
            (
                "/api/mutation",
                {
                    "path": "gateway:getOrCreateUser",
                    "args": {"userId": "user_a", "signupCredits": 100.0, "plan": "starter"},
                    "format": "json",
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
        with pytest.raises(UpstreamUnavailable):
            await store.get_or_create_user("user_a")
        assert mutation.call_count == 0

    @respx.mock
    async def test_create_is_not_retried_after_sending(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=success(None))
        mutation = respx.post(f"{URL}/api/mutation").mock(side_effect=httpx.ReadTimeout("slow"))
        with pytest.raises(UpstreamUnavailable):
            await store.get_or_create_user("user_a")
        assert mutation.call_count == 1

    @respx.mock
    async def test_create_maps_business_errors(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").mock(return_value=success(None))
        respx.post(f"{URL}/api/mutation").mock(return_value=function_error("INVALID_REQUEST"))
        with pytest.raises(InvalidRequest):
            await store.get_or_create_user("user_a")


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("code", "error", "status"),
        [
            ("INSUFFICIENT_CREDITS", InsufficientCredits, 402),
            ("TOO_MANY_ACTIVE_JOBS", TooManyActiveJobs, 429),
            ("NOT_FOUND", NotFound, 404),
            ("JOB_NOT_CANCELABLE", JobNotCancelable, 409),
            ("CONFLICT", ConvexConflict, 409),
            ("INVALID_CURSOR", InvalidCursor, 400),
        ],
    )
    def test_business_codes(self, code, error, status) -> None:
        mapped = error_from_response(function_error(code, "why"))
        assert isinstance(mapped, error) and mapped.status_code == status
        assert mapped.detail == "why"

    @pytest.mark.parametrize("code", [["INSUFFICIENT_CREDITS"], {"a": 1}, 7, None])
    def test_a_code_that_is_not_text_is_an_upstream_error(self, code: object) -> None:
        body = {"status": "error", "errorMessage": "x", "errorData": {"code": code}}
        mapped = error_from_response(httpx.Response(560, json=body))
        assert type(mapped) is UpstreamError and mapped.status_code == 502

    def test_too_many_active_jobs_keeps_retry_after(self) -> None:
        mapped = error_from_response(function_error("TOO_MANY_ACTIVE_JOBS"))
        assert "Retry-After" in mapped.headers

    @pytest.mark.parametrize(
        ("response", "error"),
        [
            (httpx.Response(560, json={"status": "error", "errorMessage": "x"}), UpstreamError),
            (function_error("SOMETHING_NEW"), UpstreamError),
            (httpx.Response(401, json={"code": "BadDeployKey"}), UpstreamError),
            (httpx.Response(404, json={"code": "FunctionNotFound"}), UpstreamError),
            (httpx.Response(500, text="oops"), UpstreamUnavailable),
            (httpx.Response(503), UpstreamUnavailable),
            (httpx.Response(429), UpstreamUnavailable),
        ],
    )  # fmt: skip
    def test_other_failures(self, response, error) -> None:
        assert type(error_from_response(response)) is error


class TestRetries:
    @respx.mock
    async def test_query_is_retried_on_5xx(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").mock(
            side_effect=[
                httpx.Response(503),
                httpx.ReadTimeout("slow"),
                httpx.Response(200, json={"status": "success", "value": None}),
            ]
        )
        assert await store.find_job("job_abcdefghijklmnop") is None
        assert route.call_count == 3

    @respx.mock
    async def test_query_gives_up_with_503(self, store: ConvexStore) -> None:
        respx.post(f"{URL}/api/query").respond(502)
        with pytest.raises(UpstreamUnavailable):
            await store.ping()

    @respx.mock
    async def test_mutation_is_not_retried_after_sending(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(side_effect=httpx.ReadTimeout("slow"))
        with pytest.raises(UpstreamUnavailable):
            await store.grant_credits("user_a", 5, "test")
        assert route.call_count == 1

    @respx.mock
    async def test_mutation_is_not_retried_on_5xx(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/mutation").respond(500)
        with pytest.raises(UpstreamUnavailable):
            await store.grant_credits("user_a", 5, "test")
        assert route.call_count == 1

    @respx.mock
    async def test_mutation_is_retried_when_never_sent(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/mutation").mock(
            side_effect=[
                httpx.ConnectError("refused"),
                httpx.Response(200, json={"status": "success", "value": USER}),
            ]
        )
        assert (await store.grant_credits("user_a", 5, "test")).credits == 100
        assert route.call_count == 2

    @respx.mock
    async def test_business_error_is_not_retried(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").mock(return_value=function_error("NOT_FOUND"))
        with pytest.raises(NotFound):
            await store.get_job("user_a", "job_abcdefghijklmnop")
        assert route.call_count == 1


class TestProductionConfig:
    def test_convex_settings_select_the_convex_store(self) -> None:
        settings = Settings(_env_file=None, convex_url=URL, convex_deploy_key="k")
        assert settings.uses_convex
        assert not Settings(_env_file=None, convex_url=URL).uses_convex
