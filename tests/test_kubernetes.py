"""The Kubernetes sidecar example agrees with the gateway config it carries.

The ConfigMap's gateway.toml is loaded with the gateway's own `load_config`, its mounted paths
mapped into tmp_path; probes, ports, mounts and the security context are checked against it,
and the probe routes are asked of a real gateway started from that very config.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config.loader import load_config
from gateway.config.model import Config, is_loopback
from gateway.http.app import create_app

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "config" / "kubernetes" / "gateway-sidecar.yaml"
GATEWAY = "kore-gateway"
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
SECRET_VALUE = "k8s-example-secret-0123456789abcdef"


@dataclass
class Example:
    config_map: dict[str, Any]
    deployment: dict[str, Any]

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    @property
    def gateway(self) -> dict[str, Any]:
        [container] = [c for c in self.pod["initContainers"] if c["name"] == GATEWAY]
        return container  # type: ignore[no-any-return]

    @property
    def app(self) -> dict[str, Any]:
        [container] = self.pod["containers"]
        return container  # type: ignore[no-any-return]

    def volume(self, name: str) -> dict[str, Any]:
        [volume] = [v for v in self.pod["volumes"] if v["name"] == name]
        return volume  # type: ignore[no-any-return]

    def mount(self, volume_kind: str) -> dict[str, Any]:
        """The gateway's one mount of a volume of `volume_kind` (configMap, secret, …)."""
        mounts: list[dict[str, Any]] = [m for m in self.gateway["volumeMounts"]
                                        if volume_kind in self.volume(m["name"])]
        assert len(mounts) == 1, f"expected one {volume_kind} mount, got {mounts}"
        return mounts[0]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e["value"] for e in container.get("env", [])}

    @property
    def toml_text(self) -> str:
        key = PurePosixPath(self.env(self.gateway)["GATEWAY_CONFIG"]).name
        return self.config_map["data"][key]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def example() -> Example:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    return Example(config_map, deployment)


@pytest.fixture
def raw(example: Example) -> dict[str, Any]:
    """The config as written in the manifest, before any path is mapped."""
    return tomllib.loads(example.toml_text)


@pytest.fixture
def config(example: Example, tmp_path: Path) -> Config:
    """The ConfigMap's config loaded by the gateway, every mount path mapped into tmp_path."""
    local = {m["mountPath"]: tmp_path / m["mountPath"].lstrip("/")
             for m in example.gateway["volumeMounts"]}
    for directory in local.values():
        directory.mkdir(parents=True, exist_ok=True)
    mounted = re.compile("|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
                         + "(?=/)")
    text = mounted.sub(lambda m: local[m.group(0)].as_posix(), example.toml_text)
    secret_dir = tmp_path / example.mount("secret")["mountPath"].lstrip("/")
    for item in example.volume(example.mount("secret")["name"])["secret"]["items"]:
        (secret_dir / item["path"]).write_text(SECRET_VALUE + "\n", encoding="utf-8")
    config_file = tmp_path / example.env(example.gateway)["GATEWAY_CONFIG"].lstrip("/")
    config_file.write_text(text, encoding="utf-8")
    return load_config(config_file, env={})


def probe_urls(container: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name in PROBES:
        command = container[name]["exec"]["command"]
        assert command[:3] == ["python", "-m", "gateway.http.healthcheck"], command
        yield name, command[3]


def under(path: str, directory: str) -> bool:
    return PurePosixPath(directory) in PurePosixPath(path).parents


class TestConfig:
    def test_config_loads_with_secret_from_the_secret_volume(self, config: Config) -> None:
        [app] = config.apps
        assert app.client_secret is not None and app.client_secret.reveal() == SECRET_VALUE

    def test_sidecar_listens_on_loopback_without_caller_keys(self, config: Config) -> None:
        assert config.server.auth == "none"
        assert is_loopback(config.server.host)

    def test_config_is_mounted_where_gateway_config_points(self, example: Example) -> None:
        path = PurePosixPath(example.env(example.gateway)["GATEWAY_CONFIG"])
        mount = example.mount("configMap")
        assert str(path.parent) == mount["mountPath"] and mount["readOnly"] is True
        items = example.volume(mount["name"])["configMap"]["items"]
        assert {"key": path.name, "path": path.name} in items

    def test_secret_file_is_on_the_secret_volume(self, example: Example,
                                                 raw: dict[str, Any]) -> None:
        mount = example.mount("secret")
        assert mount["readOnly"] is True and "subPath" not in mount  # updates reach the pod
        volume = example.volume(mount["name"])["secret"]
        files = {f"{mount['mountPath']}/{item['path']}" for item in volume["items"]}
        assert {app["client_secret_file"] for app in raw["apps"]} <= files

    def test_audit_path_is_on_the_audit_volume(self, example: Example,
                                               raw: dict[str, Any]) -> None:
        [mount] = [m for m in example.gateway["volumeMounts"]
                   if under(raw["audit"]["path"], m["mountPath"])]
        assert mount.get("readOnly") is not True
        assert mount["mountPath"] == "/var/lib/kore-gateway"  # the image's VOLUME

    def test_every_mount_has_a_volume(self, example: Example) -> None:
        for container in (example.gateway, example.app):
            for mount in container.get("volumeMounts", []):
                example.volume(mount["name"])


class TestProbes:
    def test_probes_reach_the_configured_listen_address(self, example: Example,
                                                        config: Config) -> None:
        for name, url in probe_urls(example.gateway):
            parts = urlsplit(url)
            assert parts.scheme == "http", name
            assert is_loopback(parts.hostname or ""), name
            assert parts.port == config.server.port, name

    def test_liveness_is_healthz_and_readiness_is_readyz(self, example: Example) -> None:
        paths = {name: urlsplit(url).path for name, url in probe_urls(example.gateway)}
        assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                         "readinessProbe": "/readyz"}

    async def test_probe_paths_are_routes_of_the_gateway(self, example: Example, config: Config,
                                                         aiohttp_client: Any) -> None:
        client = await aiohttp_client(create_app(config), server_kwargs={"host": "127.0.0.1"})
        for name, url in probe_urls(example.gateway):
            resp = await client.get(urlsplit(url).path)
            assert resp.status == 200, (name, url, await resp.text())

    def test_application_calls_the_sidecars_address(self, example: Example,
                                                    config: Config) -> None:
        parts = urlsplit(example.env(example.app)["KORE_GATEWAY_URL"])
        assert is_loopback(parts.hostname or "") and parts.port == config.server.port


class TestPod:
    def test_gateway_is_a_native_sidecar_running_serve(self, example: Example) -> None:
        assert example.gateway["restartPolicy"] == "Always"
        assert example.gateway["args"][0] == "serve"

    def test_grace_period_covers_the_drain(self, example: Example, config: Config) -> None:
        assert example.pod["terminationGracePeriodSeconds"] > config.server.drain_s

    def test_runs_as_the_images_user_on_a_read_only_root(self, example: Example) -> None:
        dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
        match = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
        assert match is not None
        security = example.gateway["securityContext"]
        assert (str(security["runAsUser"]), str(security["runAsGroup"])) == match.groups()
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert example.pod["securityContext"]["runAsNonRoot"] is True
        assert str(example.pod["securityContext"]["fsGroup"]) == match.group(2)

    def test_no_service_account_token_is_mounted(self, example: Example) -> None:
        """The gateway never calls the Kubernetes API: a token in the pod would only serve
        whoever breaks into it."""
        assert example.pod["automountServiceAccountToken"] is False

    def test_writable_paths_are_volumes(self, example: Example) -> None:
        """With a read-only root, only the audit volume and /tmp may be written."""
        writable = {m["mountPath"] for m in example.gateway["volumeMounts"]
                    if not m.get("readOnly")}
        assert writable == {"/var/lib/kore-gateway", "/tmp"}

    def test_resources_are_requested_and_memory_limited(self, example: Example) -> None:
        resources = example.gateway["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}
        assert "memory" in resources["limits"]
