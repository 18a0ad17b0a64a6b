"""POST /uploads and jobs made from an upload, against moto's S3 server over real HTTP.

The image's bytes go to moto for real, through the URL the gateway signed; RunPod is respx.
Every refusal is checked for what the user sees afterwards: the code, the credits (still the
signup 100) and the job list (still empty).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import respx

from config import Settings
from tests.conftest import RUNPOD_URL, serve, settings_on_moto
from tests.images import image_bytes, png

BUCKET = "cineweave-videos"
PROMPT = "The paper boat drifts down the rainy street"


@pytest.fixture
def r2_settings(
    moto_endpoint: str, settings_factory: Callable[..., Settings]
) -> Iterator[Settings]:
    limits = {"max_pending_uploads": 3, "max_image_dimension_px": 1000}
    with settings_on_moto(settings_factory, moto_endpoint, BUCKET, **limits) as settings:
        yield settings


@pytest.fixture
def runpod(moto_endpoint: str) -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
        mock.route(url__startswith=moto_endpoint).pass_through()  # the bytes go to moto
        yield mock


@pytest.fixture
async def client(
    r2_settings: Settings, runpod: respx.MockRouter
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(r2_settings) as opened:
        yield opened


async def new_upload(
    client: httpx.AsyncClient, user: dict[str, str], data: bytes, content_type: str = "image/png"
) -> dict[str, Any]:
    answer = await client.post(
        "/uploads", json={"contentType": content_type, "sizeBytes": len(data)}, headers=user
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def put(upload: dict[str, Any], data: bytes, **headers: str) -> httpx.Response:
    return httpx.put(upload["uploadUrl"], content=data, headers=upload["headers"] | headers)


async def uploaded(
    client: httpx.AsyncClient, user: dict[str, str], data: bytes, content_type: str = "image/png"
) -> str:
    upload = await new_upload(client, user, data, content_type)
    assert put(upload, data).status_code == 200
    return upload["uploadId"]


async def create_from(
    client: httpx.AsyncClient, user: dict[str, str], upload_id: str
) -> httpx.Response:
    body = {"prompt": PROMPT, "imageUrl": None, "imageUploadId": upload_id, "durationSec": 3}
    return await client.post("/jobs/create", json=body, headers=user)


async def nothing_charged(client: httpx.AsyncClient, user: dict[str, str]) -> None:
    assert (await client.get("/credits", headers=user)).json()["credits"] == 100
    assert (await client.get("/jobs", headers=user)).json()["jobs"] == []


def seconds_between(earlier: str, later: str) -> float:
    parse = datetime.fromisoformat
    return (parse(later) - parse(earlier)).total_seconds()


class TestCreateUpload:
    async def test_answers_a_signed_put_for_exactly_that_type_and_size(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload = await new_upload(client, alice, b"x" * 48213)
        assert re.fullmatch(r"upl_[A-Za-z0-9_\-]{16}", upload["uploadId"])
        assert upload["headers"] == {"Content-Type": "image/png", "Content-Length": "48213"}
        url = upload["uploadUrl"]
        assert f"/{BUCKET}/uploads/user_alice/{upload['uploadId']}?" in url
        assert "X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost" in url
        assert "X-Amz-Expires=900" in url
        assert seconds_between(upload["expiresAt"], upload["usableUntil"]) == 86_400 - 900

    async def test_costs_no_credits(self, client: httpx.AsyncClient, alice: dict[str, str]) -> None:
        await new_upload(client, alice, png())
        await nothing_charged(client, alice)

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"contentType": "image/gif", "sizeBytes": 10}, "contentType"),
            ({"contentType": "text/html", "sizeBytes": 10}, "contentType"),
            ({"contentType": "image/png", "sizeBytes": 0}, "sizeBytes"),
            ({"contentType": "image/png", "sizeBytes": 10 * 1024 * 1024 + 1}, "sizeBytes"),
            ({"contentType": "image/png"}, "sizeBytes"),
        ],
    )
    async def test_refuses_other_types_and_sizes(
        self, client: httpx.AsyncClient, alice: dict[str, str], body: dict[str, Any], field: str
    ) -> None:
        answer = await client.post("/uploads", json=body, headers=alice)
        assert answer.status_code == 400
        assert answer.json()["code"] == "INVALID_REQUEST"
        assert [error["field"] for error in answer.json()["errors"]] == [field]

    async def test_needs_a_session(self, client: httpx.AsyncClient) -> None:
        answer = await client.post("/uploads", json={"contentType": "image/png", "sizeBytes": 9})
        assert answer.status_code == 401

    async def test_past_the_pending_limit_is_a_429(
        self, client: httpx.AsyncClient, alice: dict[str, str], bob: dict[str, str]
    ) -> None:
        for _ in range(3):
            await new_upload(client, alice, png())
        answer = await client.post(
            "/uploads", json={"contentType": "image/png", "sizeBytes": 9}, headers=alice
        )
        assert answer.status_code == 429
        assert answer.json()["code"] == "TOO_MANY_PENDING_UPLOADS"
        assert 1 <= int(answer.headers["Retry-After"]) <= 900
        await new_upload(client, bob, png())  # another user's place is their own

    async def test_a_retry_with_the_same_key_is_the_same_upload(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        body = {"contentType": "image/png", "sizeBytes": 9}
        headers = alice | {"Idempotency-Key": "upload-1"}
        first = await client.post("/uploads", json=body, headers=headers)
        again = await client.post("/uploads", json=body, headers=headers)
        assert again.json()["uploadId"] == first.json()["uploadId"]
        assert again.headers["Idempotent-Replayed"] == "true"


class TestJobFromUpload:
    async def test_the_worker_gets_a_url_that_downloads_the_same_bytes(
        self, client: httpx.AsyncClient, alice: dict[str, str], runpod: respx.MockRouter
    ) -> None:
        image = png(320, 180)
        answer = await create_from(client, alice, await uploaded(client, alice, image))
        assert answer.status_code == 200, answer.text

        sent = json.loads(runpod.routes[0].calls.last.request.content)["input"]
        assert re.search(r"/uploads/user_alice/upl_[\w-]{16}\.[0-9a-f]{16}\?", sent["imageUrl"])
        assert httpx.get(sent["imageUrl"]).content == image
        assert (await client.get("/credits", headers=alice)).json()["credits"] == 97

    async def test_a_put_after_the_checks_never_reaches_the_worker(
        self, client: httpx.AsyncClient, alice: dict[str, str], runpod: respx.MockRouter
    ) -> None:
        """The upload URL outlives the checks: the worker reads the gateway's checked copy."""
        image = png(320, 180)
        upload = await new_upload(client, alice, image)
        assert put(upload, image).status_code == 200
        assert (await create_from(client, alice, upload["uploadId"])).status_code == 200
        swapped = png(4000, 4000)[: len(image)]  # same type and size, past the pixel limit
        assert put(upload, swapped).status_code == 200

        sent = json.loads(runpod.routes[0].calls.last.request.content)["input"]
        assert httpx.get(sent["imageUrl"]).content == image

    async def test_one_upload_starts_several_jobs(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload_id = await uploaded(client, alice, png())
        for _ in range(2):
            assert (await create_from(client, alice, upload_id)).status_code == 200
        assert len((await client.get("/jobs", headers=alice)).json()["jobs"]) == 2

    @pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
    async def test_jpeg_and_webp_too(
        self, client: httpx.AsyncClient, alice: dict[str, str], fmt: str
    ) -> None:
        image = image_bytes(fmt, 300, 200)
        upload_id = await uploaded(client, alice, image, f"image/{fmt.lower()}")
        assert (await create_from(client, alice, upload_id)).status_code == 200

    async def test_both_image_url_and_upload_is_a_400(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        body = {
            "prompt": PROMPT,
            "imageUrl": "https://images.example.com/boat.png",
            "imageUploadId": await uploaded(client, alice, png()),
            "durationSec": 3,
        }
        answer = await client.post("/jobs/create", json=body, headers=alice)
        assert answer.status_code == 400
        assert answer.json()["errors"][0]["field"] == "imageUploadId"
        await nothing_charged(client, alice)

    async def test_an_image_url_still_works(
        self, client: httpx.AsyncClient, alice: dict[str, str], runpod: respx.MockRouter
    ) -> None:
        url = "https://images.example.com/boat.png"
        body = {"prompt": PROMPT, "imageUrl": url, "durationSec": 3}
        assert (await client.post("/jobs/create", json=body, headers=alice)).status_code == 200
        assert json.loads(runpod.routes[0].calls.last.request.content)["input"]["imageUrl"] == url


class TestHostileUploads:
    """Each refused with a 400 of its own (a 404 for ids), and nothing charged or created."""

    async def refused(
        self, client: httpx.AsyncClient, user: dict[str, str], upload_id: str, code: str
    ) -> None:
        answer = await create_from(client, user, upload_id)
        assert answer.json()["code"] == code, answer.text
        assert answer.status_code == (404 if code == "UPLOAD_NOT_FOUND" else 400)
        await nothing_charged(client, user)

    async def test_a_png_renamed_as_jpeg(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload_id = await uploaded(client, alice, png(), "image/jpeg")
        await self.refused(client, alice, upload_id, "IMAGE_TYPE_MISMATCH")

    async def test_html_declared_as_png(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        page = b"<html><script>alert(1)</script></html>" + png()  # a polyglot's usual trick
        upload_id = await uploaded(client, alice, page)
        await self.refused(client, alice, upload_id, "INVALID_IMAGE")

    async def test_a_gif_declared_as_png(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload_id = await uploaded(client, alice, image_bytes("GIF"))
        await self.refused(client, alice, upload_id, "INVALID_IMAGE")

    async def test_a_header_past_the_dimension_limit(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload_id = await uploaded(client, alice, png(1001, 1))  # the limit here is 1000
        await self.refused(client, alice, upload_id, "IMAGE_TOO_LARGE")

    async def test_another_users_upload_is_an_unknown_one(
        self, client: httpx.AsyncClient, alice: dict[str, str], bob: dict[str, str]
    ) -> None:
        upload_id = await uploaded(client, bob, png())
        await self.refused(client, alice, upload_id, "UPLOAD_NOT_FOUND")
        unknown = await create_from(client, alice, "upl_AAAAAAAAAAAAAAAA")
        theirs = await create_from(client, alice, upload_id)
        assert unknown.json() == theirs.json()

    async def test_a_malformed_id_is_an_unknown_one(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        await self.refused(client, alice, "../videos/user_bob/x", "UPLOAD_NOT_FOUND")

    async def test_an_expired_upload(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload_id = await uploaded(client, alice, png())
        uploads = client.app_state["uploads"]  # type: ignore[attr-defined]
        now = uploads.clock()
        uploads.clock = lambda: now + 86_400_000  # a day later
        await self.refused(client, alice, upload_id, "UPLOAD_EXPIRED")

    async def test_nothing_put_yet(self, client: httpx.AsyncClient, alice: dict[str, str]) -> None:
        upload = await new_upload(client, alice, png())
        await self.refused(client, alice, upload["uploadId"], "UPLOAD_INCOMPLETE")

    async def test_size_bytes_not_the_bytes_sent(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        """R2 refuses this PUT itself; moto accepts it, so the gateway's own HEAD must catch it.

        moto's S3 server does not check SigV4 signatures (a tampered X-Amz-Signature is stored
        too), so it cannot show R2 refusing a PUT whose Content-Type or Content-Length differs
        from the signed ones. That refusal rests on R2's docs: a presigned PUT signed with a
        ContentType must be sent with exactly that Content-Type, or R2 answers 403
        (developers.cloudflare.com/r2/api/s3/presigned-urls/), and SigV4 fails on any signed
        header that differs (Content-Length is one: X-Amz-SignedHeaders above). The local
        stand-in refuses both (tests/test_local_uploads.py).
        """
        image = png()
        upload = await new_upload(client, alice, image)
        stretched = image + b"\0" * 100
        assert put(upload, stretched, **{"Content-Length": str(len(stretched))}).status_code == 200
        await self.refused(client, alice, upload["uploadId"], "UPLOAD_SIZE_MISMATCH")

    async def test_a_refusal_frees_the_idempotency_key(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload = await new_upload(client, alice, png())
        body = {"prompt": PROMPT, "imageUploadId": upload["uploadId"], "durationSec": 3}
        headers = alice | {"Idempotency-Key": "job-1"}
        first = await client.post("/jobs/create", json=body, headers=headers)
        assert first.json()["code"] == "UPLOAD_INCOMPLETE"
        assert put(upload, png()).status_code == 200
        again = await client.post("/jobs/create", json=body, headers=headers)
        assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
