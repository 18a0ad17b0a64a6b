"""CORS_ALLOW_ORIGINS: the web app's origins may call the API from a browser and read its errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from pydantic import ValidationError

from config import Settings, production_problems
from tests.conftest import bearer, serve
from tests.test_config import COMPLETE, build

APP = "https://app.cineweave.ai"
OTHER = "https://evil.example"


def preflight(origin: str, method: str = "POST", headers: str = "authorization") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


class TestSetting:
    def test_default_is_empty(self) -> None:
        assert build().cors_allow_origins == []

    def test_comma_separated_origins_are_normalized(self) -> None:
        settings = build(cors_allow_origins="https://App.CineWeave.ai/, http://localhost:3000,")
        assert settings.cors_allow_origins == ["https://app.cineweave.ai", "http://localhost:3000"]

    @pytest.mark.parametrize(
        "origin",
        ["app.cineweave.ai", "ftp://app.cineweave.ai", "https://app.cineweave.ai/login",
         "https://app.cineweave.ai?x=1", "https://user@app.cineweave.ai", "https://a.io:http"],
    )  # fmt: skip
    def test_anything_but_an_origin_is_refused(self, origin: str) -> None:
        with pytest.raises(ValidationError, match="CORS_ALLOW_ORIGINS"):
            build(cors_allow_origins=origin)

    def test_star_is_allowed_locally(self) -> None:
        settings = build(cors_allow_origins="*")
        assert settings.cors_allow_origins == ["*"]

    def test_star_is_refused_in_production(self) -> None:
        with pytest.raises(ValidationError, match="CORS_ALLOW_ORIGINS must name"):
            build(**COMPLETE, cors_allow_origins="*")

    def test_listed_origins_pass_in_production(self) -> None:
        settings = build(**COMPLETE, cors_allow_origins=APP)
        assert production_problems(settings) == []


@pytest.fixture
async def cors_client(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings_factory(cors_allow_origins=APP)) as client:
        yield client


class TestPreflight:
    async def test_allowed_origin(self, cors_client: httpx.AsyncClient) -> None:
        headers = preflight(APP, headers="authorization, content-type, idempotency-key")
        response = await cors_client.options("/jobs/create", headers=headers)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == APP
        methods = response.headers["access-control-allow-methods"]
        assert {m.strip() for m in methods.split(",")} == {"GET", "POST", "DELETE", "OPTIONS"}
        allowed = response.headers["access-control-allow-headers"].lower()
        for name in ("authorization", "content-type", "idempotency-key", "x-request-id"):
            assert name in allowed
        assert response.headers["access-control-max-age"] == "600"

    async def test_disallowed_origin(self, cors_client: httpx.AsyncClient) -> None:
        response = await cors_client.options("/jobs/create", headers=preflight(OTHER))
        assert response.status_code == 400
        assert "access-control-allow-origin" not in response.headers
        assert response.json() == {"detail": "Disallowed CORS origin", "code": "CORS_REFUSED"}

    async def test_disallowed_method(self, cors_client: httpx.AsyncClient) -> None:
        response = await cors_client.options("/jobs/create", headers=preflight(APP, "PUT"))
        assert response.status_code == 400
        assert response.json() == {"detail": "Disallowed CORS method", "code": "CORS_REFUSED"}

    async def test_a_delete_is_allowed(self, cors_client: httpx.AsyncClient) -> None:
        path = "/jobs/job_abcdefghijklmnop"
        response = await cors_client.options(path, headers=preflight(APP, "DELETE"))
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == APP


class TestActualRequests:
    async def test_get_credits_from_allowed_origin(self, cors_client, make_token) -> None:
        headers = {"Origin": APP, **bearer(make_token("user_cors"))}
        response = await cors_client.get("/credits", headers=headers)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == APP
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "retry-after" in exposed
        assert "origin" in response.headers["vary"].lower()

    async def test_401_carries_the_header_so_the_page_can_read_it(self, cors_client) -> None:
        response = await cors_client.get("/credits", headers={"Origin": APP})
        assert response.status_code == 401
        assert response.json()["code"] == "UNAUTHORIZED"
        assert response.headers["access-control-allow-origin"] == APP

    async def test_413_carries_the_header(self, cors_client, make_token) -> None:
        headers = {"Origin": APP, "Content-Type": "application/json", **bearer(make_token())}
        response = await cors_client.post("/jobs/create", content=b"x" * 70_000, headers=headers)
        assert response.status_code == 413
        assert response.headers["access-control-allow-origin"] == APP

    async def test_other_origin_gets_no_header(self, cors_client, make_token) -> None:
        headers = {"Origin": OTHER, **bearer(make_token("user_cors"))}
        response = await cors_client.get("/credits", headers=headers)
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


class TestUnset:
    async def test_no_cors_headers_at_all(self, client: httpx.AsyncClient, make_token) -> None:
        headers = {"Origin": APP, **bearer(make_token("user_cors"))}
        response = await client.get("/credits", headers=headers)
        assert "access-control-allow-origin" not in response.headers
        preflight_response = await client.options("/jobs/create", headers=preflight(APP))
        assert preflight_response.status_code == 405
        assert "access-control-allow-origin" not in preflight_response.headers
