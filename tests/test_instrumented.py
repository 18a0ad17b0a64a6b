"""instrumented.py: the timed store, storage and transport count what the upstreams report."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import respx
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from errors import InsufficientCredits, JobNotCancelable, StoreUnavailable
from instrumented import (
    InstrumentedStorage,
    InstrumentedStore,
    InstrumentedTransport,
    runpod_operation,
)
from local_storage import LocalStorage
from metrics import Metrics
from models import JobStatus, StatusUpdate
from runpod_client import RunPodClient, RunPodNotFound, RunPodUnavailable, build_http_client
from sqlite_store import SQLiteStore
from store import Store
from tests.conftest import RUNPOD_URL, TokenFactory, bearer, serve
from tests.factories import (
    all_label_values,
    credits,
    new_job,
    outcomes,
    upstream_count,
)


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "gateway.db", signup_credits=100, default_plan="starter")
    yield store
    await store.close()


@pytest.fixture
def store(sqlite: SQLiteStore, metrics: Metrics) -> InstrumentedStore:
    return InstrumentedStore(sqlite, metrics)


FAILED = StatusUpdate(JobStatus.FAILED, "WORKER_FAILED", "boom")


class TestInstrumentedStore:
    async def test_charge(self, store: InstrumentedStore, metrics: Metrics) -> None:
        await store.charge_and_create_job(new_job(job_id="job_000000000001", cost=5), 5)
        await store.charge_and_create_job(new_job(job_id="job_000000000002", cost=3), 5)
        assert credits(metrics, "charged") == 8
        assert upstream_count(metrics, "store", "charge_and_create_job", "ok") == 2

    async def test_refused_charge_counts_nothing(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        with pytest.raises(InsufficientCredits):
            await store.charge_and_create_job(new_job(job_id="job_000000000001", cost=500), 5)
        assert credits(metrics, "charged") == 0
        # The store answered: a refusal is not an upstream failure.
        assert upstream_count(metrics, "store", "charge_and_create_job", "ok") == 1

    async def test_refund_counted_once_whatever_the_repeats(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001", cost=5), 5)
        results = [await store.apply_status(job.job_id, FAILED) for _ in range(3)]
        assert [changed for _, changed in results] == [True, False, False]
        assert credits(metrics, "refunded") == 5
        assert outcomes(metrics) == {"done": 0, "failed": 1, "canceled": 0, "timed_out": 0}
        assert upstream_count(metrics, "store", "apply_status", "ok") == 3
        totals = await store.ledger_totals()
        assert totals["user_alice"]["refunds"] == credits(metrics, "refunded")

    async def test_timed_out(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001", cost=4), 5)
        update = StatusUpdate(JobStatus.FAILED, "TIMED_OUT", "too slow")
        await store.apply_status(job.job_id, update)
        assert outcomes(metrics) == {"done": 0, "failed": 0, "canceled": 0, "timed_out": 1}
        assert credits(metrics, "refunded") == 4

    async def test_done(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001"), 5)
        await store.record_runpod_id(job.job_id, "rp-1")
        for status in (JobStatus.RUNNING, JobStatus.DONE, JobStatus.DONE, JobStatus.FAILED):
            await store.apply_status(job.job_id, StatusUpdate(status))
        assert outcomes(metrics) == {"done": 1, "failed": 0, "canceled": 0, "timed_out": 0}
        assert credits(metrics, "refunded") == 0

    async def test_cancel(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001", cost=6), 5)
        await store.cancel_job("user_alice", job.job_id)
        with pytest.raises(JobNotCancelable):
            await store.cancel_job("user_alice", job.job_id)
        await store.apply_status(job.job_id, FAILED)
        assert outcomes(metrics) == {"done": 0, "failed": 0, "canceled": 1, "timed_out": 0}
        assert credits(metrics, "refunded") == 6
        assert upstream_count(metrics, "store", "cancel_job", "ok") == 2

    async def test_grant(self, store: InstrumentedStore, metrics: Metrics) -> None:
        await store.get_or_create_user("user_alice")
        granted = credits(metrics, "granted")
        assert granted is not None  # the signup grant
        user = await store.grant_credits("user_alice", 50, "support ticket 123")
        assert user.credits == 150
        assert credits(metrics, "granted") == granted + 50

    async def test_grant_to_a_new_user_counts_its_signup_too(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        user = await store.grant_credits("user_alice", 50, "support ticket 123")
        assert credits(metrics, "granted") == user.credits == 100 + 50

    async def test_signup_counted_once_from_a_read(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        await store.get_or_create_user("user_alice")
        await store.get_or_create_user("user_alice")
        await store.charge_and_create_job(new_job(job_id="job_000000000001"), 5)
        assert credits(metrics, "granted") == 100

    async def test_signup_counted_once_from_a_charge(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        await store.charge_and_create_job(new_job(job_id="job_000000000001"), 5)
        await store.charge_and_create_job(new_job(job_id="job_000000000002"), 5)
        await store.get_or_create_user("user_alice")
        assert credits(metrics, "granted") == 100
        totals = await store.ledger_totals()
        assert totals["user_alice"]["grants"] == credits(metrics, "granted")

    async def test_refused_first_charge_grants_nothing(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        with pytest.raises(InsufficientCredits):
            await store.charge_and_create_job(new_job(job_id="job_000000000001", cost=500), 5)
        assert credits(metrics, "granted") == 0
        await store.get_or_create_user("user_alice")  # the refusal left the signup to this call
        assert credits(metrics, "granted") == 100

    async def test_reads_are_timed(self, store: InstrumentedStore, metrics: Metrics) -> None:
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001"), 5)
        await store.get_or_create_user("user_alice")
        await store.get_job("user_alice", job.job_id)
        await store.find_job(job.job_id)
        await store.find_job_by_runpod_id("rp-none")
        await store.list_jobs("user_alice", 10, None)
        await store.save_download_url(job.job_id, "https://x.test/v.mp4", 1)
        await store.ping()
        operations: tuple[str, ...] = ("get_or_create_user", "get_job", "find_job")
        operations += ("find_job_by_runpod_id",)
        operations += ("list_jobs", "save_download_url", "ping")
        assert [upstream_count(metrics, "store", op, "ok") for op in operations] == [1] * 7

    def test_wraps_every_store_method(self) -> None:
        """A method missing here would pass through `__getattr__` untimed and uncounted."""
        protocol = [name for name in vars(Store) if not name.startswith("_")]
        assert "apply_status" in protocol
        for name in protocol:
            assert name in vars(InstrumentedStore), name
            wrapped = inspect.signature(getattr(Store, name)).parameters
            assert list(inspect.signature(getattr(InstrumentedStore, name)).parameters) == list(
                wrapped
            ), name

    async def test_idempotency_key_reaches_the_store(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        claim = await store.claim_idempotency_key("user_alice", "key-1", "fp", 1, 60_000, 1_000)
        assert claim.outcome == "claimed"
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001"), 5, "key-1")
        again = await store.claim_idempotency_key("user_alice", "key-1", "fp", 2, 60_000, 1_000)
        assert again.job_id == job.job_id  # the store linked the key to the job
        assert credits(metrics, "charged") == 5
        assert upstream_count(metrics, "store", "claim_idempotency_key", "ok") == 2

    async def test_reconciler_calls_are_timed(
        self, store: InstrumentedStore, metrics: Metrics
    ) -> None:
        job = await store.charge_and_create_job(new_job(job_id="job_000000000001"), 5)
        [stale] = await store.claim_stale_jobs(job.created_at + 1, job.created_at + 2, 10)
        assert stale.job_id == job.job_id
        assert await store.claim_job_check(job.job_id, 0, job.created_at + 3) is None
        assert await store.purge_idempotency_keys(0, 10) == 0
        assert await store.audit() == []
        operations = ("claim_stale_jobs", "claim_job_check", "purge_idempotency_keys", "audit")
        assert [upstream_count(metrics, "store", op, "ok") for op in operations] == [1] * 4

    async def test_extras_pass_through(self, store: InstrumentedStore, sqlite: SQLiteStore) -> None:
        assert store.path == sqlite.path
        assert store.signup_credits == 100
        with pytest.raises(AttributeError):
            store.no_such_attribute  # noqa: B018

    async def test_store_failure_is_an_upstream_error(self, metrics: Metrics) -> None:
        class DownStore:
            async def ping(self) -> None:
                raise StoreUnavailable("The job store is unavailable")

        store = InstrumentedStore(DownStore(), metrics)  # type: ignore[arg-type]  # ping() only
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert upstream_count(metrics, "store", "ping", "error") == 1


class TestSignupGrantsOverHttp:
    """The gateway counts a new user's signup credits as granted, whichever call creates them."""

    JOB = {"prompt": "A silver drone", "durationSec": 5, "seed": 42}

    @pytest.fixture
    async def gateway(self, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
        with respx.mock(assert_all_called=False) as runpod:
            runpod.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
            async with serve(settings) as client:
                yield client

    @staticmethod
    async def granted(gateway: httpx.AsyncClient) -> float:
        text = (await gateway.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for found in family.samples:
                if found.name == "gateway_credits_total" and found.labels == {"kind": "granted"}:
                    return found.value
        raise AssertionError("gateway_credits_total{kind='granted'} is not served")

    async def create(self, gateway: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await gateway.post("/jobs/create", json=self.JOB, headers=headers)
        assert response.status_code == 200, response.text

    async def credits(self, gateway: httpx.AsyncClient, headers: dict[str, str]) -> int:
        response = await gateway.get("/credits", headers=headers)
        assert response.status_code == 200, response.text
        return int(response.json()["credits"])

    async def test_first_credits_then_create(
        self, gateway: httpx.AsyncClient, settings: Settings, make_token: TokenFactory
    ) -> None:
        alice = bearer(make_token("user_alice"))
        signup = settings.effective_signup_credits
        assert signup > 0 and await self.granted(gateway) == 0
        assert await self.credits(gateway, alice) == signup
        assert await self.granted(gateway) == signup
        await self.credits(gateway, alice)
        await self.create(gateway, alice)
        assert await self.granted(gateway) == signup

    async def test_first_create_then_credits(
        self, gateway: httpx.AsyncClient, settings: Settings, make_token: TokenFactory
    ) -> None:
        bob = bearer(make_token("user_bob"))
        signup = settings.effective_signup_credits
        await self.create(gateway, bob)
        assert await self.granted(gateway) == signup
        await self.create(gateway, bob)
        await self.credits(gateway, bob)
        assert await self.granted(gateway) == signup


# --- Storage ----------------------------------------------------------------------------------


class TestInstrumentedStorage:
    async def test_head_and_presign_are_timed(self, tmp_path: Path, metrics: Metrics) -> None:
        local = LocalStorage(tmp_path / "objects", b"secret", "http://127.0.0.1:8000")
        storage = InstrumentedStorage(local, metrics)
        key = "videos/user_alice/job_000000000001.mp4"
        assert "sig=" in storage.presign_put(key, 60, "video/mp4")
        assert not await storage.exists(key)
        storage.write(key, b"mp4")  # the stand-in's own method passes through
        assert await storage.exists(key)
        assert "sig=" in storage.presign_get(key, 60)
        assert upstream_count(metrics, "r2", "head", "ok") == 2
        assert upstream_count(metrics, "r2", "presign_put", "ok") == 1
        assert upstream_count(metrics, "r2", "presign_get", "ok") == 1
        await storage.close()


# --- RunPod -----------------------------------------------------------------------------------


def runpod_answers(request: httpx.Request) -> httpx.Response:
    """A RunPod endpoint as httpx's MockTransport serves it."""
    path = request.url.path
    if path.endswith("/run"):
        return httpx.Response(200, json={"id": "3f6c1a2e-77aa-4b1e-9d7e-1c2b3a4d5e6f-u1"})
    if "/status/" in path:
        runpod_id = path.rsplit("/", 1)[1]
        return httpx.Response(200, json={"id": runpod_id, "status": "IN_PROGRESS"})
    if "/cancel/" in path:
        return httpx.Response(404, json={"error": "job not found"})
    return httpx.Response(200, json={"jobs": {}, "workers": {}})


async def no_sleep(seconds: float) -> None:
    return None


def runpod_client(transport: httpx.AsyncBaseTransport, metrics: Metrics) -> RunPodClient:
    http = build_http_client(
        "https://runpod.test/v2",
        "ep123",
        "rp-key",
        transport=InstrumentedTransport(transport, metrics),
    )
    return RunPodClient(http, sleep=no_sleep)


class TestInstrumentedTransport:
    async def test_operations_not_ids(self, metrics: Metrics) -> None:
        client = runpod_client(httpx.MockTransport(runpod_answers), metrics)
        runpod_id = await client.submit(
            {"jobId": "job_1"}, "https://g.test/w", execution_timeout_ms=1, ttl_ms=1
        )
        await client.status(runpod_id)
        await client.health()
        with pytest.raises(RunPodNotFound):
            await client.cancel(runpod_id)
        assert upstream_count(metrics, "runpod", "run", "ok") == 1
        assert upstream_count(metrics, "runpod", "status", "ok") == 1
        assert upstream_count(metrics, "runpod", "health", "ok") == 1
        assert upstream_count(metrics, "runpod", "cancel", "error") == 1
        assert not [value for value in all_label_values(metrics) if "3f6c1a2e" in value]

    async def test_unreachable_is_an_error_per_attempt(self, metrics: Metrics) -> None:
        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        client = runpod_client(httpx.MockTransport(refuse), metrics)
        with pytest.raises(RunPodUnavailable):
            await client.status("3f6c1a2e-u1")
        assert upstream_count(metrics, "runpod", "status", "error") == 3

    @pytest.mark.parametrize(
        ("path", "operation"),
        [
            ("/v2/ep123/run", "run"),
            ("/v2/ep123/runsync", "runsync"),
            ("/v2/ep123/status/3f6c1a2e-u1", "status"),
            ("/v2/ep123/cancel/3f6c1a2e-u1", "cancel"),
            ("/v2/ep123/health", "health"),
            ("/v2/status/health", "health"),
            ("/v2/ep123/purge-queue/", "purge-queue"),
            ("/v2/ep123/something/else", "other"),
            ("/", "other"),
        ],
    )
    def test_operation_names(self, path: str, operation: str) -> None:
        assert runpod_operation(path) == operation
