"""A test hook: kill the gateway at a named step, so the crash tests can prove no credit is lost."""

from __future__ import annotations

import os
import signal

CRASH_POINT_ENV = "GATEWAY_CRASH_POINT"


def crash_point(name: str) -> None:
    """Test hook: `kill -9` this very process at a named step, when armed by the environment.

    The crash tests arm one step, let a real gateway die there, restart it, and check that no
    credit is lost. Never armed in production.
    """
    armed = os.environ.get(CRASH_POINT_ENV)
    if armed == name and os.environ.get("GATEWAY_ENV", "local") != "production":
        os.kill(os.getpid(), signal.SIGKILL)
