"""idempotency.py: a retry with the same key and body is answered once, never run twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import respx

from errors import IdempotencyKeyReused
from idempotency import Answer, answer_once, request_fingerprint
from sqlite_store import SQLiteStore
from tests.conftest import RUNPOD_URL, serve
from tests.factories import (
    JOB,
    assert_error,
    create,
    credits_of,
    keyed,
)


class TestIdempotencyKey:
    async def test_retry_returns_the_first_answer(self, client, runpod, alice) -> None:
        first = await create(client, keyed(alice, "order-1"))
        again = await create(client, keyed(alice, "order-1"))
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert runpod.routes[0].call_count == 1
        assert await credits_of(client, alice) == 95

    async def test_same_key_other_body_is_409(self, client, runpod, alice) -> None:
        await create(client, keyed(alice, "order-1"))
        response = await create(client, keyed(alice, "order-1"), durationSec=6)
        assert_error(response, 409, "IDEMPOTENCY_KEY_REUSED")
        assert runpod.routes[0].call_count == 1

    async def test_json_formatting_does_not_matter(self, client, runpod, alice) -> None:
        first = await create(client, keyed(alice, "order-1"))
        raw = json.dumps({k: JOB[k] for k in reversed(list(JOB))}, indent=2).encode()
        headers = {**keyed(alice, "order-1"), "content-type": "application/json"}
        again = await client.post("/jobs/create", content=raw, headers=headers)
        assert again.json() == first.json()

    async def test_concurrent_retries_make_one_job(self, client, runpod, alice) -> None:
        responses = await asyncio.gather(
            *(create(client, keyed(alice, "burst")) for _ in range(10))
        )
        ok = {r.json()["jobId"] for r in responses if r.status_code == 200}
        busy = [r for r in responses if r.status_code == 409]
        assert len(ok) == 1 and {r.status_code for r in responses} <= {200, 409}
        assert all(r.json()["code"] == "IDEMPOTENCY_KEY_IN_USE" for r in busy)
        assert all("retry-after" in r.headers for r in busy)
        assert runpod.routes[0].call_count == 1
        assert await credits_of(client, alice) == 95

    async def test_keys_are_per_user(self, client, runpod, alice, bob) -> None:
        a = await create(client, keyed(alice, "same"))
        b = await create(client, keyed(bob, "same"), durationSec=2)
        assert a.status_code == b.status_code == 200 and a.json() != b.json()

    @pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "naïve"])
    async def test_malformed_key_is_400(self, client, runpod, alice, key) -> None:
        headers = {**alice, "Idempotency-Key": key.encode("utf-8")}
        response = await client.post("/jobs/create", json=JOB, headers=headers)
        body = assert_error(response, 400, "INVALID_REQUEST")
        message = "Idempotency-Key must be 1 to 255 printable ASCII characters"
        assert body["errors"] == [{"field": "Idempotency-Key", "message": message}]
        assert not runpod.routes[0].called

    async def test_refusal_before_charging_frees_the_key(self, settings_factory, runpod, alice):
        async with serve(settings_factory(signup_credits=3)) as client:
            refused = await create(client, keyed(alice, "k"), durationSec=5)
            assert_error(refused, 402, "INSUFFICIENT_CREDITS")
            await client.app_state["store"].grant_credits("user_alice", 10, "test")
            assert (await create(client, keyed(alice, "k"), durationSec=5)).status_code == 200

    async def test_upstream_refusal_is_replayed(self, client, alice) -> None:
        with respx.mock:
            route = respx.post(f"{RUNPOD_URL}/run").respond(400, json={"error": "bad"})
            first = await create(client, keyed(alice, "k"))
            again = await create(client, keyed(alice, "k"))
            assert route.call_count == 1
        assert first.status_code == again.status_code == 502
        assert again.json() == first.json()
        assert await credits_of(client, alice) == 100

    async def test_cancel_with_a_key(self, client, runpod, alice) -> None:
        cancel = runpod.post(f"{RUNPOD_URL}/cancel/rp-1").respond(200, json={"id": "rp-1"})
        job_id = (await create(client, alice)).json()["jobId"]
        url = f"/jobs/{job_id}/cancel"
        first = await client.post(url, headers=keyed(alice, "c1"))
        again = await client.post(url, headers=keyed(alice, "c1"))
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json() and first.json()["status"] == "canceled"
        assert cancel.call_count == 1
        other_key = await client.post(url, headers=keyed(alice, "c2"))
        assert_error(other_key, 409, "JOB_NOT_CANCELABLE")

    async def test_key_of_a_create_cannot_cancel(self, client, runpod, alice) -> None:
        job_id = (await create(client, keyed(alice, "k"))).json()["jobId"]
        response = await client.post(f"/jobs/{job_id}/cancel", headers=keyed(alice, "k"))
        assert_error(response, 409, "IDEMPOTENCY_KEY_REUSED")


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "gateway.db", signup_credits=100, default_plan="starter")
    yield store
    await store.close()


class TestFingerprint:
    def test_key_order_does_not_matter(self) -> None:
        first = request_fingerprint("create", {"prompt": "a", "durationSec": 5})
        assert first == request_fingerprint("create", {"durationSec": 5, "prompt": "a"})

    def test_the_operation_is_part_of_it(self) -> None:
        assert request_fingerprint("create", "job_1") != request_fingerprint("cancel", "job_1")


class TestAnswerOnce:
    async def test_runs_once_then_replays_the_stored_answer(self, sqlite: SQLiteStore) -> None:
        runs: list[str | None] = []

        async def action(existing: str | None) -> Answer:
            runs.append(existing)
            return 201, {"jobId": "job_1"}

        first = await answer_once(sqlite, "user_alice", "k", "fp", action)
        again = await answer_once(sqlite, "user_alice", "k", "fp", action)
        assert runs == [None] and (first.status_code, again.status_code) == (201, 201)
        assert json.loads(bytes(again.body)) == {"jobId": "job_1"}
        assert again.headers["Idempotent-Replayed"] == "true"

    async def test_a_failed_action_releases_the_key(self, sqlite: SQLiteStore) -> None:
        async def fail(existing: str | None) -> Answer:
            raise RuntimeError("nothing was done")

        async def succeed(existing: str | None) -> Answer:
            return 200, {"ok": True}

        with pytest.raises(RuntimeError):
            await answer_once(sqlite, "user_alice", "k", "fp", fail)
        response = await answer_once(sqlite, "user_alice", "k", "fp", succeed)
        assert response.status_code == 200 and "Idempotent-Replayed" not in response.headers

    async def test_another_body_with_the_key_is_refused(self, sqlite: SQLiteStore) -> None:
        async def action(existing: str | None) -> Answer:
            return 200, {}

        await answer_once(sqlite, "user_alice", "k", "fp-1", action)
        with pytest.raises(IdempotencyKeyReused):
            await answer_once(sqlite, "user_alice", "k", "fp-2", action)
