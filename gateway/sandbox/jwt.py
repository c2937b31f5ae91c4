"""Kore.ai's side of the JWT, as the sandbox plays it: the app credentials it knows and every
check it makes on a token (`appId`, algorithm, signature, `exp`/`iat`/`nbf` on the sandbox
clock, and for a token with a `jti` the 1-hour `exp` cap and the replay memory). Answering in
Kore.ai's shape is `server.py`'s; minting is `gateway.kore.tokens`'.

Kore.ai's own words are used where they are known (docs/kore.md lists each with its source):
"Invalid SDK credentials" and "Invalid JWT token" (code 4002), and the two jti messages of its
SDK security page. The other refusals are the sandbox's own wording, with code 401.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jwt
from cachetools import TLRUCache
from cryptography.hazmat.primitives import serialization

if TYPE_CHECKING:
    from gateway.config.model import KoreApp

ALGORITHMS = ("HS256", "HS512", "RS256", "RS512")
MAX_IAT_SKEW_S = 60.0  # the sandbox accepts a token issued at most this far in its future
MAX_JTI_EXP_S = 3600.0  # a token with a jti may expire at most this far ahead (Kore.ai: 1 h)
MAX_REMEMBERED_JTIS = 100_000  # bounded replay memory; the least recently seen go first
KORE_AUTH_CODE = 4002  # the `code` of Kore.ai's credential refusals (its status stays 401)
INVALID_CREDENTIALS = "Invalid SDK credentials"  # no token, unknown appId, bad signature
INVALID_TOKEN = "Invalid JWT token"  # not a JWT at all
JTI_EXP_TOO_FAR = 'error verifying the jwt: if "jti" claim "exp" must be <= 1 hour(s)'
JTI_REPLAYED = "error verifying the jwt: possibly a replay"


@dataclass
class SandboxApp:
    """Credentials Kore.ai knows: HS* → the client secret; RS* → the PEM public key."""

    client_id: str
    key: str = field(repr=False)
    algorithm: str = "HS256"

    @classmethod
    def from_kore_app(cls, app: KoreApp) -> SandboxApp:
        if app.algorithm.startswith("HS"):
            if app.client_secret is None:
                raise ValueError(f"app {app.name!r}: {app.algorithm} needs a client secret")
            return cls(app.client_id, app.client_secret.reveal(), app.algorithm)
        if app.private_key is None:
            raise ValueError(f"app {app.name!r}: {app.algorithm} needs a private key")
        return cls(app.client_id, _public_pem(app.private_key.reveal()), app.algorithm)


def _public_pem(private_pem: str) -> str:
    private_key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class _Verifier(NamedTuple):
    algorithm: str
    key: Any  # bytes for HS*, a loaded public key for RS*


class TokenRejected(Exception):
    """Why Kore.ai would refuse a token: the `msg` and `code` of its 401 answer."""

    def __init__(self, msg: str, code: int = 401) -> None:
        super().__init__(msg)
        self.msg, self.code = msg, code


def _credentials_refused() -> TokenRejected:
    return TokenRejected(INVALID_CREDENTIALS, KORE_AUTH_CODE)


class TokenChecker:
    """The keys of the apps Kore.ai knows and its `jti` replay memory; `check()` is the 401 test."""

    def __init__(self, apps: Sequence[SandboxApp], *, enforce_jti: bool,
                 clock: Callable[[], float]) -> None:
        self._verifiers = {app.client_id: _verifier(app) for app in apps}
        self._enforce_jti = enforce_jti
        self._clock = clock
        self._seen_jtis: TLRUCache[tuple[str, str], float] = TLRUCache(
            MAX_REMEMBERED_JTIS, _jti_expiry, timer=clock
        )

    def set_apps(self, apps: Sequence[SandboxApp]) -> None:
        self._verifiers = {app.client_id: _verifier(app) for app in apps}

    def check(self, token: str | None) -> dict[str, Any]:
        if not token:
            raise _credentials_refused()
        try:
            signed = _signing_input(token)  # the signature is judged below, with the key
            header = jwt.get_unverified_header(signed)
            app_id = jwt.decode(signed, options={"verify_signature": False}).get("appId")
        except jwt.PyJWTError:
            raise TokenRejected(INVALID_TOKEN, KORE_AUTH_CODE) from None
        if not isinstance(app_id, str) or app_id not in self._verifiers:
            raise _credentials_refused()
        verifier = self._verifiers[app_id]
        if header.get("alg") != verifier.algorithm:
            raise TokenRejected("Algorithm mismatch")
        claims = _decode(token, verifier)
        self._check_times(claims)
        self._check_jti(app_id, claims)
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
        if not all(_is_number(value) for value in (exp, iat, nbf)):
            raise TokenRejected("Invalid exp, iat or nbf claim")
        if exp <= now:
            raise TokenRejected("Token expired")
        if iat > now + MAX_IAT_SKEW_S:
            raise TokenRejected("Token issued in the future")
        if nbf > now:
            raise TokenRejected("Token not yet valid")

    def _check_jti(self, app_id: str, claims: dict[str, Any]) -> None:
        """Whenever a token has a jti (or Kore.ai's alias `kore_jti`, which wins), Kore.ai caps
        its `exp` at 1 h ahead and refuses it a second time; Enforce JTI also needs one."""
        jti = jti_of(claims)
        if jti is None:
            if self._enforce_jti:
                raise TokenRejected("Missing claim: jti")
            return
        if claims["exp"] > self._clock() + MAX_JTI_EXP_S:
            raise TokenRejected(JTI_EXP_TOO_FAR)
        if (app_id, jti) in self._seen_jtis:
            raise TokenRejected(JTI_REPLAYED)
        self._seen_jtis[(app_id, jti)] = float(claims["exp"])


def jti_of(claims: dict[str, Any]) -> str | None:
    """The token's JWT ID as Kore.ai reads it: `kore_jti` over `jti`; absent when empty."""
    value = claims.get("kore_jti", claims.get("jti"))
    return None if value is None or value == "" else str(value)


def _verifier(app: SandboxApp) -> _Verifier:
    if app.algorithm not in ALGORITHMS:
        raise ValueError(f"app {app.client_id!r}: algorithm must be one of {ALGORITHMS}")
    if app.algorithm.startswith("HS"):
        return _Verifier(app.algorithm, app.key.encode())
    try:
        return _Verifier(app.algorithm, serialization.load_pem_public_key(app.key.encode()))
    except ValueError:
        raise ValueError(f"app {app.client_id!r}: key is not a PEM public key") from None


def _jti_expiry(_key: tuple[str, str], exp: float, _now: float) -> float:
    return exp


def _signing_input(token: str) -> str:
    """The token with an empty signature: its header and payload, as they must parse. A token
    whose signature segment is damaged (characters appended to a valid token) is then refused
    as a bad signature, "Invalid SDK credentials" (S6), not as a token that is not a JWT."""
    head, dot, rest = token.partition(".")
    payload, dot2, _ = rest.partition(".")
    if not (dot and dot2):
        raise jwt.DecodeError("Not enough segments")
    return f"{head}.{payload}."


def _decode(token: str, verifier: _Verifier) -> dict[str, Any]:
    # Time claims are checked on the sandbox clock (`_check_times`), not PyJWT's.
    options = {
        "require": ["exp", "iat"],
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
        "verify_aud": False,
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            verifier.key,
            algorithms=[verifier.algorithm],
            options=options,  # type: ignore[arg-type]
        )
    except jwt.MissingRequiredClaimError as error:
        raise TokenRejected(f"Missing claim: {error.claim}") from None
    except jwt.DecodeError:  # a signature that does not verify, or does not even decode
        raise _credentials_refused() from None
    except jwt.PyJWTError:
        raise TokenRejected(INVALID_TOKEN, KORE_AUTH_CODE) from None
    return claims


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
