"""The full fine-tune on the tiny CNN: registration, the frozen phase, checkpoints and resume, and a
distributed run with two gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from finetune import TrainingError, finetune
from finetune.checkpoint import latest_checkpoint
from finetune.config import FULL_WEIGHT_DECAY
from finetune.full import recipe_options
from models import Registry, StoredVersion
from models.export import export_catalog
from models.spec import WEIGHTS_FILENAME
from tests.conftest import ROOT
from tests.test_finetune_support import color_image, config, make_dataset

FULL = {"mode": "full", "epochs": 3, "freeze_epochs": 1, "lr": 1e-2, "warmup_epochs": 0.5, "patience": 5}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    r = Registry(tmp_path_factory.mktemp("full") / "bentoml")
    export_catalog("tiny_cnn", registry=r)
    return r


@pytest.fixture(scope="module")
def colors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("colors") / "data", {"blue": 12, "red": 12}, seed=21)


def _weights(stored: StoredVersion | None) -> dict[str, np.ndarray]:
    assert stored is not None
    return load_file(str(stored.file(WEIGHTS_FILENAME)))


def test_frozen_epochs_leave_the_backbone_and_its_batchnorm_statistics_alone(reg: Registry, colors: Path) -> None:
    result = finetune(config(colors, "frozen", mode="full", epochs=1, freeze_epochs=1, lr=1e-2), registry=reg)
    parent, new = _weights(reg.get("tiny_cnn")), _weights(result.stored)
    body = [k for k in parent if k.startswith("body.")]
    assert any("running_mean" in k for k in body)  # BatchNorm statistics are among them
    for k in body:
        np.testing.assert_array_equal(new[k], parent[k], err_msg=k)
    assert new["head.weight"].shape == (2, 32) and np.abs(new["head.weight"]).sum() > 0
    assert result.report["recipe"]["history"][0]["frozen"] is True


def test_an_interrupted_run_resumed_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, reg: Registry, colors: Path
) -> None:
    straight = finetune(config(colors, "straight", run_dir=tmp_path / "a", **FULL), registry=reg)
    report = straight.report
    history = report["recipe"]["history"]
    assert [h["frozen"] for h in history] == [True, False, False]
    assert report["metrics"]["accuracy"] >= 0.9
    assert report["recipe"]["resumed_from_epoch"] == 0 and report["recipe"]["world_size"] == 1
    parent = _weights(reg.get("tiny_cnn"))
    assert not np.array_equal(_weights(straight.stored)["body.features.0.weight"], parent["body.features.0.weight"])
    assert latest_checkpoint(tmp_path / "a") is None  # cleared once the version is registered

    run_dir = tmp_path / "b"
    stopped = finetune(config(colors, "resumed", run_dir=run_dir, stop_after_epochs=1, **FULL), registry=reg)
    assert stopped.interrupted and stopped.stored is None and "resumed" not in reg.names()
    assert latest_checkpoint(run_dir) is not None

    with pytest.raises(TrainingError, match=r"different run \(lr: 0.01 -> 0.02\)"):
        finetune(config(colors, "resumed", run_dir=run_dir, resume=True, **{**FULL, "lr": 2e-2}), registry=reg)

    resumed = finetune(config(colors, "resumed", run_dir=run_dir, resume=True, **FULL), registry=reg)
    assert resumed.report["recipe"]["resumed_from_epoch"] == 1
    again = resumed.report["recipe"]["history"]
    assert [h["frozen"] for h in again] == [True, False, False]  # the freeze phase ended on schedule
    for a, b in zip(history, again, strict=True):
        assert a["selection_loss"] == pytest.approx(b["selection_loss"], abs=1e-6)
        assert a["lr_head"] == pytest.approx(b["lr_head"])  # the schedule continued, not restarted
    w_straight, w_resumed = _weights(straight.stored), _weights(resumed.stored)
    for k in w_straight:
        np.testing.assert_allclose(w_resumed[k], w_straight[k], rtol=0, atol=1e-6, err_msg=k)


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path, reg: Registry, colors: Path) -> None:
    # a learning rate so small that nothing improves after the first epoch: patience 1 stops at 2
    opts = {**FULL, "epochs": 6, "freeze_epochs": 0, "lr": 1e-12, "patience": 1}
    result = finetune(config(colors, "early", run_dir=tmp_path / "run", **opts), registry=reg)
    recipe = result.report["recipe"]
    assert recipe["stopped_early"] is True
    assert recipe["epochs_run"] == 2 and recipe["best_epoch"] == 1
    assert len(recipe["history"]) == 2 and result.stored is not None


def test_the_recipe_options_are_the_configs_with_the_weight_decay_it_trains_with(colors: Path) -> None:
    options = recipe_options(config(colors, "opts", **FULL))
    assert options["lr"] == FULL["lr"] and options["batch_size"] == 8
    assert options["weight_decay"] == FULL_WEIGHT_DECAY  # not given: the full fine-tune's own default
    assert recipe_options(config(colors, "opts", weight_decay=0.0, **FULL))["weight_decay"] == 0.0  # given: kept


def test_resume_without_a_checkpoint_says_so(tmp_path: Path, reg: Registry, colors: Path) -> None:
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        finetune(config(colors, "nothing", run_dir=tmp_path / "empty", resume=True, **FULL), registry=reg)


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun_register_one_version(tmp_path: Path, reg: Registry) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 12, "red": 13}, seed=22)
    report_path = tmp_path / "report.json"
    env = {**os.environ, "BENTOML_HOME": str(reg.home), "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "finetune.train", str(data), "--backbone", "tiny_cnn", "--name", "ddp", "--mode", "full",
        "--epochs", "2", "--lr", "0.01", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--run-dir", str(tmp_path / "run"), "--report-out", str(report_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    recipe = report["recipe"]
    assert recipe["world_size"] == 2 and recipe["device"] == "cpu"
    # 20 training images (25 minus 2 + 3 for validation), 2 + 2 of them held out to choose the
    # epoch: 16 in two shards of 8, 2 batches of 4 each
    assert recipe["selection"]["images"] == 4
    assert recipe["steps_per_epoch"] == 2
    assert len(recipe["history"]) == 2
    # validation was split 3 + 2 across the processes and gathered whole, in order
    assert report["metrics"]["images"] == 5
    assert report["metrics"]["per_class"]["red"]["support"] == 3
    versions = reg.list("ddp")
    assert [v.tag for v in versions] == [report["model"]]  # rank 0 alone registered
    from models import InferenceModel

    photo = tmp_path / "red.jpg"
    color_image("red", 700, seed=22).save(photo)
    assert InferenceModel(reg.get("ddp")).classify([photo], k=1)[0][0].label == "red"
