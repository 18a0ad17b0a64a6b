"""How the contract suite opens each kind of store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from convex_client import ConvexStore
from outbound_http import AsyncioTransport
from sqlite_store import SQLiteStore
from store import Store

STORE_KINDS = ["sqlite", "convex"]
CONVEX_TEST_KEY = "test-deploy-key"  # the server's default CONVEX_TEST_DEPLOY_KEY


def reset_convex(url: str) -> None:
    httpx.post(f"{url}/_test/reset", timeout=10).raise_for_status()


@asynccontextmanager
async def open_store(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path, signup_credits: int
) -> AsyncIterator[Store]:
    store: Store
    if kind == "sqlite":
        store = SQLiteStore(tmp_path / "gateway.db", signup_credits, "starter")
    elif kind == "convex":
        url = request.getfixturevalue("convex_server")
        reset_convex(url)
        http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Convex {CONVEX_TEST_KEY}"},
            transport=AsyncioTransport(),  # production's transport (outbound_http.py)
        )
        store = ConvexStore(http, signup_credits, "starter")
    else:
        raise ValueError(f"unknown store kind {kind!r}")
    try:
        yield store
    finally:
        await store.close()
