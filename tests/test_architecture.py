"""The wings of `gateway/` keep to docs/architecture.md: what each must never import, and no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"

# (modules it applies to, imports they must never make); a prefix matches itself and below.
NEVER: dict[str, tuple[str, ...]] = {
    "gateway.config": ("gateway.audit", "gateway.auth", "gateway.breaker", "gateway.bulk",
                       "gateway.cli", "gateway.deactivation", "gateway.demo", "gateway.errors",
                       "gateway.http", "gateway.kore", "gateway.logs", "gateway.metrics",
                       "gateway.ratelimit", "gateway.sandbox", "gateway.validation", "aiohttp"),
    "gateway.audit": ("gateway.http", "gateway.kore", "gateway.sandbox", "gateway.bulk",
                      "gateway.ratelimit", "gateway.deactivation", "gateway.auth", "aiohttp",
                      "jwt"),
    "gateway.ratelimit": ("gateway.http", "gateway.kore", "gateway.audit", "gateway.sandbox",
                          "gateway.bulk", "gateway.deactivation", "aiohttp"),
    "gateway.kore": ("gateway.http", "gateway.sandbox", "gateway.audit", "gateway.bulk",
                     "gateway.deactivation", "aiohttp.web"),
    "gateway.sandbox": ("gateway.kore", "gateway.http", "gateway.audit", "gateway.ratelimit",
                        "gateway.deactivation", "gateway.bulk", "gateway.auth"),
    "gateway.bulk": ("gateway.http", "gateway.kore", "gateway.audit", "gateway.ratelimit",
                     "gateway.sandbox", "gateway.deactivation", "gateway.auth", "aiohttp.web"),
    # The HTTP-free core and what everything uses.
    "gateway.deactivation": ("gateway.http", "gateway.sandbox", "gateway.bulk", "aiohttp"),
    "gateway.auth": ("gateway.http", "gateway.kore", "gateway.audit", "aiohttp"),
    "gateway.validation": ("gateway.http", "gateway.kore", "gateway.audit", "aiohttp"),
    "gateway.breaker": ("gateway.http", "gateway.kore", "gateway.audit", "aiohttp"),
    "gateway.errors": ("gateway", "aiohttp"),
    "gateway.jsoncodec": ("gateway", "aiohttp"),
    "gateway.logs": ("gateway", "aiohttp"),
    "gateway.metrics": ("gateway.http", "gateway.kore", "gateway.audit", "aiohttp"),
}
# `python -m gateway.http.healthcheck` runs in the container's probe: standard library only.
LIGHT = ("gateway.http.healthcheck", "gateway.http")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_cases() -> list[tuple[str, str]]:
    return [(module, prefix) for module in MODULES for prefix in NEVER if covers(prefix, module)]


@pytest.mark.parametrize(("module", "rule"), rule_cases(), ids=[m for m, _ in rule_cases()])
def test_module_never_imports_what_its_wing_forbids(module: str, rule: str) -> None:
    found = imports(MODULES[module])
    own = module.rsplit(".", 1)[0] if module.count(".") > 1 else module
    broken = sorted(name for name in found for forbidden in NEVER[rule]
                    if covers(forbidden, name) and not covers(own, name)
                    and not (rule != "gateway.config" and covers(rule, name)))
    assert not broken, f"{module} imports {broken}, which docs/architecture.md forbids"


def test_every_module_is_under_a_rule_or_is_wiring() -> None:
    wiring = {"gateway", "gateway.__main__", "gateway.cli", "gateway.demo"}
    loose = [m for m in MODULES if m not in wiring and not covers("gateway.http", m)
             and not any(covers(prefix, m) for prefix in NEVER)]
    assert not loose, f"modules with no rule in docs/architecture.md: {loose}"


def test_healthcheck_imports_only_the_standard_library() -> None:
    for module in LIGHT:
        outside = sorted(name for name in imports(MODULES[module])
                         if name.split(".")[0] in {"gateway", "aiohttp", "structlog", "jwt"})
        assert not outside, f"{module} imports {outside}"


def test_no_import_circle() -> None:
    graph = {m: {name for name in imports(p, top_level_only=True) if name in MODULES and name != m}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " → ".join(circle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
