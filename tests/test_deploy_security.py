"""deploy/ as a security review expects it: a read-only root file system with every place the
service writes on an emptyDir, seccomp's runtime default, no service-account token, no privilege,
ephemeral storage bounded, and a NetworkPolicy that opens only the HTTP port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT

BASE = ROOT / "deploy" / "base"
BENTOML_HOME = "/home/bentoml"  # BentoML's images


def load(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return doc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    return load(BASE / "deployment.yaml")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_pod_runs_unprivileged_under_seccomp_without_a_token(pod: dict[str, Any]) -> None:
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "ephemeral-storage" in c["resources"]["limits"]


def _service_write_paths() -> list[str]:
    """Where the service writes inside the container, as the service's own libraries compute it
    with the container's environment: the temporary folder and BentoML's Prometheus files."""
    (c,) = load(BASE / "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    code = (
        "import tempfile, os\n"
        "os.makedirs(os.environ['TMPDIR'], exist_ok=True)\n"
        "from bentoml._internal.configuration.containers import BentoMLContainer as C\n"
        "print(tempfile.gettempdir()); print(C.prometheus_multiproc_dir.get())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env, "BENTOML_HOME": BENTOML_HOME, "TMPDIR": env.get("TMPDIR", "/tmp")},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_every_place_the_service_writes_is_an_emptydir(pod: dict[str, Any]) -> None:
    (c,) = pod["containers"]
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty and not m.get("readOnly")}
    for path in _service_write_paths():
        assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (path, writable)
    for v in pod["volumes"]:
        if "emptyDir" in v:
            assert v["emptyDir"].get("sizeLimit"), v  # a runaway writer cannot fill the node
    # the registry is read, never written, by the service
    registry = [m for m in c["volumeMounts"] if m["name"] == "registry"]
    assert registry and all(m["readOnly"] for m in registry)


def test_network_policy_opens_only_the_http_port() -> None:
    policy = load(BASE / "networkpolicy.yaml")
    deployment = load(BASE / "deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in c["ports"]}
    ingress_ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports and all(p["port"] in port_names for p in ingress_ports)
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53}
    assert "networkpolicy.yaml" in load(BASE / "kustomization.yaml")["resources"]


def _requirements() -> dict[str, str]:
    lines = (ROOT / "deploy" / "requirements-serve.txt").read_text().splitlines()
    pins = [line.split(";")[0].strip() for line in lines if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, _, version in (p.partition("==") for p in pins)}


def test_the_service_image_installs_the_locked_versions() -> None:
    """deploy/requirements-serve.txt is what uv.lock says (regenerated, it is unchanged), every
    line is an exact pin, and both bentofiles install from it."""
    proc = subprocess.run(["make", "-s", "check-requirements"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    pins = _requirements()
    assert pins and all(v for v in pins.values())
    for bentofile in (ROOT / "bentofile.yaml", ROOT / "deploy" / "overlays" / "gpu" / "bentofile.yaml"):
        python = load(bentofile)["python"]
        assert python == {"requirements_txt": "./deploy/requirements-serve.txt", "lock_packages": False}, bentofile
    # the training stack stays out of the image
    assert not {"torch", "torchvision", "timm", "ray"} & pins.keys()


def test_everything_the_service_imports_is_in_the_image() -> None:
    """Import what `backbones serve` runs (the CLI's serve command, the service's modules, the
    remote registry) in a fresh interpreter: each third-party distribution loaded is pinned, and
    neither the batch job nor the trainer (which the image does not ship) is imported."""
    code = (
        "import sys, json, importlib.metadata as md\n"
        "at_start = set(sys.modules)  # what site (.pth files) loaded, not the service\n"
        "import cli.main, cli.serve, service.http, service.pool, service.drain, service.batching\n"
        "import service.oip_routes, service.metrics, models.remote, bentoml, onnxruntime\n"
        "dists = md.packages_distributions()\n"
        "loaded = {d for m in set(sys.modules) - at_start for d in dists.get(m.split('.')[0], [])}\n"
        "assert not {m.split('.')[0] for m in sys.modules} & {'embed', 'finetune', 'torch'}, 'not in the image'\n"
        "print(json.dumps(sorted(loaded)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    loaded = {d.lower().replace("_", "-") for d in __import__("json").loads(out.stdout)}
    missing = loaded - _requirements().keys() - {"backbones"}
    assert not missing, f"imported by the service but not in deploy/requirements-serve.txt: {sorted(missing)}"
