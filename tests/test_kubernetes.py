"""The Kubernetes sidecar example agrees with the gateway config it carries.

The ConfigMap's gateway.toml is loaded with the gateway's own `load_config`, its mounted paths
mapped into tmp_path; probes, ports, annotations, mounts and the security context are checked
against it, and the probe and scrape routes are asked of a real gateway started from that very
config. The audit shipper's tail paths must match every file the gateway writes (real files,
rotated and per worker), and what it ships must verify once put back together. Every object is
validated against the Kubernetes API schemas (kubernetes-validate, offline; kubeconform would
fetch its schemas from the network at run time).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import random
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.audit.log import AuditLog, rotated_files
from gateway.config.loader import load_config
from gateway.config.model import Config, is_loopback
from gateway.http.app import RUNTIME, create_admin_app, create_app
from gateway.http.runtime import audit_path
from gateway.logs import LogFile, worker_file

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "config" / "kubernetes"
MANIFEST = KUBE / "gateway-sidecar.yaml"
MONITORING = KUBE / "servicemonitor.yaml"
VERIFY_SHIPPED = KUBE / "verify-shipped-audit.sh"
GATEWAY, SHIPPER = "kore-gateway", "audit-shipper"
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
SECRET_VALUE = "k8s-example-secret-0123456789abcdef"
KUBERNETES_VERSIONS = ("1.29", "1.37")  # native sidecars need 1.29; the newest schemas known
WILDCARDS = ("0.0.0.0", "::", "")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def fluent_bit(text: str) -> list[tuple[str, dict[str, list[str]]]]:
    """Fluent Bit's classic format: ([SECTION], {key (lower case): [values]}) in order."""
    sections: list[tuple[str, dict[str, list[str]]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1].upper(), {}))
            continue
        key, _, value = line.partition(" ")
        sections[-1][1].setdefault(key.lower(), []).append(value.strip())
    return sections


@dataclass
class Example:
    config_maps: dict[str, dict[str, Any]]
    deployment: dict[str, Any]

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    def init(self, name: str) -> dict[str, Any]:
        [container] = [c for c in self.pod["initContainers"] if c["name"] == name]
        return container  # type: ignore[no-any-return]

    @property
    def gateway(self) -> dict[str, Any]:
        return self.init(GATEWAY)

    @property
    def shipper(self) -> dict[str, Any]:
        return self.init(SHIPPER)

    @property
    def app(self) -> dict[str, Any]:
        [container] = self.pod["containers"]
        return container  # type: ignore[no-any-return]

    def volume(self, name: str) -> dict[str, Any]:
        [volume] = [v for v in self.pod["volumes"] if v["name"] == name]
        return volume  # type: ignore[no-any-return]

    def mount(self, volume_kind: str, container: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        """A container's one mount of a volume of `volume_kind` (configMap, secret, …)."""
        container = self.gateway if container is None else container
        mounts: list[dict[str, Any]] = [m for m in container["volumeMounts"]
                                        if volume_kind in self.volume(m["name"])]
        assert len(mounts) == 1, f"expected one {volume_kind} mount, got {mounts}"
        return mounts[0]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in container.get("env", [])}

    def port(self, container: dict[str, Any], name: str) -> int:
        [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
        return int(port)

    def config_file(self, container: dict[str, Any], path: str) -> str:
        """The text of the ConfigMap file that `container` sees at `path`."""
        mount = self.mount("configMap", container)
        assert str(PurePosixPath(path).parent) == mount["mountPath"], (path, mount)
        source = self.volume(mount["name"])["configMap"]
        [key] = [i["key"] for i in source["items"] if i["path"] == PurePosixPath(path).name]
        return self.config_maps[source["name"]]["data"][key]  # type: ignore[no-any-return]

    @property
    def toml_text(self) -> str:
        return self.config_file(self.gateway, self.env(self.gateway)["GATEWAY_CONFIG"])

    @property
    def shipper_conf(self) -> list[tuple[str, dict[str, list[str]]]]:
        args = self.shipper["args"]
        return fluent_bit(self.config_file(self.shipper, args[args.index("-c") + 1]))

    def tails(self, tag: str) -> dict[str, list[str]]:
        [tail] = [s for name, s in self.shipper_conf
                  if name == "INPUT" and s["name"] == ["tail"] and s["tag"] == [tag]]
        return tail

    def seen_by_shipper(self, path: str) -> str:
        """Where the shipper sees a file the gateway writes at `path` (same volume)."""
        [gw] = [m for m in self.gateway["volumeMounts"] if under(path, m["mountPath"])]
        [own] = [m for m in self.shipper["volumeMounts"] if m["name"] == gw["name"]]
        relative = PurePosixPath(path).relative_to(gw["mountPath"])
        return str(PurePosixPath(own["mountPath"]) / relative)


@pytest.fixture(scope="module")
def example() -> Example:
    docs = documents(MANIFEST)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    return Example(config_maps, deployment)


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


def http_probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in PROBES:
        probe = container[name]
        assert "exec" not in probe, f"{name}: the admin listener makes exec probes unneeded"
        yield name, probe["httpGet"]


def under(path: str, directory: str) -> bool:
    return PurePosixPath(directory) in PurePosixPath(path).parents


def matches(patterns: list[str], path: str) -> bool:
    """Whether a tail `Path` value (comma-separated globs) matches `path`, as glob(3) does:
    `*` never crosses a `/`."""
    return any(PurePosixPath(path).parent == PurePosixPath(p).parent
               and fnmatch.fnmatchcase(PurePosixPath(path).name, PurePosixPath(p).name)
               for value in patterns for p in value.split(","))


class TestConfig:
    def test_config_loads_with_secret_from_the_secret_volume(self, config: Config) -> None:
        [app] = config.apps
        assert app.client_secret is not None and app.client_secret.reveal() == SECRET_VALUE

    def test_sidecar_listens_on_loopback_without_caller_keys(self, config: Config) -> None:
        assert config.server.auth == "none"
        assert is_loopback(config.server.host)

    def test_admin_listener_is_on_the_pod_ip(self, config: Config) -> None:
        assert config.server.admin_host in WILDCARDS  # what the kubelet and Prometheus reach

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

    @pytest.mark.parametrize("key", [("audit", "path"), ("logging", "file")],
                             ids=["audit-path", "log-file"])
    def test_written_files_are_on_the_audit_volume(self, example: Example, raw: dict[str, Any],
                                                   key: tuple[str, str]) -> None:
        [mount] = [m for m in example.gateway["volumeMounts"]
                   if under(raw[key[0]][key[1]], m["mountPath"])]
        assert mount.get("readOnly") is not True
        assert mount["mountPath"] == "/var/lib/kore-gateway"  # the image's VOLUME

    def test_every_mount_has_a_volume(self, example: Example) -> None:
        for container in (example.gateway, example.shipper, example.app):
            for mount in container.get("volumeMounts", []):
                example.volume(mount["name"])


class TestProbes:
    def test_probes_reach_the_admin_listener(self, example: Example, config: Config) -> None:
        for name, get in http_probes(example.gateway):
            assert example.port(example.gateway, get["port"]) == config.server.admin_port, name
            assert get.get("scheme", "HTTP") == "HTTP" and "host" not in get, name

    def test_liveness_is_healthz_and_readiness_is_readyz(self, example: Example) -> None:
        paths = {name: get["path"] for name, get in http_probes(example.gateway)}
        assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz",
                         "readinessProbe": "/readyz"}

    async def test_probe_and_scrape_paths_are_routes_of_the_admin_listener(
            self, example: Example, config: Config, aiohttp_client: Any) -> None:
        api = await aiohttp_client(create_app(config), server_kwargs={"host": "127.0.0.1"})
        admin = await aiohttp_client(create_admin_app(api.server.app[RUNTIME]),
                                     server_kwargs={"host": "127.0.0.1"})
        scrape = example.deployment["spec"]["template"]["metadata"]["annotations"]
        for path in [get["path"] for _, get in http_probes(example.gateway)] + [
                scrape["prometheus.io/path"]]:
            resp = await admin.get(path)
            assert resp.status == 200, (path, await resp.text())
        assert (await api.get(scrape["prometheus.io/path"])).status == 404  # admin only

    def test_application_calls_the_sidecars_address(self, example: Example,
                                                    config: Config) -> None:
        url = example.env(example.app)["KORE_GATEWAY_URL"]
        host, _, port = url.removeprefix("http://").rpartition(":")
        assert is_loopback(host) and int(port) == config.server.port


class TestScraping:
    def test_annotations_name_the_admin_port(self, example: Example, config: Config) -> None:
        annotations = example.deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == config.server.admin_port

    def test_service_monitor_scrapes_the_admin_port_of_these_pods(self,
                                                                  example: Example) -> None:
        docs = documents(MONITORING)
        [service] = [d for d in docs if d["kind"] == "Service"]
        [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
        pod_labels = example.deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["clusterIP"] == "None"  # every pod, not a balanced one
        assert monitor["spec"]["selector"]["matchLabels"].items() \
            <= service["metadata"]["labels"].items()
        [endpoint] = monitor["spec"]["endpoints"]
        [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert example.port(example.gateway, port["targetPort"]) == port["port"]
        assert endpoint["path"] == "/metrics"


class TestShipper:
    def test_ships_from_before_the_gateway_and_stops_after_it(self, example: Example) -> None:
        """Native sidecars stop in reverse order: the shipper reads the last lines."""
        names = [c["name"] for c in example.pod["initContainers"]]
        assert names.index(SHIPPER) < names.index(GATEWAY)
        assert example.shipper["restartPolicy"] == "Always"

    def test_tails_every_audit_file_the_gateway_writes(self, example: Example, config: Config,
                                                       raw: dict[str, Any],
                                                       tmp_path: Path) -> None:
        """Real files: the current and rotated ones, of one writer and of each worker."""
        written = asyncio.run(write_rotating_chains(config, workers=(1, 2)))
        assert len(written) >= 9  # several rotations, per worker too
        local = Path(config.audit.path).parent
        paths = example.tails("kore.audit")["path"]
        for path in written:
            on_pod = str(PurePosixPath(raw["audit"]["path"]).parent
                         / path.relative_to(local).as_posix())
            assert matches(paths, example.seen_by_shipper(on_pod)), path.name
        for stray in ("gateway.jsonl", "deactivations.jsonl.swp", "other.jsonl"):
            on_pod = str(PurePosixPath(raw["audit"]["path"]).parent / stray)
            assert not matches(paths, example.seen_by_shipper(on_pod)), stray

    def test_tails_every_log_file_the_gateway_writes(self, example: Example, config: Config,
                                                     raw: dict[str, Any]) -> None:
        names = [raw["logging"]["file"], raw["logging"]["file"] + ".1",
                 worker_file(raw["logging"]["file"], 0), worker_file(raw["logging"]["file"], 7)]
        rotating = LogFile(config.logging.file, max_bytes=4096)
        for _ in range(100):
            rotating.write("x" * 99 + "\n")
        rotating.close()
        local = sorted(p.name for p in Path(config.logging.file).parent.iterdir())
        assert {PurePosixPath(n).name for n in names[:2]} == set(local)  # the names assumed
        for name in names:
            assert matches(example.tails("kore.log")["path"], example.seen_by_shipper(name))

    def test_never_drops_or_skips_a_line(self, example: Example) -> None:
        for tag in ("kore.audit", "kore.log"):
            tail = example.tails(tag)
            assert tail["skip_long_lines"] == ["off"] and tail["read_from_head"] == ["true"]
            assert tail["path_key"] == ["file"]  # each line says which chain it belongs to
            assert "parser" not in tail  # the line is shipped as written
        outputs = [s for name, s in example.shipper_conf if name == "OUTPUT"]
        assert outputs and all(o["retry_limit"] == ["no_limits"] for o in outputs)

    def test_state_is_writable_and_the_audit_read_only(self, example: Example,
                                                       raw: dict[str, Any]) -> None:
        [gateway_audit] = [m for m in example.gateway["volumeMounts"]
                           if under(raw["audit"]["path"], m["mountPath"])]
        [audit] = [m for m in example.shipper["volumeMounts"]
                   if m["name"] == gateway_audit["name"]]
        assert audit["readOnly"] is True  # the shipper cannot alter what it ships
        writable = {m["mountPath"] for m in example.shipper["volumeMounts"]
                    if not m.get("readOnly")}
        service = dict(example.shipper_conf)["SERVICE"]
        state = [*service["storage.path"], *example.tails("kore.audit")["db"],
                 *example.tails("kore.log")["db"]]
        for path in state:
            assert any(under(path, w) for w in writable), path

    def test_every_variable_it_uses_is_set(self, example: Example) -> None:
        args = example.shipper["args"]
        text = example.config_file(example.shipper, args[args.index("-c") + 1])
        used = set(re.findall(r"\$\{(\w+)\}", text))
        assert used and used <= set(example.env(example.shipper)), used

    def test_records_name_the_pod(self, example: Example) -> None:
        [modify] = [s for name, s in example.shipper_conf
                    if name == "FILTER" and s["name"] == ["modify"]]
        assert "pod ${POD_NAME}" in modify["add"]
        [pod_name] = [e for e in example.shipper["env"] if e["name"] == "POD_NAME"]
        assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    def test_liveness_probe_names_its_port(self, example: Example) -> None:
        get = example.shipper["livenessProbe"]["httpGet"]
        service = dict(example.shipper_conf)["SERVICE"]
        assert example.port(example.shipper, get["port"]) == int(service["http_port"][0])

    @pytest.mark.skipif(sys.platform != "linux", reason="bash and jq")
    def test_shipped_lines_put_back_together_verify(self, config: Config,
                                                    tmp_path: Path) -> None:
        """What Fluent Bit ships (every line with its file and pod, in any order, some twice)
        is put back together by verify-shipped-audit.sh and verifies; a lost line fails."""
        written = asyncio.run(write_rotating_chains(config, workers=(1, 2)))
        records = [{"log": line, "file": f"/var/lib/kore-gateway/audit/{path.name}",
                    "pod": "my-service-1", "namespace": "default"}
                   for path in written for line in path.read_text("utf-8").splitlines()]
        records += records[3:5] + [{**records[0], "pod": "another-pod"}]
        records += [{"log": json.dumps(anchor), "file": "/var/lib/kore-gateway/log/gateway.jsonl",
                     "pod": "my-service-1", "namespace": "default"} for anchor in heads(written)]
        random.Random(7).shuffle(records)
        shipped = tmp_path / "shipped.jsonl"
        shipped.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        out = tmp_path / "out"
        done = run_verify_shipped(shipped, out, "--anchors", str(out / "gateway.jsonl"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(p.name for p in out.glob("deactivations*")) == [
            "deactivations-w0.jsonl", "deactivations-w1.jsonl", "deactivations.jsonl"]
        assert done.stdout.count("chain intact, 1 anchor(s) agree") == 3, done.stdout
        shipped.write_text("".join(json.dumps(r) + "\n" for r in records
                                   if r is not records[len(records) // 2]), encoding="utf-8")
        lost = run_verify_shipped(shipped, tmp_path / "out")
        assert lost.returncode == 1 and "BROKEN" in lost.stderr


async def write_rotating_chains(config: Config, workers: tuple[int, ...]) -> list[Path]:
    """Real audit files as the gateway names them: each writer's chain, rotated a few times."""
    written: list[Path] = []
    for count in workers:
        for worker in range(count):
            log = AuditLog(audit_path(config, worker, count), max_bytes=1024, fsync=False)
            log.open()
            for n in range(12):
                await log.append({"event": "deactivate.requested", "requestId": f"r-{n}",
                                  "userId": f"u-{n}", "botId": "st-demo"})
            await log.close()
            written += rotated_files(log.path)
    return written


def heads(files: list[Path]) -> list[dict[str, Any]]:
    """The `audit.anchor` log line of each chain's last record, as the gateway logs it."""
    last: dict[str, dict[str, Any]] = {}
    for path in files:
        for line in path.read_text("utf-8").splitlines():
            record = json.loads(line)
            name = re.sub(r"\.\d{6}\.jsonl$", ".jsonl", path.name)
            last[name] = {"event": "audit.anchor", "level": "info", "seq": record["seq"],
                          "file": f"/var/lib/kore-gateway/audit/{name}", "hash": record["hash"]}
    return list(last.values())


def run_verify_shipped(shipped: Path, out: Path, *options: str
                       ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out),
           "KORE_GATEWAY": str(Path(sys.executable).parent / "kore-gateway")}
    return subprocess.run(["bash", str(VERIFY_SHIPPED), str(shipped), "my-service-1", *options],
                          capture_output=True, text=True, timeout=120, env=env, check=False)


class TestPod:
    def test_gateway_is_a_native_sidecar_running_serve(self, example: Example) -> None:
        assert example.gateway["restartPolicy"] == "Always"
        assert example.gateway["args"][0] == "serve"

    def test_grace_period_covers_the_drain(self, example: Example, config: Config) -> None:
        """The gateway drains, then the shipper (stopped after it) flushes its last lines."""
        grace = int(dict(example.shipper_conf)["SERVICE"]["grace"][0])
        assert example.pod["terminationGracePeriodSeconds"] > config.server.drain_s + grace

    def test_runs_as_the_images_user_on_a_read_only_root(self, example: Example) -> None:
        dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
        match = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
        assert match is not None
        security = example.gateway["securityContext"]
        assert (str(security["runAsUser"]), str(security["runAsGroup"])) == match.groups()
        assert example.pod["securityContext"]["runAsNonRoot"] is True
        assert str(example.pod["securityContext"]["fsGroup"]) == match.group(2)
        for container in (example.gateway, example.shipper):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]

    def test_no_service_account_token_is_mounted(self, example: Example) -> None:
        """The gateway never calls the Kubernetes API: a token in the pod would only serve
        whoever breaks into it."""
        assert example.pod["automountServiceAccountToken"] is False

    def test_writable_paths_are_volumes(self, example: Example) -> None:
        """With a read-only root, only the audit volume and /tmp may be written."""
        writable = {m["mountPath"] for m in example.gateway["volumeMounts"]
                    if not m.get("readOnly")}
        assert writable == {"/var/lib/kore-gateway", "/tmp"}

    @pytest.mark.parametrize("name", [GATEWAY, SHIPPER])
    def test_resources_are_requested_and_memory_limited(self, example: Example,
                                                        name: str) -> None:
        resources = example.init(name)["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}
        assert "memory" in resources["limits"]


class TestSchemas:
    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    @pytest.mark.parametrize("path", [MANIFEST, MONITORING], ids=lambda p: p.name)
    def test_every_object_is_valid(self, path: Path, version: str) -> None:
        """Strict: an unknown or misspelt field fails too. ServiceMonitor is a CRD, outside
        the API's schemas: TestScraping checks it against the Service and the pods."""
        checked = 0
        for doc in documents(path):
            if doc["kind"] == "ServiceMonitor":
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        assert checked

    def test_a_misspelt_field_is_caught(self, example: Example) -> None:
        broken = json.loads(json.dumps(example.deployment))
        broken["spec"]["template"]["spec"]["initContainers"][1]["readinesProbe"] = {}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
