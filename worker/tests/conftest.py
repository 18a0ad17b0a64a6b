"""Real parts for the worker's tests: moto's S3 server, and small HTTP servers on loopback."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from worker.contract import CONTRACT_VERSION, POSTER_CONTENT_TYPE, VIDEO_CONTENT_TYPE
from worker.generator import TestPattern
from worker.handler import Worker

WORKER_DIR = Path(__file__).resolve().parent.parent
ROOT = WORKER_DIR.parent


# --- S3, as R2 answers presigned URLs -------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class Bucket:
    client: Any
    name: str

    def presign_put(self, key: str, content_type: str) -> str:
        params = {"Bucket": self.name, "Key": key, "ContentType": content_type}
        url: str = self.client.generate_presigned_url("put_object", Params=params, ExpiresIn=600)
        return url

    def read(self, key: str) -> tuple[bytes, str]:
        found = self.client.get_object(Bucket=self.name, Key=key)
        return found["Body"].read(), found["ContentType"]

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name).get("Contents", [])
        return [item["Key"] for item in listed]


@pytest.fixture
def bucket(moto_endpoint: str) -> Bucket:
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
    )
    name = f"videos-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(client, name)


# --- A loopback HTTP server that answers from a script and records what it got ---------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Recorder:
    """Answers each request with the next scripted status (then `default`), and keeps it."""

    url: str
    script: list[int] = field(default_factory=list)
    default: int = 200
    body: bytes = b""
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self, request: Received) -> int:
        with self.lock:
            self.received.append(request)
            return self.script.pop(0) if self.script else self.default


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    server.daemon_threads = True
    state = Recorder(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.recorder = state  # type: ignore[attr-defined]  # the handler's way back to it
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


class _RecordingHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        state: Recorder = self.server.recorder  # type: ignore[attr-defined]  # set in recorder()
        length = int(self.headers.get("Content-Length") or 0)
        request = Received(self.command, self.path, dict(self.headers), self.rfile.read(length))
        status = state.next_status(request)
        if state.delay:
            threading.Event().wait(state.delay)
        body = state.body if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def dead_url() -> str:
    """A loopback URL where nothing listens: every connection is refused at once."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}/progress?token=secret-token"


# --- Jobs --------------------------------------------------------------------------------------

JOB_ID = "job_Xk3v9QyL0aPz7wRt"
VIDEO_KEY = f"videos/user_alice/{JOB_ID}.mp4"
POSTER_KEY = f"posters/user_alice/{JOB_ID}.jpg"


def job_input(bucket: Bucket, **changes: Any) -> dict[str, Any]:
    """A complete input as the gateway sends it, its URLs presigned by the bucket."""
    base: dict[str, Any] = {
        "contractVersion": CONTRACT_VERSION,
        "jobId": JOB_ID,
        "prompt": "A silver drone flies through neon skyline",
        "imageUrl": None,
        "durationSec": 2,
        "seed": 42,
        "output": {
            "uploadUrl": bucket.presign_put(VIDEO_KEY, VIDEO_CONTENT_TYPE),
            "objectKey": VIDEO_KEY,
            "contentType": VIDEO_CONTENT_TYPE,
            "posterUploadUrl": bucket.presign_put(POSTER_KEY, POSTER_CONTENT_TYPE),
            "posterContentType": POSTER_CONTENT_TYPE,
        },
    }
    return base | changes


# --- The README's example input ----------------------------------------------------------


def readme_example() -> dict[str, Any]:
    """The complete input in the README's worker section, exactly as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The RunPod worker (`worker/`)", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    assert block, "the README's worker section has no JSON example"
    example: dict[str, Any] = json.loads(block.group(1))
    return example


def fill_in(example: dict[str, Any], bucket: Bucket, progress_url: str) -> dict[str, Any]:
    """The example with its `<...>` placeholders replaced by live URLs; nothing else changed."""
    filled: dict[str, Any] = json.loads(json.dumps(example))
    filled["progressUrl"] = f"{progress_url}/progress?jobId={JOB_ID}&token=secret-token"
    output = filled["output"]
    output["uploadUrl"] = bucket.presign_put(output["objectKey"], output["contentType"])
    output["posterUploadUrl"] = bucket.presign_put(POSTER_KEY, output["posterContentType"])
    placeholders = [value for value in _strings(example) if value.startswith("<")]
    assert len(placeholders) == 3  # exactly the three URLs above
    return filled


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def worker(sleeps: list[float]) -> Iterator[Worker]:
    """The handler's worker with the test pattern; backoff sleeps are recorded, not slept."""
    with httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0)) as client:
        yield Worker(generator=TestPattern(), client=client, sleep=sleeps.append)
