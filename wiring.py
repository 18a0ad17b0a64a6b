"""Builds what the gateway talks to from the settings: store, storage, RunPod, Clerk."""

from __future__ import annotations

import importlib.util
import logging
import secrets
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import httpx

from auth import ClerkAuth, dev_public_key_pem
from config import Settings, revealed
from events import StreamHub, renderer
from instrumented import InstrumentedStorage, InstrumentedStore, InstrumentedTransport
from jobs import JobService
from local_storage import LocalStorage
from logs import configure_logging
from metrics import Metrics
from outbound_http import default_ssl_context
from r2_client import ObjectStorage, PendingS3Client, R2Storage
from readiness import Readiness
from runpod_client import CONNECT_RETRIES, RunPodClient, build_http_client
from sqlite_store import SQLiteStore
from store import Store
from uploads import UploadService

log = logging.getLogger("gateway")


class State(TypedDict):
    """What the lifespan yields: each request reads it as `request.state`."""

    store: Store
    storage: ObjectStorage
    auth: ClerkAuth
    jobs: JobService
    settings: Settings
    readiness: Readiness
    uploads: UploadService
    streams: StreamHub


@dataclass
class Backends:
    """Which backends are real and which are the embedded stand-ins, for the start-up log."""

    store: str
    auth: str
    runpod: str
    storage: str

    def __str__(self) -> str:
        parts = ("store", self.store), ("storage", self.storage), ("RunPod", self.runpod)
        return "; ".join(f"{name}: {value}" for name, value in (*parts, ("auth", self.auth)))


def _local_secret(data_dir: Path, name: str) -> str:
    """A random secret kept in the data dir, so local restarts keep URLs and tokens valid."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _public_base_url(settings: Settings) -> str:
    return (settings.public_base_url or "http://127.0.0.1:8000").rstrip("/")


def require_client_package(module: str, backend: str) -> None:
    """Refuse to start a real backend whose client library is not installed, saying how to add it.

    `make run` installs requirements-local.txt, which leaves out boto3 and convex: without this,
    a configured R2 or Convex would fail on an import deep in start-up (or, for R2, on first use).
    """
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"{backend} is configured, but its client package {module} is not installed: "
            "`make setup` adds it (or `.venv/bin/pip install -r requirements.txt`)"
        )


def build_store(settings: Settings) -> tuple[Store, str]:
    if settings.uses_convex:
        require_client_package("convex", "Convex (CONVEX_URL)")
        from convex_client import ConvexStore

        return ConvexStore.from_settings(settings), f"Convex at {settings.convex_url}"
    path = settings.local_data_dir / "gateway.db"
    store = SQLiteStore(path, settings.effective_signup_credits, settings.default_plan)
    return store, f"SQLite at {path}"


def build_storage(settings: Settings, secret: str) -> tuple[ObjectStorage, str]:
    if settings.uses_real_r2:
        require_client_package("boto3", "R2 (R2_*)")
        endpoint = settings.r2_endpoint
        assert endpoint and settings.r2_access_key_id and settings.r2_secret_access_key
        assert settings.r2_bucket
        key_id, key = settings.r2_access_key_id, settings.r2_secret_access_key
        client = PendingS3Client(endpoint, key_id.get_secret_value(), key.get_secret_value())
        return R2Storage(client, settings.r2_bucket), f"R2 at {endpoint}"
    root = settings.local_data_dir / "objects"
    storage = LocalStorage(root, secret.encode(), _public_base_url(settings))
    return storage, f"local files in {root}"


def build_runpod_http(
    settings: Settings, stack: AsyncExitStack, metrics: Metrics
) -> tuple[httpx.AsyncClient, str]:
    if settings.uses_real_runpod:
        assert settings.runpod_endpoint_id and settings.runpod_api_key
        http = build_http_client(
            settings.runpod_api_base,
            settings.runpod_endpoint_id,
            settings.runpod_api_key.get_secret_value(),
            transport=InstrumentedTransport(
                httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES, verify=default_ssl_context()),
                metrics,
            ),
        )
        return http, f"endpoint {settings.runpod_endpoint_id} at {settings.runpod_api_base}"
    # The stand-in runs in this process and is reached through httpx's ASGI transport, so
    # runpod_client.py speaks real RunPod HTTP to it; its uploads and webhooks use real sockets.
    from local_runpod import create_local_runpod_app

    standin = create_local_runpod_app(render_seconds=settings.local_render_seconds)
    stack.push_async_callback(standin.state.runner.aclose)
    transport = InstrumentedTransport(httpx.ASGITransport(app=standin), metrics)
    http = build_http_client("http://local-runpod/v2", "local", "local", transport=transport)
    return http, "local stand-in"


async def build_state(settings: Settings, stack: AsyncExitStack, metrics: Metrics) -> State:
    data_dir = settings.local_data_dir
    secret = revealed(settings.runpod_webhook_secret) or _local_secret(data_dir, "webhook_secret")
    bare_store, store_name = build_store(settings)
    store = InstrumentedStore(bare_store, metrics)
    stack.push_async_callback(store.close)
    storage, storage_name = build_storage(settings, secret)
    stack.push_async_callback(storage.close)
    runpod_http, runpod_name = build_runpod_http(settings, stack, metrics)
    stack.push_async_callback(runpod_http.aclose)
    auth_http = await stack.enter_async_context(
        httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0), verify=default_ssl_context())
    )
    auth, auth_name = build_auth(settings, auth_http)
    await auth.load_keys()
    jobs = JobService(
        settings=settings,
        store=store,
        runpod=RunPodClient(runpod_http),
        # The state keeps the bare storage: local_storage.py's routes check its type.
        storage=InstrumentedStorage(storage, metrics),
        webhook_secret=secret,
        public_base_url=_public_base_url(settings),
    )
    backends = Backends(store_name, auth_name, runpod_name, storage_name)
    log.info("gateway starting in %s mode: %s", settings.gateway_env.value, backends)
    readiness = Readiness(store, auth, jobs.runpod)
    local_files = storage if isinstance(storage, LocalStorage) else None
    uploads = UploadService(settings, store, jobs.storage, local_files=local_files)
    streams = StreamHub.from_settings(settings, store, renderer(jobs))
    return State(
        store=store,
        storage=storage,
        auth=auth,
        jobs=jobs,
        settings=settings,
        readiness=readiness,
        uploads=uploads,
        streams=streams,
    )


def build_auth(settings: Settings, http: httpx.AsyncClient) -> tuple[ClerkAuth, str]:
    if settings.uses_real_clerk:
        source = "a PEM key" if settings.clerk_jwt_key else f"keys from {settings.jwks_url}"
        return ClerkAuth(settings, http), f"Clerk, {source}"
    public_pem = dev_public_key_pem(settings.local_data_dir)
    return ClerkAuth(settings, http, public_key_pem=public_pem), "dev issuer"


def configure_logging_for(settings: Settings) -> None:
    """Logs as the settings ask, with every configured secret redacted by value."""
    configure_logging(
        json_logs=settings.json_logs,
        project_id=settings.google_cloud_project,
        known_secrets=settings.secret_values,
    )
