"""The OpenAPI document: valid 3.1, in step with the router, the error family, the input rules,
and its own examples."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from gateway import errors
from gateway.config.model import Config
from gateway.errors import GatewayError
from gateway.http.app import create_app
from gateway.http.envelope import REQUEST_ID_PATTERN
from gateway.http.openapi import document
from gateway.validation import CHANNEL_PATTERN, Validator
from tests.conftest import ConfigFactory

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
CONTRACT_CODES = {
    "invalid_request", "payload_too_large", "unsupported_media_type", "not_found",
    "method_not_allowed", "unauthenticated", "forbidden", "bot_not_configured", "rate_limited",
    "overloaded", "audit_unavailable", "upstream_rejected", "upstream_auth_failed",
    "upstream_unavailable", "upstream_timeout",
}


def schema_errors(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> list[str]:
    """`instance` checked against `schema`, whose `#/components/…` refs point into `doc`."""
    rooted = {"allOf": [schema], "components": doc["components"]}
    validator = Draft202012Validator(rooted, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(instance)]


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` object replaced by what it names (one level)."""
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return dict(target)


def documented_schema(doc: dict[str, Any], path: str, method: str, status: int,
                      media_type: str = "application/json") -> dict[str, Any]:
    responses = doc["paths"][path][method.lower()]["responses"]
    response = responses.get(str(status)) or responses.get("default")
    assert response is not None, f"{method} {path}: {status} is not documented"
    return dict(resolve(doc, response)["content"][media_type]["schema"])


@pytest.fixture
def config(make_config: ConfigFactory) -> Config:
    return make_config()


@pytest.fixture
def doc(config: Config) -> dict[str, Any]:
    return document(config)


class TestDocument:
    def test_is_a_valid_openapi_3_1_document(self, doc: dict[str, Any]) -> None:
        validate(doc)
        assert doc["openapi"].startswith("3.1.")

    def test_every_router_route_is_documented_and_every_documented_route_exists(
            self, config: Config, doc: dict[str, Any]) -> None:
        app = create_app(config)
        routed = {(route.method, route.resource.canonical) for route in app.router.routes()
                  if route.resource is not None}
        gets = {path for method, path in routed if method == "GET"}
        routed -= {("HEAD", path) for path in gets}  # HEAD is GET without a body
        documented = {(method.upper(), path) for path, item in doc["paths"].items()
                      for method in item if method in METHODS}
        assert routed == documented

    def test_with_an_admin_listener_metrics_is_documented_as_served_there(
            self, make_config: ConfigFactory) -> None:
        """Both addresses serve this document: /metrics answers 404 on the API one."""
        config = make_config(server={"admin_listen": "127.0.0.1:0"})
        doc = document(config)
        validate(doc)
        metrics = doc["paths"]["/metrics"]["get"]
        assert "server.admin_listen" in metrics["summary"]
        assert set(metrics["responses"]) == {"200", "404"}
        schema = documented_schema(doc, "/metrics", "get", 404)
        not_found = {"error": {"code": "not_found", "message": "no such route", "requestId": "r"}}
        assert schema_errors(doc, schema, not_found) == []
        app = create_app(config)
        assert "/metrics" not in {r.resource.canonical for r in app.router.routes()
                                  if r.resource is not None}
        assert "404" not in document(make_config())["paths"]["/metrics"]["get"]["responses"]

    def test_contract_routes_are_all_there(self, doc: dict[str, Any]) -> None:
        assert set(doc["paths"]) == {
            "/v1/bots/{botId}/sessions/deactivate", "/v1/sessions/deactivate",
            "/api/public/bot/{botId}/session", "/healthz", "/readyz", "/metrics",
            "/openapi.json"}

    def test_error_codes_are_the_error_family_and_the_contract(
            self, doc: dict[str, Any]) -> None:
        family = {cls.code for cls in _subclasses(GatewayError)} | {GatewayError.code}
        documented = set(doc["components"]["schemas"]["ErrorCode"]["enum"])
        assert documented == family
        assert documented >= CONTRACT_CODES

    def test_every_error_code_has_a_valid_example(self, doc: dict[str, Any]) -> None:
        envelope = {"$ref": "#/components/schemas/Error"}
        for code in doc["components"]["schemas"]["ErrorCode"]["enum"]:
            example = doc["components"]["examples"][code]["value"]
            assert example["error"]["code"] == code
            assert schema_errors(doc, envelope, example) == []

    def test_every_documented_example_validates_against_its_schema(
            self, doc: dict[str, Any]) -> None:
        checked = 0
        for where, schema, example in _examples(doc):
            assert schema_errors(doc, schema, example) == [], where
            checked += 1
        assert checked >= 40

    def test_a_broken_example_would_be_caught(self, doc: dict[str, Any]) -> None:
        schema = documented_schema(doc, "/v1/bots/{botId}/sessions/deactivate", "post", 403)
        wrong_code = {"error": {"code": "overloaded", "message": "m", "requestId": "r-1"}}
        assert schema_errors(doc, schema, wrong_code)

    def test_deactivation_routes_need_the_bearer_key_probes_do_not(
            self, doc: dict[str, Any]) -> None:
        assert doc["components"]["securitySchemes"]["bearer"] == {
            **doc["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
        for path, item in doc["paths"].items():
            for operation in item.values():
                needs_key = operation["tags"] == ["deactivation"]
                assert operation["security"] == ([{"bearer": []}] if needs_key else []), path
                assert ("401" in operation["responses"]) == needs_key, path

    def test_without_caller_auth_nothing_asks_for_a_key(self, make_config: ConfigFactory
                                                         ) -> None:
        doc = document(make_config(server={"auth": "none"}))
        validate(doc)
        for item in doc["paths"].values():
            for operation in item.values():
                assert operation["security"] == [] and "401" not in operation["responses"]

    def test_limits_and_bot_pattern_follow_the_config(self, make_config: ConfigFactory
                                                      ) -> None:
        doc = document(make_config(server={"max_batch_items": 7},
                                   upstream={"bot_id_pattern": "[a-z]{2,5}"}))
        schemas = doc["components"]["schemas"]
        assert schemas["BatchRequest"]["properties"]["items"]["maxItems"] == 7
        assert schemas["BotId"]["pattern"] == "^(?:[a-z]{2,5})$"
        assert schema_errors(doc, schemas["BotId"], "abc") == []
        assert schema_errors(doc, schemas["BotId"], "abcdef")


BODY_CASES = [
    ({"userId": "u-1"}, True),
    ({"userId": "u-1", "channel": "rtm"}, True),
    ({"userId": "u-1", "channel": None}, False),
    ({"userId": "ü" * 256}, True),
    ({"userId": "x" * 257}, False),
    ({"userId": ""}, False),
    ({"userId": "a\u0085b"}, False),
    ({"userId": "a\nb"}, False),
    ({"userId": 7}, False),
    ({"channel": "rtm"}, False),
    ({"userId": "u-1", "channel": "ivrVoice"}, True),
    ({"userId": "u-1", "channel": "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817"}, True),
    ({"userId": "u-1", "channel": "c" * 64}, True),
    ({"userId": "u-1", "channel": "c" * 65}, False),
    ({"userId": "u-1", "channel": "ms.teams"}, False),
    ({"userId": "u-1", "extra": 1}, False),
    ([{"userId": "u-1"}], False),
]
BODY_IDS = ["plain", "channel", "null-channel", "256-chars", "257-chars", "empty-user",
            "c1-control", "newline", "number", "no-user", "camel-case-channel",
            "webhook-instance-channel", "64-char-channel", "65-char-channel",
            "dotted-channel",
            "unknown-field", "not-object"]


class TestSchemasAgreeWithTheInputRules:
    @pytest.mark.parametrize(("body", "valid"), BODY_CASES, ids=BODY_IDS)
    def test_simplified_body(self, doc: dict[str, Any], body: Any, valid: bool) -> None:
        schema = {"$ref": "#/components/schemas/DeactivateRequest"}
        assert (schema_errors(doc, schema, body) == []) is valid
        assert _accepted(lambda: Validator(r"^st-[A-Za-z0-9-]{1,100}$").simplified(
            "st-1", body)) is valid

    @pytest.mark.parametrize(("status", "valid"), [("inactive", True), ("active", False),
                                                   (None, False)], ids=["inactive", "active",
                                                                        "null"])
    def test_kore_status(self, doc: dict[str, Any], status: Any, valid: bool) -> None:
        body = {"userId": "u-1", "status": status}
        schema = {"$ref": "#/components/schemas/KoreRequest"}
        assert (schema_errors(doc, schema, body) == []) is valid
        assert _accepted(lambda: Validator(r"^st-[A-Za-z0-9-]{1,100}$").kore_compatible(
            "st-1", body)) is valid

    @pytest.mark.parametrize(("bot_id", "valid"), [
        ("st-abc", True), ("st-" + "a" * 100, True), ("st-" + "a" * 101, False),
        ("xx-abc", False), ("st-a/b", False), (".", False), ("..", False), ("", False)],
        ids=["ok", "longest", "too-long", "prefix", "slash", "dot", "dotdot", "empty"])
    def test_bot_id(self, doc: dict[str, Any], bot_id: str, valid: bool) -> None:
        schema = {"$ref": "#/components/schemas/BotId"}
        assert (schema_errors(doc, schema, bot_id) == []) is valid
        assert _accepted(lambda: Validator(r"^st-[A-Za-z0-9-]{1,100}$").bot_id(bot_id)) is valid

    def test_any_request_id_header_is_accepted_the_kept_form_is_described(
            self, doc: dict[str, Any]) -> None:
        """An invalid X-Request-ID is replaced, not refused: the parameter is a plain string."""
        parameter = doc["components"]["parameters"]["XRequestId"]
        for value in ("not a valid id!", "", "x" * 129):
            assert schema_errors(doc, parameter["schema"], value) == []
        assert f"`^{REQUEST_ID_PATTERN.pattern}$`" in parameter["description"]
        kept = doc["components"]["schemas"]["RequestId"]  # what responses and the audit carry
        assert kept["pattern"] == f"^{REQUEST_ID_PATTERN.pattern}$"

    def test_channel_schema_is_the_input_rule(self, doc: dict[str, Any]) -> None:
        assert doc["components"]["schemas"]["Channel"]["pattern"] == \
            f"^{CHANNEL_PATTERN.pattern}$"

    def test_an_item_breaking_the_rules_does_not_make_the_batch_invalid(
            self, doc: dict[str, Any]) -> None:
        schema = {"$ref": "#/components/schemas/BatchRequest"}
        items = [{"botId": "st-1", "userId": "u-1"}, {"botId": "st-1", "userId": "", "x": 1}, 7]
        assert schema_errors(doc, schema, {"items": items}) == []
        for malformed in ({"items": []}, {"items": items, "extra": 1}, {"items": "x"}, {}):
            assert schema_errors(doc, schema, malformed) != [], malformed


def _accepted(parse: Any) -> bool:
    try:
        parse()
    except errors.InvalidRequest:
        return False
    return True


def _subclasses(cls: type[GatewayError]) -> Iterator[type[GatewayError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _examples(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, schema, example value) for every example in the document."""
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                parameter = resolve(doc, parameter)
                if "example" in parameter:
                    yield f"{method} {path} {parameter['name']}", parameter["schema"], \
                        parameter["example"]
            media = [("request", operation["requestBody"]["content"])] \
                if "requestBody" in operation else []
            media += [(status, resolve(doc, r).get("content", {}))
                      for status, r in operation["responses"].items()]
            for status, content in media:
                for media_type, body in content.items():
                    for name, example in body.get("examples", {}).items():
                        yield (f"{method} {path} {status} {media_type} {name}", body["schema"],
                               resolve(doc, example)["value"])
    for name, schema in doc["components"]["schemas"].items():
        for example in schema.get("examples", []):
            yield f"schemas/{name}", schema, example
