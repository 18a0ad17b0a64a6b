"""Shared fixtures: settings, signing keys and tokens, and the app with its lifespan running."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from config import Settings
from logs import CloudLoggingFormatter
from main import create_app
from metrics import Metrics
from tests.servers import running_convex_server
from tests.stores import CONVEX_TEST_KEY, reset_convex

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
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


def with_lifespan_state(app: FastAPI, state: dict[str, Any]) -> Any:
    """What a server does for each request: hand it a copy of the lifespan's state."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["state"] = dict(state)
        await app(scope, receive, send)

    return asgi


@asynccontextmanager
async def serve(settings: Settings, *, audit: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        transport = httpx.ASGITransport(app=with_lifespan_state(app, dict(state)))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            client.app_state = state  # type: ignore[attr-defined]
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
