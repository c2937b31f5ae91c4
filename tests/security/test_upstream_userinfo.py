"""`upstream.base_url` with `user:password@` is refused (start-up and check-config), and the
upstream is shown only as `host:port` everywhere: `/readyz`, metric labels, the start-up log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config.loader import load_config
from gateway.config.model import ConfigError, upstream_host, with_changes
from gateway.http.app import create_app
from tests.conftest import base_settings, write_config

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-Pa55word-in-the-url"
USERINFO_URLS = [
    f"http://kore-user:{PASSWORD}@127.0.0.1:9",
    f"https://kore-user:{PASSWORD}@bots.kore.ai",
    f"https://{PASSWORD}@bots.kore.ai",
    f"https://kore-user:{PASSWORD}@[::1]:8443",
]


def userinfo_config(tmp_path: Path, base_url: str) -> Path:
    return write_config(tmp_path, base_settings(tmp_path, base_url))


def run_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


class TestRefused:
    @pytest.mark.parametrize("base_url", USERINFO_URLS)
    def test_config_error_names_key_and_file_not_the_password(self, tmp_path: Path,
                                                              base_url: str) -> None:
        path = userinfo_config(tmp_path, base_url)
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        text = str(caught.value)
        assert f"{path}: upstream.base_url: must not carry user:password@" in text
        assert PASSWORD not in text and "kore-user" not in text

    def test_check_config_refuses_it(self, tmp_path: Path) -> None:
        path = userinfo_config(tmp_path, USERINFO_URLS[0])
        result = run_gateway("check-config", "--config", str(path))
        assert result.returncode == 2
        assert f"{path}: upstream.base_url: must not carry user:password@" in result.stderr
        assert PASSWORD not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr

    def test_serve_refuses_to_start(self, tmp_path: Path) -> None:
        path = userinfo_config(tmp_path, USERINFO_URLS[0])
        result = run_gateway("serve", "--config", str(path))
        assert result.returncode == 2
        assert "upstream.base_url" in result.stderr and str(path) in result.stderr
        assert PASSWORD not in result.stdout + result.stderr

    def test_a_plain_url_still_loads(self, tmp_path: Path) -> None:
        path = userinfo_config(tmp_path, "https://bots.kore.ai")
        assert load_config(path, env={}).upstream.base_url == "https://bots.kore.ai"


class TestShownAsHostPort:
    @pytest.mark.parametrize(("base_url", "shown"), [
        ("https://bots.kore.ai", "bots.kore.ai:443"),
        ("https://platform.kore.ai/", "platform.kore.ai:443"),
        ("http://127.0.0.1:9090", "127.0.0.1:9090"),
        ("http://localhost", "localhost:80"),
        ("https://[::1]:8443", "[::1]:8443"),
        (f"https://kore-user:{PASSWORD}@bots.kore.ai:444", "bots.kore.ai:444"),
    ])
    def test_upstream_host(self, base_url: str, shown: str) -> None:
        assert upstream_host(base_url) == shown

    async def test_readyz_metrics_and_start_log_show_host_port_only(
            self, tmp_path: Path, aiohttp_client: Any) -> None:
        """Even a config built in code around the loader never shows the userinfo."""
        config = load_config(userinfo_config(tmp_path, "http://127.0.0.1:9"), env={})
        config = with_changes(config, upstream=with_changes(
            config.upstream, base_url=f"http://kore-user:{PASSWORD}@127.0.0.1:9"))
        with capture_logs() as logs:
            client = await aiohttp_client(create_app(config),
                                          server_kwargs={"host": "127.0.0.1"})
            readyz = await (await client.get("/readyz")).json()
            metrics = await (await client.get("/metrics")).text()
            await client.close()
        [started] = [e for e in logs if e["event"] == "gateway.started"]
        assert started["upstream"] == "127.0.0.1:9"
        assert readyz["circuit"]["host"] == "127.0.0.1:9"
        assert 'kore_gateway_circuit_state{bot="*",host="127.0.0.1:9"}' in metrics
        everything = repr(logs) + repr(readyz) + metrics
        assert PASSWORD not in everything and "kore-user" not in everything
