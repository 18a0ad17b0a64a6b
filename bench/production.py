"""Production mode for the bench: the gateway as Cloud Run runs it, on real parts on loopback.

`GATEWAY_ENV=production` with every backend real: the Convex store behind the project's Convex
imitation (`tests/convex_server/server.mjs`: the real `convex/` functions under convex-test),
moto's S3 server as R2, the bench's RunPod stand-in, and an RS256 key as Clerk's
(`CLERK_JWT_KEY`), whose tokens the bench mints. The fixtures are the local rows' fixtures:
the same users and credits, granted through Convex, and done jobs made through the API.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.fixtures import CREDITS, TOKEN_TTL_SECONDS, USER, Fixtures, creator_ids
from bench.processes import LOOPBACK, ROOT, ProcessGroups, free_port, minimal_env, wait_for_port
from models import object_key_for

ISSUER = "https://clerk.cineweave.bench"
DEPLOY_KEY = "prod:cineweave-bench|0123456789abcdef"
BUCKET = "cineweave-videos"
# moto accepts any credentials; these only have to look like R2's.
R2_KEY_ID, R2_SECRET = "bench-access-key-id", "bench-secret-access-key"
CONVEX_START_SECONDS = 60.0


@dataclass
class Upstreams:
    """The Convex imitation and moto's S3 server, running; what the gateway is pointed at."""

    convex_url: str
    convex_pid: int
    r2_url: str
    signing_key: rsa.RSAPrivateKey

    def call(self, kind: str, path: str, **args: Any) -> Any:
        """One Convex function call with the deploy key, as the gateway makes it."""
        body = {"path": f"gateway:{path}", "args": args, "format": "json"}
        headers = {"Authorization": f"Convex {DEPLOY_KEY}"}
        response = httpx.post(f"{self.convex_url}/api/{kind}", json=body, headers=headers)
        response.raise_for_status()
        answer = response.json()
        if answer.get("status") != "success":
            raise RuntimeError(f"Convex {path} failed: {answer}")
        return answer["value"]

    def s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.r2_url,
            # moto refuses a bucket made in "auto" without a location; the gateway's own client
            # says "auto", as R2 wants, and moto serves it the same bucket.
            region_name="us-east-1",
            aws_access_key_id=R2_KEY_ID,
            aws_secret_access_key=R2_SECRET,
        )

    # --- the fixtures, as the local rows have them ------------------------------------------

    def prepare(self) -> Fixtures:
        """The bucket, the users with their credits, and a session token for each."""
        self.s3().create_bucket(Bucket=BUCKET)
        users = [USER, *creator_ids()]
        for user_id in users:
            self.call(
                "mutation",
                "grantCredits",
                userId=user_id,
                amount=CREDITS,
                reason="benchmark",
                signupCredits=0,
                plan="starter",
            )
        return Fixtures(
            secret=secrets.token_urlsafe(32),
            token=self.token(USER),
            creator_tokens=[self.token(user_id) for user_id in users[1:]],
        )

    def token(self, user_id: str) -> str:
        """A session token shaped like a Clerk v2 one, signed with the key the gateway trusts."""
        now = int(time.time())
        claims = {
            "sub": user_id,
            "sid": f"sess_bench_{secrets.token_hex(8)}",
            "iss": ISSUER,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_TTL_SECONDS,
            "v": 2,
        }
        return jwt.encode(claims, self.signing_key, algorithm="RS256", headers={"kid": "bench"})

    def runpod_id_of(self, job_id: str) -> str:
        job = self.call("query", "findJob", jobId=job_id)
        if not job or not job.get("runpodId"):
            raise RuntimeError(f"job {job_id} has no RunPod id")
        return str(job["runpodId"])

    def store_video(self, job_id: str) -> None:
        # The gateway only HEADs the object; the bytes need not be a real MP4.
        key = object_key_for(USER, job_id)
        self.s3().put_object(Bucket=BUCKET, Key=key, Body=b"\x00\x00\x00\x18ftypmp42 bench")

    def settings(self, port: int, runpod_port: int, secret: str) -> dict[str, str]:
        """The gateway's environment: production, every backend on loopback."""
        public_pem = self.signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "GATEWAY_ENV": "production",
            "CLERK_JWT_KEY": public_pem.decode(),
            "CLERK_ISSUER": ISSUER,
            "RUNPOD_API_KEY": "bench",
            "RUNPOD_ENDPOINT_ID": "bench",
            "RUNPOD_API_BASE": f"http://{LOOPBACK}:{runpod_port}/v2",
            "RUNPOD_WEBHOOK_SECRET": secret,
            # Never called: the stand-in sends no webhooks. Production requires https.
            "PUBLIC_BASE_URL": f"https://gateway.bench.invalid:{port}",
            "R2_ACCOUNT_ID": "0123456789abcdef0123456789abcdef",
            "R2_ACCESS_KEY_ID": R2_KEY_ID,
            "R2_SECRET_ACCESS_KEY": R2_SECRET,
            "R2_BUCKET": BUCKET,
            "R2_ENDPOINT_URL": self.r2_url,
            "CONVEX_URL": self.convex_url,
            "CONVEX_DEPLOY_KEY": DEPLOY_KEY,
            "MAX_CONCURRENT_JOBS": "1000000",
            # The reconciler would sweep the imitation every 30 s, in the middle of a run.
            "RECONCILER_ENABLED": "false",
        }

    def baseline_settings(self) -> dict[str, str]:
        """The production baseline: one `gateway:getUser` per request to the same imitation."""
        return {
            "BENCH_UPSTREAM_URL": self.convex_url,
            "BENCH_UPSTREAM_KEY": DEPLOY_KEY,
            "BENCH_UPSTREAM_USER": USER,
        }


def start_upstreams(procs: ProcessGroups, cwd: Path, logs: Path) -> Upstreams:
    """Start the Convex imitation (node) and moto's S3 server, each on a free port."""
    convex_port, r2_port = free_port(), free_port()
    convex_log = logs / "convex.log"
    convex = procs.spawn(
        ["node", "--import", "tsx", "tests/convex_server/server.mjs", str(convex_port)],
        minimal_env(CONVEX_TEST_DEPLOY_KEY=DEPLOY_KEY),
        ROOT,  # node finds tsx and convex-test in the repo's node_modules
        convex_log,
    )
    # moto comes with the dev venv (requirements-dev.txt), which runs this harness.
    moto_log = logs / "moto.log"
    moto = procs.spawn(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(r2_port)],
        minimal_env(),
        cwd,
        moto_log,
    )
    wait_for_convex(convex_port, convex, convex_log)
    wait_for_port(r2_port, moto, moto_log)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Upstreams(
        f"http://{LOOPBACK}:{convex_port}", convex.pid, f"http://{LOOPBACK}:{r2_port}", key
    )


def wait_for_convex(port: int, process: Any, log: Path) -> None:
    # The imitation loads every module and the schema before it listens; then /_test/health.
    wait_for_port(port, process, log)
    deadline = time.monotonic() + CONVEX_START_SECONDS
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{LOOPBACK}:{port}/_test/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the Convex imitation did not become healthy; see {log}")
