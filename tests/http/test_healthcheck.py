"""The container probe: aiming (listen address → URL) and probing a real gateway over loopback."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.http.app import RUNTIME, create_admin_app
from gateway.http.healthcheck import ProbeError, main, resolve, target_url


class TestTargetUrl:
    @pytest.mark.parametrize(("listen", "url"), [
        ("127.0.0.1:8080", "http://127.0.0.1:8080/healthz"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080/healthz"),
        ("[::]:9000", "http://[::1]:9000/healthz"),
        ("[::1]:9000", "http://[::1]:9000/healthz"),
        ("localhost:8081", "http://localhost:8081/healthz"),
        ("192.0.2.10:80", "http://192.0.2.10:80/healthz"),  # documentation address: parsed only
    ], ids=["loopback", "ipv4-wildcard", "ipv6-wildcard", "ipv6-loopback", "name", "pod-ip"])
    def test_listen_address_becomes_url(self, listen: str, url: str) -> None:
        assert target_url(listen) == url

    @pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.1", "127.0.0.1:99999", ":x"],
                             ids=["port-0", "no-port", "port-range", "not-a-port"])
    def test_unusable_listen_address_is_refused(self, listen: str) -> None:
        with pytest.raises(ProbeError, match="listen address"):
            target_url(listen)


class TestResolve:
    def test_url_is_used_as_given(self) -> None:
        assert resolve("http://127.0.0.1:8080/readyz", None) == "http://127.0.0.1:8080/readyz"

    def test_path_goes_to_the_configs_listen_address(self, tmp_path: Path) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text('[server]\nlisten = "0.0.0.0:8181"\n', encoding="utf-8")
        assert resolve("/readyz", str(config)) == "http://127.0.0.1:8181/readyz"
        assert resolve(None, str(config)) == "http://127.0.0.1:8181/healthz"

    def test_path_goes_to_the_admin_address_when_one_is_set(self, tmp_path: Path) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text('[server]\nlisten = "127.0.0.1:8080"\nadmin_listen = "0.0.0.0:9091"\n',
                          encoding="utf-8")
        assert resolve("/readyz", str(config)) == "http://127.0.0.1:9091/readyz"
        assert resolve(None, str(config)) == "http://127.0.0.1:9091/healthz"

    def test_empty_admin_address_means_the_listen_address(self, tmp_path: Path) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text('[server]\nlisten = "127.0.0.1:8181"\nadmin_listen = ""\n',
                          encoding="utf-8")
        assert resolve(None, str(config)) == "http://127.0.0.1:8181/healthz"

    @pytest.mark.parametrize(("server", "message"), [
        ("listen = 8080", "server.listen must be a string"),
        ('admin_listen = 9091', "server.admin_listen must be a string"),
    ], ids=["listen", "admin_listen"])
    def test_address_that_is_no_string_is_refused(self, tmp_path: Path, server: str,
                                                  message: str) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text(f"[server]\n{server}\n", encoding="utf-8")
        with pytest.raises(ProbeError, match=message):
            resolve(None, str(config))

    def test_config_without_listen_uses_the_default(self, tmp_path: Path) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text("[audit]\npath = 'a.jsonl'\n", encoding="utf-8")
        assert resolve(None, str(config)) == "http://127.0.0.1:8080/healthz"

    @pytest.mark.parametrize(("argument", "config", "message"), [
        (None, None, "GATEWAY_CONFIG is not set"),
        ("/healthz", "/nonexistent/gateway.toml", "No such file"),
        ("healthz", None, "starting with /"),
        ("https://127.0.0.1:8080/healthz", None, "only http://"),
    ], ids=["no-config", "missing-config", "relative-path", "https"])
    def test_unaimable_probe_is_refused(self, argument: str | None, config: str | None,
                                        message: str) -> None:
        with pytest.raises(ProbeError, match=message):
            resolve(argument, config)

    def test_broken_toml_is_refused(self, tmp_path: Path) -> None:
        config = tmp_path / "gateway.toml"
        config.write_text("[server\n", encoding="utf-8")
        with pytest.raises(ProbeError, match="gateway.toml"):
            resolve(None, str(config))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def url_of(gateway: TestClient, path: str) -> str:
    return f"http://127.0.0.1:{gateway.server.port}{path}"


async def probe_main(*argv: str, env: dict[str, str] | None = None) -> int:
    """`main` blocks on its socket, so it runs in a thread while the loop serves the gateway."""
    return await asyncio.to_thread(main, list(argv), env or {})


class TestProbeAgainstGateway:
    async def test_healthz_and_readyz_are_healthy(self, gateway: TestClient,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
        assert await probe_main(url_of(gateway, "/healthz")) == 0
        assert await probe_main(url_of(gateway, "/readyz")) == 0
        out = capsys.readouterr().out
        assert "healthy: " in out and "/readyz: 200" in out

    async def test_bare_path_follows_gateway_config(self, gateway: TestClient,
                                                    tmp_path: Path) -> None:
        config = tmp_path / "probe.toml"
        config.write_text(f'[server]\nlisten = "127.0.0.1:{gateway.server.port}"\n',
                          encoding="utf-8")
        assert await probe_main("/readyz", env={"GATEWAY_CONFIG": str(config)}) == 0
        assert await probe_main(env={"GATEWAY_CONFIG": str(config)}) == 0

    async def test_bare_path_goes_to_the_admin_listener(self, gateway: TestClient,
                                                        aiohttp_server: Any,
                                                        tmp_path: Path) -> None:
        """With admin_listen set, the probe aims there, not at the API address (here closed)."""
        admin = await aiohttp_server(create_admin_app(gateway.server.app[RUNTIME]),
                                     host="127.0.0.1")
        config = tmp_path / "probe.toml"
        config.write_text(f'[server]\nlisten = "127.0.0.1:{closed_port()}"\n'
                          f'admin_listen = "0.0.0.0:{admin.port}"\n', encoding="utf-8")
        env = {"GATEWAY_CONFIG": str(config)}
        assert await probe_main("/readyz", env=env) == 0
        assert await probe_main(env=env) == 0

    async def test_draining_gateway_is_not_ready(self, gateway: TestClient,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        gateway.server.app[RUNTIME].draining = True
        assert await probe_main(url_of(gateway, "/readyz")) == 1
        err = capsys.readouterr().err
        assert "unhealthy: " in err and "/readyz: 503" in err and '"draining": true' in err
        assert await probe_main(url_of(gateway, "/healthz")) == 0  # alive while it drains

    async def test_unknown_route_is_unhealthy(self, gateway: TestClient) -> None:
        assert await probe_main(url_of(gateway, "/nope")) == 1

    async def test_closed_port_is_unhealthy(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert await probe_main(f"http://127.0.0.1:{closed_port()}/healthz") == 1
        assert "unhealthy: " in capsys.readouterr().err

    async def test_too_many_arguments_is_unhealthy_never_2(self) -> None:
        assert await probe_main("/healthz", "/readyz") == 1


async def run_module(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class TestEntryPoint:
    async def test_module_exit_codes(self, gateway: TestClient) -> None:
        """`python -m gateway.http.healthcheck` is what the image's HEALTHCHECK and the probes run."""
        code, out = await run_module("-m", "gateway.http.healthcheck", url_of(gateway, "/healthz"))
        assert (code, out.split(":")[0]) == (0, "healthy")
        code, out = await run_module("-m", "gateway.http.healthcheck", url_of(gateway, "/missing"))
        assert (code, out.split(":")[0]) == (1, "unhealthy")

    async def test_probe_imports_only_the_standard_library(self) -> None:
        """A probe runs every few seconds: it must not pay for aiohttp or cryptography."""
        code, out = await run_module("-c", (
            "import sys, gateway.http.healthcheck as h; "
            "print(sorted(m for m in ('aiohttp', 'cryptography', 'jwt', 'structlog', "
            "'prometheus_client', 'gateway.config', 'gateway.cli') if m in sys.modules))"))
        assert (code, out.strip()) == (0, "[]")


def test_module_is_the_images_healthcheck() -> None:
    """The Dockerfile's HEALTHCHECK runs this very module."""
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text("utf-8")
    assert '"python", "-m", "gateway.http.healthcheck"' in dockerfile

