"""webhooks.py: the proofs (signature, per-job token), the body's shape, and what applying does."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
import respx
from starlette.requests import ClientDisconnect

from errors import InvalidRequest
from tests.conftest import RUNPOD_URL, WEBHOOK_SECRET
from tests.factories import (
    assert_error,
    assert_written_for_people,
    completed,
    create,
    credits_of,
    finished_job,
    send_signed,
    store_object,
)
from webhooks import (
    SIGNATURE_TOLERANCE_SECONDS,
    progress_token,
    read_body,
    sign_body,
    signature_is_valid,
    webhook_payload,
    webhook_token,
)


class TestWebhookProof:
    async def test_no_proof_is_401(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post("/webhooks/runpod", json=completed(job_id))
        assert_error(response, 401, "INVALID_SIGNATURE")
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    @pytest.mark.parametrize(
        "header",
        ["", "garbage", "t=abc,v1=00", "v1=deadbeef", "t=1", "t=99999999999999999999,v1=ab"],
    )
    async def test_malformed_signature_is_401(self, client, runpod, alice, header) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post(
            "/webhooks/runpod",
            content=json.dumps(completed(job_id)),
            headers={"x-runpod-signature": header},
        )
        assert_error(response, 401, "INVALID_SIGNATURE")

    @pytest.mark.parametrize("skew", [-301, 301])
    async def test_stale_or_future_timestamp_is_401(self, client, runpod, alice, skew) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        response = await send_signed(client, completed(job_id), t=int(time.time()) + skew)
        assert_error(response, 401, "INVALID_SIGNATURE")
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    async def test_wrong_secret_is_401(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        response = await send_signed(client, completed(job_id), secret="not-the-secret")
        assert_error(response, 401, "INVALID_SIGNATURE")

    async def test_signature_over_another_body_is_401(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        header = sign_body(WEBHOOK_SECRET, json.dumps(completed(job_id, status="FAILED")).encode())
        response = await client.post(
            "/webhooks/runpod",
            content=json.dumps(completed(job_id)),
            headers={"x-runpod-signature": header},
        )
        assert_error(response, 401, "INVALID_SIGNATURE")

    async def test_rotated_secret_any_v1_matches(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        raw = json.dumps(completed(job_id)).encode()
        good = sign_body(WEBHOOK_SECRET, raw)
        t, v1 = good.split(",")
        header = f"{t},v1={'0' * 64},{v1}"
        response = await client.post(
            "/webhooks/runpod", content=raw, headers={"x-runpod-signature": header}
        )
        assert response.status_code == 200 and response.json()["status"] == "done"

    async def test_a_body_sent_in_chunks_is_read_whole(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        raw = json.dumps(completed(job_id)).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(raw), 7):
                yield raw[start : start + 7]

        headers = {"x-runpod-signature": sign_body(WEBHOOK_SECRET, raw)}
        response = await client.post("/webhooks/runpod", content=chunks(), headers=headers)
        assert response.status_code == 200 and response.json()["status"] == "done"
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "done" and job["r2Url"]

    async def test_bad_token_is_401(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        other = webhook_token(WEBHOOK_SECRET, "job_someotherjob000")
        for params in [{"jobId": job_id, "token": other}, {"jobId": job_id}, {"token": other}]:
            response = await client.post("/webhooks/runpod", params=params, json=completed(job_id))
            assert_error(response, 401, "INVALID_SIGNATURE")

    async def test_webhook_over_one_mib_is_413(self, client) -> None:
        raw = b"{" + b" " * (1024 * 1024) + b"}"
        response = await client.post("/webhooks/runpod", content=raw)
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")


class TestSignedWebhook:
    async def test_completed_with_video_is_done(self, client, runpod, alice) -> None:
        job_id = await finished_job(client, runpod, alice)
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "done" and job["error"] is None
        assert await credits_of(client, alice) == 95

    async def test_completed_without_video_fails_and_refunds(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        response = await send_signed(client, completed(job_id))
        assert response.status_code == 200 and response.json()["status"] == "failed"
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["error"]["code"] == "OUTPUT_MISSING" and job["r2Url"] is None
        assert await credits_of(client, alice) == 100

    async def test_failed_keeps_worker_message_and_refunds_once(self, client, runpod, alice):
        job_id = (await create(client, alice)).json()["jobId"]
        error = json.dumps(
            {"error_type": "OOM", "error_message": "CUDA out of memory", "error_traceback": "..."}
        )
        payload = completed(job_id, status="FAILED", error=error)
        for _ in range(3):
            assert (await send_signed(client, payload)).status_code == 200
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "failed"
        assert job["error"] == {"code": "WORKER_FAILED", "detail": "CUDA out of memory"}
        assert await credits_of(client, alice) == 100

    @pytest.mark.parametrize(
        ("runpod_status", "status", "code"),
        [("TIMED_OUT", "failed", "TIMED_OUT"), ("CANCELLED", "canceled", "CANCELED")],
    )
    async def test_other_endings_refund(self, client, runpod, alice, runpod_status, status, code):
        job_id = (await create(client, alice)).json()["jobId"]
        await send_signed(client, completed(job_id, status=runpod_status))
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert (job["status"], job["error"]["code"]) == (status, code)
        assert await credits_of(client, alice) == 100

    async def test_late_progress_after_done_changes_nothing(self, client, runpod, alice) -> None:
        job_id = await finished_job(client, runpod, alice)
        response = await send_signed(client, completed(job_id, status="IN_PROGRESS"))
        assert response.status_code == 200 and response.json()["status"] == "done"
        replay = await send_signed(client, completed(job_id))
        assert replay.status_code == 200 and replay.json()["status"] == "done"
        assert await credits_of(client, alice) == 95

    async def test_progress_moves_to_running(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        await send_signed(client, completed(job_id, status="IN_PROGRESS", output=0.4))
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "running"

    async def test_arrives_before_the_runpod_id_was_recorded(self, client, alice) -> None:
        with respx.mock:
            respx.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ReadTimeout("slow"))
            job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        response = await send_signed(client, completed(job_id, runpod_id="rp-late"))
        assert response.status_code == 200 and response.json()["status"] == "done"

    async def test_found_by_runpod_id_alone(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        response = await send_signed(client, {"id": "rp-1", "status": "IN_PROGRESS"})
        assert response.status_code == 200
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "running"

    async def test_unknown_job_is_404(self, client) -> None:
        response = await send_signed(client, completed("job_doesnotexist00", runpod_id="rp-x"))
        assert_error(response, 404, "NOT_FOUND")

    async def test_mismatched_runpod_id_is_404(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        response = await send_signed(client, completed(job_id, runpod_id="rp-other"))
        assert_error(response, 404, "NOT_FOUND")

    async def test_signed_garbage_is_400(self, client) -> None:
        for raw in [b"not json", b"[1]", b'{"status": "COMPLETED"}']:
            header = sign_body(WEBHOOK_SECRET, raw)
            response = await client.post(
                "/webhooks/runpod", content=raw, headers={"x-runpod-signature": header}
            )
            # Malformed input is the sender's fault: a 400, never a 502 blaming RunPod.
            assert response.status_code == 400, response.text
            assert response.json()["code"] == "INVALID_REQUEST"


class TestTokenWebhook:
    def url(self, job_id: str) -> str:
        return f"/webhooks/runpod?jobId={job_id}&token={webhook_token(WEBHOOK_SECRET, job_id)}"

    async def test_runpod_decides_not_the_body(self, client, runpod, alice) -> None:
        status = runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "IN_PROGRESS"}
        )
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        forged = completed(job_id)  # the body claims COMPLETED; RunPod says otherwise
        response = await client.post(self.url(job_id), json=forged)
        assert response.status_code == 200 and response.json()["status"] == "running"
        assert status.called

    async def test_completed_at_runpod_with_video_is_done(self, client, runpod, alice) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "COMPLETED", "output": {}}
        )
        job_id = (await create(client, alice)).json()["jobId"]
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        response = await client.post(self.url(job_id), json={"id": "rp-1"})
        assert response.json()["status"] == "done"

    async def test_another_runpod_id_than_the_recorded_one_is_400(
        self, client, runpod, alice
    ) -> None:
        own = runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "IN_QUEUE"}
        )
        other = runpod.get(f"{RUNPOD_URL}/status/rp-evil").respond(
            200, json={"id": "rp-evil", "status": "FAILED", "error": "x"}
        )
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post(self.url(job_id), json={"id": "rp-evil", "status": "FAILED"})
        assert_error(response, 400, "INVALID_REQUEST")
        assert not own.called and not other.called
        job = await client.app_state["jobs"].store.find_job(job_id)
        assert (job.status.value, job.runpod_id) == ("queued", "rp-1")
        assert await credits_of(client, alice) == 95

    async def test_runpod_forgot_the_job_fails_and_refunds(self, client, runpod, alice) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(404, json={"error": "not found"})
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post(self.url(job_id), json={"id": "rp-1", "status": "FAILED"})
        assert response.json()["status"] == "failed"
        assert await credits_of(client, alice) == 100

    async def test_replay_after_terminal_does_not_ask_runpod(self, client, runpod, alice) -> None:
        status = runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(
            200, json={"id": "rp-1", "status": "FAILED", "error": "boom"}
        )
        job_id = (await create(client, alice)).json()["jobId"]
        for _ in range(3):
            response = await client.post(self.url(job_id), json={"id": "rp-1", "status": "FAILED"})
            assert response.status_code == 200
        assert status.call_count == 1
        assert await credits_of(client, alice) == 100

    async def test_runpod_down_is_503_and_changes_nothing(self, client, runpod, alice) -> None:
        runpod.get(f"{RUNPOD_URL}/status/rp-1").respond(502)
        job_id = (await create(client, alice)).json()["jobId"]
        response = await client.post(self.url(job_id), json={"id": "rp-1", "status": "FAILED"})
        assert_error(response, 503, "UPSTREAM_UNAVAILABLE")
        assert (await client.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"


def contract_error(job_id: str | None, message: str = "CUDA out of memory") -> str:
    """A failed worker's `error`, as the worker contract has it echo the job id."""
    report = {"error_type": "RuntimeError", "error_message": message}
    return json.dumps(report if job_id is None else {"jobId": job_id, **report})


# An exception that escaped the handler, as runpod-python reports it (rp_job.py, `run_job`).
SDK_CRASH = json.dumps(
    {
        "error_type": "<class 'RuntimeError'>",
        "error_message": "CUDA out of memory",
        "error_traceback": "Traceback (most recent call last): ...",
        "hostname": "abc-1",
        "worker_id": "abc",
        "runpod_version": "1.12.0",
    }
)


class TestTokenWebhookProof:
    """A job whose `/run` answer was lost has no RunPod id: a webhook may bind one only with
    the worker's echo of our job id in RunPod's own answer, never on the body's word."""

    def url(self, job_id: str) -> str:
        return f"/webhooks/runpod?jobId={job_id}&token={webhook_token(WEBHOOK_SECRET, job_id)}"

    async def lost_submission(self, client, alice) -> str:
        with respx.mock:
            respx.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ReadTimeout("slow"))
            job_id = (await create(client, alice)).json()["jobId"]
        assert (await client.app_state["jobs"].store.find_job(job_id)).runpod_id is None
        return job_id

    async def stored(self, client, job_id: str) -> Any:
        return await client.app_state["jobs"].store.find_job(job_id)

    @pytest.mark.parametrize(
        "answer",
        [
            (200, {"id": "rp-other", "status": "FAILED", "error": contract_error("job_other0000")}),
            (200, {"id": "rp-other", "status": "FAILED", "error": SDK_CRASH}),
            (200, {"id": "rp-other", "status": "FAILED", "error": "plain text"}),
            (200, {"id": "rp-other", "status": "COMPLETED", "output": {"jobId": "job_other0000"}}),
            (200, {"id": "rp-other", "status": "CANCELLED"}),
            (404, {"error": "request does not exist"}),
        ],
    )
    async def test_leaked_token_cannot_attach_another_job(self, client, alice, answer) -> None:
        job_id = await self.lost_submission(client, alice)
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        with respx.mock:
            other = respx.get(f"{RUNPOD_URL}/status/rp-other").respond(answer[0], json=answer[1])
            attack = await client.post(self.url(job_id), json={"id": "rp-other", "status": "X"})
        assert attack.status_code == 200, attack.text
        assert attack.json() == {"jobId": job_id, "status": "queued"}
        assert other.call_count == 1
        job = await self.stored(client, job_id)
        assert (job.status.public.value, job.runpod_id, job.error_code) == ("queued", None, None)
        assert await credits_of(client, alice) == 95

        # RunPod's genuine webhook still finishes the job, and binds the real id.
        with respx.mock:
            output = {"jobId": job_id, "objectKey": f"videos/user_alice/{job_id}.mp4"}
            respx.get(f"{RUNPOD_URL}/status/rp-mine").respond(
                200, json={"id": "rp-mine", "status": "COMPLETED", "output": output}
            )
            genuine = await client.post(self.url(job_id), json={"id": "rp-mine", "status": "X"})
        assert genuine.status_code == 200 and genuine.json()["status"] == "done"
        job = await self.stored(client, job_id)
        assert (job.status.value, job.runpod_id) == ("done", "rp-mine")
        assert await credits_of(client, alice) == 95

    async def test_completed_with_echo_binds_and_completes(self, client, alice) -> None:
        job_id = await self.lost_submission(client, alice)
        store_object(client, f"videos/user_alice/{job_id}.mp4")
        with respx.mock:
            respx.get(f"{RUNPOD_URL}/status/rp-mine").respond(
                200, json={"id": "rp-mine", "status": "COMPLETED", "output": {"jobId": job_id}}
            )
            response = await client.post(self.url(job_id), json={"id": "rp-mine"})
        assert response.status_code == 200 and response.json()["status"] == "done"
        assert (await self.stored(client, job_id)).runpod_id == "rp-mine"
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "done" and job["r2Url"]
        assert await credits_of(client, alice) == 95

    async def test_failed_with_echo_refunds_once(self, client, alice) -> None:
        job_id = await self.lost_submission(client, alice)
        with respx.mock:
            status = respx.get(f"{RUNPOD_URL}/status/rp-mine").respond(
                200, json={"id": "rp-mine", "status": "FAILED", "error": contract_error(job_id)}
            )
            for _ in range(3):  # RunPod's tries, or replays: one refund whatever the count
                response = await client.post(self.url(job_id), json={"id": "rp-mine"})
                assert response.status_code == 200 and response.json()["status"] == "failed"
        assert status.call_count == 1
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["error"] == {"code": "WORKER_FAILED", "detail": "CUDA out of memory"}
        assert (await self.stored(client, job_id)).runpod_id == "rp-mine"
        assert await credits_of(client, alice) == 100

    async def test_failed_without_echo_waits_for_the_deadline(self, client, alice) -> None:
        job_id = await self.lost_submission(client, alice)
        with respx.mock:
            respx.get(f"{RUNPOD_URL}/status/rp-mine").respond(
                200, json={"id": "rp-mine", "status": "FAILED", "error": SDK_CRASH}
            )
            response = await client.post(self.url(job_id), json={"id": "rp-mine"})
        assert response.status_code == 200 and response.json()["status"] == "queued"
        job = await self.stored(client, job_id)
        assert (job.runpod_id, job.error_code) == (None, None)
        assert await credits_of(client, alice) == 95

        # The reconciler never binds it either; past its deadline it is refunded, once.
        jobs = client.app_state["jobs"]
        assert await jobs.settle(job) == "waiting"
        assert await jobs.settle(replace(job, created_at=job.created_at - 10**8)) == "expired"
        job = (await client.get(f"/jobs/{job_id}", headers=alice)).json()
        assert (job["status"], job["error"]["code"]) == ("failed", "DEADLINE_EXCEEDED")
        assert await credits_of(client, alice) == 100


class TestSignatureProof:
    BODY = b'{"id": "rp-1", "status": "COMPLETED"}'

    def test_a_fresh_signature_is_valid(self) -> None:
        header = sign_body(WEBHOOK_SECRET, self.BODY, 1_000)
        assert signature_is_valid(WEBHOOK_SECRET, header, self.BODY, now=1_010)

    def test_the_signature_is_hmac_sha256_of_timestamp_dot_body(self) -> None:
        # Computed here from the scheme itself, so a relay's signer can be checked against it.
        for secret in (WEBHOOK_SECRET, "another-secret", WEBHOOK_SECRET):
            digest = hmac.new(secret.encode(), b"1000." + self.BODY, hashlib.sha256).hexdigest()
            assert sign_body(secret, self.BODY, 1_000) == f"t=1000,v1={digest}"

    def test_another_body_or_secret_is_not(self) -> None:
        header = sign_body(WEBHOOK_SECRET, self.BODY, 1_000)
        assert not signature_is_valid(WEBHOOK_SECRET, header, self.BODY + b" ", now=1_000)
        assert not signature_is_valid("another-secret", header, self.BODY, now=1_000)

    def test_an_old_signature_is_not(self) -> None:
        header = sign_body(WEBHOOK_SECRET, self.BODY, 1_000)
        late = 1_000 + SIGNATURE_TOLERANCE_SECONDS + 1
        assert not signature_is_valid(WEBHOOK_SECRET, header, self.BODY, now=late)

    @pytest.mark.parametrize("header", ["", "t=abc,v1=00", "t=1000", "v1=00", "t=²,v1=00"])
    def test_a_malformed_header_is_not(self, header: str) -> None:
        assert not signature_is_valid(WEBHOOK_SECRET, header, self.BODY, now=1_000)


class TestReadBody:
    """`read_body` against the messages an ASGI server sends (one, several, a disconnect)."""

    @staticmethod
    def receiving(*messages: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        return receive

    async def test_one_message_or_several(self) -> None:
        one = self.receiving({"type": "http.request", "body": b"{}"})
        assert await read_body(one) == b"{}"
        assert await read_body(self.receiving({"type": "http.request"})) == b""
        parts = [
            {"type": "http.request", "body": b'{"a"', "more_body": True},
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b": 1}", "more_body": False},
        ]
        assert await read_body(self.receiving(*parts)) == b'{"a": 1}'

    async def test_a_disconnect_is_starlettes_client_disconnect(self) -> None:
        first = {"type": "http.request", "body": b"{", "more_body": True}
        with pytest.raises(ClientDisconnect):
            await read_body(self.receiving(first, {"type": "http.disconnect"}))


class TestPayloadShape:
    def test_a_signed_body_must_name_runpods_job_and_status(self) -> None:
        with pytest.raises(InvalidRequest) as refused:
            webhook_payload(b'{"output": {}}', signed=True)
        assert refused.value.errors is not None
        assert {e["field"] for e in refused.value.errors} == {"id", "status"}

    def test_a_tokened_body_may_omit_them(self) -> None:
        assert webhook_payload(b"{}", signed=False) == {}

    @pytest.mark.parametrize(
        "body", [b"[]", b"not json", b"[" * 10_000, b'{"a": 1} x', b"\xff{}", b'{"a": 1,}']
    )
    def test_anything_but_a_json_object_is_refused(self, body: bytes) -> None:
        with pytest.raises(InvalidRequest):
            webhook_payload(body, signed=False)
        try:
            read = json.loads(body)
        except (ValueError, RecursionError):
            read = None
        assert not isinstance(read, dict)  # the stdlib finds no object in any of them either

    @pytest.mark.parametrize(
        "body",
        [
            b'{"output": {"p": 0.5, "n": -7, "e": 1e-7, "u": "\\u00e9\\ud83c\\udfac"}}',
            b'{"a": 1, "a": 2}',
            # Refused by orjson, read by the stdlib: the parser falls back to it.
            b'{"output": NaN, "error": Infinity}',
            b'{"error": "\\ud800"}',
            b"\xef\xbb\xbf{}",
            ' {"error": "ça n\'a pas marché"} '.encode(),
        ],
    )
    def test_a_json_object_is_read_as_the_stdlib_reads_it(self, body: bytes) -> None:
        parsed = webhook_payload(body, signed=False)
        assert repr(parsed) == repr(json.loads(body))  # repr: NaN is not equal to itself


# --- The worker's progress POST -----------------------------------------------------------------


def progress_path(runpod: respx.MockRouter) -> str:
    """The `progressUrl` the gateway put in the last job it submitted, as a path and query."""
    job_input = json.loads(runpod.routes[0].calls.last.request.content)["input"]
    url = httpx.URL(job_input["progressUrl"])
    return f"{url.raw_path.decode()}"


async def job_of(client: httpx.AsyncClient, alice: dict[str, str], job_id: str) -> dict[str, Any]:
    return (await client.get(f"/jobs/{job_id}", headers=alice)).json()


class TestProgress:
    async def test_first_report_runs_the_job_and_shows(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        url = progress_path(runpod)
        response = await client.post(url, json={"progress": 0.0, "stage": "started"})
        assert response.status_code == 200, response.text
        assert response.json() == {
            "jobId": job_id,
            "status": "running",
            "progress": 0.0,
            "stage": "started",
        }
        await client.post(url, json={"progress": 0.1, "stage": "generating"})
        job = await job_of(client, alice, job_id)
        listed = (await client.get("/jobs", headers=alice)).json()["jobs"][0]
        shown = ("running", 0.1, "generating")
        assert (job["status"], job["progress"], job["stage"]) == shown
        assert (listed["status"], listed["progress"], listed["stage"]) == shown
        assert job["posterUrl"] is None and job["r2Url"] is None
        assert await credits_of(client, alice) == 95  # progress moves no money

    async def test_reports_within_a_second_are_not_written(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        jobs = client.app_state["jobs"]
        now = [jobs.clock()]
        jobs.clock = lambda: now[0]  # the service's injectable clock: nothing waits
        url = progress_path(runpod)
        await client.post(url, json={"progress": 0.1, "stage": "generating"})
        now[0] += 999
        dropped = await client.post(url, json={"progress": 0.5, "stage": "generating"})
        assert dropped.status_code == 200 and dropped.json()["progress"] == 0.1
        now[0] += 1
        await client.post(url, json={"progress": 0.6, "stage": "generating"})
        assert (await job_of(client, alice, job_id))["progress"] == 0.6

    async def test_a_finished_job_is_answered_200_unchanged(self, client, runpod, alice) -> None:
        job_id = await finished_job(client, runpod, alice)
        url = progress_path(runpod)
        before = await job_of(client, alice, job_id)
        response = await client.post(url, json={"progress": 0.8, "stage": "uploading"})
        assert response.status_code == 200
        assert response.json() == {
            "jobId": job_id,
            "status": "done",
            "progress": 1.0,
            "stage": None,
        }
        assert await job_of(client, alice, job_id) == before

    async def test_a_newer_workers_extra_field_is_ignored(self, client, runpod, alice) -> None:
        await create(client, alice)
        body = {"progress": 0.5, "stage": "generating", "etaSeconds": 12}
        response = await client.post(progress_path(runpod), json=body)
        assert response.status_code == 200 and response.json()["progress"] == 0.5

    async def test_bad_or_missing_token_is_401(self, client, runpod, alice) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        body = {"progress": 0.1, "stage": "started"}
        other_job = progress_token(WEBHOOK_SECRET, "job_someotherjob000")
        # The webhook's token proves a webhook only: another purpose, another token.
        webhook = webhook_token(WEBHOOK_SECRET, job_id)
        for params in [
            {"jobId": job_id, "token": other_job},
            {"jobId": job_id, "token": webhook},
            {"jobId": job_id, "token": "é" * 64},
            {"jobId": job_id},
            {"token": progress_token(WEBHOOK_SECRET, job_id)},
        ]:
            response = await client.post("/webhooks/runpod/progress", params=params, json=body)
            assert_error(response, 401, "INVALID_SIGNATURE")
        assert (await job_of(client, alice, job_id))["status"] == "queued"
        # What an operator's alert reads: each refusal counted, by its own reason.
        scraped = (await client.get("/metrics")).text
        counted = 'gateway_webhook_verification_failures_total{reason="bad_progress_token"} 5.0'
        assert counted in scraped.splitlines()

    async def test_unknown_job_is_404(self, client) -> None:
        job_id = "job_doesnotexist0000"
        params = {"jobId": job_id, "token": progress_token(WEBHOOK_SECRET, job_id)}
        body = {"progress": 0.1, "stage": "started"}
        response = await client.post("/webhooks/runpod/progress", params=params, json=body)
        assert_error(response, 404, "NOT_FOUND")

    @pytest.mark.parametrize(
        "raw",
        [
            b"{}",
            b"not json",
            b"[0.5]",
            b'{"progress": 1.5, "stage": "started"}',
            b'{"progress": -0.1, "stage": "started"}',
            b'{"progress": NaN, "stage": "started"}',
            b'{"progress": 0.5, "stage": "dancing"}',
            b'{"progress": 0.5, "stage": "g\xc3\xa9n\xc3\xa9ration \xf0\x9f\x8e\xac"}',
            b'{"progress": 0.5, "stage": "\\ud800"}',
            b'{"progress": true, "stage": "started"}',
            b'{"stage": "started"}',
        ],
    )
    async def test_junk_is_400_and_changes_nothing(self, client, runpod, alice, raw) -> None:
        job_id = (await create(client, alice)).json()["jobId"]
        headers = {"content-type": "application/json"}
        response = await client.post(progress_path(runpod), content=raw, headers=headers)
        body = assert_error(response, 400, "INVALID_REQUEST")
        assert body["errors"]
        assert_written_for_people(body)
        job = await job_of(client, alice, job_id)
        assert (job["status"], job["progress"], job["stage"]) == ("queued", None, None)

    async def test_a_huge_body_is_413(self, client, runpod, alice) -> None:
        await create(client, alice)
        raw = b'{"progress": 0.5, "stage": "started", "pad": "' + b"x" * 70_000 + b'"}'
        headers = {"content-type": "application/json"}
        response = await client.post(progress_path(runpod), content=raw, headers=headers)
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")
