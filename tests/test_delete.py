"""`DELETE /jobs/{id}` (main.py, `jobs.delete_job_and_media`) on each store, against moto's S3
server over real HTTP: the video really goes, the job is gone for its owner, the books balance.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import respx

from config import Settings
from tests.conftest import RUNPOD_URL, WEBHOOK_SECRET, moto_bucket, serve
from tests.stores import CONVEX_TEST_KEY, reset_convex
from webhooks import sign_body

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BUCKET = "cineweave-videos"
JOB = {"prompt": "A silver drone flies through neon skyline", "durationSec": 2, "seed": 42}
SIGNUP = 100


@pytest.fixture
def s3(moto_endpoint: str) -> Iterator[S3Client]:
    with moto_bucket(moto_endpoint, BUCKET) as client:
        yield client


@pytest.fixture(params=["sqlite", "convex"])
def r2_settings(
    request: pytest.FixtureRequest,
    s3: S3Client,
    moto_endpoint: str,
    settings_factory: Callable[..., Settings],
) -> Callable[..., Settings]:
    """Settings for R2 on moto, on each store; `bucket=` points an app at another bucket."""
    store: dict[str, Any] = {}
    if request.param == "convex":
        url = request.getfixturevalue("convex_server")
        reset_convex(url)
        store = {"convex_url": url, "convex_deploy_key": CONVEX_TEST_KEY}

    def build(bucket: str = BUCKET) -> Settings:
        return settings_factory(
            r2_access_key_id="test-key",
            r2_secret_access_key="test-secret",
            r2_bucket=bucket,
            r2_endpoint_url=moto_endpoint,
            signup_credits=SIGNUP,
            **store,
        )

    return build


@pytest.fixture
def runpod() -> Iterator[respx.MockRouter]:
    """RunPod accepts every job, each with its own id; calls to moto and Convex go through."""
    ids = (f"rp-{n}" for n in itertools.count(1))
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{RUNPOD_URL}/run").mock(
            side_effect=lambda _: httpx.Response(200, json={"id": next(ids), "status": "IN_QUEUE"})
        )
        mock.post(url__startswith=f"{RUNPOD_URL}/cancel/").respond(
            200, json={"id": "rp-1", "status": "CANCELLED"}
        )
        mock.route(host="127.0.0.1").pass_through()
        yield mock


def video_key(user_id: str, job_id: str) -> str:
    return f"videos/{user_id}/{job_id}.mp4"


def poster_key(user_id: str, job_id: str) -> str:
    return f"videos/{user_id}/{job_id}.jpg"


def stored(s3: S3Client, key: str) -> bool:
    """What a HEAD on the object answers: 200 while it is there, 404 once it is gone."""
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=BUCKET, Key=key)
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return False
    return True


async def created_job(client: httpx.AsyncClient, user: dict[str, str]) -> tuple[str, str]:
    """A new job and the RunPod id it was submitted as."""
    created = await client.post("/jobs/create", json=JOB, headers=user)
    assert created.status_code == 200, created.text
    job_id = created.json()["jobId"]
    runpod_id = (await client.app_state["store"].find_job(job_id)).runpod_id  # type: ignore[attr-defined]
    return job_id, runpod_id


async def webhook(client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
    raw = json.dumps(payload).encode()
    headers = {"x-runpod-signature": sign_body(WEBHOOK_SECRET, raw)}
    answered = await client.post("/webhooks/runpod", content=raw, headers=headers)
    assert answered.status_code == 200, answered.text


async def done_job(
    client: httpx.AsyncClient, s3: S3Client, user: dict[str, str], user_id: str
) -> str:
    """A job rendered and stored as the worker would: its MP4 in the bucket, RunPod's webhook."""
    job_id, runpod_id = await created_job(client, user)
    s3.put_object(Bucket=BUCKET, Key=video_key(user_id, job_id), Body=b"\x00\x00\x00\x18ftypmp42")
    output = {"jobId": job_id, "objectKey": video_key(user_id, job_id)}
    await webhook(client, {"id": runpod_id, "status": "COMPLETED", "output": output})
    return job_id


async def listed_ids(client: httpx.AsyncClient, user: dict[str, str]) -> list[str]:
    answer = await client.get("/jobs", headers=user)
    assert answer.status_code == 200, answer.text
    return [job["jobId"] for job in answer.json()["jobs"]]


async def books(client: httpx.AsyncClient) -> Any:
    return await client.app_state["store"].ledger_totals()  # type: ignore[attr-defined]


class TestDelete:
    async def test_a_done_job_and_its_video_are_gone(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id = await done_job(client, s3, alice, "user_alice")
            kept = await done_job(client, s3, alice, "user_alice")
            assert stored(s3, video_key("user_alice", job_id))
            before = await books(client)

            deleted = await client.delete(f"/jobs/{job_id}", headers=alice)

            assert (deleted.status_code, deleted.content) == (204, b"")
            assert not stored(s3, video_key("user_alice", job_id))
            assert stored(s3, video_key("user_alice", kept))  # only that job's video
            gone = await client.get(f"/jobs/{job_id}", headers=alice)
            assert (gone.status_code, gone.json()["code"]) == (404, "NOT_FOUND")
            assert await listed_ids(client, alice) == [kept]
            assert (await client.get("/credits", headers=alice)).json()["credits"] == SIGNUP - 4
            assert await books(client) == before
        # `serve` runs the store's audit on the way out: the ledger still matches every job.

    async def test_a_failed_job_can_be_deleted_and_keeps_its_refund(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id, runpod_id = await created_job(client, alice)
            failed = {"id": runpod_id, "status": "FAILED", "error": "out of memory"}
            await webhook(client, failed | {"output": None, "input": {"jobId": job_id}})
            assert (await client.get("/credits", headers=alice)).json()["credits"] == SIGNUP

            deleted = await client.delete(f"/jobs/{job_id}", headers=alice)

            assert deleted.status_code == 204
            assert await listed_ids(client, alice) == []
            assert (await client.get("/credits", headers=alice)).json()["credits"] == SIGNUP

    async def test_a_live_job_is_refused_and_nothing_changes(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id, _ = await created_job(client, alice)
            before = (await client.get(f"/jobs/{job_id}", headers=alice)).json()

            refused = await client.delete(f"/jobs/{job_id}", headers=alice)

            assert refused.status_code == 409
            assert refused.json() == {
                "detail": "The job is still queued: cancel it first",
                "code": "JOB_NOT_DELETABLE",
            }
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).json() == before
            assert await listed_ids(client, alice) == [job_id]
            # Canceled, it may go.
            assert (await client.post(f"/jobs/{job_id}/cancel", headers=alice)).status_code == 200
            assert (await client.delete(f"/jobs/{job_id}", headers=alice)).status_code == 204

    async def test_media_a_worker_uploads_for_a_canceled_job_goes_too(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        """The worker uploaded (or uploads later) for a job the user canceled and then deleted:
        the delete takes the poster the job never recorded, and RunPod's late COMPLETED webhook
        takes what arrived after the delete. The job stays deleted, the refund stays."""
        async with serve(r2_settings()) as client:
            job_id, runpod_id = await created_job(client, alice)
            video, poster = video_key("user_alice", job_id), poster_key("user_alice", job_id)
            s3.put_object(Bucket=BUCKET, Key=poster, Body=b"\xff\xd8\xff\xe0")  # before cancel
            assert (await client.post(f"/jobs/{job_id}/cancel", headers=alice)).status_code == 200
            assert (await client.delete(f"/jobs/{job_id}", headers=alice)).status_code == 204
            assert not stored(s3, poster)

            for key in (video, poster):  # the worker finishes after all
                s3.put_object(Bucket=BUCKET, Key=key, Body=b"late")
            output = {"jobId": job_id, "objectKey": video, "posterUploaded": True}
            await webhook(client, {"id": runpod_id, "status": "COMPLETED", "output": output})

            assert not stored(s3, video) and not stored(s3, poster)
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).status_code == 404
            assert (await client.get("/credits", headers=alice)).json()["credits"] == SIGNUP

    async def test_another_users_job_is_not_found_and_its_video_stays(
        self, r2_settings, s3, runpod, alice: dict[str, str], bob: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id = await done_job(client, s3, alice, "user_alice")

            refused = await client.delete(f"/jobs/{job_id}", headers=bob)
            unknown = await client.delete("/jobs/job_doesnotexist00", headers=alice)

            assert (refused.status_code, refused.json()["code"]) == (404, "NOT_FOUND")
            assert refused.json() == unknown.json()  # the same answer: nothing revealed
            assert stored(s3, video_key("user_alice", job_id))
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "done"

    async def test_a_repeat_is_204_again(
        self, r2_settings, s3, runpod, alice: dict[str, str], bob: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id = await done_job(client, s3, alice, "user_alice")
            first = await client.delete(f"/jobs/{job_id}", headers=alice)
            again = await client.delete(f"/jobs/{job_id}", headers=alice)
            other = await client.delete(f"/jobs/{job_id}", headers=bob)

        assert (first.status_code, again.status_code, again.content) == (204, 204, b"")
        assert other.status_code == 404  # a tombstone is still only its owner's

    async def test_concurrent_deletes_all_succeed(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id = await done_job(client, s3, alice, "user_alice")
            answers = await asyncio.gather(
                *[client.delete(f"/jobs/{job_id}", headers=alice) for _ in range(5)]
            )
            assert [answer.status_code for answer in answers] == [204] * 5
            assert not stored(s3, video_key("user_alice", job_id))
            assert (await client.get("/credits", headers=alice)).json()["credits"] == SIGNUP - 2


class TestIdempotencyKey:
    async def test_a_retry_replays_the_204(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        async with serve(r2_settings()) as client:
            job_id = await done_job(client, s3, alice, "user_alice")
            other = await done_job(client, s3, alice, "user_alice")
            keyed = {**alice, "Idempotency-Key": "delete-1"}
            first = await client.delete(f"/jobs/{job_id}", headers=keyed)
            replay = await client.delete(f"/jobs/{job_id}", headers=keyed)
            reused = await client.delete(f"/jobs/{other}", headers=keyed)

            assert (first.status_code, first.content) == (204, b"")
            assert (replay.status_code, replay.content) == (204, b"")
            assert replay.headers["Idempotent-Replayed"] == "true"
            assert (reused.status_code, reused.json()["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")
            assert await listed_ids(client, alice) == [other]


class TestStorageFailure:
    async def test_the_job_is_gone_at_once_and_a_retry_deletes_the_video(
        self, r2_settings, s3, runpod, alice: dict[str, str]
    ) -> None:
        """An instance whose R2 refuses the delete (here: its bucket does not exist)."""
        async with serve(r2_settings()) as client:
            job_id = await done_job(client, s3, alice, "user_alice")
            async with serve(r2_settings(bucket="no-such-bucket")) as broken:
                failed = await broken.delete(f"/jobs/{job_id}", headers=alice)

            assert (failed.status_code, failed.json()["code"]) == (503, "STORAGE_UNAVAILABLE")
            assert failed.headers["Retry-After"]
            # Never a visible job without its video: the job went first.
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).status_code == 404
            assert stored(s3, video_key("user_alice", job_id))

            retried = await client.delete(f"/jobs/{job_id}", headers=alice)

            assert retried.status_code == 204
            assert not stored(s3, video_key("user_alice", job_id))
