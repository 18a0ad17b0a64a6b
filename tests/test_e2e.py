"""End to end in local mode: a real uvicorn, the RunPod stand-in, real sockets, a real MP4."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from tests.factories import jpeg_size
from tests.servers import manage, running_gateway

pytestmark = pytest.mark.e2e


def wait_for_status(
    client: httpx.Client, job_id: str, wanted: str, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] == wanted:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} never reached {wanted}")


def video_seconds(data: bytes) -> tuple[float, int, int]:
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        assert stream.duration is not None and stream.time_base is not None
        seconds = float(stream.duration * stream.time_base)
        return seconds, stream.codec_context.width, stream.codec_context.height


class TestLocalMode:
    def test_create_render_download_and_pay(self, tmp_path: Path, store_env) -> None:
        settings = {"LOCAL_RENDER_SECONDS": "0.5", **store_env}
        with running_gateway(tmp_path / "data", **settings) as (base, env):
            token = manage(env, "mint-token", "user_e2e")
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
                assert client.get("/credits").json() == {"credits": 100, "plan": "starter"}
                body = {"prompt": "A silver drone over a neon skyline", "durationSec": 2}
                created = client.post("/jobs/create", json=body)
                assert created.status_code == 200, created.text
                job = wait_for_status(client, created.json()["jobId"], "done")
                assert job["r2Url"].startswith(f"{base}/_local/storage/videos/user_e2e/")

                video = httpx.get(job["r2Url"], timeout=10)
                assert video.status_code == 200
                assert video.headers["content-type"] == "video/mp4"
                seconds, width, height = video_seconds(video.content)
                assert abs(seconds - 2) < 0.25 and (width, height) == (320, 180)

                tampered = job["r2Url"].replace("sig=", "sig=0")
                assert httpx.get(tampered).status_code == 403
                assert client.get("/credits").json()["credits"] == 98

            assert "108 credits" in manage(env, "grant", "user_e2e", "10")
            shown = manage(env, "show", "user_e2e")
            assert "108 credits" in shown and job["jobId"] in shown and "done" in shown
        # With Convex configured, nothing may have gone to the embedded store.
        assert (tmp_path / "data" / "gateway.db").exists() == ("CONVEX_URL" not in store_env)

    def test_progress_then_done_with_a_poster(self, tmp_path: Path, store_env) -> None:
        # The worker POSTs its progress to the gateway over loopback. Nothing here asks RunPod's
        # /status (no reconciler, no stale poll within 10 minutes), so only the POSTs can show
        # `running`, and only the webhook `done`.
        settings = {
            "LOCAL_RENDER_SECONDS": "3",
            "RECONCILER_ENABLED": "false",
            "RECONCILE_AFTER_SECONDS": "600",
            **store_env,
        }
        with running_gateway(tmp_path / "data", **settings) as (base, env):
            token = manage(env, "mint-token", "user_e2e")
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
                body = {"prompt": "A slow pan over a harbour", "durationSec": 1}
                job_id = client.post("/jobs/create", json=body).json()["jobId"]
                running = wait_for_status(client, job_id, "running")
                done = wait_for_status(client, job_id, "done")
                assert running["stage"] in ("started", "generating", "uploading")
                assert 0 <= running["progress"] <= 0.8 and running["posterUrl"] is None
                assert (done["progress"], done["stage"]) == (1.0, None)
                assert done["posterUrl"].startswith(f"{base}/_local/storage/videos/user_e2e/")
                assert client.get("/credits").json()["credits"] == 99

            poster = httpx.get(done["posterUrl"], timeout=10)
            assert poster.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
            assert jpeg_size(poster.content) == (320, 180)

    def test_worker_failure_is_refunded(self, tmp_path: Path, store_env) -> None:
        settings = {"LOCAL_RENDER_SECONDS": "0", **store_env}
        with running_gateway(tmp_path / "data", **settings) as (base, env):
            token = manage(env, "mint-token", "user_e2e")
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
                body = {"prompt": "make it [[fail]]", "durationSec": 3}
                job_id = client.post("/jobs/create", json=body).json()["jobId"]
                job = wait_for_status(client, job_id, "failed")
                assert job["error"]["code"] == "WORKER_FAILED"
                # The worker's own message, carried in its jobId-echoing error, reaches the user.
                detail = "Simulated worker failure: the prompt contains [[fail]]"
                assert job["error"]["detail"] == detail
                assert client.get("/credits").json()["credits"] == 100
