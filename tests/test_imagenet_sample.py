"""Accuracy of the bundled EfficientNet-Lite0/1/2 on real ImageNet photos (../shared/data/imagenet-sample):
`backbones classify` reaches the top-1 below (a few points under what each measured: 0.89, 0.87,
0.91 of these 100 photos) and agrees with timm's own eval pipeline on >= 99/100."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, SHARED_DATA, shared_data

pytestmark = [pytest.mark.slow, pytest.mark.data]


def _truth(photos: list[Path]) -> list[int]:
    wnids = (SHARED_DATA / "imagenet_wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    return [index[p.name.split("_", 1)[0]] for p in photos]


@pytest.mark.parametrize(
    ("name", "min_top1"), [("efficientnet_lite0", 0.87), ("efficientnet_lite1", 0.85), ("efficientnet_lite2", 0.88)]
)
def test_bundled_top1_and_agreement_with_timm(tmp_path: Path, name: str, min_top1: float) -> None:
    folder = shared_data("imagenet-sample")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    assert len(photos) == 100
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "classify", name, str(folder), "--json", "-k", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    ours = [rows[p.name]["predictions"][0]["index"] for p in photos]
    truth = _truth(photos)
    top1 = sum(o == t for o, t in zip(ours, truth, strict=True)) / len(photos)
    assert top1 >= min_top1, f"{name}: top-1 {top1:.2f}"

    # timm's own eval pipeline for the model, on the same bundled weights
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from models import get_entry
    from models.weights import build_pretrained

    entry = get_entry(name)
    net = build_pretrained(entry)
    transform = create_transform(**resolve_data_config({}, model=timm.create_model(entry.arch)))
    with torch.no_grad():
        theirs = [int(net(transform(Image.open(p).convert("RGB")).unsqueeze(0))[0].argmax()) for p in photos]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert agree >= 99, f"agrees with timm on {agree}/100"
