"""`/`: the playground page and its dev-token endpoint in local mode, a docs pointer in production.

The page itself, driven in Chromium, is in tests/test_playground_browser.py.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from config import Settings
from main import create_app
from openapi import DOCS_CSP
from tests.conftest import serve
from tests.test_config import COMPLETE


def local_settings(settings_factory: Callable[..., Settings]) -> Settings:
    # The dev issuer, as `make run` has it: no Clerk key configured.
    return settings_factory(clerk_jwt_key=None)


class TestLocalMode:
    async def test_serves_the_page_under_the_docs_policy(self, settings_factory) -> None:
        async with serve(local_settings(settings_factory)) as client:
            page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == DOCS_CSP
        assert "<title>CineWeave playground</title>" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing elsewhere

    async def test_a_dev_token_is_a_working_session(self, settings_factory) -> None:
        async with serve(local_settings(settings_factory)) as client:
            minted = await client.post("/_local/token", json={"userId": "user_page"})
            assert minted.status_code == 200
            assert minted.json()["expiresIn"] == 3600
            token = minted.json()["token"]
            credits = await client.get("/credits", headers={"Authorization": f"Bearer {token}"})
        assert credits.json() == {"credits": 100, "plan": "starter"}

    async def test_a_bad_user_id_is_400_in_shape(self, settings_factory) -> None:
        async with serve(local_settings(settings_factory)) as client:
            refused = await client.post("/_local/token", json={"userId": "user alice"})
        assert refused.status_code == 400
        assert refused.json()["code"] == "INVALID_REQUEST"
        assert "userId" in refused.json()["detail"]

    async def test_with_real_clerk_there_is_no_dev_token(self, settings) -> None:
        async with serve(settings) as client:  # the suite's settings carry a Clerk key
            assert (await client.post("/_local/token", json={"userId": "u"})).status_code == 404
            assert (await client.get("/")).status_code == 200  # the page still loads

    async def test_the_schema_shows_neither(self, settings_factory) -> None:
        async with serve(local_settings(settings_factory)) as client:
            paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/" not in paths and "/_local/token" not in paths


class TestProduction:
    async def test_names_the_docs_and_serves_no_page_or_token(self) -> None:
        app = create_app(Settings(_env_file=None, **COMPLETE))  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            root = await client.get("/")
            token = await client.post("/_local/token", json={"userId": "user_x"})
        assert root.status_code == 200
        assert root.json() == {
            "service": "CineWeave API gateway",
            "docs": "/docs",
            "redoc": "/redoc",
            "openapi": "/openapi.json",
        }
        assert token.status_code == 404 and token.json()["code"] == "NOT_FOUND"
