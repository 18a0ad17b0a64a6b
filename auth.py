"""Clerk session tokens: verify them the way Clerk's own SDKs do, plus the local dev issuer.

Keys come from a PEM public key (`CLERK_JWT_KEY`, no network) or from the instance's JWKS, fetched
with the gateway's async HTTP client and cached by `kid`. Every verification failure is a 401
`Unauthorized`; having no key at all because the JWKS cannot be fetched is a 503 `AuthUnavailable`.

Over 400 lines because the local dev issuer (its key, JWKS and minted tokens, at the bottom) is
the other half of the same checks: local mode verifies its tokens through the very code path
production uses, and a rule changed here must change what the dev tokens carry in the same diff.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.types import Options
from starlette.requests import Request

from config import Settings
from errors import AuthUnavailable, Unauthorized

logger = logging.getLogger(__name__)

# Clerk signs with RSA only. A tuple, not a set: `alg` is untrusted JSON and may be unhashable.
ALGORITHMS = ("RS256", "RS384", "RS512")
# Clerk's SDKs allow 5 s of clock skew on exp, nbf and iat.
CLOCK_SKEW_SECONDS = 5.0
# A Clerk session token is about 1 KB; anything near this is an attack, refused before parsing.
MAX_TOKEN_LENGTH = 16 * 1024
SESSION_COOKIE = "__session"
# Clerk's SDKs keep keys about 5 minutes.
JWKS_MAX_AGE_SECONDS = 300.0
# Tokens with random `kid`s must not turn us into a JWKS hammer: one fetch per 30 s at most.
JWKS_MIN_INTERVAL_SECONDS = 30.0
# Enough for every active user of one instance; each entry is a few hundred bytes.
CLAIMS_CACHE_SIZE = 4096

# PyJWT checks the signature only; the claims are checked against our (injectable) clock below.
_SIGNATURE_ONLY: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The user a verified session token names. `claims` is shared with the cache: read only."""

    user_id: str
    session_id: str | None
    claims: dict[str, Any]


def token_from_request(request: Request) -> str | None:
    """The session token a request carries: `Authorization: Bearer`, else the `__session` cookie."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(SESSION_COOKIE) or None


class ClerkAuth:
    """Turns a Clerk session token into a `Principal`."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        public_key_pem: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        pem = public_key_pem or settings.clerk_jwt_key
        self._pem_key = load_rsa_public_key(pem) if pem else None
        url = settings.jwks_url
        self._jwks = JwksKeys(http, url, clock) if url and self._pem_key is None else None
        self._issuer = settings.clerk_issuer.rstrip("/") if settings.clerk_issuer else None
        self._parties = tuple(settings.clerk_authorized_parties)
        self._clock = clock
        self._verified = VerifiedTokens(CLAIMS_CACHE_SIZE)

    async def load_keys(self) -> None:
        """Warm the JWKS cache at start-up; a failure is logged, and retried on first use."""
        if self._jwks is not None:
            await self._jwks.load()

    @property
    def keys_loaded(self) -> bool:
        """Whether a token could be verified right now without a fetch (for /readyz)."""
        if self._pem_key is not None:
            return True
        return self._jwks is not None and self._jwks.loaded

    async def ensure_keys(self) -> bool:
        """`keys_loaded`, after one fetch of the JWKS if no key is cached (for /readyz).

        The fetch keeps the JWKS rate limit (once per 30 s), so probes cannot hammer Clerk.
        """
        if not self.keys_loaded:
            await self.load_keys()
        return self.keys_loaded

    async def authenticate(self, request: Request) -> Principal:
        """The principal of the request's session token (Bearer first, then `__session`)."""
        token = token_from_request(request)
        if token is None:
            raise Unauthorized("Missing session token")
        return await self.verify(token)

    async def verify(self, token: str) -> Principal:
        """The principal `token` names; raises only `Unauthorized` or `AuthUnavailable`."""
        _check_shape(token)
        digest = hashlib.sha256(token.encode("ascii")).digest()
        principal = self._remembered(digest)
        if principal is None:
            principal = await self._verify_fresh(token)
            self._verified.put(digest, principal)
        return principal

    def _remembered(self, digest: bytes) -> Principal | None:
        principal = self._verified.get(digest)
        if principal is not None and _is_expired(principal.claims["exp"], self._clock()):
            self._verified.discard(digest)
            raise Unauthorized("Session token has expired")
        return principal

    async def _verify_fresh(self, token: str) -> Principal:
        try:
            claims = await self._verified_claims(token)
        except (Unauthorized, AuthUnavailable):
            raise
        except Exception as exc:
            # Fail closed: whatever a hostile token trips over is a 401, never a 500.
            logger.warning("unexpected error while verifying a session token", exc_info=True)
            raise Unauthorized() from exc
        sid = claims.get("sid")
        session_id = sid if isinstance(sid, str) else None
        return Principal(user_id=claims["sub"], session_id=session_id, claims=claims)

    async def _verified_claims(self, token: str) -> dict[str, Any]:
        header = _checked_header(token)
        key = await self._signing_key(header.get("kid"))
        claims = _signed_claims(token, key)  # signature first, then the claims
        _check_claims(claims, self._clock())
        self._check_origin(claims)
        return claims

    async def _signing_key(self, kid: str | None) -> rsa.RSAPublicKey:
        # With a PEM key there is exactly one key, so `kid` is irrelevant (as in Clerk's SDKs).
        if self._pem_key is not None:
            return self._pem_key
        if self._jwks is None:
            raise AuthUnavailable("No Clerk signing key is configured")
        return await self._jwks.key_for(kid)

    def _check_origin(self, claims: dict[str, Any]) -> None:
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise Unauthorized("Session token has the wrong issuer")
        azp = claims.get("azp")
        # As Clerk's SDKs do, a token without `azp` skips the check: native apps have no origin.
        if self._parties and azp and azp not in self._parties:
            raise Unauthorized("Session token was issued to an unauthorized party")


def _check_shape(token: str) -> None:
    if not isinstance(token, str) or not token:
        raise Unauthorized("Missing session token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized("Session token is too large")
    if not token.isascii():
        raise Unauthorized("Session token is malformed")


def _checked_header(token: str) -> dict[str, Any]:
    # The header is untrusted until the signature checks out; it may only make us refuse.
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthorized("Session token is malformed") from exc
    if header.get("alg") not in ALGORITHMS:
        raise Unauthorized("Session token uses an unsupported algorithm")
    if "typ" in header and header["typ"] != "JWT":
        raise Unauthorized("Session token has the wrong type")
    if not isinstance(header.get("kid", ""), str):
        raise Unauthorized("Session token is malformed")
    return header


def _signed_claims(token: str, key: rsa.RSAPublicKey) -> dict[str, Any]:
    # `algorithms` is fixed here, never read from the token: that is what blocks `alg: none`
    # and HS256 signed with our public key as the secret.
    try:
        return jwt.decode(token, key, algorithms=list(ALGORITHMS), options=_SIGNATURE_ONLY)
    except jwt.InvalidSignatureError as exc:
        raise Unauthorized("Session token signature is invalid") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("Session token is malformed") from exc


def _check_claims(claims: dict[str, Any], now: float) -> None:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("Session token has no subject")
    exp = _timestamp(claims, "exp")
    if exp is None:
        raise Unauthorized("Session token has no expiry")
    if _is_expired(exp, now):
        raise Unauthorized("Session token has expired")
    for name in ("nbf", "iat"):
        moment = _timestamp(claims, name)
        if moment is not None and moment > now + CLOCK_SKEW_SECONDS:
            raise Unauthorized("Session token is not valid yet")


def _timestamp(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int; json reads NaN, Infinity and 400-digit ints: a NaN `exp` would never expire.
    if not isinstance(value, bool) and isinstance(value, int | float):
        moment = float(value) if abs(value) < 1e18 else math.nan
        if math.isfinite(moment):
            return moment
    raise Unauthorized(f"Session token claim {name!r} is not a timestamp")


def _is_expired(exp: float, now: float) -> bool:
    return exp <= now - CLOCK_SKEW_SECONDS


class VerifiedTokens:
    """A bounded LRU of principals this process verified, keyed by the sha256 of the token.

    Hashing keeps the cache small (tokens may be 16 KB) and keeps bearer tokens out of memory.
    Callers check `exp` on every hit, so an entry never outlives its token.
    """

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, Principal] = OrderedDict()

    def get(self, digest: bytes) -> Principal | None:
        principal = self._entries.get(digest)
        if principal is not None:
            self._entries.move_to_end(digest)
        return principal

    def put(self, digest: bytes, principal: Principal) -> None:
        self._entries[digest] = principal
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)


class JwksKeys:
    """The JWKS's RSA keys by `kid`, refreshed when stale or on a miss, at most once per 30 s."""

    def __init__(self, http: httpx.AsyncClient, url: str, clock: Callable[[], float]) -> None:
        self._http = http
        self._url = url
        self._clock = clock
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        # Concurrent misses wait for the one fetch in flight instead of starting their own.
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    async def load(self) -> None:
        await self._refresh()
        if not self._keys:
            logger.warning("no Clerk signing keys yet; will retry on the first request")

    async def key_for(self, kid: str | None) -> rsa.RSAPublicKey:
        missing = not self._keys if kid is None else kid not in self._keys
        # A request that already holds its key need not queue behind a fetch in flight.
        if missing or (self._is_stale() and not self._lock.locked()):
            await self._refresh()
        if not self._keys:
            raise AuthUnavailable("Clerk signing keys could not be fetched")
        if kid is None:
            return self._only_key()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("Session token is signed by an unknown key")
        return key

    def _only_key(self) -> rsa.RSAPublicKey:
        # No `kid` is unambiguous only when the JWKS holds a single key.
        if len(self._keys) != 1:
            raise Unauthorized("Session token has no key id")
        return next(iter(self._keys.values()))

    def _is_stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at > JWKS_MAX_AGE_SECONDS

    def _may_fetch(self) -> bool:
        last = self._attempted_at
        return last is None or self._clock() - last >= JWKS_MIN_INTERVAL_SECONDS

    async def _refresh(self) -> None:
        # Waiting on the lock (not returning early) lets concurrent misses share one fetch.
        async with self._lock:
            if not self._may_fetch():
                return
            self._attempted_at = self._clock()
            keys = await self._fetch()
            # A failed or empty fetch keeps the old keys: they still verify while Clerk is down.
            if keys:
                self._keys = keys
                self._fetched_at = self._attempted_at

    async def _fetch(self) -> dict[str, rsa.RSAPublicKey]:
        try:
            response = await self._http.get(self._url)
            if response.status_code != 200:
                logger.warning("JWKS fetch from %s returned %s", self._url, response.status_code)
                return {}
            keys = parse_jwks(response.json())
        except Exception as exc:
            # The JWKS is an outside service: any failure means "no new keys", never a crash.
            logger.warning("JWKS fetch from %s failed: %r", self._url, exc)
            return {}
        if not keys:
            logger.warning("JWKS from %s holds no usable RSA signing keys", self._url)
        return keys


def parse_jwks(document: object) -> dict[str, rsa.RSAPublicKey]:
    """The RSA signing keys of a JWKS document by `kid`; entries we cannot use are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for entry in document["keys"]:
        kid_and_key = _rsa_signing_key(entry)
        if kid_and_key is not None:
            keys[kid_and_key[0]] = kid_and_key[1]
    return keys


def _rsa_signing_key(entry: object) -> tuple[str, rsa.RSAPublicKey] | None:
    if not isinstance(entry, dict) or entry.get("kty") != "RSA":
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
        return None
    try:
        # Only `n` and `e`: a JWKS that leaked a private key must not make us hold one.
        key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": entry["n"], "e": entry["e"]})
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None
    return (kid, key) if isinstance(key, rsa.RSAPublicKey) else None


def load_rsa_public_key(pem: str) -> rsa.RSAPublicKey:
    """Parse `CLERK_JWT_KEY`; like Clerk's SDKs, accept it on one line or with literal `\\n`s."""
    body = pem.replace("\\n", "\n")
    for marker in ("-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"):
        body = body.replace(marker, "")
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("CLERK_JWT_KEY is not a PEM public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("CLERK_JWT_KEY is not an RSA public key")
    return key


# --- The local dev issuer ---------------------------------------------------------------------

DEV_ISSUER = "http://localhost/cineweave-dev-issuer"
DEV_KID = "dev"
DEV_KEY_FILE = "dev_jwt_key.pem"
# The public half of DEV_KEY_FILE, after the SHA-256 of the key file it was derived from.
DEV_PUBLIC_KEY_FILE = "dev_jwt_key.pub"


def ensure_dev_key(data_dir: Path) -> tuple[str, str]:
    """The dev issuer's key pair as (private PEM, public PEM), created on first use."""
    key = _dev_private_key(data_dir)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private_pem.decode(), _public_pem(key)


def dev_public_key_pem(data_dir: Path) -> str:
    """The dev issuer's public key as PEM, for the gateway's own checks; the pair is created on
    first use.

    Loading the private key checks it whole (OpenSSL's RSA key check tests p and q for
    primality): ~50 ms, a twelfth of a local cold start (issue 13). So the public half is
    derived from a checked key once, and kept beside it with the SHA-256 of the key file it
    came from: a key file that changed in any way is loaded and checked again.
    """
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        _create_dev_key(path)
    key_file = path.read_bytes()
    digest = hashlib.sha256(key_file).hexdigest()
    cached = data_dir / DEV_PUBLIC_KEY_FILE
    try:
        recorded, public_pem = cached.read_text().split("\n", 1)
    except (OSError, ValueError):
        recorded, public_pem = "", ""
    if recorded == digest and public_pem:
        return public_pem
    public_pem = _public_pem(_checked_private_key(path, key_file))
    _write_replacing(cached, f"{digest}\n{public_pem}")
    return public_pem


def _public_pem(key: rsa.RSAPrivateKey) -> str:
    public = key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def _write_replacing(path: Path, text: str) -> None:
    """Write `text` whole or not at all: a process starting alongside never reads half of it.
    A data dir that refuses the write only costs the next start the check again."""
    try:
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as temp_file:
            temp_file.write(text)
        os.replace(temp_name, path)
    except OSError:
        os.unlink(temp_name)


def mint_dev_token(
    data_dir: Path, user_id: str, ttl_seconds: int = 3600, *, kid: str = DEV_KID
) -> str:
    """A session token from the dev issuer, shaped like a Clerk v2 session token."""
    now = int(time.time())
    claims = {
        "sub": user_id,
        "sid": f"sess_dev_{secrets.token_hex(8)}",
        "iss": DEV_ISSUER,
        "iat": now,
        "nbf": now,
        # Clerk tokens live 60 s; a dev token lives an hour because a human pastes it into curl.
        "exp": now + ttl_seconds,
        "v": 2,
    }
    return jwt.encode(claims, _dev_private_key(data_dir), algorithm="RS256", headers={"kid": kid})


def dev_jwks(data_dir: Path) -> dict[str, Any]:
    """The dev issuer's public key as a JWKS, for `/.well-known/jwks.json`."""
    jwk = RSAAlgorithm.to_jwk(_dev_private_key(data_dir).public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": DEV_KID, "use": "sig", "alg": "RS256"}]}


def _dev_private_key(data_dir: Path) -> rsa.RSAPrivateKey:
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        _create_dev_key(path)
    return _checked_private_key(path, path.read_bytes())


def _checked_private_key(path: Path, key_file: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(key_file, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key")
    return key


def _create_dev_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # mkstemp makes the file 0600; hard-linking it into place means two processes starting
    # together never read a half-written key, and the first one's key wins.
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".dev_jwt_key.")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            temp_file.write(pem)
        os.link(temp_name, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp_name)
