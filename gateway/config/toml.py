"""A typed reader over one parsed TOML table that collects problems instead of raising.

Each getter takes a key off the table, checks its type (and range, choice or form) and names
the key in a problem when it is wrong; `finish()` reports the keys nobody asked for. It knows
no table of the gateway's: those are `config_tables.py`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config.model import Secret

# The largest number a float key without its own upper bound takes (seconds or calls a second).
MAX_FLOAT = 1e9


class Table:
    """Reads one TOML table with typed getters, collecting problems instead of raising."""

    def __init__(self, data: Any, where: str, problems: list[str], base_dir: Path,
                 env: Mapping[str, str]) -> None:
        self.where, self.problems, self.base_dir, self.env = where, problems, base_dir, env
        if not isinstance(data, dict):
            self.fail("", "must be a table")
            data = {}
        self.data = dict(data)

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name) if name else self.where}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.fail(name, f"must be {_kind_name(kind)}, not a boolean")
            return default
        if not isinstance(value, kind):
            self.fail(name, f"must be {_kind_name(kind)}")
            return default
        return value

    def number(self, name: str, default: float, *, low: float, high: float | None = None,
               integer: bool = False) -> Any:
        if name not in self.data:
            return default
        value = self.get(name, int if integer else float, default)
        if not integer and high is None and not value <= MAX_FLOAT:  # inf and nan fail too
            # TOML allows inf; no duration or rate here means more than some 31 years.
            self.fail(name, f"must be a finite number, at least {low:g} and at most {MAX_FLOAT:g}")
            return default
        if not value >= low or (high is not None and not value <= high):  # nan fails both
            bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            self.fail(name, f"must be {bound}")
            return default
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value: str = self.get(name, str, default)
        if value not in choices:
            self.fail(name, "must be one of " + ", ".join(f'"{c}"' for c in choices))
            return default
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) and v for v in value):
            self.fail(name, "must be a list of non-empty strings")
            return default
        return tuple(value)

    def path(self, name: str, default: str | None) -> str | None:
        value = self.get(name, str, default)
        if value is None:
            return None
        return str((self.base_dir / value).resolve()) if value else value

    def secret(self, name: str, *, required: bool, resolve: bool = True) -> Secret | None:
        forms = [f for f in (name, f"{name}_env", f"{name}_file") if f in self.data]
        if not resolve:
            for f in forms:
                self.get(f, str, "")
            return None
        if len(forms) > 1:
            self.fail(name, f"give only one of {name}, {name}_env, {name}_file")
            for f in forms:
                self.data.pop(f)
            return None
        if not forms:
            if required:
                self.fail(name, f"is required (as {name}, {name}_env or {name}_file)")
            return None
        return self.read_secret(forms[0], self.get(forms[0], str, ""))

    def read_secret(self, form: str, value: str) -> Secret | None:
        """The secret named by `form` (`x_env`, `x_file` or `x`) whose value is `value`."""
        if form.endswith("_env"):
            text = self.env.get(value, "")
            if not text:
                self.fail(form, f"environment variable {value} is not set or empty")
                return None
            return Secret(text)
        if form.endswith("_file"):
            path = (self.base_dir / value).resolve()
            try:
                text = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.fail(form, f"cannot read {path}: {exc.strerror or exc}")
                return None
            if not text:
                self.fail(form, f"{path} is empty")
                return None
            return Secret(text)
        if not value:
            self.fail(form, "must not be empty")
            return None
        return Secret(value)

    def finish(self) -> None:
        for name in sorted(self.data):
            self.fail(name, "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
