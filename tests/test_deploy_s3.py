"""deploy/overlays/s3: the pods serve from a registry in object storage. No shared volume is left;
the local store (BENTOML_HOME's `models` and `backbones`, where pulls land) is a size-limited
emptyDir; the bucket's URL is set and the credentials come from a Secret, none inline; the
NetworkPolicy lets the pods reach the store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from models import Registry, Settings
from models.objectstore import open_store

from .conftest import ROOT
from .test_deploy import container, render

OVERLAY = ROOT / "deploy" / "overlays" / "s3"
BENTOML_HOME = "/home/bentoml"  # BentoML's images
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "": 1}

pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


def quantity(value: str) -> int:
    """A Kubernetes quantity (``4Gi``, ``512Mi``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i|[kMG])?", str(value)).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit or ""]


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return render("s3")


@pytest.fixture(scope="module")
def pod(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objects["Deployment/backbones"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_no_persistent_volume_is_left(objects: dict[str, dict[str, Any]], pod: dict[str, Any]) -> None:
    assert not [k for k in objects if k.startswith("PersistentVolumeClaim/")]
    assert [v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == []
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = container(objects["Deployment/backbones"])["volumeMounts"]
    assert {m["name"] for m in mounts} <= volumes  # every mount has its volume


def test_the_local_store_is_a_writable_size_limited_emptydir(
    objects: dict[str, dict[str, Any]], pod: dict[str, Any]
) -> None:
    c = container(objects["Deployment/backbones"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    local = Registry(BENTOML_HOME)  # where the service's pulls write, as the registry computes it
    for folder in (local.models_dir, local.own_dir()):
        mount = mounts[str(folder)]
        assert not mount.get("readOnly", False), folder
        cache = volumes[mount["name"]]
        assert set(cache) == {"name", "emptyDir"} and quantity(cache["emptyDir"]["sizeLimit"]) > 0, cache
    # every emptyDir on disk fits in the container's ephemeral storage (else the pod is evicted first)
    on_disk = sum(
        quantity(v["emptyDir"]["sizeLimit"])
        for v in pod["volumes"]
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    )
    assert on_disk < quantity(c["resources"]["limits"]["ephemeral-storage"])
    assert c["resources"]["limits"]["ephemeral-storage"] == c["resources"]["requests"]["ephemeral-storage"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True  # the cache is the only new place written


def test_the_registry_url_is_set_and_credentials_come_from_a_secret(
    objects: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = container(objects["Deployment/backbones"])
    env = {e["name"]: e for e in c["env"]}
    url = env[Settings.env_name("registry_url")]["value"]
    assert open_store(url).display.startswith("s3://")  # a URL the service accepts (nothing is requested)
    for e in c["env"]:
        if "value" in e:  # values from a Secret (API keys) are not in the manifest
            monkeypatch.setenv(e["name"], e["value"])
    settings = Settings()  # the container's values are valid settings
    assert settings.registry_url == url and settings.swap_poll_seconds >= 1
    (source,) = c["envFrom"]
    assert source["secretRef"]["name"] and set(source) == {"secretRef"}
    assert not set(SECRET_VARS) & set(env)  # credentials only through the Secret
    assert not [k for k in objects if k.startswith("Secret/")]  # the Secret is created by hand, not shipped


def test_nothing_secret_is_written_in_the_overlay() -> None:
    for path in sorted(OVERLAY.iterdir()):
        text = path.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        assert docs, path
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path  # an AWS access key id
        assert not re.search(r"^\s*(kind:\s*Secret|stringData:|data:)", text, re.MULTILINE), path
        for var in SECRET_VARS:
            assert not re.search(rf"{var}\s*[:=]\s*[^.\s,]", text), (path, var)  # only "...", never a value


def test_the_pods_may_reach_the_store_and_still_dns(objects: dict[str, dict[str, Any]]) -> None:
    policy = objects["NetworkPolicy/backbones"]["spec"]
    ports = {(p["port"], p.get("protocol", "TCP")) for rule in policy["egress"] for p in rule["ports"]}
    assert {(443, "TCP"), (53, "UDP"), (53, "TCP")} <= ports
    assert [r["ports"] for r in policy["ingress"]] == [[{"port": "http", "protocol": "TCP"}]]  # unchanged


def test_the_overlay_keeps_the_cpu_sizing_and_names_only_its_own_files() -> None:
    doc = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    named = [OVERLAY / p["path"] for p in doc["patches"]] + [(OVERLAY / r).resolve() for r in doc["resources"]]
    assert all(p.exists() for p in named), named
    assert Path(ROOT / "deploy" / "overlays" / "cpu").resolve() in named
