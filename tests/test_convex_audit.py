"""ConvexStore's operator views (`audit`, `ledger_totals`): walked page by page across calls.

Each page is one Convex query within the per-function read limits (`convex/gateway.ts`); the
pages themselves are tested in vitest (`convex/gateway.test.ts`), including a deployment of
10,000 users and 50,000 jobs. Here respx answers as the deployment would, so a walk of several
pages can be checked without seeding thousands of documents over HTTP.
(Kept out of `tests/test_convex_client.py` while issue 10 rewrites that file: fold it in later.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx
from pydantic import SecretStr

from config import Settings
from convex_client import ConvexStore
from errors import InvalidCursor

URL = "https://happy-animal-123.convex.cloud"


@pytest.fixture
async def store() -> AsyncIterator[ConvexStore]:
    settings = Settings(
        _env_file=None, convex_url=URL, convex_deploy_key=SecretStr("prod:secret-key")
    )
    opened = ConvexStore.from_settings(settings)
    yield opened
    await opened.close()


def success(value: object) -> httpx.Response:
    return httpx.Response(200, json={"status": "success", "value": value, "logLines": []})


def total(user_id: str, credits: int) -> dict[str, object]:
    return {"userId": user_id, "credits": credits, "grants": credits, "charges": 0, "refunds": 0}


def sent(route: respx.Route) -> list[dict[str, object]]:
    return [json.loads(call.request.content) for call in route.calls]


class TestLedgerTotals:
    @respx.mock
    async def test_walks_every_page_passing_the_cursor_back(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").mock(
            side_effect=[
                success({"totals": [total("user_a", 5)], "cursor": "c1"}),
                success({"totals": [], "cursor": "c2"}),  # a page may be empty mid-walk
                success({"totals": [total("user_b", 7)], "cursor": None}),
            ]
        )
        totals = await store.ledger_totals()
        assert totals == {
            "user_a": {"credits": 5, "grants": 5, "charges": 0, "refunds": 0},
            "user_b": {"credits": 7, "grants": 7, "charges": 0, "refunds": 0},
        }
        assert [(body["path"], body["args"]) for body in sent(route)] == [
            ("gateway:ledgerTotals", {"cursor": None}),
            ("gateway:ledgerTotals", {"cursor": "c1"}),
            ("gateway:ledgerTotals", {"cursor": "c2"}),
        ]


class TestAudit:
    @respx.mock
    async def test_joins_the_problems_of_every_page_in_order(self, store: ConvexStore) -> None:
        route = respx.post(f"{URL}/api/query").mock(
            side_effect=[
                success({"problems": ["user_a: balance 1 != ..."], "cursor": "jobs"}),
                success({"problems": ["job_1: 0 charges", "job_2: 2 charges"], "cursor": None}),
            ]
        )
        assert await store.audit() == [
            "user_a: balance 1 != ...",
            "job_1: 0 charges",
            "job_2: 2 charges",
        ]
        assert [body["args"] for body in sent(route)] == [{"cursor": None}, {"cursor": "jobs"}]

    @respx.mock
    async def test_a_refused_cursor_stops_the_walk(self, store: ConvexStore) -> None:
        # What the deployment answers for a cursor the function did not hand out (a ConvexError
        # with errorData): the audit fails loudly instead of reporting a partial result.
        body = {
            "status": "error",
            "errorMessage": "Uncaught ConvexError: INVALID_CURSOR",
            "errorData": {"code": "INVALID_CURSOR", "message": "The cursor is malformed"},
            "logLines": [],
        }
        respx.post(f"{URL}/api/query").mock(
            side_effect=[
                success({"problems": [], "cursor": "stale"}),
                httpx.Response(560, json=body),
            ]
        )
        with pytest.raises(InvalidCursor):
            await store.audit()
