"""Shared fixtures: settings, signing keys and tokens, and the app with its lifespan running."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from moto.server import ThreadedMotoServer
from starlette.types import Receive, Scope, Send

from config import Settings
from logs import CloudLoggingFormatter
from main import create_app
from metrics import Metrics
from r2_client import make_s3_client
from tests.servers import running_convex_server
from tests.stores import CONVEX_TEST_KEY, reset_convex

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

RUNPOD_BASE = "https://runpod.test/v2"
RUNPOD_ENDPOINT = "ep123"
RUNPOD_URL = f"{RUNPOD_BASE}/{RUNPOD_ENDPOINT}"
WEBHOOK_SECRET = "whsec-test-secret"
PUBLIC_BASE = "https://gateway.test"
# The Cloud project the JSON log lines name in their trace field.
PROJECT = "cineweave-prod"
LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture(scope="session")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def public_pem(signing_key: rsa.RSAPrivateKey) -> str:
    return (
        signing_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def make_token(signing_key: rsa.RSAPrivateKey) -> TokenFactory:
    def mint(user_id: str = "user_alice", ttl: int = 60, **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": user_id, "sid": "sess_1", "iat": now, "nbf": now, "exp": now + ttl}
        payload.update(claims)
        return jwt.encode(payload, signing_key, algorithm="RS256", headers={"kid": "test"})

    return mint


@pytest.fixture
def settings_factory(tmp_path: Path, public_pem: str) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "gateway_env": "local",
            "local_data_dir": tmp_path / "data",
            "clerk_jwt_key": public_pem,
            "runpod_api_key": "rp-test-key",
            "runpod_endpoint_id": RUNPOD_ENDPOINT,
            "runpod_api_base": RUNPOD_BASE,
            "runpod_webhook_secret": WEBHOOK_SECRET,
            "public_base_url": PUBLIC_BASE,
            # Tests drive the reconciler by hand, so no background pass races them.
            "reconciler_enabled": False,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return build


def with_lifespan_state(app: FastAPI, state: dict[str, Any]) -> Any:
    """What a server does for each request: hand it a copy of the lifespan's state."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["state"] = dict(state)
        await app(scope, receive, send)

    return asgi


class AppClient(httpx.AsyncClient):
    """A client of the app that also holds its lifespan state, for a test to look behind the API
    (the store's books, the storage's files)."""

    app_state: Mapping[str, Any]


@asynccontextmanager
async def serve(settings: Settings, *, audit: bool = True) -> AsyncIterator[AppClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        assert state is not None, "create_app's lifespan yields the app's state"
        transport = httpx.ASGITransport(app=with_lifespan_state(app, dict(state)))
        async with AppClient(transport=transport, base_url="http://testserver") as client:
            client.app_state = state
            yield client
        # Whatever the scenario did, every credit must be accounted for afterwards.
        if audit:
            assert await state["store"].audit() == []


@pytest.fixture(scope="session")
def convex_server() -> Iterator[str]:
    """One convex-test server for the session; each user resets it for isolation."""
    with running_convex_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "convex"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The same scenario on each store: SQLite, or the real Convex functions over HTTP."""
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("convex_server")
    reset_convex(url)
    return {"CONVEX_URL": url, "CONVEX_DEPLOY_KEY": CONVEX_TEST_KEY}


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as opened:
        yield opened


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def json_logs() -> Iterator[LogLines]:
    """Every log line, as the JSON formatter writes it for Cloud Logging."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(CloudLoggingFormatter(PROJECT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def runpod() -> Any:
    """RunPod's API at the transport: `/run` accepts every job as `rp-1`."""
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
        yield mock


@pytest.fixture
def alice(make_token: TokenFactory) -> dict[str, str]:
    return bearer(make_token("user_alice"))


@pytest.fixture
def bob(make_token: TokenFactory) -> dict[str, str]:
    return bearer(make_token("user_bob"))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port: R2 over real HTTP, one per test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@contextmanager
def moto_bucket(endpoint: str, name: str) -> Iterator[S3Client]:
    """Bucket `name` on moto's server, through the gateway's own client; removed afterwards."""
    client = make_s3_client(endpoint, "test-key", "test-secret")
    # R2 signs for region "auto"; moto wants the bucket created in the region it is asked from.
    # The ignore: "auto" is R2's region, no AWS one, so boto3-stubs' literals lack it.
    auto = {"LocationConstraint": "auto"}
    client.create_bucket(Bucket=name, CreateBucketConfiguration=auto)  # type: ignore[arg-type]
    yield client
    for item in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@contextmanager
def settings_on_moto(
    settings_factory: Callable[..., Settings], endpoint: str, bucket: str, **overrides: Any
) -> Iterator[Settings]:
    """Settings whose R2 is bucket `bucket` on moto's server, for as long as the block runs."""
    with moto_bucket(endpoint, bucket):
        yield settings_factory(
            r2_access_key_id="test-key",
            r2_secret_access_key="test-secret",
            r2_bucket=bucket,
            r2_endpoint_url=endpoint,
            **overrides,
        )
