"""deploy/ checked by the tools a cluster operator would use, offline: kustomize renders every
overlay, kubernetes-validate (strict) and checkov accept the output and the Dockerfile, promtool
checks and unit-tests the alert rules; and the manifests agree with the server: ports, probes,
health service names, entrypoint arguments, /dev/shm size, and every metric they query."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from loramerge.server.app import SERVICES
from loramerge.server.auth import check_exposure
from loramerge.server.cli import build_parser
from loramerge.server.config import Settings, load_settings
from metric_names import exported_metrics, names_in

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "multi-replica", "gpu-multi")
KUBERNETES_VERSION = "1.37.0"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make system-deps` / `make install`")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered by `kubectl kustomize` into its own file."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [_tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, f"{overlay}: {result.stderr}"
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(result.stdout)
    return files


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(docs, "Deployment", "loramerge")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "loramerge"]
    return dict(container)


def _settings(docs: list[dict[str, Any]], tmp_path: Path) -> Settings:
    """The settings the server would build in the pod: the ConfigMap file + the env."""
    config = _one(docs, "ConfigMap")["data"]["loramerge.yaml"]
    path = tmp_path / "loramerge.yaml"
    path.write_text(config)
    env = {e["name"]: e["value"] for e in _container(docs)["env"] if "value" in e}
    if "http" not in Settings.model_fields:  # until the OpenAI endpoint (helper "clients") lands
        env = {k: v for k, v in env.items() if not k.startswith("LORAMERGE_HTTP__")}
    args = build_parser().parse_args(["serve", *_container(docs)["args"]])
    assert args.config == Path("/etc/loramerge/loramerge.yaml")
    return load_settings(path, environ=env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_settings_agree_with_the_server(
    rendered: dict[str, Path], overlay: str, tmp_path: Path
) -> None:
    docs = _documents(rendered[overlay])
    settings = _settings(docs, tmp_path)
    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"grpc": settings.grpc.port, "metrics": settings.metrics.port}
    if "http" in Settings.model_fields:
        expected["http"] = settings.http.port  # type: ignore[attr-defined]
    assert {name: ports[name] for name in expected} == expected
    assert settings.grpc.host == settings.metrics.host == "0.0.0.0"
    check_exposure(settings)  # the server's own start check: remote listeners need auth

    service = _one(docs, "Service", "loramerge")["spec"]["ports"]
    for port in service:
        assert port["port"] == ports[port["targetPort"]], port
    assert {p["name"]: p.get("appProtocol") for p in service}["grpc"] == "grpc"

    known_services = {"", *SERVICES.values()}
    budget = (
        container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
    )
    assert budget >= 600, "model load and pool warm-up need minutes"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == settings.grpc.port, probe
        assert grpc_probe["service"] in known_services, probe

    # The image has no `prepare` extra: the model and adapters come from the volumes.
    assert settings.engine.model == Path("/models/base")
    assert not settings.adapters.use_default_pool
    pod = _one(docs, "Deployment", "loramerge")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > settings.grpc.grace_seconds + 30
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/adapters"]["readOnly"]
    assert str(settings.merge.export_dir).startswith("/dev/shm/")
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_tmpfs_alert_knows_the_shm_size(rendered: dict[str, Path], overlay: str) -> None:
    docs = _documents(rendered[overlay])
    pod = _one(docs, "Deployment", "loramerge")["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    size = shm["emptyDir"]["sizeLimit"]
    groups = _one(docs, "PrometheusRule")["spec"]["groups"]
    (constant,) = [
        r for g in groups for r in g["rules"] if r.get("record") == "loramerge:shm_size_bytes"
    ]
    assert constant["expr"] == f"vector({_bytes(size)})"


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** (["Ki", "Mi", "Gi", "Ti"].index(unit) + 1)


def test_multi_replica_scales_on_a_metric_prometheus_adapter_exposes(
    rendered: dict[str, Path],
) -> None:
    docs = _documents(rendered["multi-replica"])
    hpa = _one(docs, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "rules.yaml").read_text())
    exposed = {rule["name"]["as"]: rule for rule in rules["rules"]["custom"]}
    assert metric["pods"]["metric"]["name"] in exposed
    deployment = _one(docs, "Deployment", "loramerge")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    container = _container(docs)
    store = {e["name"]: e for e in container["env"]}["LORAMERGE_STORE__URL"]["value"]
    assert store.startswith("postgresql://")
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_tenant_id"


def test_gpu_overlays_request_gpus_and_tensor_parallel_matches(rendered: dict[str, Path]) -> None:
    for overlay, gpus in (("gpu", 1), ("multi-replica", 1), ("gpu-multi", 4)):
        container = _container(_documents(rendered[overlay]))
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus, overlay
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert int(env.get("LORAMERGE_ENGINE__TENSOR_PARALLEL_SIZE") or 1) == gpus, overlay


def test_rendered_manifests_pass_kubernetes_validate_strict(rendered: dict[str, Path]) -> None:
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet",
         *map(str, rendered.values())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the Prometheus Operator's CRDs may lack a schema (a warning).
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("WARN"):
            assert "monitoring.coreos.com" in line, line


def test_checkov_passes_manifests_and_dockerfile(rendered: dict[str, Path]) -> None:
    """No failed check; skips carry their reason next to them (deployment.yaml, Dockerfile)."""
    directory = next(iter(rendered.values())).parent
    shutil.copy(DEPLOY / "docker" / "Dockerfile", directory / "Dockerfile")
    result = subprocess.run(
        [_tool("checkov"), "--quiet", "--compact", "--skip-download", "--output", "json",
         "--framework", "kubernetes", "dockerfile", "--directory", str(directory)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert failed == []
    for report in reports:
        assert report["summary"]["passed"] > 50
        for skipped in report["results"].get("skipped_checks", []):
            assert skipped["check_result"].get("suppress_comment"), skipped["check_id"]


def test_generated_copies_are_current() -> None:
    """The ConfigMap file and the PrometheusRule copy deploy/loramerge.example.yaml and
    deploy/alerts (kustomize reads only below a kustomization)."""
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "k8s" / "sync.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = _tool("promtool")
    alerts = DEPLOY / "alerts"
    check = subprocess.run(
        [promtool, "check", "rules", str(alerts / "loramerge.rules.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", str(alerts / "loramerge.rules.test.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr
    rules = yaml.safe_load((alerts / "loramerge.rules.yaml").read_text())
    alerts_defined = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = yaml.safe_load((alerts / "loramerge.rules.test.yaml").read_text())
    alerts_tested = {
        case["alertname"]
        for test in tested["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts_tested == alerts_defined, "every alert has a unit test that fires it"


def _queries() -> dict[str, str]:
    """Every PromQL expression in deploy/: alert rules, HPA adapter rule, dashboard."""
    queries = {}
    rules = yaml.safe_load((DEPLOY / "alerts" / "loramerge.rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            queries[f"rule {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "rules.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        queries[f"prometheus-adapter {rule['name']['as']}"] = rule["seriesQuery"]
    dashboard = json.loads((DEPLOY / "dashboards" / "loramerge.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return queries


def test_every_metric_deploy_queries_is_exported() -> None:
    exported = exported_metrics()
    recorded = {
        rule["record"]
        for group in yaml.safe_load((DEPLOY / "alerts" / "loramerge.rules.yaml").read_text())[
            "groups"
        ]
        for rule in group["rules"]
        if "record" in rule
    }
    missing: dict[str, set[str]] = {}
    for where, expr in _queries().items():
        names = names_in(expr)
        if where != "rule loramerge:shm_size_bytes" and "up{" not in expr:
            assert names, f"{where} names none of our metrics: {expr}"
        unknown = names - exported - recorded
        if unknown:
            missing[where] = unknown
    assert missing == {}


def test_entrypoint_arguments_are_accepted_by_our_cli() -> None:
    """ENTRYPOINT + CMD of the image parse with our parser, and the image's default config
    loads; the manifests' args are checked per overlay above."""
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint[0] == "loramerge"
    args = build_parser().parse_args([*entrypoint[1:], *cmd])
    assert args.command == "serve"
    config = re.search(r"^COPY (deploy/docker/\S+) (\S+)$", dockerfile, re.M)
    assert config is not None and Path(config.group(2)) == args.config
    settings = load_settings(ROOT / config.group(1), environ={})
    assert settings.grpc.host == "0.0.0.0" and settings.engine.model is not None
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}  # type: ignore[union-attr]
    assert {settings.grpc.port, settings.metrics.port} <= exposed
