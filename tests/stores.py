"""How the contract suite opens each kind of store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from store import SQLiteStore, Store

STORE_KINDS = ["sqlite"]


@asynccontextmanager
async def open_store(kind: str, tmp_path: Path, signup_credits: int) -> AsyncIterator[Store]:
    if kind != "sqlite":
        raise ValueError(f"unknown store kind {kind!r}")
    store = SQLiteStore(tmp_path / "gateway.db", signup_credits, "starter")
    try:
        yield store
    finally:
        await store.close()
