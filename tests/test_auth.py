"""Tests for `auth.py`: Clerk session token verification, the JWKS cache and the dev issuer.

Keys are generated here with `cryptography`, tokens are signed with PyJWT, and the JWKS URL is
mocked at the httpx transport with respx. The clock is injected, so no test sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.requests import Request

from auth import (
    CLOCK_SKEW_SECONDS,
    DEV_ISSUER,
    ClerkAuth,
    Principal,
    VerifiedTokens,
    dev_jwks,
    dev_public_key_pem,
    ensure_dev_key,
    mint_dev_token,
    token_from_request,
)
from config import Settings
from errors import AuthUnavailable, Unauthorized

ISSUER = "https://clerk.cineweave.test"
JWKS_URL = f"{ISSUER}/.well-known/jwks.json"
ORIGIN = "https://app.cineweave.test"
START = 1_700_000_000.0
ABSENT = object()  # a claim override that removes the claim


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    # Cached per name: generating RSA keys is the slow part of this module.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class Signer:
    """A key pair with a `kid`, as Clerk would hold one."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @property
    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    @property
    def jwk(self) -> dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def sign(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None | object = ABSENT,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
    ) -> str:
        header: dict[str, Any] = dict(headers or {})
        if kid is ABSENT:
            header["kid"] = self.kid
        elif kid is not None:
            header["kid"] = kid
        return jwt.encode(claims, self.private_key, algorithm=alg, headers=header)


def session_claims(now: float, **overrides: Any) -> dict[str, Any]:
    """The claims of a Clerk v2 session token issued at `now`, with `overrides` applied."""
    claims: dict[str, Any] = {
        "sub": "user_123",
        "sid": "sess_456",
        "iss": ISSUER,
        "azp": ORIGIN,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 60,
        "jti": secrets.token_hex(8),
        "v": 2,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not ABSENT}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: object) -> str:
    return b64url(json.dumps(value).encode())


def jwks_document(*signers: Signer) -> dict[str, Any]:
    return {"keys": [signer.jwk for signer in signers]}


def jwks_response(*signers: Signer) -> httpx.Response:
    return httpx.Response(200, json=jwks_document(*signers))


def make_settings(**overrides: Any) -> Settings:
    # Every Clerk field is explicit and `.env` is ignored, so the developer's shell cannot leak in.
    values: dict[str, Any] = {
        "gateway_env": "local",
        "clerk_issuer": ISSUER,
        "clerk_jwks_url": None,
        "clerk_jwt_key": None,
        "clerk_authorized_parties": [ORIGIN],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def make_request(headers: dict[str, str]) -> Request:
    raw = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
    ]
    return Request(
        {"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""}
    )


async def assert_rejected(auth: ClerkAuth, token: str, reason: str) -> None:
    """`verify` refuses `token` with a 401 whose detail names `reason`."""
    with pytest.raises(Unauthorized) as caught:
        await auth.verify(token)
    error = caught.value
    assert (error.status_code, error.code) == (401, "UNAUTHORIZED")
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert reason in error.detail


async def assert_unavailable(auth: ClerkAuth, token: str) -> None:
    with pytest.raises(AuthUnavailable) as caught:
        await auth.verify(token)
    assert (caught.value.status_code, caught.value.code) == (503, "AUTH_UNAVAILABLE")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def signer() -> Signer:
    return Signer("key_a", rsa_key("a"))


@pytest.fixture
def second_signer() -> Signer:
    return Signer("key_b", rsa_key("b"))


@pytest.fixture
def jwks() -> Iterator[respx.Route]:
    # Any request to another URL fails the test: nothing here may reach the network.
    with respx.mock(assert_all_called=False) as router:
        yield router.get(JWKS_URL)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0)) as client:
        yield client


@pytest.fixture
def jwks_auth(
    http: httpx.AsyncClient, clock: FakeClock, jwks: respx.Route, signer: Signer
) -> ClerkAuth:
    jwks.mock(return_value=jwks_response(signer))
    return ClerkAuth(make_settings(), http, clock=clock)


@pytest.fixture
def pem_auth(
    http: httpx.AsyncClient, clock: FakeClock, jwks: respx.Route, signer: Signer
) -> ClerkAuth:
    return ClerkAuth(make_settings(clerk_jwt_key=signer.public_pem), http, clock=clock)


class TestValidTokens:
    async def test_pem_key(
        self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        principal = await pem_auth.verify(signer.sign(session_claims(clock())))
        assert (principal.user_id, principal.session_id) == ("user_123", "sess_456")
        assert principal.claims["v"] == 2
        assert jwks.call_count == 0

    async def test_jwks(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        principal = await jwks_auth.verify(signer.sign(session_claims(clock())))
        assert principal == Principal("user_123", "sess_456", principal.claims)
        assert jwks.call_count == 1

    @pytest.mark.parametrize("alg", ["RS384", "RS512"])
    async def test_other_rsa_algorithms(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, alg: str
    ) -> None:
        principal = await jwks_auth.verify(signer.sign(session_claims(clock()), alg=alg))
        assert principal.user_id == "user_123"

    async def test_pem_key_on_one_line_with_escaped_newlines(
        self, http: httpx.AsyncClient, signer: Signer, clock: FakeClock
    ) -> None:
        one_line = signer.public_pem.strip().replace("\n", "\\n")
        auth = ClerkAuth(make_settings(clerk_jwt_key=one_line), http, clock=clock)
        principal = await auth.verify(signer.sign(session_claims(clock())))
        assert principal.user_id == "user_123"

    async def test_no_kid_with_one_jwks_key(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        principal = await jwks_auth.verify(signer.sign(session_claims(clock()), kid=None))
        assert principal.user_id == "user_123"

    async def test_without_sid(self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock) -> None:
        principal = await pem_auth.verify(signer.sign(session_claims(clock(), sid=ABSENT)))
        assert principal.session_id is None


class TestAuthenticate:
    async def test_bearer_header(
        self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock()))
        principal = await pem_auth.authenticate(make_request({"Authorization": f"Bearer {token}"}))
        assert principal.user_id == "user_123"

    async def test_session_cookie(
        self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock()))
        principal = await pem_auth.authenticate(make_request({"Cookie": f"__session={token}"}))
        assert principal.user_id == "user_123"

    async def test_bearer_preferred_over_cookie(
        self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        bearer = signer.sign(session_claims(clock(), sub="user_bearer"))
        cookie = signer.sign(session_claims(clock(), sub="user_cookie"))
        request = make_request(
            {"Authorization": f"bearer {bearer}", "Cookie": f"__session={cookie}"}
        )
        principal = await pem_auth.authenticate(request)
        assert principal.user_id == "user_bearer"

    async def test_other_scheme_falls_back_to_cookie(
        self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock()))
        request = make_request(
            {"Authorization": "Basic dXNlcjpwdw==", "Cookie": f"__session={token}"}
        )
        principal = await pem_auth.authenticate(request)
        assert principal.user_id == "user_123"

    async def test_missing_token(self, pem_auth: ClerkAuth) -> None:
        assert token_from_request(make_request({"Authorization": "Bearer "})) is None
        with pytest.raises(Unauthorized) as caught:
            await pem_auth.authenticate(make_request({}))
        assert (caught.value.status_code, caught.value.code) == (401, "UNAUTHORIZED")
        assert caught.value.headers == {"WWW-Authenticate": "Bearer"}


class TestHostileTokens:
    async def test_alg_none(self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock) -> None:
        header = {"alg": "none", "typ": "JWT", "kid": signer.kid}
        token = f"{b64json(header)}.{b64json(session_claims(clock()))}."
        await assert_rejected(jwks_auth, token, "unsupported algorithm")

    async def test_hs256_signed_with_public_pem(
        self, pem_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        # PyJWT refuses to sign this, so forge it by hand: the classic key-confusion attack.
        signing_input = (
            f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(session_claims(clock()))}"
        )
        mac = hmac.new(signer.public_pem.encode(), signing_input.encode(), hashlib.sha256)
        await assert_rejected(pem_auth, f"{signing_input}.{b64url(mac.digest())}", "algorithm")

    async def test_unknown_kid(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock()), kid="key_unknown")
        await assert_rejected(jwks_auth, token, "unknown key")

    async def test_no_kid_with_two_keys(
        self,
        jwks_auth: ClerkAuth,
        jwks: respx.Route,
        signer: Signer,
        second_signer: Signer,
        clock: FakeClock,
    ) -> None:
        jwks.mock(return_value=jwks_response(signer, second_signer))
        token = signer.sign(session_claims(clock()), kid=None)
        await assert_rejected(jwks_auth, token, "no key id")

    async def test_expired(self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock) -> None:
        token = signer.sign(session_claims(clock() - 120))
        await assert_rejected(jwks_auth, token, "expired")

    async def test_expired_3s_ago_is_accepted_within_skew(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), exp=int(clock()) - 3))
        assert (await jwks_auth.verify(token)).user_id == "user_123"

    async def test_expired_exactly_skew_ago(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), exp=int(clock() - CLOCK_SKEW_SECONDS)))
        await assert_rejected(jwks_auth, token, "expired")

    async def test_nbf_in_future_beyond_skew(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), nbf=int(clock()) + 10))
        await assert_rejected(jwks_auth, token, "not valid yet")

    async def test_iat_in_future_beyond_skew(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), iat=int(clock()) + 10))
        await assert_rejected(jwks_auth, token, "not valid yet")

    async def test_wrong_issuer(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), iss="https://evil.clerk.accounts.dev"))
        await assert_rejected(jwks_auth, token, "issuer")

    async def test_missing_issuer(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), iss=ABSENT))
        await assert_rejected(jwks_auth, token, "issuer")

    async def test_wrong_azp(self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock) -> None:
        token = signer.sign(session_claims(clock(), azp="https://evil.test"))
        await assert_rejected(jwks_auth, token, "unauthorized party")

    async def test_azp_absent_is_accepted_like_clerk(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        # Decision: Clerk's SDK checks `azp` only when the token has one (native apps have none).
        token = signer.sign(session_claims(clock(), azp=ABSENT))
        assert (await jwks_auth.verify(token)).user_id == "user_123"

    async def test_missing_sub(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), sub=ABSENT))
        await assert_rejected(jwks_auth, token, "no subject")

    async def test_missing_exp(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), exp=ABSENT))
        await assert_rejected(jwks_auth, token, "no expiry")

    async def test_nan_exp(self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock) -> None:
        token = signer.sign(session_claims(clock(), exp=float("nan")))
        await assert_rejected(jwks_auth, token, "not a timestamp")

    async def test_tampered_payload(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        header, _, signature = signer.sign(session_claims(clock())).split(".")
        forged = b64json(session_claims(clock(), sub="user_admin"))
        await assert_rejected(jwks_auth, f"{header}.{forged}.{signature}", "signature")

    async def test_truncated_token(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock()))
        await assert_rejected(jwks_auth, token[:-12], "")

    async def test_100kb_token(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        token = signer.sign(session_claims(clock(), padding="x" * 100_000))
        await assert_rejected(jwks_auth, token, "too large")
        assert jwks.call_count == 0  # refused before any parsing or fetching

    @pytest.mark.parametrize("token", ["hello", "a.b.c", "", "ünïcode.a.b", "...."])
    async def test_not_a_jwt(self, jwks_auth: ClerkAuth, token: str) -> None:
        await assert_rejected(jwks_auth, token, "")

    @pytest.mark.parametrize(
        "header",
        [
            {"alg": ["RS256"], "kid": "key_a"},
            {"alg": {"RS256": 1}, "kid": "key_a"},
            {"alg": "RS256", "kid": 7},
            {"alg": "RS256", "kid": ["key_a"]},
            ["alg", "RS256"],
            "RS256",
        ],
    )
    async def test_weird_header_types(
        self, jwks_auth: ClerkAuth, clock: FakeClock, header: object
    ) -> None:
        token = f"{b64json(header)}.{b64json(session_claims(clock()))}.c2ln"
        await assert_rejected(jwks_auth, token, "")

    @pytest.mark.parametrize("payload", ["bm90IGpzb24", b64json(["a", "list"]), "%%%"])
    async def test_malformed_payload(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, payload: str
    ) -> None:
        header, _, signature = signer.sign(session_claims(clock())).split(".")
        await assert_rejected(jwks_auth, f"{header}.{payload}.{signature}", "")

    async def test_typ_at_jwt(self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock) -> None:
        token = signer.sign(session_claims(clock()), headers={"typ": "at+jwt"})
        await assert_rejected(jwks_auth, token, "wrong type")

    async def test_other_key_with_same_kid(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        attacker = Signer(signer.kid, rsa_key("attacker"))
        await assert_rejected(jwks_auth, attacker.sign(session_claims(clock())), "signature")


class TestJwksFetching:
    async def test_flood_of_random_kids_fetches_at_most_once_per_30s(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        await jwks_auth.load_keys()
        clock.advance(31)
        for _ in range(200):
            token = signer.sign(session_claims(clock()), kid=secrets.token_hex(8))
            await assert_rejected(jwks_auth, token, "unknown key")
        assert jwks.call_count == 2  # the warm-up plus one refetch

    async def test_another_fetch_allowed_after_31s(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        await jwks_auth.load_keys()
        for _ in range(20):
            await assert_rejected(jwks_auth, signer.sign(session_claims(clock()), kid="x"), "")
        assert jwks.call_count == 1
        clock.advance(31)
        await assert_rejected(jwks_auth, signer.sign(session_claims(clock()), kid="y"), "")
        assert jwks.call_count == 2

    async def test_concurrent_misses_share_one_fetch(
        self, http: httpx.AsyncClient, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        async def slow_jwks(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(0.05)
            return jwks_response(signer)

        jwks.mock(side_effect=slow_jwks)
        auth = ClerkAuth(make_settings(), http, clock=clock)
        tokens = [signer.sign(session_claims(clock())) for _ in range(20)]
        principals = await asyncio.gather(*(auth.verify(token) for token in tokens))
        assert {principal.user_id for principal in principals} == {"user_123"}
        assert jwks.call_count == 1

    async def test_cached_keys_verify_while_jwks_down(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        await jwks_auth.load_keys()
        jwks.mock(side_effect=httpx.ConnectError("connection refused"))
        clock.advance(301)  # stale, so verify tries (and fails) to refresh
        principal = await jwks_auth.verify(signer.sign(session_claims(clock())))
        assert principal.user_id == "user_123"
        assert jwks.call_count == 2

    async def test_jwks_down_with_nothing_cached(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        jwks.mock(side_effect=httpx.ConnectError("connection refused"))
        await assert_unavailable(jwks_auth, signer.sign(session_claims(clock())))

    async def test_jwks_5xx_with_nothing_cached(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route
    ) -> None:
        jwks.mock(return_value=httpx.Response(502, text="bad gateway"))
        await assert_unavailable(jwks_auth, signer.sign(session_claims(clock())))

    @pytest.mark.parametrize(
        "body",
        [b"<html>not json</html>", b'{"keys": "nope"}', b"[1, 2]", b'{"keys": []}'],
    )
    async def test_garbage_jwks(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock, jwks: respx.Route, body: bytes
    ) -> None:
        jwks.mock(return_value=httpx.Response(200, content=body))
        await assert_unavailable(jwks_auth, signer.sign(session_claims(clock())))

    async def test_key_rotation_picks_up_new_kid(
        self,
        jwks_auth: ClerkAuth,
        jwks: respx.Route,
        signer: Signer,
        second_signer: Signer,
        clock: FakeClock,
    ) -> None:
        await jwks_auth.load_keys()
        jwks.mock(return_value=jwks_response(signer, second_signer))
        clock.advance(31)
        principal = await jwks_auth.verify(second_signer.sign(session_claims(clock())))
        assert principal.user_id == "user_123"
        assert jwks.call_count == 2

    async def test_stale_cache_refreshes_after_5_minutes(
        self,
        jwks_auth: ClerkAuth,
        jwks: respx.Route,
        signer: Signer,
        second_signer: Signer,
        clock: FakeClock,
    ) -> None:
        await jwks_auth.load_keys()
        jwks.mock(return_value=jwks_response(second_signer))  # key_a rotated out
        clock.advance(301)
        await assert_rejected(jwks_auth, signer.sign(session_claims(clock())), "unknown key")
        assert jwks.call_count == 2

    async def test_unusable_jwks_entries_are_skipped(
        self, jwks_auth: ClerkAuth, jwks: respx.Route, signer: Signer, clock: FakeClock
    ) -> None:
        ec_public = ec.generate_private_key(ec.SECP256R1()).public_key()
        odd_keys = [
            {**ECAlgorithm.to_jwk(ec_public, as_dict=True), "kid": "key_ec"},
            {"kty": "oct", "k": b64url(b"secret"), "kid": "key_hmac"},
            {"kty": "RSA", "kid": "key_bad_n", "n": 12345, "e": "AQAB"},
            {**signer.jwk, "kid": "key_enc", "use": "enc"},
            "not a key",
        ]
        jwks.mock(return_value=httpx.Response(200, json={"keys": [*odd_keys, signer.jwk]}))
        assert (await jwks_auth.verify(signer.sign(session_claims(clock())))).user_id == "user_123"
        for kid in ("key_ec", "key_hmac", "key_bad_n", "key_enc"):
            await assert_rejected(jwks_auth, signer.sign(session_claims(clock()), kid=kid), "")

    async def test_load_keys_never_raises(
        self, jwks_auth: ClerkAuth, jwks: respx.Route, clock: FakeClock
    ) -> None:
        jwks.mock(side_effect=httpx.ConnectError("connection refused"))
        await jwks_auth.load_keys()
        assert not jwks_auth.keys_loaded
        jwks.mock(side_effect=None, return_value=httpx.Response(200, content=b"garbage"))
        clock.advance(31)
        await jwks_auth.load_keys()
        assert not jwks_auth.keys_loaded

    async def test_keys_loaded(self, jwks_auth: ClerkAuth, pem_auth: ClerkAuth) -> None:
        assert pem_auth.keys_loaded
        assert not jwks_auth.keys_loaded
        await jwks_auth.load_keys()
        assert jwks_auth.keys_loaded


class TestClaimsCache:
    async def test_second_verify_uses_cache(
        self,
        jwks_auth: ClerkAuth,
        jwks: respx.Route,
        signer: Signer,
        second_signer: Signer,
        clock: FakeClock,
    ) -> None:
        token = signer.sign(session_claims(clock(), exp=int(clock()) + 600))
        await jwks_auth.verify(token)
        jwks.mock(return_value=jwks_response(second_signer))  # key_a is gone from the JWKS
        clock.advance(301)
        # A fresh key_a token refreshes the stale JWKS, loses key_a from the key cache, fails...
        await assert_rejected(jwks_auth, signer.sign(session_claims(clock())), "unknown key")
        # ...but the token verified earlier is answered from the claims cache.
        assert (await jwks_auth.verify(token)).user_id == "user_123"
        assert jwks.call_count == 2

    async def test_cached_token_rejected_after_exp_plus_skew(
        self, jwks_auth: ClerkAuth, jwks: respx.Route, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock()))  # exp = start + 60
        await jwks_auth.verify(token)
        clock.advance(64)
        assert (await jwks_auth.verify(token)).user_id == "user_123"
        clock.advance(1)
        await assert_rejected(jwks_auth, token, "expired")
        assert jwks.call_count == 1  # answered from the cache, not re-verified

    async def test_rejected_tokens_are_not_cached(
        self, jwks_auth: ClerkAuth, signer: Signer, clock: FakeClock
    ) -> None:
        token = signer.sign(session_claims(clock(), nbf=int(clock()) + 30))
        await assert_rejected(jwks_auth, token, "not valid yet")
        clock.advance(30)
        assert (await jwks_auth.verify(token)).user_id == "user_123"

    def test_lru_is_bounded(self) -> None:
        cache = VerifiedTokens(max_entries=2)
        principals = [Principal(f"user_{n}", None, {"exp": 0}) for n in range(3)]
        cache.put(b"0", principals[0])
        cache.put(b"1", principals[1])
        assert cache.get(b"0") is principals[0]  # now the most recently used
        cache.put(b"2", principals[2])
        assert (cache.get(b"0"), cache.get(b"1"), cache.get(b"2")) == (
            principals[0],
            None,
            principals[2],
        )


class TestDevIssuer:
    def test_ensure_dev_key_is_stable(self, tmp_path: Path) -> None:
        first = ensure_dev_key(tmp_path)
        assert ensure_dev_key(tmp_path) == first
        assert first[0].startswith("-----BEGIN PRIVATE KEY-----")
        assert first[1].startswith("-----BEGIN PUBLIC KEY-----")

    def test_key_file_is_private(self, tmp_path: Path) -> None:
        ensure_dev_key(tmp_path / "nested")
        assert os.stat(tmp_path / "nested" / "dev_jwt_key.pem").st_mode & 0o777 == 0o600
        assert os.listdir(tmp_path / "nested") == ["dev_jwt_key.pem"]

    def test_public_half_is_kept_for_the_key_it_came_from(self, tmp_path: Path) -> None:
        public_pem = dev_public_key_pem(tmp_path)  # creates the pair, as a first start does
        assert public_pem == ensure_dev_key(tmp_path)[1]
        kept = tmp_path / "dev_jwt_key.pub"
        assert sorted(os.listdir(tmp_path)) == ["dev_jwt_key.pem", "dev_jwt_key.pub"]
        # A later start reads the kept half, not the private key (no key check: issue 13): a
        # kept text under the key file's digest is what it answers...
        digest = kept.read_text().split("\n", 1)[0]
        assert digest == hashlib.sha256((tmp_path / "dev_jwt_key.pem").read_bytes()).hexdigest()
        kept.write_text(f"{digest}\nkept half")
        assert dev_public_key_pem(tmp_path) == "kept half"
        kept.write_text(f"{digest}\n{public_pem}")
        assert dev_public_key_pem(tmp_path) == public_pem
        # ...but only while the key file is the one it was derived from.
        (tmp_path / "dev_jwt_key.pem").unlink()
        new_public_pem = dev_public_key_pem(tmp_path)
        assert new_public_pem != public_pem
        assert new_public_pem == ensure_dev_key(tmp_path)[1]
        assert kept.read_text().endswith(new_public_pem)

    def test_a_changed_key_file_is_checked_again(self, tmp_path: Path) -> None:
        dev_public_key_pem(tmp_path)
        (tmp_path / "dev_jwt_key.pem").write_text("not a key")
        with pytest.raises(ValueError):
            dev_public_key_pem(tmp_path)

    async def test_minted_token_verifies(self, tmp_path: Path, http: httpx.AsyncClient) -> None:
        _, public_pem = ensure_dev_key(tmp_path)
        local = make_settings(clerk_issuer=None, clerk_authorized_parties=[])
        auth = ClerkAuth(local, http, public_key_pem=public_pem)
        principal = await auth.verify(mint_dev_token(tmp_path, "user_dev"))
        assert principal.user_id == "user_dev"
        assert principal.session_id is not None
        assert principal.claims["iss"] == DEV_ISSUER
        assert principal.claims["v"] == 2
        assert principal.claims["exp"] - principal.claims["iat"] == 3600

    def test_dev_jwks(self, tmp_path: Path) -> None:
        _, public_pem = ensure_dev_key(tmp_path)
        public_key = serialization.load_pem_public_key(public_pem.encode())
        assert isinstance(public_key, rsa.RSAPublicKey)
        (jwk,) = dev_jwks(tmp_path)["keys"]
        assert (jwk["kid"], jwk["kty"], jwk["alg"]) == ("dev", "RSA", "RS256")
        numbers = public_key.public_numbers()
        assert int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "==")) == numbers.n
        assert int.from_bytes(base64.urlsafe_b64decode(jwk["e"] + "==")) == numbers.e

    async def test_dev_jwks_verifies_minted_token(
        self, tmp_path: Path, http: httpx.AsyncClient, jwks: respx.Route
    ) -> None:
        jwks.mock(return_value=httpx.Response(200, json=dev_jwks(tmp_path)))
        settings = make_settings(clerk_jwks_url=JWKS_URL, clerk_issuer=DEV_ISSUER)
        auth = ClerkAuth(settings, http)
        token = mint_dev_token(tmp_path, "user_dev")
        assert (await auth.verify(token)).user_id == "user_dev"
