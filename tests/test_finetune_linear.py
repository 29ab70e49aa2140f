"""The linear probe end to end on the tiny CNN (real export, registry, ONNX Runtime), the feature
cache, unreadable files, the promotion gate; and on real photos where ../shared/data exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from finetune import finetune
from finetune.features import cache_root
from models import InferenceModel, Registry, StoredVersion
from models.export import export_catalog
from models.spec import ONNX_FILENAME
from tests.conftest import shared_data
from tests.test_finetune_support import color_image, config, make_dataset


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry of this module's own with tiny_cnn exported once."""
    r = Registry(tmp_path_factory.mktemp("probe") / "bentoml")
    export_catalog("tiny_cnn", registry=r)
    return r


@pytest.fixture(scope="module")
def colors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("colors") / "data", {"blue": 15, "red": 15})


def test_probe_registers_one_graph_with_both_outputs_labels_and_report(reg: Registry, colors: Path) -> None:
    parent = reg.get("tiny_cnn")
    result = finetune(config(colors, "colors"), registry=reg)
    stored = result.stored
    assert stored is not None and stored.spec.name == "colors"
    spec = stored.spec
    assert spec.labels == ["blue", "red"] and spec.parent == parent.tag
    assert spec.architecture.num_classes == 2 and spec.architecture.name == "tiny_cnn"
    assert spec.preprocess == parent.spec.preprocess
    assert spec.verification["top1_agreement"] == 1.0  # verified like any export
    graph = onnx.load(str(stored.file(ONNX_FILENAME)))
    assert [o.name for o in graph.graph.output] == ["logits", "features"]

    training = spec.training
    assert training is not None
    assert training["metrics"]["accuracy"] >= 0.9
    assert training["data"]["counts"] == {"train": {"blue": 12, "red": 12}, "val": {"blue": 3, "red": 3}}
    assert training["split"] == {"seed": 0, "val_fraction": 0.2, "val_dir": None}
    assert len(training["data"]["fingerprint"]) == 64
    assert set(training["per_class"]) == {"blue", "red"}
    assert training["recipe"]["weight_decay"] in [r["weight_decay"] for r in training["recipe"]["cross_validation"]]
    report = json.loads(stored.file("report.json").read_text())
    assert report["metrics"]["confusion"]["labels"] == ["blue", "red"]
    assert sum(map(sum, report["metrics"]["confusion"]["matrix"])) == 6
    with Image.open(stored.file("confusion.png")) as png:
        assert png.format == "PNG" and png.width > 100
    assert {"report.json", "confusion.png"} <= set(spec.files)  # checksummed like the graph

    # one session: the new logits, and features identical to the backbone's (same body)
    new, old = InferenceModel(stored), InferenceModel(parent)
    photos = [color_image("red", 500), color_image("blue", 501)]
    paths = []
    for i, img in enumerate(photos):
        paths.append(colors.parent / f"probe{i}.jpg")
        img.save(paths[-1])
    assert [p[0].label for p in new.classify(paths, k=1)] == ["red", "blue"]
    np.testing.assert_allclose(new.embed(paths), old.embed(paths), atol=1e-4)


def test_a_second_run_on_the_same_photos_does_no_feature_work(tmp_path: Path, reg: Registry) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 6, "red": 6}, seed=11)  # content no other test has
    first = finetune(config(data, "cache-a"), registry=reg).report
    assert first["features"]["computed"] == 12 and first["features"]["cached"] == 0
    second = finetune(config(data, "cache-b", seed=3), registry=reg).report
    assert second["features"]["computed"] == 0 and second["features"]["cached"] == 12
    # renamed files are still hits (the key is the content); a changed file is a miss
    (data / "red" / "red_000.jpg").rename(data / "red" / "renamed.jpg")
    color_image("blue", 900).save(data / "blue" / "blue_000.jpg")
    third = finetune(config(data, "cache-c"), registry=reg).report
    assert third["features"] == {**third["features"], "computed": 1, "cached": 11}
    shards = list((cache_root(reg)).rglob("*.safetensors"))
    assert shards and all(s.stat().st_size > 0 for s in shards)


def test_unreadable_files_are_reported_counted_and_skipped(tmp_path: Path, reg: Registry) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 6, "red": 6}, seed=12)
    good = (data / "red" / "red_000.jpg").read_bytes()
    (data / "red" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (data / "blue" / "notes.jpg").write_text("not a photo")
    result = finetune(config(data, "skips"), registry=reg)
    report = result.report
    skipped = {s["path"]: s["reason"] for s in report["data"]["skipped"]}
    assert set(skipped) == {"red/truncated.jpg", "blue/notes.jpg"}
    assert "decode" in skipped["red/truncated.jpg"] and skipped["blue/notes.jpg"] == "not an image"
    counts = report["data"]["counts"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 12
    assert any("2 unreadable file(s) skipped" in w for w in report["warnings"])
    assert result.stored is not None and result.stored.spec.training["data"]["skipped_count"] == 2
    # remembered: the next run neither decodes the broken file again nor forgets to report it
    again = finetune(config(data, "skips"), registry=reg).report
    assert again["features"]["computed"] == 0
    assert {s["path"] for s in again["data"]["skipped"]} == set(skipped)


def test_a_val_dir_is_used_as_given_and_files_shared_with_training_leave_training(
    tmp_path: Path, reg: Registry
) -> None:
    train = make_dataset(tmp_path / "train", {"blue": 8, "red": 8}, seed=15)
    val = make_dataset(tmp_path / "val", {"blue": 3, "red": 3}, seed=15, start=100)
    (val / "red" / "copied.jpg").write_bytes((train / "red" / "red_002.jpg").read_bytes())
    result = finetune(config(train, "valdir", val_dir=val), registry=reg)
    report = result.report
    assert report["split"] == {"seed": 0, "val_fraction": None, "val_dir": str(val)}
    assert report["data"]["counts"] == {"train": {"blue": 8, "red": 7}, "val": {"blue": 3, "red": 4}}
    assert report["data"]["removed"] == [
        {"path": "red/red_002.jpg", "label": "red", "reason": "the same content is in the validation data"}
    ]
    assert any("also in the validation data" in w for w in report["warnings"])
    assert report["data"]["val_fingerprint"] != report["data"]["train_fingerprint"]
    assert report["metrics"]["images"] == 7


def _accuracy(stored: StoredVersion | None) -> float:
    assert stored is not None and stored.spec.training is not None
    return float(stored.spec.training["metrics"]["accuracy"])


def test_promotion_gate_moves_the_alias_only_for_a_better_version(tmp_path: Path, reg: Registry) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 10, "red": 10}, seed=13)
    # 4 validation images: below the gate's default minimum, which tests/test_finetune_gate.py covers
    name, alias, gate = "gate", "production", {"gate_min_images": 4}
    # a deliberately poor version first: trained on the same classes with the labels swapped
    swapped = make_dataset(tmp_path / "swapped", {"blue": 10, "red": 10}, seed=14)
    (swapped / "red").rename(swapped / "tmp")
    (swapped / "blue").rename(swapped / "red")
    (swapped / "tmp").rename(swapped / "blue")
    weak = finetune(config(swapped, name, promote_if_better=alias, **gate), registry=reg)
    assert weak.promotion is not None and weak.promotion.promoted
    assert "did not exist yet" in weak.promotion.reason
    assert reg.aliases(name)[alias] == weak.stored.spec.version  # type: ignore[union-attr]

    good = finetune(config(data, name, promote_if_better=alias, **gate), registry=reg)
    p = good.promotion
    assert p is not None and p.promoted and p.reason == "better accuracy"
    assert p.old_tag == weak.stored.tag and p.new_accuracy is not None and p.old_accuracy is not None  # type: ignore[union-attr]
    assert p.new_accuracy > p.old_accuracy
    assert p.new_accuracy == pytest.approx(_accuracy(good.stored))  # ONNX gate == report figure
    assert reg.aliases(name)[alias] == good.stored.spec.version  # type: ignore[union-attr]
    assert "not moved" not in p.line() and f"{p.old_accuracy:.4f}" in p.line()

    tie = finetune(config(data, name, promote_if_better=alias, **gate), registry=reg)
    t = tie.promotion
    assert t is not None and not t.promoted and "tie does not promote" in t.reason
    assert t.new_accuracy == t.old_accuracy
    assert reg.aliases(name)[alias] == good.stored.spec.version  # type: ignore[union-attr]

    # a version for other labels is another task: the gate refuses to replace the old one with it
    make_dataset(data, {"green": 10}, seed=13)
    other = finetune(config(data, name, promote_if_better=alias, **gate), registry=reg)
    o = other.promotion
    assert o is not None and not o.promoted and "other labels" in o.reason and "only here: ['green']" in o.reason
    assert reg.aliases(name)[alias] == good.stored.spec.version  # type: ignore[union-attr]
    history = reg.alias_history(name)
    assert [h["version"] for h in history] == [weak.stored.spec.version, good.stored.spec.version]  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.data
def test_probe_on_real_photos_flags_the_placeholder_and_learns_ants_vs_bees(
    tmp_path: Path, lite0_registry: Registry
) -> None:
    data = shared_data("hymenoptera/train")
    # a CSV manifest of a part of the real photos (absolute paths), with the crawler's placeholder
    rows = [f"{p},{label}" for label in ("ants", "bees") for p in sorted((data / label).glob("*.jpg"))[:25]]
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\n" + "\n".join([*rows, f"{data / 'ants' / 'imageNotFound.gif'},ants"]) + "\n")
    # a registry of its own, holding the session's EfficientNet-Lite0 export (the same files)
    src = lite0_registry.get("efficientnet_lite0")
    reg = Registry(tmp_path / "bentoml")
    fields = src.spec.model_dump(exclude={"name", "version", "created_at", "files", "schema_version"})
    reg.register("efficientnet_lite0", {f: src.file(f) for f in src.spec.files}, fields)
    result = finetune(config(manifest, "antsbees", backbone="efficientnet_lite0", batch_size=32), registry=reg)
    report = result.report
    assert report["data"]["kind"] == "csv"
    assert report["data"]["odd_format_files"] == [str(data / "ants" / "imageNotFound.gif")]
    assert report["data"]["formats"] == {"JPEG": 50, "GIF": 1}
    assert report["data"]["counts"]["val"] == {"ants": 5, "bees": 5}
    assert report["metrics"]["accuracy"] >= 0.8
