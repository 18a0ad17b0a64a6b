"""`make fuzz`: schemathesis against a real gateway, with valid auth and a fixed seed.

Starts the gateway in local mode on a free loopback port, mints a token, tops up the user's
credits, and runs `st run` over the OpenAPI schema. It fails on any 5xx and on any response
that does not match the schema (status, content type, body, headers); and it fails if fewer
than MIN_REQUESTS requests were generated, so a schema that tests nothing cannot pass.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.servers import ROOT, GatewayProcess, manage

SEED = 20261125
MIN_REQUESTS = 1000
# What "correct" means here. positive_data_acceptance is left out on purpose: some valid-looking
# inputs are refused by rules a schema cannot state (an image URL whose host is an IP address,
# an opaque cursor the gateway never issued), and those refusals are the point.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "unsupported_method",
        # Every operation that declares a session must refuse a call without one.
        "ignored_auth",
    ]
)


def run(max_examples: int, max_time: int) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        gateway = GatewayProcess(
            Path(scratch) / "data", LOCAL_RENDER_SECONDS="0", RECONCILER_ENABLED="false"
        )
        gateway.start()
        try:
            token = manage(gateway.env, "mint-token", "user_fuzz", "--ttl", "7200")
            manage(gateway.env, "grant", "user_fuzz", "100000")
            return _schemathesis(gateway.base_url, token, max_examples, max_time)
        finally:
            gateway.stop()


def _schemathesis(base: str, token: str, examples: int, max_time: int) -> int:
    command = [
        str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", CHECKS,
        "--max-examples", str(examples),
        "--seed", str(SEED),
        "--max-time", str(max_time),
        "--workers", "1",
        "--no-color",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, check=False, capture_output=True, text=True)
    print(done.stdout[-20000:], done.stderr[-5000:], sep="\n")
    match = re.search(r"(\d+) generated", done.stdout)
    generated = int(match.group(1)) if match else 0
    print(f"fuzz: {generated} requests generated (minimum {MIN_REQUESTS})")
    if done.returncode:
        return done.returncode
    return 0 if generated >= MIN_REQUESTS else 1


if __name__ == "__main__":
    sys.exit(run(max_examples=int(sys.argv[1]) if len(sys.argv) > 1 else 60, max_time=90))
