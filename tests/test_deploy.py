"""deploy/: the manifests parse and agree with each other and with the service (port, probes,
grace period, settings, metric names), and `bentoml build` packages the service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from models import Settings

from .conftest import ROOT, jpeg_bytes, registry_with

DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
OVERLAYS = ("cpu", "gpu")


def bentoml_port() -> int:
    """The port `backbones serve` listens on unless told: BentoML's default, which its image exposes."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return int(BentoMLContainer.http.port.get())


PORT = bentoml_port()
PRESTOP_SLEEP = 5  # the preStop hook's sleep
GRACE_MARGIN = 5

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization_files(folder: Path) -> Iterator[Path]:
    """Every file a kustomization names (resources, patches, generator inputs), recursively."""
    doc = load_all(folder / "kustomization.yaml")[0]
    for res in doc.get("resources", []):
        target = (folder / res).resolve()
        if target.is_dir():
            yield target / "kustomization.yaml"
            yield from kustomization_files(target)
        else:
            yield target
    for patch in doc.get("patches", []):
        if "path" in patch:
            yield (folder / patch["path"]).resolve()
    for gen in doc.get("configMapGenerator", []):
        for f in gen.get("files", []):
            yield (folder / f.split("=", 1)[-1]).resolve()


def base_objects() -> dict[str, dict[str, Any]]:
    """The base's objects by kind (one of each)."""
    objects = [o for p in kustomization_files(DEPLOY / "base") for o in load_all(p)]
    objects += load_all(MONITORING / "servicemonitor.yaml")
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), "one object of each kind expected"
    return by_kind


def render(overlay: str) -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (renders the kustomize overlays)")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", []) if "value" in e}


def test_every_file_parses_and_every_kustomization_names_existing_files() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 14
    for p in files:
        assert json.loads(p.read_text()) if p.suffix == ".json" else load_all(p), p
    for folder in [DEPLOY / "base", MONITORING, *(DEPLOY / "overlays" / o for o in OVERLAYS)]:
        named = list(kustomization_files(folder))
        missing = [str(p) for p in named if not p.is_file()]
        assert named and not missing, missing


def test_selectors_labels_ports_and_names_agree() -> None:
    objs = base_objects()
    dep, svc, hpa, pdb, mon = (
        objs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor")
    )
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert svc["spec"]["selector"] == selector and pdb["spec"]["selector"]["matchLabels"] == selector
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", dep["metadata"]["name"], dep["apiVersion"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]  # a drain never blocks forever
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    (sport,) = svc["spec"]["ports"]
    assert sport["port"] == PORT and sport["targetPort"] in ports
    assert [e["port"] for e in mon["spec"]["endpoints"]] == [sport["name"]]
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {c[p]["httpGet"]["port"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} <= set(ports)
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts <= {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    scrape = load_all(MONITORING / "scrape.yml")[0]["scrape_configs"][0]
    keep = scrape["relabel_configs"][0]
    assert keep["regex"] == ";".join(pod_labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/component"))


def test_the_pod_runs_backbones_serve_so_dead_workers_are_replaced() -> None:
    """The image's own `bentoml serve` runs with BENTOML_CONTAINERIZED set, which turns BentoML's
    worker respawn off; `backbones serve` unsets it (cli/serve.py CONTAINER_MARKERS)."""
    from cli.serve import CONTAINER_MARKERS

    for overlay in OVERLAYS:
        c = container(render(overlay)["Deployment/backbones"])
        args = c.get("command", []) + c.get("args", [])
        assert args[:4] == ["python", "-m", "cli", "serve"], (overlay, args)
        assert int(args[args.index("--port") + 1]) == PORT
        assert c["workingDir"].endswith("/src")
        assert not set(CONTAINER_MARKERS) & {e["name"] for e in c.get("env", [])}


def test_grace_period_covers_prestop_drain_delay_and_drain() -> None:
    fields = Settings.model_fields
    drain_delay, drain = fields["drain_delay_seconds"].default, fields["drain_seconds"].default
    expected = PRESTOP_SLEEP + drain_delay + drain + GRACE_MARGIN
    assert expected == 43  # the figure the Deployment's comment explains
    for overlay in OVERLAYS:
        dep = render(overlay)["Deployment/backbones"]
        spec = dep["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == expected, overlay
        assert container(dep)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP)]
        env = env_of(dep)
        assert not {Settings.env_name("drain_seconds"), Settings.env_name("drain_delay_seconds")} & env.keys()


def _settings_from(env: dict[str, str]) -> Settings:
    prefix = Settings.model_config.get("env_prefix", "")
    by_env = {Settings.env_name(field): field for field in Settings.model_fields}
    unknown = {k for k in env if k.startswith(prefix) and k not in by_env}
    assert not unknown, f"the manifest sets variables no setting reads: {unknown}"
    return Settings.model_validate({by_env[k]: v for k, v in env.items() if k.startswith(prefix)})


def test_overlays_size_the_pod_the_way_the_settings_read_it() -> None:
    cpu = render("cpu")["Deployment/backbones"]
    res = container(cpu)["resources"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS: the cores are the pod's own
    settings = _settings_from(env_of(cpu))  # every BACKBONES_ variable is a real, valid setting
    assert settings.workers == int(res["requests"]["cpu"]) and settings.providers == "cpu"
    assert settings.served_refs() == ["efficientnet_lite0"]

    gpu_objs = render("gpu")
    gpu = gpu_objs["Deployment/backbones"]
    res = container(gpu)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1
    spec = gpu["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]) and spec["nodeSelector"]
    settings = _settings_from(env_of(gpu))
    # one worker process per requested core, as with a GPU on a whole machine (models/runtime.py)
    assert settings.providers == "auto" and settings.workers == int(res["requests"]["cpu"])
    assert settings.decode_threads == 1
    assert gpu_objs["HorizontalPodAutoscaler/backbones"]["spec"]["maxReplicas"] <= 4
    for overlay, objs in (("cpu", render("cpu")), ("gpu", gpu_objs)):
        kinds = {k.split("/")[0] for k in objs}
        assert {
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "ConfigMap",
        } <= kinds, overlay
        _settings_from(env_of(objs["Deployment/backbones"]))


# -- metric names: what the alerts and the dashboard use must be what the service exports ------

_METRIC = re.compile(r"\b((?:backbones|bentoml)_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b((?:backbones|bentoml)_[a-z0-9_]+)\{([^}]*)\}")


def alert_exprs() -> list[str]:
    groups = load_all(MONITORING / "alerts.yml")[0]["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads((MONITORING / "backbones.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


def project_metrics() -> dict[str, set[str]]:
    """The series names service/metrics.py creates (counters get _total, histograms _bucket,
    _sum and _count) with their label names, read from the metric objects themselves."""
    from service.metrics import metrics

    out: dict[str, set[str]] = {}
    for metric in vars(metrics()).values():
        (family,) = metric.describe()
        labels = set(metric._labelnames)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[family.type]
        for s in suffixes:
            out[family.name + s] = labels | ({"le"} if s == "_bucket" else set())
    return out


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Series names and their label names from a real /metrics scrape of the running service,
    after a good request and a bad one."""
    from .serving import start_server, stop_server

    home = registry_with(tmp_path_factory.mktemp("deploy") / "bentoml", "tiny_cnn").home
    server = start_server(home, ["tiny_cnn"], tmp_path_factory.mktemp("log") / "server.log")
    try:
        assert server.post("/classify", jpeg_bytes(0)).status_code == 200
        assert server.post("/embed", b"not an image").status_code == 400
        text = httpx.get(server.url + "/metrics", timeout=30).text
    finally:
        stop_server(server)
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2) or ""))
    return out


@pytest.mark.slow
def test_alerts_and_dashboard_use_only_exported_metrics_and_labels(scraped: dict[str, set[str]]) -> None:
    project = project_metrics()
    for name in project:  # the in-process view and the real scrape agree where both see a series
        if name in scraped:
            assert scraped[name] <= project[name], name
    exported = {**scraped, **project}
    exprs = alert_exprs() + dashboard_exprs()
    used = {m for e in exprs for m in _METRIC.findall(e)}
    assert used and not used - set(exported), sorted(used - set(exported))
    for expr in exprs:
        for name, selector in _SELECTOR.findall(expr):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", selector))
            assert labels <= exported[name], (name, labels - exported[name])
    # every project metric has a place on the dashboard
    on_dashboard = {m for e in dashboard_exprs() for m in _METRIC.findall(e)}
    bare = {re.sub(r"_(bucket|sum|count)$", "", m) for m in on_dashboard}
    assert {re.sub(r"_(bucket|sum|count)$", "", m) for m in project} <= bare


def test_alert_outcomes_are_outcomes_the_service_counts() -> None:
    """``outcome="..."`` values must be among those the metric's own help text lists."""
    from service.metrics import metrics

    declared: dict[str, set[str]] = {}
    for metric in vars(metrics()).values():
        (family,) = metric.describe()
        listed = re.search(r"outcome \(([^)]*)\)", family.documentation)  # "... by outcome (ok, failed)"
        if listed:
            declared[family.name + "_total"] = set(listed.group(1).replace(" ", "").split(","))
    assert declared.keys() == {"backbones_requests_total", "backbones_model_swaps_total"}
    used = 0
    for expr in alert_exprs() + dashboard_exprs():
        for name, selector in _SELECTOR.findall(expr):
            for value in re.findall(r'outcome="(\w+)"', selector):
                assert value in declared[name], (name, value)
                used += 1
    assert used >= 4
    names = [r["alert"] for g in load_all(MONITORING / "alerts.yml")[0]["groups"] for r in g["rules"]]
    assert len(names) == len(set(names)) >= 4
    for topic in ("Error", "Latency", "Shedding", "SwapFailed"):
        assert any(topic in n for n in names), topic


# -- bentoml build -----------------------------------------------------------------------------


def _bentoml_build(bentofile: Path, home: Path) -> Path:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    args = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "--output", "tag"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return home / "bentos" / name / version


@pytest.mark.slow
@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "deploy/overlays/gpu/bentofile.yaml"])
def test_bentoml_build_packages_the_service(tmp_path: Path, bentofile: str) -> None:
    bento = _bentoml_build(ROOT / bentofile, tmp_path / "bentoml")
    for f in ("service/bento.py", "service/http.py", "models/registry.py", "models/preflight_child.py", "cli/main.py"):
        assert (bento / "src" / f).is_file(), f
    # the image ships what `backbones serve` imports, not the batch job or the trainer
    for folder in ("finetune", "embed"):
        assert not (bento / "src" / folder).exists(), folder
    info = load_all(bento / "bento.yaml")[0]
    assert info["service"] == "service.bento:Backbones"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert f"EXPOSE {PORT}" in dockerfile
    # the Deployment runs the service from the bento's code folder inside the image
    (bento_path,) = re.findall(r"ARG BENTO_PATH=(\S+)", dockerfile)
    assert container(base_objects()["Deployment"])["workingDir"] == f"{bento_path}/src"
    if "gpu" in bentofile:
        assert "cuda" in dockerfile.lower()
    root = load_all(ROOT / "bentofile.yaml")[0]
    this = load_all(ROOT / bentofile)[0]
    assert this["python"] == root["python"] and this["include"] == root["include"]
