"""Uploads in local mode: signed URLs refuse what R2 refuses, and a sweep expires uploads.

R2 refuses a presigned PUT whose Content-Type or Content-Length is not the signed one (403
SignatureDoesNotMatch; developers.cloudflare.com/r2/api/s3/presigned-urls/). moto cannot show
that (tests/test_uploads.py); the local stand-in must, since developers upload to it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import respx

from config import Settings
from tests.conftest import serve
from tests.images import png

PROMPT = "The paper boat drifts down the rainy street"
DAY_MS = 86_400_000


@pytest.fixture
async def client(
    settings_factory: Callable[..., Settings], store_env: dict[str, str], runpod: respx.MockRouter
) -> AsyncIterator[httpx.AsyncClient]:
    """Local storage (no R2 settings), on each store."""
    runpod.route(host="127.0.0.1").pass_through()  # the Convex test server is real
    settings = settings_factory(**{name.lower(): value for name, value in store_env.items()})
    async with serve(settings) as opened:
        yield opened


def local_path(url: str) -> str:
    """The signed URL's path and query: the test client talks to the app, not PUBLIC_BASE_URL."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def new_upload(client: httpx.AsyncClient, user: dict[str, str], size: int) -> dict[str, Any]:
    body = {"contentType": "image/png", "sizeBytes": size}
    answer = await client.post("/uploads", json=body, headers=user)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def put(
    client: httpx.AsyncClient, upload: dict[str, Any], data: bytes, **headers: str
) -> httpx.Response:
    sent = {"Content-Type": upload["headers"]["Content-Type"]} | headers
    return await client.put(local_path(upload["uploadUrl"]), content=data, headers=sent)


async def create_from(
    client: httpx.AsyncClient, user: dict[str, str], upload_id: str
) -> httpx.Response:
    body = {"prompt": PROMPT, "imageUploadId": upload_id, "durationSec": 2}
    return await client.post("/jobs/create", json=body, headers=user)


class TestSignedPut:
    async def test_the_signed_type_and_size_are_stored(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        image = png()
        upload = await new_upload(client, alice, len(image))
        assert (await put(client, upload, image)).status_code == 200

    async def test_another_content_type_is_refused(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        image = png()
        upload = await new_upload(client, alice, len(image))
        answer = await put(client, upload, image, **{"Content-Type": "text/html"})
        assert answer.status_code == 403
        assert answer.json()["code"] == "INVALID_SIGNATURE"
        assert (await create_from(client, alice, upload["uploadId"])).json()["code"] == (
            "UPLOAD_INCOMPLETE"
        )

    @pytest.mark.parametrize("delta", [-1, 1, 1000])
    async def test_another_size_is_refused(
        self, client: httpx.AsyncClient, alice: dict[str, str], delta: int
    ) -> None:
        image = png()
        upload = await new_upload(client, alice, len(image))
        other = image[:delta] if delta < 0 else image + b"\0" * delta
        answer = await put(client, upload, other)
        assert (answer.status_code, answer.json()["code"]) == (403, "INVALID_SIGNATURE")

    async def test_a_tampered_length_is_refused(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        upload = await new_upload(client, alice, 10)
        upload["uploadUrl"] = upload["uploadUrl"].replace("length=10", "length=11")
        answer = await put(client, upload, b"x" * 11)
        assert (answer.status_code, answer.json()["code"]) == (403, "INVALID_SIGNATURE")

    async def test_an_expired_url_is_refused(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        image = png()
        upload = await new_upload(client, alice, len(image))
        storage = client.app_state["storage"]  # type: ignore[attr-defined]
        now = storage.clock()
        storage.clock = lambda: now + 901  # the URL lives 900 s
        answer = await put(client, upload, image)
        assert (answer.status_code, answer.json()["code"]) == (403, "URL_EXPIRED")


class TestJobFromLocalUpload:
    async def test_the_worker_downloads_the_same_bytes(
        self, client: httpx.AsyncClient, alice: dict[str, str], runpod: respx.MockRouter
    ) -> None:
        image = png(320, 180)
        upload = await new_upload(client, alice, len(image))
        assert (await put(client, upload, image)).status_code == 200
        assert (await create_from(client, alice, upload["uploadId"])).status_code == 200

        sent = json.loads(runpod.routes[0].calls.last.request.content)["input"]
        fetched = await client.get(local_path(sent["imageUrl"]))
        assert fetched.status_code == 200 and fetched.content == image
        assert (await client.get("/credits", headers=alice)).json()["credits"] == 98

    async def test_a_put_after_the_checks_never_reaches_the_worker(
        self, client: httpx.AsyncClient, alice: dict[str, str], runpod: respx.MockRouter
    ) -> None:
        image = png(320, 180)
        upload = await new_upload(client, alice, len(image))
        assert (await put(client, upload, image)).status_code == 200
        assert (await create_from(client, alice, upload["uploadId"])).status_code == 200
        swapped = png(4000, 4000)[: len(image)]  # same type and size: the URL takes it
        assert (await put(client, upload, swapped)).status_code == 200

        sent = json.loads(runpod.routes[0].calls.last.request.content)["input"]
        assert (await client.get(local_path(sent["imageUrl"]))).content == image


class TestSweep:
    async def test_forgets_expired_uploads_and_deletes_their_files(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        image = png()
        upload = await new_upload(client, alice, len(image))
        assert (await put(client, upload, image)).status_code == 200
        storage = client.app_state["storage"]  # type: ignore[attr-defined]
        stored = storage.root / "uploads" / "user_alice" / upload["uploadId"]
        uploads = client.app_state["uploads"]  # type: ignore[attr-defined]
        now = uploads.clock()

        uploads.clock = lambda: now + DAY_MS - 60_000  # a minute short of its 24 h
        assert await uploads.sweep_once() == 0
        assert stored.exists()
        assert (await create_from(client, alice, upload["uploadId"])).status_code == 200

        uploads.clock = lambda: now + DAY_MS + 1_000
        assert await uploads.sweep_once() == 1
        assert not stored.exists()
        answer = await create_from(client, alice, upload["uploadId"])
        assert (answer.status_code, answer.json()["code"]) == (404, "UPLOAD_NOT_FOUND")
