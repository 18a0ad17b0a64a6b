"""Hostile input at every parser: never a 5xx, always `{"detail", "code"}`, nothing charged.

Two halves. First the known examples of each class of defect (issue 11): deep nesting, integers
past SQLite's range, lone surrogates, malformed webhooks that carry a valid proof, log
injection. Then hypothesis throws generated values at every body, header, query parameter,
cursor, webhook body (validly signed, and validly tokened) and Idempotency-Key, against the
in-process app with RunPod mocked at the transport, and checks the same rule after each answer,
credits and the ledger audit included. Derandomized and bounded, so `make test` runs the same
examples every time in a few seconds.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, quote_from_bytes

import httpx
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RUNPOD_URL, WEBHOOK_SECRET, AppClient, TokenFactory, bearer, serve
from tests.stores import CONVEX_TEST_KEY, reset_convex
from webhooks import sign_body, webhook_token

JOB: dict[str, Any] = {
    "prompt": "A silver drone flies through neon skyline",
    "durationSec": 1,
    "seed": 42,
}
START_CREDITS = 10_000
DEEP = 10_000  # the depth: far past Python's recursion limit

# One app per test, shared by its examples; derandomized, so a failure replays exactly.
HOSTILE = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- The app, a user with credits, and RunPod --------------------------------------------------


def _status_answer(request: httpx.Request) -> httpx.Response:
    """RunPod's `/status`: the job it was asked about, still running (its real shape)."""
    runpod_id = request.url.path.rsplit("/", 1)[-1]
    return httpx.Response(200, json={"id": runpod_id, "status": "IN_PROGRESS"})


@pytest.fixture
def runpod() -> Any:
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{RUNPOD_URL}/run").respond(200, json={"id": "rp-1", "status": "IN_QUEUE"})
        mock.get(url__regex=rf"{re.escape(RUNPOD_URL)}/status/.*").mock(side_effect=_status_answer)
        mock.post(url__regex=rf"{re.escape(RUNPOD_URL)}/cancel/.*").respond(
            200, json={"id": "rp-1", "status": "CANCELLED"}
        )
        mock.route(host="127.0.0.1").pass_through()  # the Convex test server is real
        yield mock


@pytest.fixture
async def app(settings_factory, runpod) -> AsyncIterator[httpx.AsyncClient]:
    # Room for every generated create: the limits are not what these tests probe.
    settings_ = settings_factory(
        max_concurrent_jobs=1000, cors_allow_origins=["https://app.example.com"]
    )
    async with serve(settings_) as client:
        store = client.app_state["store"]
        await store.grant_credits("user_alice", START_CREDITS - 100, "hostile-input tests")
        yield client


@pytest.fixture
async def convex_app(settings_factory, runpod, convex_server) -> AsyncIterator[httpx.AsyncClient]:
    """The same app on the real Convex functions (convex-test), for what reaches the store."""
    reset_convex(convex_server)
    settings_ = settings_factory(
        max_concurrent_jobs=1000, convex_url=convex_server, convex_deploy_key=CONVEX_TEST_KEY
    )
    async with serve(settings_) as client:
        store = client.app_state["store"]
        await store.grant_credits("user_alice", START_CREDITS - 100, "hostile-input tests")
        yield client


@pytest.fixture
def alice(make_token: TokenFactory) -> dict[str, str]:
    return bearer(make_token("user_alice", ttl=600))


async def a_job(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.post("/jobs/create", json=JOB, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["jobId"]


async def balance(client: AppClient) -> int:
    store = client.app_state["store"]
    return (await store.get_or_create_user("user_alice")).credits


def assert_refusal_shape(response: httpx.Response) -> None:
    """The rule: never a 5xx; a refusal is JSON with a non-empty `detail` and `code`."""
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict), body
        assert isinstance(body.get("detail"), str) and body["detail"], body
        assert isinstance(body.get("code"), str) and body["code"], body


async def assert_books_balance(client: AppClient) -> None:
    store = client.app_state["store"]
    assert await store.audit() == []


async def assert_nothing_charged(
    client: AppClient, response: httpx.Response, before: int, cost: Any = None
) -> None:
    """A refused request moved no credit; an accepted create cost exactly its price, once."""
    assert_refusal_shape(response)
    cost = JOB["durationSec"] if cost is None else cost
    charged = cost if response.status_code == 200 and _created(response) else 0
    assert await balance(client) == before - charged
    await assert_books_balance(client)


def _created(response: httpx.Response) -> bool:
    replayed = response.headers.get("idempotent-replayed") == "true"
    return response.request.url.path == "/jobs/create" and not replayed


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def signed(raw: bytes) -> dict[str, str]:
    return {"x-runpod-signature": sign_body(WEBHOOK_SECRET, raw)}


def tokened_url(job_id: str) -> str:
    return f"/webhooks/runpod?jobId={job_id}&token={webhook_token(WEBHOOK_SECRET, job_id)}"


# --- 1. The known examples, one per class -----------------------------------------------------

NESTED = [b"[" * DEEP + b"]" * DEEP, b'{"id":' * DEEP + b"1" + b"}" * DEEP]
# Under the 64 KiB limit of a create body: `{"id":` 10,000 deep would be a 413.
NESTED_SMALL = [b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP]


class TestDeepNesting:
    @pytest.mark.parametrize("raw", NESTED, ids=["array", "object"])
    async def test_signed_webhook_is_400(self, app, alice, raw) -> None:
        before = await balance(app)
        response = await app.post("/webhooks/runpod", content=raw, headers=signed(raw))
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
        await assert_nothing_charged(app, response, before)

    @pytest.mark.parametrize("raw", NESTED, ids=["array", "object"])
    async def test_tokened_webhook_is_400(self, app, alice, raw) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        response = await app.post(tokened_url(job_id), content=raw)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
        await assert_nothing_charged(app, response, before)
        job = (await app.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["status"] == "queued"

    @pytest.mark.parametrize("raw", NESTED_SMALL, ids=["array", "object"])
    async def test_create_body_is_400(self, app, alice, raw) -> None:
        before = await balance(app)
        headers = {**alice, "content-type": "application/json"}
        response = await app.post("/jobs/create", content=raw, headers=headers)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
        await assert_nothing_charged(app, response, before)

    async def test_cursor_is_400(self, app, alice) -> None:
        response = await app.get("/jobs", params={"cursor": b64(b"[" * 380)}, headers=alice)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_CURSOR"


class TestHugeIntegers:
    @pytest.mark.parametrize("created_at", [10**30, -(10**30), 2**63, True, 1e300])
    async def test_cursor_is_invalid_cursor(self, app, alice, created_at) -> None:
        cursor = b64(json.dumps([created_at, "job_x"]).encode())
        response = await app.get("/jobs", params={"cursor": cursor}, headers=alice)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_CURSOR"

    async def test_create_fields_are_400(self, app, alice) -> None:
        before = await balance(app)
        for field in ("durationSec", "seed"):
            response = await app.post("/jobs/create", json={**JOB, field: 10**30}, headers=alice)
            assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
            await assert_nothing_charged(app, response, before)


LONE = "\ud800"


class TestLoneSurrogates:
    @pytest.mark.parametrize(
        "changes",
        [
            {"prompt": f"a drone {LONE}"},
            {"imageUrl": f"https://images.example.com/{LONE}.png"},
            {"imageUrl": f"https://images.example.com/a.png?q={LONE}"},
            {"durationSec": LONE},
            {"seed": [LONE]},
        ],
    )
    async def test_create_is_400_at_validation(self, app, alice, changes) -> None:
        before = await balance(app)
        # ensure_ascii (json's default) writes the surrogate as the escape "\ud800".
        raw = json.dumps({**JOB, **changes}).encode()
        headers = {**alice, "content-type": "application/json"}
        response = await app.post("/jobs/create", content=raw, headers=headers)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
        [field] = changes
        [error] = response.json()["errors"]
        assert error["field"] == field and "surrogate" in error["message"]
        # Worded as every other field error: the field's name, then the rule it broke.
        assert error["message"].startswith(f"{field} must be valid Unicode text")
        await assert_nothing_charged(app, response, before)

    async def test_a_surrogate_key_is_400(self, app, alice) -> None:
        raw = json.dumps({**JOB, LONE: 1}).encode()
        headers = {**alice, "content-type": "application/json"}
        response = await app.post("/jobs/create", content=raw, headers=headers)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"

    async def test_signed_webhook_fields_are_400(self, app, alice) -> None:
        job_id = await a_job(app, alice)
        for payload in (
            {"id": LONE, "status": "COMPLETED"},
            {"id": "rp-1", "status": LONE},
            {"id": "rp-1", "status": "COMPLETED", "input": {"jobId": LONE}},
        ):
            raw = json.dumps(payload).encode()
            response = await app.post("/webhooks/runpod", content=raw, headers=signed(raw))
            assert response.status_code == 400, response.text
        assert (await app.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    async def test_a_workers_error_keeps_its_words(self, app, alice) -> None:
        job_id = await a_job(app, alice)
        payload = {"id": "rp-1", "status": "FAILED", "input": {"jobId": job_id}}
        raw = json.dumps({**payload, "error": f"CUDA {LONE} out of memory"}).encode()
        response = await app.post("/webhooks/runpod", content=raw, headers=signed(raw))
        assert response.status_code == 200 and response.json()["status"] == "failed"
        job = (await app.get(f"/jobs/{job_id}", headers=alice)).json()
        assert job["error"] == {"code": "WORKER_FAILED", "detail": "CUDA \ufffd out of memory"}
        assert await balance(app) == START_CREDITS  # refunded


class TestMalformedProvenWebhooks:
    @pytest.mark.parametrize(
        "payload",
        [
            {"status": "COMPLETED"},
            {"id": "rp-1"},
            {"id": 7, "status": "COMPLETED"},
            {"id": "rp-1", "status": ["COMPLETED"]},
            {"id": "", "status": "COMPLETED"},
            {"id": "../../v2/x", "status": "COMPLETED"},
            {"id": "rp-1", "status": "COMPLETED", "input": "job_x"},
            {"id": "rp-1", "status": "COMPLETED", "input": {"jobId": 12}},
            [1],
            "COMPLETED",
        ],
    )
    async def test_signed_is_400(self, app, alice, payload) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        raw = json.dumps(payload).encode()
        response = await app.post("/webhooks/runpod", content=raw, headers=signed(raw))
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
        await assert_nothing_charged(app, response, before)
        assert (await app.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    @pytest.mark.parametrize(
        "payload", [{"id": "../../v2/x"}, {"id": 7}, {"id": "rp-2", "status": 1}, [1], b"nope"]
    )
    async def test_tokened_is_400_and_never_reaches_runpod(
        self, app, alice, runpod, payload
    ) -> None:
        with respx.mock:  # the job's /run answer was lost: no RunPod id is recorded
            respx.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ReadTimeout("lost"))
            job_id = (await app.post("/jobs/create", json=JOB, headers=alice)).json()["jobId"]
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response = await app.post(tokened_url(job_id), content=raw)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_REQUEST"
        assert not any("/v2/x" in str(call.request.url) for call in runpod.calls)

    async def test_non_ascii_token_is_401(self, app, alice) -> None:
        job_id = await a_job(app, alice)
        response = await app.post(f"/webhooks/runpod?jobId={job_id}&token=%C3%A9", json={})
        assert response.status_code == 401 and response.json()["code"] == "INVALID_SIGNATURE"

    @pytest.mark.parametrize("header", [b"t=1,v1=\xe9", b"t=\xb2,v1=ab", b"t=\xb9\xb2\xb3,v1=ab"])
    async def test_non_ascii_signature_is_401(self, app, header) -> None:
        response = await app.post(
            "/webhooks/runpod", content=b"{}", headers=[(b"x-runpod-signature", header)]
        )
        assert response.status_code == 401 and response.json()["code"] == "INVALID_SIGNATURE"


# --- 2. Generated hostile values --------------------------------------------------------------

# Strings that have broken parsers somewhere: surrogates, controls, separators, traversal,
# injections, numbers that do not fit, and the empty string.
NASTY_STRINGS = [
    "",
    LONE,
    "\udfff",
    "a\ud800b",
    "\x00",
    "\n",
    "\r\n",
    "\u2028",
    "\u202e",
    "\ufeff",
    "%00",
    "../../v2/x",
    "job_" + "A" * 16,
    "job_" + "A" * 16 + "\n",
    "' OR 1=1 --",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "1e400",
    "²",  # a digit to str.isdigit(), not to int()
    "9999999999²",
    str(10**30),
    "NaN",
    "é" * 3000,
]
nasty_text = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=40),
    # st.text leaves out surrogates and controls; this alphabet is mostly them.
    st.text(
        alphabet=st.characters(categories=["Cs", "Cc", "Cf", "Zl", "Zp", "Co", "Lo"]), max_size=20
    ),
)
huge_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([10**30, -(2**63), 2**64])
)
json_scalars = st.one_of(
    st.none(), st.booleans(), huge_ints, st.floats(allow_nan=False), nasty_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=12,
)
deep_json = st.integers(min_value=500, max_value=DEEP).flatmap(
    lambda depth: st.sampled_from(
        [b"[" * depth + b"]" * depth, b'{"id":' * depth + b"0" + b"}" * depth, b"[" * depth]
    )
)


def encode(value: Any) -> bytes:
    # Infinity included: JSON has none, but Python writes and reads it, and so may a client.
    return json.dumps(value).encode()


raw_bodies = st.one_of(json_values.map(encode), deep_json, st.binary(max_size=200))
# A create body: each field valid, hostile, or missing; sometimes a stray extra field.
create_bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.just(JOB["prompt"]), json_values),
        "imageUrl": st.one_of(st.none(), st.just("https://images.example.com/a.png"), json_values),
        "durationSec": st.one_of(st.just(1), json_values),
        "seed": st.one_of(st.just(7), json_values),
        "extra": json_values,
    },
)
# Header values as the server hands them over: any byte but CR and LF (the framing).
header_bytes = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([s.encode("utf-8", "surrogatepass") for s in NASTY_STRINGS]),
).filter(lambda b: b"\r" not in b and b"\n" not in b)


def _jwt_like(header: bytes, claims: bytes, signature: bytes) -> bytes:
    return b".".join(
        base64.urlsafe_b64encode(part).rstrip(b"=") for part in (header, claims, signature)
    )


session_tokens = st.one_of(
    header_bytes,
    st.tuples(raw_bodies, raw_bodies, st.binary(max_size=64)).map(lambda t: _jwt_like(*t)),
)
# Query values as bytes, percent-encoded on the wire: "%ED%A0%80" is what a surrogate becomes.
query_bytes = st.one_of(
    st.binary(max_size=100),
    nasty_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: b64(encode(v)).encode()),  # hostile cursors
)


def query(**values: bytes) -> str:
    return "&".join(f"{name}={quote_from_bytes(value, safe='')}" for name, value in values.items())


class TestGeneratedBodies:
    @HOSTILE
    @given(body=create_bodies)
    async def test_create_json(self, app, alice, body) -> None:
        before = await balance(app)
        headers = {**alice, "content-type": "application/json"}
        response = await app.post("/jobs/create", content=encode(body), headers=headers)
        # 1 credit a second: an accepted body cost its own durationSec.
        await assert_nothing_charged(app, response, before, cost=body.get("durationSec"))

    @HOSTILE
    @given(
        raw=raw_bodies,
        content_type=st.sampled_from(
            ["application/json", "text/plain", "", "application/json; charset=utf-16"]
        ),
    )
    async def test_create_raw(self, app, alice, raw, content_type) -> None:
        before = await balance(app)
        headers = {**alice, "content-type": content_type}
        response = await app.post("/jobs/create", content=raw, headers=headers)
        await assert_nothing_charged(app, response, before)

    @HOSTILE
    @given(raw=raw_bodies, path=st.sampled_from(["/jobs/{job}/cancel", "/credits", "/jobs"]))
    async def test_bodies_where_none_belong(self, app, alice, raw, path) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        response = await app.post(path.format(job=job_id), content=raw, headers=alice)
        assert_refusal_shape(response)
        refund = JOB["durationSec"] if response.status_code == 200 else 0  # a cancel refunds
        assert await balance(app) == before + refund
        await assert_books_balance(app)


class TestGeneratedWebhooks:
    @HOSTILE
    @given(payload=json_values, job_id_field=st.booleans())
    async def test_signed(self, app, alice, payload, job_id_field) -> None:
        job_id = await a_job(app, alice)
        if job_id_field and isinstance(payload, dict):
            payload = {**payload, "input": {"jobId": job_id}}
        before = await balance(app)
        raw = encode(payload)
        response = await app.post("/webhooks/runpod", content=raw, headers=signed(raw))
        assert_refusal_shape(response)
        assert await balance(app) >= before  # a proven FAILED may refund, never charge
        await assert_books_balance(app)

    @HOSTILE
    @given(raw=raw_bodies)
    async def test_signed_raw(self, app, raw) -> None:
        response = await app.post("/webhooks/runpod", content=raw, headers=signed(raw))
        assert_refusal_shape(response)

    @HOSTILE
    @given(raw=st.one_of(raw_bodies, json_values.map(lambda v: encode({"id": v}))))
    async def test_tokened(self, app, alice, raw) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        response = await app.post(tokened_url(job_id), content=raw)
        assert_refusal_shape(response)
        assert await balance(app) >= before
        await assert_books_balance(app)

    @HOSTILE
    @given(runpod_id=st.one_of(json_values, st.sampled_from(["rp-2", "../../v2/x", "a?b", "%2e"])))
    async def test_tokened_before_the_runpod_id_is_known(self, app, alice, runpod_id) -> None:
        """The one case where the body's id reaches a RunPod URL: it must be checked first."""
        with respx.mock(assert_all_called=False) as lost:
            lost.post(f"{RUNPOD_URL}/run").mock(side_effect=httpx.ReadTimeout("lost"))
            status = lost.get(url__regex=rf"{re.escape(RUNPOD_URL)}/status/.*")
            status.mock(side_effect=_status_answer)
            job_id = (await app.post("/jobs/create", json=JOB, headers=alice)).json()["jobId"]
            before = await balance(app)
            response = await app.post(tokened_url(job_id), content=encode({"id": runpod_id}))
        assert_refusal_shape(response)
        for call in status.calls:
            assert call.request.url.path.rsplit("/", 1)[-1] == runpod_id  # only a clean id
        assert await balance(app) >= before
        await assert_books_balance(app)


class TestGeneratedHeaders:
    @HOSTILE
    @given(token=session_tokens, as_cookie=st.booleans())
    async def test_session(self, app, token, as_cookie) -> None:
        before = await balance(app)
        name = b"cookie" if as_cookie else b"authorization"
        value = b"__session=" + token if as_cookie else b"Bearer " + token
        response = await app.post("/jobs/create", content=encode(JOB), headers=[(name, value)])
        assert response.status_code in (400, 401, 403), response.text
        await assert_nothing_charged(app, response, before)

    @HOSTILE
    @given(
        # Every other header the gateway or its telemetry reads.
        name=st.sampled_from(
            [
                b"idempotency-key",
                b"x-request-id",
                b"origin",
                b"content-type",
                b"cookie",
                b"user-agent",
                b"x-cloud-trace-context",
                b"traceparent",
                b"accept",
            ]
        ),
        value=header_bytes,
    )
    async def test_on_create(self, app, alice, name, value) -> None:
        before = await balance(app)
        headers = [(k.encode(), v.encode()) for k, v in alice.items()] + [(name, value)]
        response = await app.post("/jobs/create", content=encode(JOB), headers=headers)
        await assert_nothing_charged(app, response, before)

    @HOSTILE
    @given(value=header_bytes, body=st.sampled_from([b"{}", b'{"id":"rp-1","status":"FAILED"}']))
    async def test_signature(self, app, alice, value, body) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        headers = [(b"x-runpod-signature", value)]
        response = await app.post("/webhooks/runpod", content=body, headers=headers)
        assert response.status_code in (400, 401), response.text
        await assert_nothing_charged(app, response, before)
        assert (await app.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"

    @HOSTILE
    @given(key=st.one_of(header_bytes, st.sampled_from([b"k1", b"k2", b"a" * 255, b"a" * 256])))
    async def test_idempotency_key_twice(self, app, alice, key) -> None:
        before = await balance(app)
        headers = [(k.encode(), v.encode()) for k, v in alice.items()]
        headers.append((b"idempotency-key", key))
        first = await app.post("/jobs/create", content=encode(JOB), headers=headers)
        second = await app.post("/jobs/create", content=encode(JOB), headers=headers)
        for response in (first, second):
            assert_refusal_shape(response)
        fresh = {r.json()["jobId"] for r in (first, second) if r.status_code == 200}
        assert len(fresh) <= 1  # one key, one job: a retry never charges twice
        if first.headers.get("idempotent-replayed") == "true":
            fresh = set()  # k1 again in a later example: the first answer, replayed
        assert await balance(app) == before - JOB["durationSec"] * len(fresh)
        await assert_books_balance(app)


class TestGeneratedStorageUrls:
    """The local stand-in for R2 serves signed URLs on the gateway itself (local mode)."""

    @HOSTILE
    @given(
        key=nasty_text,
        # A far-future expiry half the time, so the signature check itself is reached.
        expires=st.one_of(query_bytes, st.just(b"99999999999")),
        sig=query_bytes,
        method=st.sampled_from(["GET", "PUT"]),
    )
    async def test_signed_url(self, app, key, expires, sig, method) -> None:
        path = quote(key.encode("utf-8", "surrogatepass"), safe="/")
        url = f"/_local/storage/videos/{path}.mp4?{query(expires=expires, sig=sig)}"
        response = await app.request(method, url, content=b"mp4" if method == "PUT" else None)
        assert response.status_code in (403, 404), response.text
        assert_refusal_shape(response)


class TestGeneratedPreflights:
    @HOSTILE
    @given(origin=header_bytes, method=header_bytes, headers=header_bytes)
    async def test_preflight(self, app, origin, method, headers) -> None:
        response = await app.options(
            "/jobs/create",
            headers=[
                (b"origin", origin),
                (b"access-control-request-method", method),
                (b"access-control-request-headers", headers),
            ],
        )
        assert_refusal_shape(response)


class TestGeneratedCancels:
    @HOSTILE
    @given(key=st.one_of(header_bytes, st.sampled_from([b"c1", b"c2"])))
    async def test_idempotency_key(self, app, alice, key) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        headers = [(k.encode(), v.encode()) for k, v in alice.items()]
        headers.append((b"idempotency-key", key))
        first = await app.post(f"/jobs/{job_id}/cancel", headers=headers)
        again = await app.post(f"/jobs/{job_id}/cancel", headers=headers)
        for response in (first, again):
            assert_refusal_shape(response)
        # A key reused from an earlier example on another job is a 409, and refunds nothing.
        refunded = JOB["durationSec"] if first.status_code == 200 else 0
        assert await balance(app) == before + refunded  # refunded once, whatever the retries
        await assert_books_balance(app)


class TestGeneratedDeletes:
    @HOSTILE
    @given(key=st.one_of(header_bytes, st.sampled_from([b"d1", b"d2"])))
    async def test_idempotency_key_on_a_live_job(self, app, alice, key) -> None:
        job_id = await a_job(app, alice)
        before = await balance(app)
        headers = [(k.encode(), v.encode()) for k, v in alice.items()]
        headers.append((b"idempotency-key", key))
        first = await app.delete(f"/jobs/{job_id}", headers=headers)
        again = await app.delete(f"/jobs/{job_id}", headers=headers)
        for response in (first, again):
            assert_refusal_shape(response)
            assert response.status_code in (400, 409), response.text  # never deleted: it is live
        assert (await app.get(f"/jobs/{job_id}", headers=alice)).json()["status"] == "queued"
        assert await balance(app) == before
        await assert_books_balance(app)


class TestGeneratedQueries:
    @HOSTILE
    @given(limit=query_bytes, cursor=query_bytes)
    async def test_list(self, app, alice, limit, cursor) -> None:
        response = await app.get(f"/jobs?{query(limit=limit, cursor=cursor)}", headers=alice)
        assert_refusal_shape(response)

    @HOSTILE
    @given(cursor=json_values.map(lambda v: b64(encode(v))))
    async def test_cursor(self, app, alice, cursor) -> None:
        response = await app.get("/jobs", params={"cursor": cursor}, headers=alice)
        assert response.status_code == 400 and response.json()["code"] in (
            "INVALID_CURSOR",
            "INVALID_REQUEST",  # over 512 characters
        )

    @HOSTILE
    @given(job_id=query_bytes, token=query_bytes, real_token=st.booleans())
    async def test_webhook_proof(self, app, alice, job_id, token, real_token) -> None:
        before = await balance(app)
        if real_token:
            text = job_id.decode("utf-8", "replace")
            token = webhook_token(WEBHOOK_SECRET, text).encode()
        url = f"/webhooks/runpod?{query(jobId=job_id, token=token)}"
        response = await app.post(url, content=b"{}")
        assert response.status_code in (400, 401, 404), response.text
        await assert_nothing_charged(app, response, before)

    @HOSTILE
    @given(job_id=nasty_text, method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]))
    async def test_job_path(self, app, alice, job_id, method) -> None:
        before = await balance(app)
        path = quote(job_id.encode("utf-8", "surrogatepass"), safe="")
        suffix = "/cancel" if method == "POST" else ""
        response = await app.request(method, f"/jobs/{path}{suffix}", headers=alice)
        # 307: the empty id, "/jobs/", is redirected to "/jobs" (FastAPI's trailing-slash rule).
        assert response.status_code in (307, 400, 404, 405), response.text
        if method != "HEAD":
            await assert_nothing_charged(app, response, before)


# Fewer examples: each one is several Convex calls over HTTP.
ON_CONVEX = settings(HOSTILE, max_examples=15)


class TestOnConvex:
    """What reaches the store, on the production store's real functions too."""

    @ON_CONVEX
    @given(cursor=query_bytes)
    async def test_cursor(self, convex_app, alice, cursor) -> None:
        response = await convex_app.get(f"/jobs?{query(cursor=cursor)}", headers=alice)
        assert_refusal_shape(response)
        # 200 only for bytes that happen to be a convex-test cursor (its cursors are JSON text).
        assert response.status_code in (200, 400), response.text

    async def test_huge_integer_cursor(self, convex_app, alice) -> None:
        cursor = b64(json.dumps([10**30, "job_x"]).encode())
        response = await convex_app.get("/jobs", params={"cursor": cursor}, headers=alice)
        assert response.status_code == 400 and response.json()["code"] == "INVALID_CURSOR"

    @ON_CONVEX
    @given(body=create_bodies)
    async def test_create_json(self, convex_app, alice, body) -> None:
        before = await balance(convex_app)
        headers = {**alice, "content-type": "application/json"}
        response = await convex_app.post("/jobs/create", content=encode(body), headers=headers)
        await assert_nothing_charged(convex_app, response, before, cost=body.get("durationSec"))
