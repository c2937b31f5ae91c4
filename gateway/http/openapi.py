"""The OpenAPI 3.1 document of the inbound API, built as data; `GET /openapi.json` serves it.

Covers every route of the contract, the request and response bodies, the error envelope with
every error code, the bearer scheme and examples. The config fills in what a deployment
changes: the `botId` pattern, the batch limit and whether callers authenticate at all.
Knows nothing of aiohttp; `tests/test_openapi.py` holds it to the router and to live answers.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.config.model import Config
from gateway.validation import CHANNEL_PATTERN

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
EXAMPLE_ID = "6f1c2a9e0b7d4c3fa5e8d2b1c0a99f17"
EXAMPLE_BOT = "st-1234"
CHANNEL = f"^{CHANNEL_PATTERN.pattern}$"  # the input rule, anchored as JSON Schema needs

# Every error code of the contract, with the status it comes with and an example message.
ERRORS: dict[str, tuple[str, str]] = {
    "invalid_request": ("400", "userId: 1–256 characters"),
    "unauthenticated": ("401", "missing or unknown API key"),
    "forbidden": ("403", "this caller may not deactivate sessions of bot st-1234"),
    "bot_not_configured": ("403", "no Kore.ai app is configured for bot st-1234"),
    "not_found": ("404", "no such route"),
    "method_not_allowed": ("405", "this method is not allowed on this route"),
    "request_timeout": ("408", "the body did not arrive within 10 s (server.client_timeout_s)"),
    "payload_too_large": ("413", "the body is larger than 65536 bytes"),
    "unsupported_media_type": ("415", "send the body as Content-Type: application/json"),
    "rate_limited": ("429", "the Kore.ai rate limit for bot st-1234 is spent; retry in 3 s"),
    "upstream_rejected": ("400", "Kore.ai rejected the call (400): Invalid userId"),
    "upstream_auth_failed": ("502", "Kore.ai refused the gateway's credentials (401)"),
    "upstream_unavailable": ("502", "Kore.ai answered 503"),
    "upstream_timeout": ("504", "Kore.ai did not answer within the deadline"),
    "overloaded": ("503", "the gateway is at its in-flight limit; retry shortly"),
    "audit_unavailable": ("503", "the audit log cannot be written; nothing was sent to Kore.ai"),
    "internal_error": ("500", "an unexpected error occurred; it has been logged"),
}
RETRY_AFTER_STATUSES = frozenset({"429", "502", "503"})  # 502: while the circuit is open


def document(config: Config) -> dict[str, Any]:
    secured = config.server.auth != "none"
    return {
        "openapi": OPENAPI_VERSION,
        "info": _info(),
        "tags": [{"name": "deactivation", "description": "Close Kore.ai bot sessions."},
                 {"name": "operations", "description": "Probes, metrics and this document; "
                                                       "no caller key needed."}],
        "paths": _paths(secured, admin=bool(config.server.admin_listen)),
        "components": _components(config),
    }


def _info() -> dict[str, Any]:
    return {
        "title": "kore-session-gateway",
        "version": __version__,
        "summary": "Close a user's Kore.ai bot session without handing out Kore.ai credentials.",
        "description": (
            "Every error uses one envelope, `{\"error\": {\"code\", \"message\", "
            "\"requestId\"}}`; `code` is one of `ErrorCode`. An unknown route answers 404 "
            "`not_found`, a wrong method 405 `method_not_allowed`. Every response carries "
            "`X-Request-ID`."),
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    }


# --- paths ----------------------------------------------------------------------------------

def _paths(secured: bool, *, admin: bool = False) -> dict[str, Any]:
    return {
        "/v1/bots/{botId}/sessions/deactivate": {"post": _simple(secured)},
        "/v1/sessions/deactivate": {"post": _batch(secured)},
        "/api/public/bot/{botId}/session": {"put": _kore(secured)},
        "/healthz": {"get": _probe("health", "Liveness: 200 while the process runs.",
                                   {"200": _ok("The process runs.", "Health")})},
        "/readyz": {"get": _probe("readiness", "Readiness: config loaded, audit log writable, "
                                  "a token can be minted, not draining.", {
                                      "200": _ok("Ready.", "Readiness"),
                                      "503": _ok("Not ready, or draining.", "Readiness",
                                                 "NotReady")})},
        "/metrics": {"get": _metrics_operation(admin)},
        "/openapi.json": {"get": _probe("openapi", "This document.", {"200": {
            "description": "The OpenAPI 3.1 document.", "headers": _headers("200"),
            "content": {JSON: {"schema": {"type": "object",
                                          "required": ["openapi", "info", "paths"]}}}}})},
    }


def _operation(op_id: str, summary: str, secured: bool, *, parameters: list[Any],
               body: dict[str, Any], responses: dict[str, Any]) -> dict[str, Any]:
    return {"operationId": op_id, "summary": summary, "tags": ["deactivation"],
            "security": [{"bearer": []}] if secured else [],
            "parameters": parameters, "requestBody": body, "responses": responses}


def _simple(secured: bool) -> dict[str, Any]:
    return _operation(
        "deactivateSession", "Close one user's session of one bot.", secured,
        parameters=[_ref("parameters", "BotId"), _ref("parameters", "XRequestId")],
        body=_body("DeactivateRequest", {
            "user": {"value": {"userId": "jane@example.com"}},
            "user and channel": {"value": {"userId": "u-1001", "channel": "rtm"}},
            "IVR voice channel": {"value": {"userId": "u-1001", "channel": "ivrVoice"}},
            "webhook instance": {"value": {
                "userId": "u-1001", "channel": "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817"}}}),
        responses={
            "200": _ok("Kore.ai closed the session.", "DeactivateResponse"),
            **_errors(secured, "invalid_request", "upstream_rejected", "unauthenticated",
                      "forbidden", "bot_not_configured", "payload_too_large",
                      "request_timeout", "unsupported_media_type", "rate_limited",
                      "upstream_auth_failed", "upstream_unavailable", "upstream_timeout",
                      "overloaded", "audit_unavailable", not_found="upstream_rejected"),
        })


def _batch(secured: bool) -> dict[str, Any]:
    return _operation(
        "deactivateBatch", "Close many sessions: each item authorized, validated, audited and "
        "answered on its own.", secured,
        parameters=[_ref("parameters", "XRequestId")],
        body=_body("BatchRequest", {"two items": {"value": {"items": [
            {"botId": EXAMPLE_BOT, "userId": "u-1"},
            {"botId": "st-5678", "userId": "u-2", "channel": "msteams"}]}}}),
        responses={
            "200": _ok("The batch ran; `results` holds every item's own outcome (item `i` "
                       "used request ID `<requestId>.<i>`).", "BatchResponse"),
            **_errors(secured, "invalid_request", "unauthenticated", "payload_too_large",
                      "request_timeout", "unsupported_media_type", "overloaded"),
        })


def _kore(secured: bool) -> dict[str, Any]:
    errors = _errors(secured, "invalid_request", "unauthenticated", "forbidden",
                     "bot_not_configured", "payload_too_large", "request_timeout",
                     "unsupported_media_type", "rate_limited", "upstream_auth_failed",
                     "upstream_unavailable", "upstream_timeout", "overloaded",
                     "audit_unavailable")
    errors["400"] = _passthrough("An invalid request (the gateway's envelope) or Kore.ai's own "
                                 "400 answer, passed through as Kore.ai sent it.", errors["400"])
    errors["404"] = _passthrough("Kore.ai's own 404 answer, passed through as Kore.ai sent it.")
    return _operation(
        "deactivateKoreCompatible", "Kore.ai's own session route and body, for existing Kore.ai "
        "clients (their own `auth` header is dropped, never forwarded).", secured,
        parameters=[_ref("parameters", "BotId"), _ref("parameters", "XRequestId")],
        body=_body("KoreRequest", {"Kore.ai body": {"value": {
            "userId": "u-1001", "status": "inactive", "channel": "rtm"}}}),
        responses={"200": _ok("Kore.ai's own answer.", "KoreSuccess"), **errors})


def _metrics_operation(admin: bool) -> dict[str, Any]:
    """With `server.admin_listen` set, /metrics is served on that address only."""
    summary = "Prometheus text format (with several workers, the sum over all of them)."
    if not admin:
        return _probe("metrics", summary, {"200": _metrics_response()})
    return _probe("metrics", summary + " Served on the admin address (server.admin_listen) "
                  "only: 404 `not_found` on the API address.",
                  {"200": _metrics_response(), "404": _error_response("404", ["not_found"])})


def _probe(op_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"operationId": op_id, "summary": summary, "tags": ["operations"], "security": [],
            "responses": responses}


# --- responses ------------------------------------------------------------------------------

def _ref(kind: str, name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _headers(status: str) -> dict[str, Any]:
    headers = {"X-Request-ID": _ref("headers", "XRequestId")}
    if status in RETRY_AFTER_STATUSES:
        headers["Retry-After"] = _ref("headers", "RetryAfter")
    if status == "401":
        headers["WWW-Authenticate"] = _ref("headers", "WwwAuthenticate")
    return headers


def _ok(description: str, schema: str, example: str | None = None) -> dict[str, Any]:
    return {"description": description, "headers": _headers("200"),
            "content": {JSON: {"schema": _ref("schemas", schema),
                               "examples": {"example": _ref("examples", example or schema)}}}}


def _body(schema: str, examples: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref("schemas", schema),
                                                  "examples": examples}}}


def _errors(secured: bool, *codes: str, not_found: str | None = None) -> dict[str, Any]:
    """Error responses by status, each limited to the codes this route can give with it."""
    by_status: dict[str, list[str]] = {}
    for code in codes:
        if code == "unauthenticated" and not secured:
            continue
        by_status.setdefault(ERRORS[code][0], []).append(code)
    if not_found is not None:
        by_status["404"] = [not_found]
    responses = {status: _error_response(status, found) for status, found in by_status.items()}
    responses["default"] = {"description": "Any other error, in the envelope (500 "
                                           "`internal_error` is never expected).",
                            "content": {JSON: {"schema": _ref("schemas", "Error")}}}
    return dict(sorted(responses.items()))


def _error_response(status: str, codes: list[str]) -> dict[str, Any]:
    schema = {"allOf": [_ref("schemas", "Error"), {"properties": {"error": {"properties": {
        "code": {"enum": codes}}}}}]}
    return {"description": ", ".join(f"`{code}`" for code in codes),
            "headers": _headers(status),
            "content": {JSON: {"schema": schema,
                               "examples": {code: _ref("examples", code) for code in codes}}}}


def _passthrough(description: str, envelope: dict[str, Any] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = _ref("schemas", "KoreError")
    examples: dict[str, Any] = {"Kore.ai": _ref("examples", "KoreError")}
    if envelope is not None:
        schema = {"anyOf": [envelope["content"][JSON]["schema"], schema]}
        examples = {**envelope["content"][JSON]["examples"], **examples}
    return {"description": description, "headers": _headers("400"),
            "content": {JSON: {"schema": schema, "examples": examples},
                        "text/plain": {"schema": {"type": "string"}}}}


def _metrics_response() -> dict[str, Any]:
    sample = ('# HELP kore_gateway_requests_total HTTP requests answered, by route template, '
              'status and caller (anonymous when not authenticated).\n'
              '# TYPE kore_gateway_requests_total counter\n'
              'kore_gateway_requests_total{caller="crm-service",route="/v1/bots/{botId}/'
              'sessions/deactivate",status="200"} 42.0\n')
    return {"description": "Every `kore_gateway_*` metric (see docs/operations.md, Metrics).",
            "headers": _headers("200"),
            "content": {"text/plain": {"schema": {"type": "string"},
                                       "examples": {"excerpt": {"value": sample}}}}}


# --- components -----------------------------------------------------------------------------

def _components(config: Config) -> dict[str, Any]:
    return {
        "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "The caller's API key (`kore-gateway hash-key`); the gateway keeps "
                           "only its SHA-256 digest. Not used with `server.auth = \"none\"`."}},
        "parameters": _parameters(),
        "headers": _response_headers(),
        "schemas": {**_input_schemas(config), **_output_schemas(), **_error_schemas()},
        "examples": _examples(),
    }


def _parameters() -> dict[str, Any]:
    return {
        "BotId": {"name": "botId", "in": "path", "required": True,
                  "description": "The Kore.ai bot (`upstream.bot_id_pattern`).",
                  "schema": _ref("schemas", "BotId"), "example": EXAMPLE_BOT},
        # Any value is accepted: one that is not a valid request ID is replaced, not refused.
        "XRequestId": {"name": "X-Request-ID", "in": "header", "required": False,
                       "description": "Kept when it matches `^[A-Za-z0-9._:-]{1,128}$`, "
                                      "else replaced by a new random ID (never refused); "
                                      "the ID goes upstream and into the audit.",
                       "schema": {"type": "string"}, "example": EXAMPLE_ID},
    }


def _response_headers() -> dict[str, Any]:
    return {
        "XRequestId": {"description": "The request ID (the caller's, or a new one).",
                       "schema": _ref("schemas", "RequestId")},
        "RetryAfter": {"description": "Whole seconds to wait before retrying (at least 1); "
                                      "on a 502 only while the circuit breaker is open.",
                       "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"}},
        "WwwAuthenticate": {"description": "Always `Bearer`.",
                            "schema": {"type": "string", "const": "Bearer"}},
    }


def _anchored(pattern: str) -> str:
    """JSON Schema patterns search; the gateway's `bot_id_pattern` must match in full."""
    if pattern.startswith("^") and pattern.endswith("$"):
        return pattern
    return f"^(?:{pattern})$"


def _input_schemas(config: Config) -> dict[str, Any]:
    channel = {"type": "string", "pattern": CHANNEL,
               "description": "Kore.ai's channel type as Kore.ai spells it (rtm, msteams, "
                              "ivrVoice…) or a webhook instance ID (ivrInst-…), sent upstream "
                              "unchanged. Optional: leave the key out for no channel (null is "
                              "refused)."}
    user_id = {"type": "string", "minLength": 1, "maxLength": 256,
               "not": {"pattern": "[\\u0000-\\u001F\\u007F-\\u009F]"},
               "description": "1–256 characters, no control characters (Cc), no lone "
                              "surrogates."}
    return {
        "BotId": {"type": "string", "pattern": _anchored(config.upstream.bot_id_pattern),
                  "not": {"enum": [".", ".."]}},
        "UserId": user_id,
        "Channel": channel,
        "RequestId": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        "DeactivateRequest": _closed({"userId": _ref("schemas", "UserId"),
                                      "channel": _ref("schemas", "Channel")}, ["userId"]),
        "KoreRequest": _closed({"userId": _ref("schemas", "UserId"),
                                "status": {"const": "inactive"},
                                "channel": _ref("schemas", "Channel")}, ["userId"]),
        "BatchItem": _closed({"botId": _ref("schemas", "BotId"),
                              "userId": _ref("schemas", "UserId"),
                              "channel": _ref("schemas", "Channel")}, ["botId", "userId"]),
        "BatchRequest": _closed({"items": {
            "type": "array", "minItems": 1, "maxItems": config.server.max_batch_items,
            "description": "At most `server.max_batch_items` (more: 413). Each item should be "
                           "a `BatchItem`; any other item is not refused with the batch but "
                           "gets its own error in `results`.",
            # Per-item errors: an item breaking the rules does not make the batch invalid.
            "items": {"anyOf": [_ref("schemas", "BatchItem"), {}]}}}, ["items"]),
    }


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def _output_schemas() -> dict[str, Any]:
    return {
        "DeactivateResponse": _closed({
            "success": {"const": True}, "botId": _ref("schemas", "BotId"),
            "userId": _ref("schemas", "UserId"),
            "channel": {"type": ["string", "null"], "pattern": CHANNEL,
                        "description": "The channel given, null when none was."},
            "requestId": _ref("schemas", "RequestId")},
            ["success", "botId", "userId", "channel", "requestId"]),
        "BatchResult": {
            **_closed({"index": {"type": "integer", "minimum": 0},
                       "botId": {"description": "As sent (null when missing)."},
                       "userId": {"description": "As sent (null when missing)."},
                       "status": {"type": "integer", "description": "The HTTP status this "
                                  "item alone would have had."},
                       "success": {"type": "boolean"},
                       "error": _ref("schemas", "ItemError")},
                      ["index", "botId", "userId", "status", "success"]),
            "if": {"properties": {"success": {"const": False}}},
            "then": {"required": ["error"]},
            "else": {"not": {"required": ["error"]}},
        },
        "BatchResponse": _closed({
            "results": {"type": "array", "items": _ref("schemas", "BatchResult")},
            "summary": _closed({"succeeded": {"type": "integer", "minimum": 0},
                                "failed": {"type": "integer", "minimum": 0}},
                               ["succeeded", "failed"])}, ["results", "summary"]),
        "KoreSuccess": {"type": "object", "required": ["success"],
                        "properties": {"success": {"const": True}},
                        "description": "Kore.ai's answer body as Kore.ai sent it."},
        "KoreError": {"type": ["object", "array"],
                      "description": "Kore.ai's own error body as Kore.ai sent it, usually "
                                     "`{\"errors\": [{\"msg\", \"code\"}]}`."},
        "Health": _closed({"status": {"const": "ok"}}, ["status"]),
        "Readiness": {
            "type": "object", "required": ["status", "checks"],
            "properties": {
                "status": {"enum": ["ready", "not_ready"]},
                "checks": {"type": "object", "additionalProperties": {"type": "boolean"},
                           "properties": {name: {"type": "boolean"} for name in
                                          ("config", "audit", "token", "draining")}},
                "circuit": {"type": "object", "properties": {
                    "host": {"type": "string"},
                    "state": {"enum": ["closed", "open", "half_open"],
                              "description": "The host-wide circuit (every bot)."},
                    "consecutiveFailures": {"type": "integer", "minimum": 0},
                    "failingBots": {"type": "integer", "minimum": 0},
                    "openBots": {"type": "integer", "minimum": 0,
                                 "description": "Bots whose own circuit is not closed."},
                    "openBotIds": {"type": "array", "items": {"type": "string"},
                                   "maxItems": 20}}},
                "configReload": {"type": "object", "required": ["ok"], "properties": {
                    "ok": {"type": "boolean"}, "error": {"type": "string"},
                    "keys": {"type": "array", "items": {"type": "string"}},
                    "failedAt": {"type": "string"}, "kept": {"type": "string"}},
                    "description": "The last config reload; while it failed the whole "
                                   "running config is kept."},
                "auditDiskFreeBytes": {
                    "type": ["integer", "null"], "minimum": 0,
                    "description": "Bytes free for the gateway on the audit log's volume "
                                   "(null when it cannot be read)."},
                "pausedBots": {"type": "integer", "minimum": 0,
                               "description": "Bots paused after Kore.ai's rate-limit answer "
                                              "(as this process knows them)."}}},
    }


def _error_schemas() -> dict[str, Any]:
    inner = {"code": _ref("schemas", "ErrorCode"),
             "message": {"type": "string", "minLength": 1}}
    return {
        "ErrorCode": {"type": "string", "enum": list(ERRORS),
                      "description": "; ".join(f"`{code}` ({status})"
                                               for code, (status, _) in ERRORS.items())},
        "Error": _closed({"error": _closed({**inner, "requestId": _ref("schemas", "RequestId")},
                                           ["code", "message", "requestId"])}, ["error"]),
        "ItemError": _closed(inner, ["code", "message"]),
    }


def _examples() -> dict[str, Any]:
    examples: dict[str, Any] = {
        code: {"summary": f"{status} {code}",
               "value": {"error": {"code": code, "message": message, "requestId": EXAMPLE_ID}}}
        for code, (status, message) in ERRORS.items()}
    examples.update({
        "DeactivateResponse": {"value": {"success": True, "botId": EXAMPLE_BOT,
                                         "userId": "u-1001", "channel": "rtm",
                                         "requestId": EXAMPLE_ID}},
        "BatchResponse": {"value": {"results": [
            {"index": 0, "botId": EXAMPLE_BOT, "userId": "u-1", "status": 200, "success": True},
            {"index": 1, "botId": "st-5678", "userId": "u-2", "status": 403, "success": False,
             "error": {"code": "forbidden",
                       "message": "this caller may not deactivate sessions of bot st-5678"}}],
            "summary": {"succeeded": 1, "failed": 1}}},
        "KoreSuccess": {"value": {"success": True}},
        "KoreError": {"value": {"errors": [{"msg": "Invalid userId", "code": 400}]}},
        "Health": {"value": {"status": "ok"}},
        "Readiness": {"value": {"status": "ready", "checks": {
            "config": True, "audit": True, "token": True, "draining": False},
            "circuit": {"host": "bots.kore.ai", "state": "closed", "consecutiveFailures": 0}}},
        "NotReady": {"value": {"status": "not_ready", "checks": {
            "config": True, "audit": False, "token": True, "draining": False},
            "circuit": {"host": "bots.kore.ai", "state": "open", "consecutiveFailures": 5}}},
    })
    return examples
