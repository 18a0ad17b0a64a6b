"""The handler in process: what a job's input makes it do, and what it answers."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import av
import pytest
from conftest import JOB_ID, POSTER_KEY, VIDEO_KEY, Bucket, Recorder, dead_url, job_input

from worker.contract import WorkerError, WorkerOutput
from worker.generator import TestPattern
from worker.handler import Worker, configure_logging, handler, load_generator


def run(worker: Worker, payload: Any) -> dict[str, Any]:
    return worker.handle({"id": "rp-job-1", "input": payload})


def error_of(answer: dict[str, Any]) -> WorkerError:
    """The error as the gateway reads it back from RunPod's status: a JSON string."""
    assert set(answer) == {"error"}, answer
    assert isinstance(answer["error"], str)
    return WorkerError.from_error_string(answer["error"])


def video_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        assert stream.average_rate is not None
        return float(stream.frames / stream.average_rate)


class TestSuccess:
    def test_video_and_poster_arrive_and_the_output_echoes_the_job(
        self, worker: Worker, bucket: Bucket
    ) -> None:
        answer = run(worker, job_input(bucket, durationSec=3))

        output = WorkerOutput.model_validate(answer)
        assert output.job_id == JOB_ID and output.object_key == VIDEO_KEY
        assert output.poster_uploaded is True and output.duration_sec == 3
        video, content_type = bucket.read(VIDEO_KEY)
        assert content_type == "video/mp4" and len(video) == output.size_bytes
        assert video_seconds(video) == pytest.approx(3.0)
        poster, poster_type = bucket.read(POSTER_KEY)
        assert poster_type == "image/jpeg" and poster[:2] == b"\xff\xd8"

    def test_without_a_poster_url_only_the_video_is_uploaded(
        self, worker: Worker, bucket: Bucket
    ) -> None:
        payload = job_input(bucket)
        payload["output"] = {k: v for k, v in payload["output"].items() if "poster" not in k}

        answer = run(worker, payload)

        assert answer["posterUploaded"] is False
        assert bucket.keys() == [VIDEO_KEY]

    def test_a_fetched_start_image_reaches_the_generator(
        self, bucket: Bucket, recorder: Recorder, worker: Worker
    ) -> None:
        seen: list[bytes | None] = []

        class Recording(TestPattern):
            def generate(self, prompt: str, image: bytes | None, duration: int, seed: int) -> Path:
                seen.append(image)
                return super().generate(prompt, image, duration, seed)

        recorder.body = b"\x89PNG fake image"
        worker.generator = Recording()
        answer = run(worker, job_input(bucket, imageUrl=f"{recorder.url}/start.png"))

        assert answer["jobId"] == JOB_ID
        assert seen == [b"\x89PNG fake image"]

    def test_the_video_file_is_deleted_after_upload(self, worker: Worker, bucket: Bucket) -> None:
        made: list[Path] = []

        class Keeping(TestPattern):
            def generate(self, prompt: str, image: bytes | None, duration: int, seed: int) -> Path:
                made.append(super().generate(prompt, image, duration, seed))
                return made[-1]

        worker.generator = Keeping()
        run(worker, job_input(bucket))

        assert made and not made[0].exists()


class TestRefusals:
    def test_missing_upload_url(self, worker: Worker, bucket: Bucket) -> None:
        payload = job_input(bucket)
        del payload["output"]["uploadUrl"]

        error = error_of(run(worker, payload))

        assert error.job_id == JOB_ID and error.error_type == "InvalidInput"
        assert "output.uploadUrl" in error.error_message
        assert bucket.keys() == []

    @pytest.mark.parametrize("duration", [0, 61])
    def test_duration_out_of_range(self, worker: Worker, bucket: Bucket, duration: int) -> None:
        error = error_of(run(worker, job_input(bucket, durationSec=duration)))

        assert error.job_id == JOB_ID and error.error_type == "InvalidInput"
        assert "durationSec" in error.error_message
        assert bucket.keys() == []

    def test_an_image_answering_404(
        self, worker: Worker, bucket: Bucket, recorder: Recorder
    ) -> None:
        recorder.default = 404
        error = error_of(run(worker, job_input(bucket, imageUrl=f"{recorder.url}/gone.png")))

        assert error.job_id == JOB_ID and error.error_type == "InvalidInput"
        assert error.error_message == "The image at imageUrl could not be fetched: HTTP 404"
        assert bucket.keys() == []

    def test_an_image_host_that_refuses_connections(self, worker: Worker, bucket: Bucket) -> None:
        error = error_of(run(worker, job_input(bucket, imageUrl=dead_url())))

        assert error.job_id == JOB_ID and "imageUrl could not be fetched" in error.error_message

    def test_an_image_behind_a_redirect_is_not_followed(
        self, worker: Worker, bucket: Bucket, recorder: Recorder
    ) -> None:
        recorder.default = 302
        error = error_of(run(worker, job_input(bucket, imageUrl=f"{recorder.url}/moved.png")))

        assert error.error_message.endswith("HTTP 302")

    def test_an_unknown_contract_version(self, worker: Worker, bucket: Bucket) -> None:
        error = error_of(run(worker, job_input(bucket, contractVersion=2)))

        assert error.job_id == JOB_ID and "contractVersion 2" in error.error_message

    def test_input_that_is_not_an_object_still_answers_with_the_contract_error(
        self, worker: Worker
    ) -> None:
        error = error_of(run(worker, "not an object"))

        assert error.job_id is None and error.error_type == "InvalidInput"


class TestUpload:
    def test_two_503s_then_success(
        self, worker: Worker, bucket: Bucket, recorder: Recorder, sleeps: list[float]
    ) -> None:
        recorder.script = [503, 503]
        payload = job_input(bucket)
        payload["output"]["uploadUrl"] = f"{recorder.url}/upload?X-Amz-Signature=sig"

        answer = run(worker, payload)

        assert answer["jobId"] == JOB_ID
        puts = [r for r in recorder.received if r.method == "PUT"]
        assert len(puts) == 3 and len({r.body for r in puts}) == 1
        assert all(r.headers["Content-Type"] == "video/mp4" for r in puts)
        # Full jitter: each wait is random, within a ceiling that doubles from 0.5 s.
        assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0

    def test_always_503_gives_the_error_echo(
        self, worker: Worker, bucket: Bucket, recorder: Recorder, sleeps: list[float]
    ) -> None:
        recorder.default = 503
        payload = job_input(bucket)
        payload["output"]["uploadUrl"] = f"{recorder.url}/upload?X-Amz-Signature=sig"

        error = error_of(run(worker, payload))

        assert error.job_id == JOB_ID and error.error_type == "UploadFailed"
        assert error.error_message == "Uploading the video failed after 6 attempts: HTTP 503"
        assert len(recorder.received) == 6 and len(sleeps) == 5

    def test_a_refused_signature_is_not_retried(
        self, worker: Worker, bucket: Bucket, recorder: Recorder, sleeps: list[float]
    ) -> None:
        recorder.default = 403
        payload = job_input(bucket)
        payload["output"]["uploadUrl"] = f"{recorder.url}/upload?X-Amz-Signature=sig"

        error = error_of(run(worker, payload))

        assert error.error_message == "Uploading the video was refused: HTTP 403"
        assert len(recorder.received) == 1 and sleeps == []

    def test_a_failed_poster_never_fails_the_job(
        self, worker: Worker, bucket: Bucket, recorder: Recorder
    ) -> None:
        recorder.default = 500
        payload = job_input(bucket)
        payload["output"]["posterUploadUrl"] = f"{recorder.url}/poster?X-Amz-Signature=sig"

        answer = run(worker, payload)

        assert answer["jobId"] == JOB_ID and answer["posterUploaded"] is False
        assert bucket.keys() == [VIDEO_KEY]


class TestGeneratorFailure:
    def test_an_exception_is_returned_with_the_echo(self, worker: Worker, bucket: Bucket) -> None:
        class OutOfMemory(TestPattern):
            def generate(self, prompt: str, image: bytes | None, duration: int, seed: int) -> Path:
                raise RuntimeError("CUDA out of memory")

        worker.generator = OutOfMemory()
        answer = run(worker, job_input(bucket))

        error_of(answer)  # the shape the gateway reads
        assert json.loads(answer["error"]) == {
            "jobId": JOB_ID,
            "error_type": "RuntimeError",
            "error_message": "CUDA out of memory",
        }

    def test_the_operator_gets_its_traceback_and_a_refusal_none(
        self, worker: Worker, bucket: Bucket, caplog: pytest.LogCaptureFixture
    ) -> None:
        class Broken(TestPattern):
            def generate(self, prompt: str, image: bytes | None, duration: int, seed: int) -> Path:
                raise RuntimeError("CUDA out of memory")

        worker.generator = Broken()
        run(worker, job_input(bucket, durationSec=61))
        assert "Traceback" not in caplog.text
        run(worker, job_input(bucket))
        assert "Traceback" in caplog.text and "in generate" in caplog.text


class TestLogs:
    def test_no_presigned_url_or_token_is_ever_logged(
        self, worker: Worker, bucket: Bucket, recorder: Recorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        configure_logging()
        caplog.set_level(logging.DEBUG)
        secret_query = "X-Amz-Signature=very-secret-signature"
        recorder.default = 503
        good = job_input(bucket, progressUrl=dead_url())
        failing = job_input(bucket)
        failing["output"]["uploadUrl"] = f"{recorder.url}/upload?{secret_query}"
        failing["output"]["posterUploadUrl"] = f"{recorder.url}/poster?{secret_query}"

        run(worker, good)
        run(worker, failing)
        run(worker, job_input(bucket, imageUrl=f"{recorder.url}/image?{secret_query}"))

        logged = caplog.text
        assert "job job_Xk3v9QyL0aPz7wRt failed" in logged  # the failures were logged...
        assert "progress started not delivered" in logged
        for leak in ("X-Amz-Signature", "X-Amz-Credential", "secret-token", recorder.url):
            assert leak not in logged  # ...and nothing that opens a URL


class TestModuleHandler:
    def test_the_sdk_facing_handler_answers_a_refusal_with_the_echo(self) -> None:
        answer = handler({"id": "rp-job-1", "input": {"jobId": JOB_ID}})

        assert json.loads(answer["error"])["jobId"] == JOB_ID


class TestLoadGenerator:
    def test_unset_is_the_test_pattern(self) -> None:
        assert isinstance(load_generator(None), TestPattern)

    def test_a_module_and_class_are_imported_and_built(self) -> None:
        generator = load_generator("worker.generator:TestPattern")
        assert isinstance(generator, TestPattern) and generator.max_duration_sec == 60

    @pytest.mark.parametrize("spec", ["worker.generator", "worker.generator:"])
    def test_a_spec_without_a_class_is_refused(self, spec: str) -> None:
        with pytest.raises(ValueError, match="module:Class"):
            load_generator(spec)
