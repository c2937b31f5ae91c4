"""Kore.ai's answers with anything shaped like a JWT replaced by `[redacted]`.

Applied to every answer body as it is read (`client.py`), before any part of it can reach a
caller (messages, the Kore-compatible route's pass-through), a log line or the audit: an
upstream that echoes the token it was sent must not hand it to whoever reads its answer.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
_B64URL = "[A-Za-z0-9_-]"
# A JWT's first segment is a JSON object in base64url, so it opens with "e" then one of w-z
# ('{' then '"', ' ' or a line break); an opaque three-part token is caught by its length.
JWT_SHAPE = re.compile(
    rf"(?<!{_B64URL})(?:e[w-z]{_B64URL}{{6,}}\.{_B64URL}{{2,}}\.{_B64URL}*"
    rf"|{_B64URL}{{16,}}\.{_B64URL}{{16,}}\.{_B64URL}{{16,}})"
)


def scrub(text: str) -> str:
    return JWT_SHAPE.sub(REDACTED, text)
