"""The HTTP contract, route by route, with RunPod mocked at the transport (respx)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import replace
from typing import Any

import httpx
import pytest
import respx

import events
import uploads
from jobs import Reconciler
from models import now_ms
from tests.conftest import RUNPOD_URL, WEBHOOK_SECRET, bearer, serve
from tests.factories import (
    JOB,
    assert_error,
    assert_written_for_people,
    completed,
    create,
    credits_of,
    finished_job,
    send_signed,
    store_object,
)
from webhooks import webhook_token
from worker.contract import CONTRACT_VERSION, WorkerOutput


class TestCreateJob:
    async def test_success_charges_and_submits(self, client, runpod, alice) -> None:
        response = await create(client, alice)
        assert response.status_code == 200
        job_id = response.json()["jobId"]
        assert re.fullmatch(r"job_[A-Za-z0-9_-]{12,}", job_id)
        assert response.json() == {"jobId": job_id}
        assert await credits_of(client, alice) == 100 - 5

        sent = runpod.routes[0].calls.last.request
        assert sent.headers["authorization"] == "Bearer rp-test-key"
        body = json.loads(sent.content)
        worker_input = body["input"]
        assert worker_input["jobId"] == job_id and worker_input["seed"] == 42
        assert worker_input["durationSec"] == 5 and worker_input["imageUrl"] is None
        output = worker_input["output"]
        assert output["objectKey"] == f"videos/user_alice/{job_id}.mp4"
        assert output["contentType"] == "video/mp4" and output["uploadUrl"].startswith("https://")
        token = webhook_token(WEBHOOK_SECRET, job_id)
        assert body["webhook"] == (
            f"https://gateway.test/webhooks/runpod?jobId={job_id}&token={token}"
        )
        assert set(body["policy"]) == {"executionTimeout", "ttl"}

        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "queued" and job["cost"] == 5

    async def test_omitted_seed_is_picked_and_recorded(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice, seed=None)).json()["jobId"]
        seed = (await client.get(f"/jobs/{job_id}", headers=alice)).json()["seed"]
        assert 0 <= seed < 2**32
        assert json.loads(runpod.routes[0].calls.last.request.content)["input"]["seed"] == seed

    async def test_prompt_is_trimmed_and_unicode_kept(self, client, runpod, alice) -> None:
        prompt = "  Ein Drache 🐉 über Tōkyō\n\tbei Nacht  "
        job_id = (await create(client, alice, prompt=prompt)).json()["jobId"]
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["prompt"] == prompt.strip()

    async def test_cost_uses_credits_per_second(self, settings_factory, runpod, alice) -> None:
        async with serve(settings_factory(credits_per_second=3)) as client:
            await create(client, alice, durationSec=4)
            assert await credits_of(client, alice) == 100 - 12

    @pytest.mark.parametrize(
        "changes",
        [
            {"prompt": ""},
            {"prompt": "   \n "},
            {"prompt": "x" * 2001},
            {"prompt": "bell\x07"},
            {"prompt": "nul\x00"},
            {"prompt": 5},
            {"durationSec": "5"},
            {"durationSec": 5.5},
            {"durationSec": True},
            {"durationSec": 0},
            {"durationSec": 11},
            {"seed": -1},
            {"seed": 2**32},
            {"seed": "42"},
            {"extra": 1},
            {"imageUrl": 7},
        ],
    )
    async def test_invalid_body_is_400(self, client, runpod, alice, changes) -> None:
        body = assert_error(await create(client, alice, **changes), 400, "INVALID_REQUEST")
        assert [error["field"] for error in body["errors"]] == list(changes)
        assert_written_for_people(body)
        assert not runpod.routes[0].called
        assert await credits_of(client, alice) == 100

    async def test_missing_field_names_it(self, client, runpod, alice) -> None:
        response = await client.post("/jobs/create", json={"prompt": "x"}, headers=alice)
        body = assert_error(response, 400, "INVALID_REQUEST")
        assert body["errors"] == [{"field": "durationSec", "message": "durationSec is required"}]

    async def test_every_bad_field_is_named_in_one_answer(self, client, runpod, alice) -> None:
        """The configured limits are checked in the same pass as the model's own rules."""
        bad = {"prompt": "", "durationSec": 11, "seed": -1, "imageUrl": "http://a.example/x"}
        body = assert_error(await create(client, alice, **bad), 400, "INVALID_REQUEST")
        assert body["errors"] == [
            {"field": "prompt", "message": "prompt must not be empty"},
            {"field": "imageUrl", "message": "imageUrl must be an https URL"},
            {"field": "durationSec", "message": "durationSec must be from 1 to 10"},
            {"field": "seed", "message": "seed must be at least 0"},
        ]
        assert body["detail"] == "Invalid request: " + "; ".join(
            error["message"] for error in body["errors"]
        )
        assert not runpod.routes[0].called and await credits_of(client, alice) == 100

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            (
                b'{"prompt": "x",\n  "durationSec": 5,}',
                "body is not valid JSON (line 2, column 20): "
                "expecting property name enclosed in double quotes",
            ),
            (b"{not json", None),
            (b'{"prompt": "\xff"}', "body must be JSON in UTF-8"),
            (b"[]", "body must be a JSON object"),
            (b"null", "body must be a JSON object"),
            (b'"text"', "body must be a JSON object"),
        ],
    )
    async def test_malformed_json_is_400(self, client, runpod, alice, raw, message) -> None:
        headers = {**alice, "content-type": "application/json"}
        response = await client.post("/jobs/create", content=raw, headers=headers)
        body = assert_error(response, 400, "INVALID_REQUEST")
        [error] = body["errors"]
        assert error["field"] == "body"
        assert message is None or error["message"] == message
        assert_written_for_people(body)
        assert await credits_of(client, alice) == 100

    @pytest.mark.parametrize(
        ("path", "message"),
        [
            ("/jobs?limit=0", "limit must be at least 1"),
            ("/jobs?limit=x", "limit must be a whole number"),
            ("/jobs?cursor=" + "a" * 513, "cursor must be at most 512 characters"),
        ],
    )
    async def test_query_errors_are_for_people(self, client, alice, path, message) -> None:
        body = assert_error(await client.get(path, headers=alice), 400, "INVALID_REQUEST")
        assert [error["message"] for error in body["errors"]] == [message]

    @pytest.mark.parametrize(
        "url",
        [
            "http://images.example.com/a.png",
            "ftp://images.example.com/a.png",
            "file:///etc/passwd",
            "https://user:pass@images.example.com/a.png",
            "https://user@images.example.com/a.png",
            "https://127.0.0.1/a.png",
            "https://2130706433/a.png",
            "https://0177.0.0.1/a.png",
            "https://0x7f.0.0.1/a.png",
            "https://0x7f000001/a.png",
            "https://127.1/a.png",
            "https://[::1]/a.png",
            "https://[::ffff:169.254.169.254]/a.png",
            "https://169.254.169.254/latest/meta-data",
            "https://localhost/a.png",
            "https://metadata.google.internal/a.png",
            "https://intranet/a.png",
            "https://%31%32%37.0.0.1/a.png",
            "https:///a.png",
            "https://images.example.com/" + "a" * 2048,
            "https://images.example.com/a b.png",
        ],
    )
    async def test_unsafe_image_url_is_400(self, client, runpod, alice, url) -> None:
        body = assert_error(await create(client, alice, imageUrl=url), 400, "INVALID_REQUEST")
        assert body["errors"][0]["field"] == "imageUrl"

    async def test_https_image_url_is_accepted(self, client, runpod, alice) -> None:
        url = "https://images.example.com/start.png?w=320"
        assert (await create(client, alice, imageUrl=url)).status_code == 200
        sent = json.loads(runpod.routes[0].calls.last.request.content)
        assert sent["input"]["imageUrl"] == url

    async def test_allowed_hosts(self, settings_factory, runpod, alice) -> None:
        settings = settings_factory(image_url_allowed_hosts="cdn.cineweave.ai")
        async with serve(settings) as client:
            ok = await create(client, alice, imageUrl="https://CDN.cineweave.ai/a.png")
            assert ok.status_code == 200
            refused = await create(client, alice, imageUrl="https://evil.example.com/a.png")
            body = assert_error(refused, 400, "INVALID_REQUEST")
            message = "imageUrl must name an allowed host"
            assert body["errors"] == [{"field": "imageUrl", "message": message}]

    async def test_insufficient_credits_is_402(self, settings_factory, runpod, alice) -> None:
        async with serve(settings_factory(signup_credits=4)) as client:
            assert_error(await create(client, alice, durationSec=5), 402, "INSUFFICIENT_CREDITS")
            assert await credits_of(client, alice) == 4
        assert not runpod.routes[0].called

    async def test_sixth_active_job_is_429(self, client, runpod, alice) -> None:
        for _ in range(5):
            assert (await create(client, alice, durationSec=1)).status_code == 200
        response = await create(client, alice, durationSec=1)
        assert_error(response, 429, "TOO_MANY_ACTIVE_JOBS")
        assert int(response.headers["retry-after"]) > 0
        assert await credits_of(client, alice) == 95

    async def test_body_over_64_kib_is_413(self, client, runpod, alice) -> None:
        raw = json.dumps({**JOB, "prompt": "x" * 70_000}).encode()
        headers = {**alice, "content-type": "application/json"}
        response = await client.post("/jobs/create", content=raw, headers=headers)
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")

    async def test_chunked_body_over_limit_is_413(self, client, runpod, alice) -> None:
        async def chunks():
            for _ in range(20):
                yield b"x" * 8192

        headers = {**alice, "content-type": "application/json"}
        response = await client.post("/jobs/create", content=chunks(), headers=headers)
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")


class TestCreateJobLimits:
    """Each app validates /jobs/create with its own settings' limits (main.create_job_route)."""

    async def test_two_apps_keep_their_own_limits(self, settings_factory, tmp_path, alice) -> None:
        strict = settings_factory(max_duration_sec=4, local_data_dir=tmp_path / "strict")
        async with serve(strict) as strict_client, serve(settings_factory()) as default_client:
            with respx.mock(assert_all_called=False) as runpod:
                runpod.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1"})
                refused = await create(strict_client, alice, durationSec=5)
                accepted = await create(default_client, alice, durationSec=5)
            schemas = [
                (await c.get("/openapi.json")).json() for c in (strict_client, default_client)
            ]
        assert_error(refused, 400, "INVALID_REQUEST")
        assert accepted.status_code == 200, accepted.text
        limits = [s["components"]["schemas"]["CreateJobRequest"] for s in schemas]
        assert [limit["properties"]["durationSec"]["maximum"] for limit in limits] == [4, 10]


class TestRoutesAddedAsBuilt:
    def test_the_api_routes_are_the_ones_built_at_import(self, settings_factory) -> None:
        """Not included: an included router's routes are built again for the app on the first
        request matched past them, the first /healthz (~15 ms of every cold start, issue 13)."""
        import main

        app = main.create_app(settings_factory())
        for router in (main.router, events.events_router, uploads.router):
            for route in router.routes:
                assert route in app.router.routes
        # In their order: /jobs/events before `main.router`, whose /jobs/{job_id} would take it.
        routes = app.router.routes
        assert routes.index(events.events_router.routes[0]) < routes.index(main.router.routes[0])


class TestCreateJobUpstream:
    async def _refused(self, client, alice, status: int, code: str) -> dict[str, Any]:
        response = await create(client, alice)
        assert_error(response, status, code)
        assert await credits_of(client, alice) == 100
        jobs = (await client.get("/jobs", headers=alice)).json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["status"] == "failed"
        assert jobs[0]["error"]["code"] == "SUBMIT_FAILED"
        return jobs[0]

    async def test_runpod_4xx_is_502_and_refunds(self, client, alice) -> None:
        with respx.mock:
            route = respx.post(f"{RUNPOD_URL}/run").respond(400, json={"error": "bad input"})
            await self._refused(client, alice, 502, "UPSTREAM_ERROR")
            assert route.call_count == 1

    async def test_runpod_5xx_is_503_refunds_and_is_not_retried(self, client, alice) -> None:
        with respx.mock:
            route = respx.post(f"{RUNPOD_URL}/run").respond(500)
            await self._refused(client, alice, 503, "UPSTREAM_UNAVAILABLE")
            assert route.call_count == 1

    async def test_runpod_unreachable_is_503_and_refunds(self, client, alice) -> None:
        with respx.mock:
            respx.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ConnectError("refused"))
            await self._refused(client, alice, 503, "UPSTREAM_UNAVAILABLE")

    async def test_runpod_429_after_backoff_is_503(self, client, alice) -> None:
        with respx.mock:
            route = respx.post(f"{RUNPOD_URL}/run").respond(429, headers={"Retry-After": "0"})
            await self._refused(client, alice, 503, "UPSTREAM_UNAVAILABLE")
            assert route.call_count > 1

    async def test_timeout_after_sending_keeps_the_job(self, client, alice) -> None:
        with respx.mock:
            route = respx.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ReadTimeout("slow"))
            response = await create(client, alice)
            assert route.call_count == 1
        assert response.status_code == 200
        job = (await client.get(f"/jobs/{response.json()['jobId']}", headers=alice)).json()
        assert job["status"] == "queued"
        assert await credits_of(client, alice) == 95


class TestAuthOnRoutes:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/credits"),
            ("GET", "/jobs"),
            ("GET", "/jobs/job_abcdefghijklmnop"),
            ("POST", "/jobs/create"),
            ("POST", "/jobs/job_abcdefghijklmnop/cancel"),
        ],
    )
    async def test_missing_token_is_401(self, client, method, path) -> None:
        response = await client.request(method, path, json=JOB)
        assert_error(response, 401, "UNAUTHORIZED")
        assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_garbage_token_is_401(self, client) -> None:
        response = await client.get("/credits", headers=bearer("not.a.jwt"))
        assert_error(response, 401, "UNAUTHORIZED")

    async def test_session_cookie_is_accepted(self, client, make_token) -> None:
        client.cookies.set("__session", make_token("user_cookie"))
        response = await client.get("/credits")
        client.cookies.clear()
        assert response.status_code == 200

    async def test_subject_that_is_not_an_id_is_401(self, client, make_token) -> None:
        response = await client.get("/credits", headers=bearer(make_token("../../etc")))
        assert_error(response, 401, "UNAUTHORIZED")


class TestGetJob:
    async def test_unknown_and_malformed_ids_are_404(self, client, alice) -> None:
        for job_id in ["job_doesnotexist00", "nope", "job_" + "x" * 200]:
            assert_error(await client.get(f"/jobs/{job_id}", headers=alice), 404, "NOT_FOUND")

    async def test_another_users_job_is_404(self, client, runpod, alice, bob) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        assert_error(await client.get(f"/jobs/{job_id}", headers=bob), 404, "NOT_FOUND")

    async def test_shape_of_a_queued_job(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert set(job) == {
            "jobId", "status", "progress", "stage", "r2Url", "expiresAt", "posterUrl",
            "posterExpiresAt", "durationSec", "prompt", "imageUrl", "seed", "cost", "createdAt",
            "updatedAt", "error",
        }  # fmt: skip
        assert job["r2Url"] is None and job["expiresAt"] is None and job["error"] is None
        assert job["progress"] is job["stage"] is job["posterUrl"] is job["posterExpiresAt"] is None
        assert job["createdAt"].endswith("Z") and job["updatedAt"].endswith("Z")

    @staticmethod
    def worker_output(job_id: str, poster_uploaded: bool) -> dict[str, Any]:
        output = WorkerOutput(
            contract_version=CONTRACT_VERSION,
            job_id=job_id,
            object_key=f"videos/user_alice/{job_id}.mp4",
            size_bytes=3,
            duration_sec=5,
            poster_uploaded=poster_uploaded,
        )
        return output.to_wire()

    async def test_done_job_with_a_poster_shows_it(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        store_object(client, f"videos/user_alice/{job_id}.jpg", b"\xff\xd8jpeg")
        output = self.worker_output(job_id, poster_uploaded=True)
        await send_signed(client, completed(job_id, output=output))
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        prefix = f"https://gateway.test/_local/storage/videos/user_alice/{job_id}.jpg?"
        assert job["status"] == "done" and job["posterUrl"].startswith(prefix)
        assert job["posterExpiresAt"] == job["expiresAt"]
        assert (job["progress"], job["stage"]) == (1.0, None)
        poster = await client.get(job["posterUrl"])
        assert poster.status_code == 200 and poster.content == b"\xff\xd8jpeg"
        assert poster.headers["content-type"] == "image/jpeg"
        listed = (await client.get("/jobs", headers=alice)).json()["jobs"][0]
        assert listed["posterUrl"] == job["posterUrl"]  # presigned once, reused like the video's

    async def test_done_job_without_a_poster_is_still_done(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        output = self.worker_output(job_id, poster_uploaded=False)
        await send_signed(client, completed(job_id, output=output))
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "done" and job["r2Url"]
        assert job["posterUrl"] is None and job["posterExpiresAt"] is None
        assert await credits_of(client, alice) == 95

    async def test_done_job_has_a_stable_signed_url(self, client, runpod, alice) -> None:
        job_id = await finished_job(client, runpod, alice)
        first = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert first["status"] == "done"
        assert first["r2Url"].startswith("https://gateway.test/_local/storage/videos/user_alice/")
        expires = first["expiresAt"]
        assert expires.endswith("Z")
        remaining = _parse_iso(expires) - time.time()
        assert 86_400 - 60 < remaining <= 86_400 + 1
        second = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert (second["r2Url"], second["expiresAt"]) == (first["r2Url"], expires)

    async def test_url_near_expiry_is_renewed(self, settings_factory, runpod, alice) -> None:
        # A TTL inside the one-hour reuse margin forces a fresh URL on every poll.
        async with serve(settings_factory(signed_url_ttl_seconds=1800)) as client:
            job_id = await finished_job(client, runpod, alice)
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["r2Url"]
            now = [now_ms()]
            jobs = replace(client.app_state["jobs"], clock=lambda: now[0])
            first = await jobs.with_download_url(await jobs.store.get_job("user_alice", job_id))
            now[0] += 1000  # a second later, not waited for
            second = await jobs.with_download_url(first)
            assert first.download_expires_at is not None
            assert second.download_expires_at == first.download_expires_at + 1000
            saved = await jobs.store.get_job("user_alice", job_id)
            assert saved.download_expires_at == second.download_expires_at


def _parse_iso(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class TestListJobs:
    async def test_pages_newest_first(self, client, runpod, alice, bob) -> None:
        await create(client, bob, durationSec=1)
        made = []
        for _ in range(5):
            made.append((await create(client, alice, durationSec=1)).json()["jobId"])
            await asyncio.sleep(0.002)
        seen, cursor = [], None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = (await client.get("/jobs", params=params, headers=alice)).json()
            seen += [job["jobId"] for job in page["jobs"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert seen == list(reversed(made))

    async def test_default_limit_and_empty(self, client, alice) -> None:
        page = (await client.get("/jobs", headers=alice)).json()
        assert page == {"jobs": [], "nextCursor": None}

    @pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "x"}])
    async def test_bad_limit_is_400(self, client, alice, params) -> None:
        response = await client.get("/jobs", params=params, headers=alice)
        assert_error(response, 400, "INVALID_REQUEST")

    async def test_malformed_cursor_is_400(self, client, alice) -> None:
        response = await client.get("/jobs", params={"cursor": "%%%"}, headers=alice)
        assert_error(response, 400, "INVALID_CURSOR")


class TestCancel:
    async def test_cancel_refunds_and_stops_runpod(self, client, runpod, alice) -> None:
        cancel = runpod.post(f"{RUNPOD_URL}/cancel/rp-1").respond(
            200, json={"id": "rp-1", "status": "CANCELLED"}
        )
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post(f"/jobs/{job_id}/cancel", headers=alice)
        assert response.status_code == 200 and response.json()["status"] == "canceled"
        assert cancel.called
        assert await credits_of(client, alice) == 100

    async def test_finished_job_is_409(self, client, runpod, alice) -> None:
        job_id = await finished_job(client, runpod, alice)
        response = await client.post(f"/jobs/{job_id}/cancel", headers=alice)
        assert_error(response, 409, "JOB_NOT_CANCELABLE")
        assert await credits_of(client, alice) == 95

    async def test_another_users_job_is_404(self, client, runpod, alice, bob) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        assert_error(await client.post(f"/jobs/{job_id}/cancel", headers=bob), 404, "NOT_FOUND")
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    async def test_runpod_down_leaves_the_job(self, client, runpod, alice) -> None:
        runpod.post(f"{RUNPOD_URL}/cancel/rp-1").respond(503)
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post(f"/jobs/{job_id}/cancel", headers=alice)
        assert_error(response, 503, "UPSTREAM_UNAVAILABLE")
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"
        assert await credits_of(client, alice) == 95


class TestCredits:
    async def test_new_user_starts_with_signup_credits(self, client, alice) -> None:
        response = await client.get("/credits", headers=alice)
        assert response.json() == {"credits": 100, "plan": "starter"}

    async def test_production_signup_default_is_zero(self, settings_factory) -> None:
        assert settings_factory().effective_signup_credits == 100
        assert settings_factory(signup_credits=7).effective_signup_credits == 7


class TestErrors:
    async def test_unknown_route_is_404_in_shape(self, client) -> None:
        assert_error(await client.get("/nope"), 404, "NOT_FOUND")

    async def test_wrong_method_is_405_in_shape(self, client) -> None:
        assert_error(await client.delete("/credits"), 405, "METHOD_NOT_ALLOWED")

    async def test_healthz(self, client) -> None:
        assert (await client.get("/healthz")).json() == {"status": "ok"}


class TestHead:
    """HEAD answers as GET does, without a body (RFC 9110 §9.3.2); it used to be a 405."""

    async def assert_head_is_get(self, client, path: str, headers=None) -> None:
        got = await client.get(path, headers=headers)
        head = await client.head(path, headers=headers)
        assert head.status_code == got.status_code and head.content == b""
        for name in ("content-type", "content-length", "www-authenticate", "cache-control"):
            assert head.headers.get(name) == got.headers.get(name), name

    async def test_user_routes(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        for path in ("/credits", "/jobs", f"/jobs/{job_id}", "/jobs/job_doesnotexist00"):
            await self.assert_head_is_get(client, path, alice)
        await self.assert_head_is_get(client, "/credits")  # 401 without a session

    async def test_public_routes(self, client) -> None:
        for path in ("/healthz", "/openapi.json", "/docs", "/redoc", "/nope"):
            await self.assert_head_is_get(client, path)
        # /metrics changes with every request it counts, so only its status and type compare.
        head = await client.head("/metrics")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-type"].startswith("text/plain")

    async def test_a_route_without_get_still_refuses_head(self, client) -> None:
        response = await client.head("/webhooks/runpod")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert response.content == b""

    async def test_allow_names_head_beside_get(self, client) -> None:
        response = await client.delete("/credits")
        assert_error(response, 405, "METHOD_NOT_ALLOWED")
        assert response.headers["allow"] == "GET, HEAD"

    async def test_schema_lists_no_head_operations(self, client) -> None:
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert not [path for path, operations in paths.items() if "head" in operations]


class TestConcurrency:
    async def test_fifty_parallel_creates(self, client, runpod, alice) -> None:
        start = await credits_of(client, alice)
        responses = await asyncio.gather(*(create(client, alice, durationSec=3) for _ in range(50)))
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 5
        assert set(statuses) == {200, 429}
        now = await credits_of(client, alice)
        charged = 3 * statuses.count(200)
        assert now >= 0 and now + charged == start


def quiet(settings_factory, **changes: Any):
    """Settings under which a job is 'quiet' almost at once, so the reconciler looks at it."""
    return serve(settings_factory(reconcile_after_seconds=0.01, **changes))


async def reconcile(client) -> dict[str, int]:
    await asyncio.sleep(0.02)
    return await Reconciler(client.app_state["jobs"]).reconcile_once()


class TestReconciler:
    async def test_lost_webhook_is_recovered(self, settings_factory, runpod, alice) -> None:
        status = runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "COMPLETED"}
        )
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            store_object(client, f"videos/user_alice/{job_id}.mp4")
            assert await reconcile(client) == {"updated": 1}
            assert status.call_count == 1
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert job["status"] == "done" and job["r2Url"]

    async def test_runpod_forgot_it(self, settings_factory, runpod, alice) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(404)
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            await reconcile(client)
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert (job["status"], job["error"]["code"]) == ("failed", "UPSTREAM_LOST")
            assert await credits_of(client, alice) == 100

    async def test_still_running_is_left_alone(self, settings_factory, runpod, alice) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "IN_PROGRESS"}
        )
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            assert await reconcile(client) == {"updated": 1}
            assert await reconcile(client) == {"unchanged": 1}
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert job["status"] == "running"
            assert await credits_of(client, alice) == 95

    async def test_progress_in_status_is_recorded(self, settings_factory, runpod, alice) -> None:
        # What `runpod.serverless.progress_update` makes /status show (rp_progress.py): the
        # report as the IN_PROGRESS job's output. It survives a lost progress POST this way.
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200,
            json={
                "id": "rp-1",
                "status": "IN_PROGRESS",
                "output": {"progress": 0.1, "stage": "generating"},
            },
        )
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            assert await reconcile(client) == {"updated": 1}
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert (job["status"], job["progress"], job["stage"]) == ("running", 0.1, "generating")
            assert await credits_of(client, alice) == 95

    async def test_progress_of_another_shape_still_runs(
        self, settings_factory, runpod, alice
    ) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "IN_PROGRESS", "output": 0.4}
        )
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            assert await reconcile(client) == {"updated": 1}
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert (job["status"], job["progress"], job["stage"]) == ("running", None, None)

    async def test_uncertain_submission_waits_for_word(self, settings_factory, alice) -> None:
        async with quiet(settings_factory) as client:
            with respx.mock:
                respx.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ReadTimeout("slow"))
                job_id = (await create(client, alice)).json()["jobId"]
            assert await reconcile(client) == {"waiting": 1}
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    async def test_past_the_deadline_is_cancelled_and_refunded(
        self, settings_factory, runpod, alice
    ) -> None:
        cancel = runpod.post(f"{RUNPOD_URL}/cancel/rp-1").respond(200, json={"id": "rp-1"})
        async with quiet(settings_factory) as client:
            jobs = client.app_state["jobs"]
            job_id = (await create(client, alice)).json()["jobId"]
            job = await jobs.store.find_job(job_id)
            # A job created long ago: its RunPod ttl has run out.
            assert await jobs.settle(replace(job, created_at=job.created_at - 10**8)) == "expired"
            assert cancel.called
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert (job["status"], job["error"]["code"]) == ("failed", "DEADLINE_EXCEEDED")
            assert await credits_of(client, alice) == 100

    async def test_runpod_down_is_retried_next_pass(self, settings_factory, runpod, alice):
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(503)
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            assert await reconcile(client) == {"error": 1}
            assert await reconcile(client) == {"error": 1}
            assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    async def test_instances_never_check_one_job_twice(
        self, settings_factory, runpod, alice
    ) -> None:
        status = runpod.get(url__regex=rf"{RUNPOD_URL}/status/.*").respond(
            200, json={"id": "rp-1", "status": "IN_QUEUE"}
        )
        async with quiet(settings_factory) as client:
            for _ in range(4):
                await create(client, alice, durationSec=1)
            await asyncio.sleep(0.02)
            jobs = client.app_state["jobs"]
            passes = await asyncio.gather(*(Reconciler(jobs).reconcile_once() for _ in range(3)))
            assert sum(sum(p.values()) for p in passes) == 4
            assert status.call_count == 4

    async def test_stale_poll_checks_once(self, settings_factory, runpod, alice) -> None:
        status = runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "COMPLETED"}
        )
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            store_object(client, f"videos/user_alice/{job_id}.mp4")
            await asyncio.sleep(0.02)
            job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
            assert job["status"] == "done" and status.call_count == 1

    async def test_stale_poll_with_runpod_down_still_answers(
        self, settings_factory, runpod, alice
    ) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(500)
        async with quiet(settings_factory) as client:
            job_id = (await create(client, alice)).json()["jobId"]
            await asyncio.sleep(0.02)
            response = await client.get(f"/jobs/{job_id}", headers=alice)
            assert response.status_code == 200 and response.json()["status"] == "queued"

    async def test_fresh_poll_asks_nobody(self, client, runpod, alice) -> None:
        status = runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(200, json={})
        job_id = (await create(client, alice)).json()["jobId"]
        await client.get(f"/jobs/{job_id}", headers=alice)
        assert not status.called


class TestReconcilerLoop:
    async def test_waits_a_jittered_interval_between_passes(self, client, runpod) -> None:
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 3:
                raise asyncio.CancelledError  # as the lifespan's task.cancel() would

        with pytest.raises(asyncio.CancelledError):
            await Reconciler(client.app_state["jobs"], sleep=sleep).run_forever()
        assert len(waits) == 3 and all(15 <= wait <= 45 for wait in waits)  # 30 s, ±50 %


class TestStartupLog:
    async def test_names_each_backend_in_words(self, settings_factory, caplog) -> None:
        settings = settings_factory(clerk_jwt_key=None, runpod_api_key=None)
        with caplog.at_level(logging.INFO, logger="gateway"):
            async with serve(settings):
                pass
        data = settings.local_data_dir
        line = next(r.getMessage() for r in caplog.records if "starting" in r.getMessage())
        assert line == (
            f"gateway starting in local mode: store: SQLite at {data / 'gateway.db'}; "
            f"storage: local files in {data / 'objects'}; RunPod: local stand-in; auth: dev issuer"
        )
