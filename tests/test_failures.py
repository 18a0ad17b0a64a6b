"""A store that fails or cannot be reached gives a 503, and never a half-done charge."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from errors import StoreUnavailable
from sqlite_store import SQLiteStore
from tests.conftest import bearer, serve
from tests.factories import new_job


class TestSQLiteLocked:
    async def test_locked_database_is_503_and_nothing_is_written(self, tmp_path: Path) -> None:
        store = SQLiteStore(tmp_path / "gateway.db", 100, "starter", busy_timeout_ms=50)
        await store.get_or_create_user("user_a")
        # Another process (an operator command, a second instance) holds the write lock.
        other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await store.charge_and_create_job(new_job("user_a", cost=10), 5)
            assert raised.value.status_code == 503
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await store.get_or_create_user("user_a")).credits == 100
        assert (await store.list_jobs("user_a", 10, None)).jobs == []
        assert await store.audit() == []
        await store.close()


class TestConvexUnreachable:
    async def test_every_route_answers_503(self, settings_factory, make_token) -> None:
        from tests.servers import free_port

        dead = f"http://127.0.0.1:{free_port()}"
        settings = settings_factory(convex_url=dead, convex_deploy_key="k")
        headers = bearer(make_token("user_a"))
        # No closing audit: the store is down, which is the point.
        async with serve(settings, audit=False) as client:
            for method, path, body in [
                ("GET", "/credits", None),
                ("GET", "/jobs", None),
                ("GET", "/jobs/job_abcdefghijklmnop", None),
                ("POST", "/jobs/create", {"prompt": "x", "durationSec": 1}),
            ]:
                response = await client.request(method, path, json=body, headers=headers)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["code"] == "STORE_UNAVAILABLE"
                assert "retry-after" in response.headers


class TestStorageDown:
    async def test_completed_webhook_with_r2_down_is_503(self, settings_factory, make_token):
        import respx

        from tests.conftest import RUNPOD_URL
        from tests.factories import completed, send_signed
        from tests.servers import free_port

        settings = settings_factory(
            r2_endpoint_url=f"http://127.0.0.1:{free_port()}",
            r2_access_key_id="k",
            r2_secret_access_key="s",
            r2_bucket="videos",
        )
        headers = bearer(make_token("user_a"))
        with respx.mock(assert_all_called=False) as mock:
            mock.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
            mock.route(host="127.0.0.1").pass_through()
            async with serve(settings) as client:
                body = {"prompt": "x", "durationSec": 2}
                job_id = (await client.post("/jobs/create", json=body, headers=headers)).json()[
                    "jobId"
                ]
                response = await send_signed(client, completed(job_id))
                assert response.status_code == 503
                assert response.json()["code"] == "STORAGE_UNAVAILABLE"
                job = (await client.get(f"/jobs/{job_id}", headers=headers)).json()
                assert job["status"] == "queued"
                assert (await client.get("/credits", headers=headers)).json()["credits"] == 98


class TestRunpodIdNotRecorded:
    """RunPod accepted the job, then the store failed: the client must get the job, not a 503."""

    async def test_create_answers_with_the_job_that_runs(self, tmp_path: Path, settings_factory):
        import httpx
        import respx

        from jobs import JobService
        from local_storage import LocalStorage
        from models import CreateJobRequest
        from runpod_client import RunPodClient, build_http_client
        from tests.conftest import PUBLIC_BASE, RUNPOD_BASE, RUNPOD_ENDPOINT, RUNPOD_URL

        settings = settings_factory()
        store = SQLiteStore(tmp_path / "gateway.db", 100, "starter", busy_timeout_ms=50)
        held = []

        def accept_then_lock(request: httpx.Request) -> httpx.Response:
            # Between RunPod's answer and recording its id, another writer takes the lock.
            other = sqlite3.connect(store.path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            held.append(other)
            return httpx.Response(200, json={"id": "rp-1", "status": "IN_QUEUE"})

        http = build_http_client(RUNPOD_BASE, RUNPOD_ENDPOINT, "rp-key")
        jobs = JobService(
            settings=settings,
            store=store,
            runpod=RunPodClient(http),
            storage=LocalStorage(tmp_path / "objects", b"secret", PUBLIC_BASE),
            webhook_secret="whsec",
            public_base_url=PUBLIC_BASE,
        )
        request = CreateJobRequest.model_validate({"prompt": "a cat", "durationSec": 3})
        try:
            with respx.mock() as mock:
                run = mock.post(f"{RUNPOD_URL}/run").mock(side_effect=accept_then_lock)
                job = await jobs.create("user_a", request)
        finally:
            for connection in held:
                connection.execute("ROLLBACK")
                connection.close()
            await http.aclose()
        assert run.call_count == 1
        stored = await store.get_job("user_a", job.job_id)
        assert stored.runpod_id is None  # its webhook records it
        assert (await store.get_or_create_user("user_a")).credits == 100 - stored.cost
        assert await store.audit() == []
        await store.close()
