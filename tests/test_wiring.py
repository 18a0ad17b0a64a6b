"""wiring.py: what the gateway is built from, and what it says when a piece is missing."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from config import Settings
from wiring import build_storage, build_store


class TestMissingClientPackage:
    """`make run` installs no boto3 or convex (requirements-local.txt): a configured R2 or Convex
    must then stop start-up naming the package and how to add it."""

    def test_r2_without_boto3(
        self, settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "boto3", None)  # as in a venv without it
        settings = settings_factory(
            r2_access_key_id=SecretStr("key"),
            r2_secret_access_key=SecretStr("secret"),
            r2_bucket="videos",
            r2_endpoint_url="http://127.0.0.1:9",
        )
        with pytest.raises(RuntimeError, match=r"R2 \(R2_\*\) is configured.*boto3.*make setup"):
            build_storage(settings, "secret")

    def test_convex_without_its_package(
        self, settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "convex", None)
        settings = settings_factory(
            convex_url="http://127.0.0.1:9", convex_deploy_key=SecretStr("key")
        )
        with pytest.raises(RuntimeError, match=r"Convex \(CONVEX_URL\).*convex.*make setup"):
            build_store(settings)
