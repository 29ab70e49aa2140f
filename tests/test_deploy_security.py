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
