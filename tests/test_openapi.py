"""The API's schema, pinned: a move or a refactor must not change what clients are promised."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from config import Settings
from main import create_app

SNAPSHOT = Path(__file__).parent / "snapshots" / "openapi.json"
# `UPDATE_SNAPSHOTS=1 pytest tests/test_openapi.py` rewrites it, for a change meant to be seen.
UPDATE = os.environ.get("UPDATE_SNAPSHOTS") == "1"


def as_text(schema_bytes: bytes) -> str:
    """Indented for a readable diff; key order and every value kept as the gateway serves them."""
    return json.dumps(json.loads(schema_bytes), indent=2, ensure_ascii=False) + "\n"


class TestSchemaSnapshot:
    async def test_served_schema_matches_the_snapshot(self, settings: Settings) -> None:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/openapi.json")
        assert response.status_code == 200
        served = as_text(response.content)
        if UPDATE:
            SNAPSHOT.write_text(served)
        assert served == SNAPSHOT.read_text(), "schema changed: review, then UPDATE_SNAPSHOTS=1"

    def test_error_answers_build_no_serializer(self, settings: Settings) -> None:
        """Error schemas are named by reference: a `model` would make FastAPI build a serializer
        per status per route at start-up, ~60 of them (issue 13), that no answer uses."""
        for route in create_app(settings).routes:
            assert not getattr(route, "response_fields", None), route
