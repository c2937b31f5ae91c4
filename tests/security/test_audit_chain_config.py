"""The chain key's configuration (contract §4 `chain_key_*`, `anchor_every_s`): from a variable
or a file, never written in the config, never on the audit volume, never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.audit.chain import ChainKey
from gateway.audit.log import verify_files
from gateway.config.loader import load_config
from gateway.config.model import ConfigError, Secret
from gateway.http.runtime import Runtime
from tests.conftest import base_settings, merge, write_config

KEY_TEXT = "chain-key-" + "5f" * 16


def load(tmp_path: Path, env: dict[str, str] | None = None, **audit: Any) -> Any:
    settings = merge(base_settings(tmp_path), {"audit": audit})
    return load_config(write_config(tmp_path, settings), env=env or {})


def problems(tmp_path: Path, env: dict[str, str] | None = None, **audit: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, env, **audit)
    text = str(caught.value)
    assert KEY_TEXT not in text
    return text


class TestChainKey:
    def test_from_a_variable(self, tmp_path: Path) -> None:
        config = load(tmp_path, {"AUDIT_KEY": KEY_TEXT}, chain_key_env="AUDIT_KEY")
        assert config.audit.chain_key == Secret(KEY_TEXT)
        assert KEY_TEXT not in repr(config)

    def test_from_a_file_outside_the_audit_directory(self, tmp_path: Path) -> None:
        (tmp_path / "keys").mkdir()
        (tmp_path / "keys" / "chain.key").write_text(KEY_TEXT + "\n", encoding="utf-8")
        config = load(tmp_path, chain_key_file="keys/chain.key")
        assert config.audit.chain_key == Secret(KEY_TEXT)  # stripped, like every secret file

    def test_empty_variable_name_means_no_key(self, tmp_path: Path) -> None:
        config = load(tmp_path, chain_key_env="", anchor_every_s=5)
        assert config.audit.chain_key is None and config.audit.anchor_every_s == 5

    def test_defaults(self, tmp_path: Path) -> None:
        config = load(tmp_path)
        assert config.audit.chain_key is None and config.audit.anchor_every_s == 60

    def test_a_file_in_the_audit_directory_is_refused(self, tmp_path: Path) -> None:
        audit_dir = tmp_path / "audit"
        audit_dir.mkdir()
        (audit_dir / "chain.key").write_text(KEY_TEXT, encoding="utf-8")
        text = problems(tmp_path, chain_key_file="audit/chain.key")
        assert "gateway.toml: audit.chain_key_file:" in text
        assert "is in the audit directory" in text and "off the audit volume" in text

    def test_a_link_in_the_audit_directory_is_refused(self, tmp_path: Path) -> None:
        """Whoever can write the audit directory could point the link at a key of theirs."""
        (tmp_path / "audit").mkdir()
        (tmp_path / "real.key").write_text(KEY_TEXT, encoding="utf-8")
        (tmp_path / "audit" / "link.key").symlink_to(tmp_path / "real.key")
        assert "audit.chain_key_file:" in problems(tmp_path, chain_key_file="audit/link.key")

    def test_a_link_to_the_audit_directory_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "audit").mkdir()
        (tmp_path / "audit" / "chain.key").write_text(KEY_TEXT, encoding="utf-8")
        (tmp_path / "elsewhere.key").symlink_to(tmp_path / "audit" / "chain.key")
        assert "audit.chain_key_file:" in problems(tmp_path, chain_key_file="elsewhere.key")

    @pytest.mark.parametrize(("audit", "env", "expected"), [
        ({"chain_key_env": "NOPE"}, {}, "audit.chain_key_env: environment variable NOPE"),
        ({"chain_key_file": "absent.key"}, {}, "audit.chain_key_file: cannot read"),
        ({"chain_key_env": "K", "chain_key_file": "k"}, {"K": KEY_TEXT},
         "audit.chain_key_env: give only one of chain_key_env, chain_key_file"),
        ({"chain_key": KEY_TEXT}, {}, "audit.chain_key: give chain_key_env or chain_key_file"),
        ({"anchor_every_s": 0}, {}, "audit.anchor_every_s: must be at least"),
        ({"anchor_every_s": "60"}, {}, "audit.anchor_every_s: must be a number"),
    ], ids=["unset-variable", "missing-file", "both", "in-the-config", "zero-interval",
            "interval-not-number"])
    def test_errors_name_the_key(self, tmp_path: Path, audit: dict[str, Any],
                                 env: dict[str, str], expected: str) -> None:
        assert expected in problems(tmp_path, env, **audit)


async def test_the_runtime_writes_a_keyed_chain(tmp_path: Path) -> None:
    config = load(tmp_path, {"AUDIT_KEY": KEY_TEXT}, chain_key_env="AUDIT_KEY")
    runtime = Runtime(config)
    assert KEY_TEXT not in repr(runtime.audit._key)
    runtime.audit.open()
    await runtime.audit.append({"event": "deactivate.denied"})
    await runtime.audit.close()
    await runtime.tokens.aclose()
    report = verify_files([config.audit.path], keys=[ChainKey(KEY_TEXT.encode())])
    assert report.ok and report.records == 1
