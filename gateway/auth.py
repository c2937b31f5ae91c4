"""Caller authentication: API key → `Caller`, and which bots a caller may touch.

Keys are stored only as SHA-256 digests and compared in constant time. Knows nothing of
HTTP beyond the `Authorization` header's text, and nothing of tokens or Kore.ai.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.config.model import CallerConfig
from gateway.errors import Forbidden, Unauthenticated

KEY_BYTES = 32
BEARER_FORM = "send the API key as 'Authorization: Bearer <key>'"


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    bots: tuple[str, ...]

    def may_touch(self, bot_id: str) -> bool:
        return _matches(bot_id, self.bots)

    def authorize(self, bot_id: str) -> None:
        if not _matches(bot_id, self.bots):  # `may_touch`, one call fewer on every request
            raise Forbidden(f"caller {self.name} may not touch bot {bot_id}")


@functools.lru_cache(maxsize=16384)
def _matches(bot_id: str, globs: tuple[str, ...]) -> bool:
    """Whether `bot_id` matches one of `globs` (remembered: every request asks twice)."""
    return any(fnmatchcase(bot_id, glob) for glob in globs)


LOCAL_CALLER = Caller("local", ("*",))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random caller key (URL-safe, 256 bits)."""
    return "kgw_" + secrets.token_urlsafe(KEY_BYTES)


class Authenticator:
    """Maps a bearer key to its caller; `mode = "none"` answers `LOCAL_CALLER` for everyone."""

    def __init__(self, callers: Sequence[CallerConfig], mode: str = "api-key") -> None:
        self.mode = mode
        self._callers = [(bytes.fromhex(c.key_sha256), Caller(c.name, c.bots)) for c in callers]

    def authenticate(self, authorization: str | None) -> Caller:
        if self.mode == "none":
            return LOCAL_CALLER
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated(BEARER_FORM)
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for stored, caller in self._callers:  # no early exit: every key costs the same
            if hmac.compare_digest(stored, digest) and found is None:
                found = caller
        if found is None:
            raise Unauthenticated("the API key is missing or not valid")
        return found
