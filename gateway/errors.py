"""The gateway's error family: one class per contract error code.

Every error a caller can see is a `GatewayError`; `app.py` renders it as the contract's
envelope. Messages name the field and the rule, never a secret value.
"""

from __future__ import annotations

from typing import Any


class ListenError(Exception):
    """A listen address (the gateway's, the sandbox's) cannot be bound: in use, not local, no
    permission. Not an answer to a caller: `kore-gateway` prints it and exits 2."""


class GatewayError(Exception):
    """An error with a contract `code` and HTTP `status`."""

    code: str = "internal_error"
    status: int = 500
    outcome: str = "failed"  # the audit `outcome` of a terminal record for this error

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        upstream_status: int | None = None,
        upstream_body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.upstream_status = upstream_status
        self.upstream_body = upstream_body

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidRequest(GatewayError):
    code, status, outcome = "invalid_request", 400, "rejected"


class PayloadTooLarge(GatewayError):
    code, status, outcome = "payload_too_large", 413, "rejected"


class UnsupportedMediaType(GatewayError):
    code, status, outcome = "unsupported_media_type", 415, "rejected"


class NotFound(GatewayError):
    code, status, outcome = "not_found", 404, "rejected"


class MethodNotAllowed(GatewayError):
    code, status, outcome = "method_not_allowed", 405, "rejected"


class RequestTimeout(GatewayError):
    """The client did not deliver its request body within `server.client_timeout_s`."""

    code, status, outcome = "request_timeout", 408, "failed"


class Unauthenticated(GatewayError):
    code, status, outcome = "unauthenticated", 401, "denied"


class Forbidden(GatewayError):
    code, status, outcome = "forbidden", 403, "denied"


class BotNotConfigured(GatewayError):
    code, status, outcome = "bot_not_configured", 403, "denied"


class RateLimited(GatewayError):
    code, status, outcome = "rate_limited", 429, "failed"


class Overloaded(GatewayError):
    code, status, outcome = "overloaded", 503, "failed"


class AuditUnavailable(GatewayError):
    code, status, outcome = "audit_unavailable", 503, "failed"


class UpstreamError(GatewayError):
    """Any failure of the Kore.ai call; `upstream.py` raises only these."""

    code, status, outcome = "upstream_unavailable", 502, "failed"


class UpstreamRejected(UpstreamError):
    """Kore.ai answered 400 or 404: passed through with its status."""

    code, status, outcome = "upstream_rejected", 400, "rejected"

    def __init__(self, message: str, *, upstream_status: int, upstream_body: Any = None) -> None:
        super().__init__(message, upstream_status=upstream_status, upstream_body=upstream_body)
        self.status = upstream_status


class UpstreamAuthFailed(UpstreamError):
    code, status, outcome = "upstream_auth_failed", 502, "failed"


class UpstreamUnavailable(UpstreamError):
    code, status, outcome = "upstream_unavailable", 502, "failed"


class UpstreamCircuitOpen(UpstreamUnavailable):
    """The circuit breaker for the upstream host is open: fail fast, nothing sent.

    Same status and code as the failures that opened it (the contract gives
    `upstream_unavailable` 502 only); it adds a `Retry-After` until the next probe.
    """


class UpstreamRateLimited(UpstreamError):
    """Kore.ai itself answered 429 (after retries)."""

    code, status, outcome = "rate_limited", 429, "failed"


class UpstreamTimeout(UpstreamError):
    code, status, outcome = "upstream_timeout", 504, "failed"
