"""/readyz: 200 when the store, the Clerk keys and RunPod answer; else 503 naming what failed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from auth import ClerkAuth, mint_dev_token
from config import Settings
from errors import StoreUnavailable
from readiness import Readiness
from runpod_client import RunPodClient, build_http_client
from sqlite_store import SQLiteStore
from tests import convex_fixtures as shapes
from tests.conftest import RUNPOD_BASE, RUNPOD_ENDPOINT, RUNPOD_URL, bearer, serve
from tests.servers import free_port
from tests.stores import CONVEX_TEST_KEY, reset_convex

ISSUER = "https://clerk.cineweave.test"
CONVEX_URL = "https://happy-animal-123.convex.cloud"
JWKS_URL = f"{ISSUER}/.well-known/jwks.json"
HEALTHY = {"jobs": {"inQueue": 0, "inProgress": 0}, "workers": {"idle": 1, "running": 0}}
# Every embedded stand-in: the dev issuer, the in-process RunPod, SQLite.
LOCAL = {"clerk_jwt_key": None, "runpod_api_key": None, "runpod_endpoint_id": None}


def jwks(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": "test", "use": "sig", "alg": "RS256"}]}


async def readyz(settings: Settings, audit: bool = True) -> httpx.Response:
    async with serve(settings, audit=audit) as client:
        return await client.get("/readyz")


def assert_not_ready(response: httpx.Response, part: str, why: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["code"] == "NOT_READY"
    assert f"{part}: {why}" in body["detail"]
    assert why in body["checks"][part]
    others = {name for name, result in body["checks"].items() if result != "ok"}
    assert others == {part}, body


class TestReady:
    async def test_local_mode_is_ready(self, settings_factory: Callable[..., Settings]) -> None:
        response = await readyz(settings_factory(**LOCAL))
        assert response.status_code == 200
        assert response.json() == {
            "status": "ready",
            "checks": {"store": "ok", "auth": "ok", "runpod": "ok"},
        }

    async def test_pem_key_and_real_runpod(self, settings_factory, respx_mock) -> None:
        route = respx_mock.get(f"{RUNPOD_URL}/health").respond(200, json=HEALTHY)
        assert (await readyz(settings_factory())).status_code == 200
        assert route.calls.last.request.headers["authorization"] == "Bearer rp-test-key"

    async def test_jwks_with_keys(self, settings_factory, respx_mock, signing_key) -> None:
        respx_mock.get(JWKS_URL).respond(200, json=jwks(signing_key))
        settings = settings_factory(**LOCAL, clerk_issuer=ISSUER)
        assert (await readyz(settings)).status_code == 200

    async def test_convex_store(self, settings_factory, convex_server: str) -> None:
        reset_convex(convex_server)
        settings = settings_factory(
            **LOCAL, convex_url=convex_server, convex_deploy_key=CONVEX_TEST_KEY
        )
        assert (await readyz(settings)).status_code == 200

    async def test_not_in_the_openapi_schema(self, client: httpx.AsyncClient) -> None:
        assert "/readyz" not in (await client.get("/openapi.json")).json()["paths"]


class TestStoreDown:
    async def test_convex_unreachable(self, settings_factory) -> None:
        dead = f"http://127.0.0.1:{free_port()}"
        settings = settings_factory(**LOCAL, convex_url=dead, convex_deploy_key="k")
        response = await readyz(settings, audit=False)  # the store is down: nothing to audit
        assert_not_ready(response, "store", "The store could not be reached")

    async def test_convex_refuses_the_deploy_key(self, settings_factory, convex_server) -> None:
        """The real key check answers 401 BadAdminKey (see tests/convex_fixtures.py)."""
        settings = settings_factory(**LOCAL, convex_url=convex_server, convex_deploy_key="old")
        response = await readyz(settings, audit=False)
        assert_not_ready(response, "store", "Convex refused the deploy key (HTTP 401 BadAdminKey)")

    @pytest.mark.parametrize(
        "answer",
        [shapes.MISSING_FUNCTION_PROD, shapes.MISSING_FUNCTION_DEV, shapes.WRONG_KIND_404],
        ids=lambda a: a.name,
    )
    async def test_convex_functions_not_deployed(self, settings_factory, respx_mock, answer):
        respx_mock.post(f"{CONVEX_URL}/api/query").respond(answer.status, content=answer.content())
        settings = settings_factory(**LOCAL, convex_url=CONVEX_URL, convex_deploy_key="k")
        response = await readyz(settings, audit=False)
        why = "Convex could not run gateway:ping: the functions in convex/ are not deployed"
        assert_not_ready(response, "store", why)

    async def test_sqlite_held_by_another_process(self, settings_factory) -> None:
        """A write waiting on another process's lock holds the store's one thread: no answer."""
        settings = settings_factory(**LOCAL)
        db_path = settings.local_data_dir / "gateway.db"
        async with serve(settings) as client:
            token = mint_dev_token(settings.local_data_dir, "user_ready")
            # SQLite's own trace hook on the store's connection says when the write's statement
            # starts, on the store's thread: from then it waits on the lock, holding that thread.
            writing = threading.Event()

            def on_statement(sql: str) -> None:
                if sql == "BEGIN IMMEDIATE":
                    writing.set()

            store_db = client.app_state["store"]._db
            store_db.set_trace_callback(on_statement)
            other = sqlite3.connect(db_path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:
                waiting = asyncio.create_task(client.get("/credits", headers=bearer(token)))
                assert await asyncio.to_thread(writing.wait, 30), "the write never reached SQLite"
                started = time.monotonic()
                response = await client.get("/readyz")
                elapsed = time.monotonic() - started
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert_not_ready(response, "store", "no answer within 2 s")
            assert elapsed < 3.0  # the check gave up; it did not wait out the 5 s busy timeout
            assert (await waiting).status_code == 200  # the lock was released in time
            store_db.set_trace_callback(None)  # after the write: the store's thread is idle
            assert (await client.get("/readyz")).status_code == 200


class TestAuthDown:
    async def test_jwks_unreachable_and_no_keys(self, settings_factory, respx_mock) -> None:
        route = respx_mock.get(JWKS_URL).mock(side_effect=httpx.ConnectError("refused"))
        response = await readyz(settings_factory(**LOCAL, clerk_issuer=ISSUER))
        assert_not_ready(response, "auth", "no Clerk signing keys are loaded")
        assert route.called

    async def test_jwks_5xx(self, settings_factory, respx_mock) -> None:
        respx_mock.get(JWKS_URL).respond(503)
        response = await readyz(settings_factory(**LOCAL, clerk_issuer=ISSUER))
        assert_not_ready(response, "auth", "no Clerk signing keys are loaded")


class TestRunPodDown:
    async def test_health_5xx(self, settings_factory, respx_mock) -> None:
        route = respx_mock.get(f"{RUNPOD_URL}/health").respond(503)
        response = await readyz(settings_factory())
        assert_not_ready(response, "runpod", "RunPod answered HTTP 503")
        assert route.call_count == 1  # one attempt: Cloud Run retries the probe, not us

    async def test_connect_error(self, settings_factory, respx_mock) -> None:
        respx_mock.get(f"{RUNPOD_URL}/health").mock(side_effect=httpx.ConnectError("refused"))
        response = await readyz(settings_factory())
        assert_not_ready(response, "runpod", "Could not reach RunPod")

    async def test_wrong_api_key(self, settings_factory, respx_mock) -> None:
        respx_mock.get(f"{RUNPOD_URL}/health").respond(401, json={"error": "Unauthorized"})
        response = await readyz(settings_factory())
        assert_not_ready(response, "runpod", "RunPod answered HTTP 401")


class TestRunPodCache:
    async def test_second_probe_within_ttl_does_not_call_runpod(
        self, settings_factory, respx_mock
    ) -> None:
        route = respx_mock.get(f"{RUNPOD_URL}/health").respond(200, json=HEALTHY)
        async with serve(settings_factory()) as client:
            for _ in range(3):
                assert (await client.get("/readyz")).status_code == 200
        assert route.call_count == 1

    async def test_a_failure_is_cached_too(self, settings_factory, respx_mock) -> None:
        route = respx_mock.get(f"{RUNPOD_URL}/health").respond(500)
        async with serve(settings_factory()) as client:
            for _ in range(2):
                assert (await client.get("/readyz")).status_code == 503
        assert route.call_count == 1


# --- Readiness itself, with a clock the test moves -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def runpod_client() -> RunPodClient:
    return RunPodClient(build_http_client(RUNPOD_BASE, RUNPOD_ENDPOINT, "rp-test-key"))


@pytest.fixture
async def sqlite_store(tmp_path: Path):
    store = SQLiteStore(tmp_path / "gateway.db", 0, "starter")
    yield store
    await store.close()


class TestReadiness:
    async def test_runpod_is_asked_again_after_the_ttl(
        self, settings_factory, sqlite_store, respx_mock
    ) -> None:
        route = respx_mock.get(f"{RUNPOD_URL}/health").respond(200, json=HEALTHY)
        clock = Clock()
        async with httpx.AsyncClient() as http:
            auth = ClerkAuth(settings_factory(), http)
            readiness = Readiness(sqlite_store, auth, runpod_client(), runpod_ttl=10, clock=clock)
            await readiness.check()
            clock.now += 9.9
            await readiness.check()
            assert route.call_count == 1
            clock.now += 0.2
            await readiness.check()
            assert route.call_count == 2

    async def test_missing_keys_are_fetched_again(
        self, settings_factory, sqlite_store, respx_mock, signing_key
    ) -> None:
        route = respx_mock.get(JWKS_URL).mock(
            side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json=jwks(signing_key))]
        )
        respx_mock.get(f"{RUNPOD_URL}/health").respond(200, json=HEALTHY)
        clock = Clock()
        async with httpx.AsyncClient() as http:
            settings = settings_factory(clerk_jwt_key=None, clerk_issuer=ISSUER)
            auth = ClerkAuth(settings, http, clock=clock)
            await auth.load_keys()  # start-up: Clerk is down
            readiness = Readiness(sqlite_store, auth, runpod_client())
            assert (await readiness.check())["auth"] != "ok"
            clock.now += 31  # past the JWKS rate limit: the probe may fetch again
            assert (await readiness.check())["auth"] == "ok"
        assert route.call_count == 2

    async def test_checks_run_concurrently_each_with_a_timeout(
        self, settings_factory, sqlite_store, respx_mock
    ) -> None:
        async def hang(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(5)
            return httpx.Response(200, json={})

        respx_mock.get(JWKS_URL).mock(side_effect=hang)
        respx_mock.get(f"{RUNPOD_URL}/health").mock(side_effect=hang)
        async with httpx.AsyncClient() as http:
            auth = ClerkAuth(settings_factory(clerk_jwt_key=None, clerk_issuer=ISSUER), http)
            readiness = Readiness(sqlite_store, auth, runpod_client(), timeout=0.3)
            started = time.monotonic()
            checks = await readiness.check()
            elapsed = time.monotonic() - started
        assert checks == {
            "store": "ok",
            "auth": "no answer within 0.3 s",
            "runpod": "no answer within 0.3 s",
        }
        assert elapsed < 0.55  # two hung parts, one timeout: they ran side by side


class PingCounter:
    """A store as `/readyz` sees it: only `ping`, counted, failing on demand."""

    def __init__(self) -> None:
        self.pings = 0
        self.down = False

    async def ping(self) -> None:
        self.pings += 1
        if self.down:
            raise StoreUnavailable("The job store is unavailable: disk I/O error")


class TestStoreCheck:
    """Anyone may call /readyz: a good store answer is reused, so hits cannot become load."""

    async def check(self, readiness: Readiness) -> str:
        return (await readiness.check())["store"]

    async def test_a_good_answer_is_reused_for_a_second(self, settings_factory, respx_mock) -> None:
        respx_mock.get(f"{RUNPOD_URL}/health").respond(200, json=HEALTHY)
        store, clock = PingCounter(), Clock()
        async with httpx.AsyncClient() as http:
            auth = ClerkAuth(settings_factory(), http)
            # The ignore: a counting stand-in for the store, with ping() only.
            readiness = Readiness(store, auth, runpod_client(), clock=clock)  # type: ignore[arg-type]
            for _ in range(50):
                assert await self.check(readiness) == "ok"
            assert store.pings == 1
            clock.now += 1.01
            assert await self.check(readiness) == "ok"
            assert store.pings == 2

    async def test_a_failure_is_checked_again_at_once(self, settings_factory, respx_mock) -> None:
        respx_mock.get(f"{RUNPOD_URL}/health").respond(200, json=HEALTHY)
        store, clock = PingCounter(), Clock()
        store.down = True
        async with httpx.AsyncClient() as http:
            auth = ClerkAuth(settings_factory(), http)
            # The ignore: a counting stand-in for the store, with ping() only.
            readiness = Readiness(store, auth, runpod_client(), clock=clock)  # type: ignore[arg-type]
            assert "unavailable" in await self.check(readiness)
            store.down = False  # back: the very next probe sees it, with no clock moved
            assert await self.check(readiness) == "ok"
            assert store.pings == 2
