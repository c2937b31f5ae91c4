"""`load_config(path)`: the one way in: read the TOML file, let `tables.py` check every key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from gateway.config.model import Config, ConfigError
from gateway.config.tables import read_tables


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Reads, resolves and checks one TOML config file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the config file: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    env = os.environ if env is None else env
    return read_tables(raw, source, Path(path).resolve().parent, env)
