"""The linear probe that tunes itself: the cross-validated penalty (deterministic, and the one the
head is fitted with), the augmented views (the mirror image's eval view, cached), several
backbones compared by cross-validation, and the new version made from the parent's graph."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image, ImageOps
from safetensors.numpy import load_file

from finetune import FinetuneConfig, finetune, scan_dataset
from finetune.features import extract_features
from finetune.lbfgs import minimize
from finetune.linear import WEIGHT_DECAY_GRID, fit_linear_head
from finetune.recipes import parent_with_head
from finetune.views import VIEW_SETS
from models import InferenceModel, Registry, StoredVersion
from models.export import export_catalog, register_backbone
from models.fp16 import convert_version_fp16
from models.spec import ONNX_FILENAME, WEIGHTS_FILENAME
from tests.conftest import ROOT, shared_data
from tests.test_finetune_support import color_image, config, make_dataset


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    r = Registry(tmp_path_factory.mktemp("tuned") / "bentoml")
    export_catalog("tiny_cnn", registry=r)
    return r


@pytest.fixture(scope="module")
def colors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("colors") / "data", {"blue": 15, "red": 15}, seed=41)


def blobs(n: int, *, noise: float, flipped: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes in 40 dimensions, a share ``flipped`` of the labels wrong."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0, noise, (n, 40)) + np.outer(2 * y - 1, np.r_[np.ones(4), np.zeros(36)])
    wrong = rng.random(n) < flipped
    return x.astype(np.float32), np.where(wrong, 1 - y, y)


def test_the_cross_validated_penalty_is_deterministic_and_is_the_one_fitted() -> None:
    clean = blobs(120, noise=0.5, flipped=0.0, seed=1)
    noisy = blobs(120, noise=1.5, flipped=0.3, seed=2)
    chosen = []
    for x, y in (clean, noisy):
        head = fit_linear_head(x, y, 2, seed=7)
        assert [r["weight_decay"] for r in head.cv] == sorted(WEIGHT_DECAY_GRID) and head.folds == 5
        best = min(head.cv, key=lambda r: r["loss"])
        assert head.weight_decay == best["weight_decay"] and head.chosen == best
        assert f"weight decay {best['weight_decay']:g}" in head.why and "5-fold" in head.why
        # the same seed gives the same table and the same head
        again = fit_linear_head(x, y, 2, seed=7)
        assert again.cv == head.cv
        np.testing.assert_array_equal(again.weight, head.weight)
        # ... the head is the one fitted with the chosen penalty, not with any other
        given = fit_linear_head(x, y, 2, weight_decay=head.weight_decay)
        assert given.cv == [] and "as given" in given.why
        np.testing.assert_allclose(given.weight, head.weight, atol=1e-6)
        other = next(wd for wd in WEIGHT_DECAY_GRID if wd != head.weight_decay)
        assert not np.allclose(fit_linear_head(x, y, 2, weight_decay=other).weight, head.weight, atol=1e-3)
        # another seed deals other folds
        assert [r["loss"] for r in fit_linear_head(x, y, 2, seed=8).cv] != [r["loss"] for r in head.cv]
        chosen.append(head.weight_decay)
    assert chosen[0] < chosen[1]  # wrong labels call for a stronger penalty


def test_the_probes_optimizer_finds_minima() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(30, 30))
    h, target = a @ a.T + 0.01 * np.eye(30), rng.normal(size=30)  # ill-conditioned, convex

    def quadratic(x: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.5 * float((x - target) @ h @ (x - target)), h @ (x - target)

    np.testing.assert_allclose(minimize(quadratic, np.zeros(30), max_iter=2000, tolerance_change=0), target, atol=1e-4)

    def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
        f = 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
        g = np.array([-400 * x[0] * (x[1] - x[0] ** 2) - 2 * (1 - x[0]), 200 * (x[1] - x[0] ** 2)])
        return float(f), g

    np.testing.assert_allclose(minimize(rosenbrock, np.array([-1.2, 1.0]), max_iter=500), [1.0, 1.0], atol=1e-4)


def test_the_probe_counts_each_class_the_same_however_many_images_it_has() -> None:
    # 90 of one class, 10 of the other, overlapping: unweighted, the small class is mostly lost
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(90, int), np.ones(10, int)]
    x = (rng.normal(0, 1.0, (100, 8)) + np.outer(y, np.r_[1.2, np.zeros(7)])).astype(np.float32)
    weights = [100 / (2 * 90), 100 / (2 * 10)]  # Split.class_weights()
    plain = fit_linear_head(x, y, 2, weight_decay=0.01)
    balanced = fit_linear_head(x, y, 2, weight_decay=0.01, class_weights=weights)

    def recall_small(head: object) -> float:
        return float((head.logits(x)[y == 1].argmax(1) == 1).mean())  # type: ignore[attr-defined]

    assert recall_small(balanced) > recall_small(plain) + 0.2
    cv = fit_linear_head(x, y, 2, class_weights=weights).cv
    assert all(0 <= r["balanced_accuracy"] <= 1 for r in cv)


def _asymmetric_photo(path: Path) -> Path:
    """A square photo that differs from its mirror image (a dark left half)."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(80, 220, (96, 96, 3)).astype(np.uint8)
    pixels[:, :40] //= 4
    Image.fromarray(pixels).save(path)
    return path


def test_views_are_the_eval_view_of_the_mirrored_photo_and_are_cached(tmp_path: Path, reg: Registry) -> None:
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    photo = _asymmetric_photo(root / "a" / "photo.png")
    with Image.open(photo) as img:
        ImageOps.mirror(img).save(root / "b" / "mirrored.png")
    samples = {s.label: s for s in scan_dataset(root).samples}
    tiny = reg.get("tiny_cnn")
    table = extract_features(tiny, list(samples.values()), registry=reg, views=VIEW_SETS["flip"])
    assert table.stats.computed == 2 and table.stats.views == 2
    flipped = table.rows([samples["a"]], "flip")[0]
    # 96 px -> resize 72 -> crop 64: an even margin, so the mirrored crop is the mirrored photo's crop
    np.testing.assert_allclose(flipped, table.rows([samples["b"]])[0], atol=1e-4)
    assert not np.allclose(flipped, table.rows([samples["a"]])[0], atol=1e-3)

    again = extract_features(tiny, list(samples.values()), registry=reg, views=VIEW_SETS["flip"])
    assert again.stats.computed == 0 and again.stats.cached == 2
    np.testing.assert_array_equal(again.rows([samples["a"]], "flip")[0], flipped)
    crops = extract_features(tiny, [samples["a"]], registry=reg, views=VIEW_SETS["flip-crops"])
    assert crops.stats.computed == 1  # the new crops only: the image was decoded once more
    views = {v: crops.rows([samples["a"]], v)[0] for v in VIEW_SETS["flip-crops"]}
    assert len({feats.tobytes() for feats in views.values()}) == 6  # six different views


def test_a_probe_on_views_says_so_and_fits_another_head(reg: Registry, colors: Path) -> None:
    plain = finetune(config(colors, "views-plain"), registry=reg)
    flipped = finetune(config(colors, "views-flip", views="flip"), registry=reg)
    recipe = flipped.report["recipe"]
    assert recipe["views"] == ["center", "flip"] and recipe["views_per_image"] == 2
    assert flipped.report["features"]["views"] == 2
    assert "(2 view(s) each)" in recipe["why"] and recipe["cross_validation"]
    heads = [load_file(str(r.stored.file(WEIGHTS_FILENAME)))["head.weight"] for r in (plain, flipped)]  # type: ignore[union-attr]
    assert not np.allclose(heads[0], heads[1])
    assert flipped.report["metrics"]["accuracy"] >= 0.9


def _blind(reg: Registry, tmp_path: Path) -> StoredVersion:
    """tiny_cnn with its first convolution zeroed, registered as ``blind``: every image gets the
    same features, so no probe can learn from it."""
    src = reg.get("tiny_cnn")
    model = onnx.load(str(src.file(ONNX_FILENAME)))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    for t in model.graph.initializer:
        if t.name in conv.input[1:]:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    path = tmp_path / ONNX_FILENAME
    onnx.save(model, str(path))
    fields = src.spec.model_dump(exclude={"name", "version", "created_at", "files", "schema_version"})
    return reg.register("blind", {ONNX_FILENAME: path, WEIGHTS_FILENAME: src.file(WEIGHTS_FILENAME)}, fields)


def test_several_backbones_the_best_by_cross_validation_is_registered(
    tmp_path: Path, reg: Registry, colors: Path
) -> None:
    blind = _blind(reg, tmp_path)
    tiny = reg.get("tiny_cnn")
    for order in ("blind,tiny_cnn", "tiny_cnn,blind"):
        result = finetune(config(colors, "picked", backbone=order), registry=reg)
        report = result.report
        assert result.stored is not None and result.stored.spec.parent == tiny.tag
        assert report["backbone"] == tiny.tag
        rows = {r["backbone"]: r for r in report["recipe"]["backbones"]}
        assert list(rows) == [{"blind": blind.tag, "tiny_cnn": tiny.tag}[b] for b in order.split(",")]
        assert rows[tiny.tag]["chosen"] and not rows[blind.tag]["chosen"]
        assert rows[tiny.tag]["cv_loss"] < rows[blind.tag]["cv_loss"]
        assert rows[blind.tag]["cv_accuracy"] <= 0.6 and rows[tiny.tag]["val_accuracy"] >= 0.9
        assert "validation split plays no part" in report["recipe"]["backbone_choice"]
    # a given penalty is cross-validated too, to compare the backbones by
    given = finetune(config(colors, "picked", backbone="blind,tiny_cnn", weight_decay=0.1), registry=reg).report
    assert [r["weight_decay"] for r in given["recipe"]["backbones"]] == [0.1, 0.1]
    assert given["backbone"] == tiny.tag


def test_backbone_lists_are_checked_and_auto_means_the_offline_catalog(colors: Path) -> None:
    auto = FinetuneConfig(data=colors, backbone="auto", name="x")
    assert auto.backbones == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    for bad, message in [
        ("tiny_cnn,,blind", "empty entry"),
        ("tiny_cnn,tiny_cnn", "twice"),
        ("auto,tiny_cnn", "'auto' stands alone"),
    ]:
        with pytest.raises(Exception, match=message):
            FinetuneConfig(data=colors, backbone=bad, name="x")
    with pytest.raises(Exception, match="give one backbone with --mode full"):
        FinetuneConfig(data=colors, backbone="auto", name="x", mode="full")


def test_the_probe_is_the_parents_graph_with_a_new_head(tmp_path: Path, reg: Registry, colors: Path) -> None:
    parent = reg.get("tiny_cnn")
    stored = finetune(config(colors, "grafted"), registry=reg).stored
    assert stored is not None
    spec = stored.spec
    assert spec.training is not None and spec.training["recipe"]["graph"] == "the parent's graph with the new head"
    assert spec.verification["max_abs_feature_diff"] <= 1e-4 and spec.verification["top1_agreement"] == 1.0
    old, new = (onnx.load(str(v.file(ONNX_FILENAME))) for v in (parent, stored))
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in old.graph.node]
    changed = {
        t.name
        for t, u in zip(new.graph.initializer, old.graph.initializer, strict=True)
        if t.SerializeToString() != u.SerializeToString()
    }
    assert changed == {"head.weight", "head.bias"}
    weights, parent_weights = (
        load_file(str(stored.file(WEIGHTS_FILENAME))),
        load_file(str(parent.file(WEIGHTS_FILENAME))),
    )
    assert weights["head.weight"].shape == (2, 32)
    for k in parent_weights:
        if not k.startswith("head."):
            np.testing.assert_array_equal(weights[k], parent_weights[k], err_msg=k)

    # it answers like the same network exported from PyTorch
    net = parent_with_head(parent, weights["head.weight"], weights["head.bias"])
    exported = register_backbone(
        net, registry=reg, name="exported", preprocess=spec.preprocess, labels=spec.labels, parent=parent.tag,
        architecture=spec.architecture,
    )  # fmt: skip
    photos = []
    for i, label in enumerate(["red", "blue", "red"]):
        photos.append(tmp_path / f"{i}.jpg")
        color_image(label, 600 + i, seed=41).save(photos[-1])
    a, b = InferenceModel(stored), InferenceModel(exported)
    batch = a.loader.batch(photos)
    np.testing.assert_allclose(a.run(batch).logits, b.run(batch).logits, atol=1e-4)
    np.testing.assert_allclose(a.run(batch).features, b.run(batch).features, atol=1e-5)


def test_a_probe_on_a_graph_that_takes_a_head_never_imports_pytorch(reg: Registry, colors: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from models import Registry; from finetune import FinetuneConfig, finetune; "
        f"r = finetune(FinetuneConfig(data=Path({str(colors)!r}), backbone='tiny_cnn', name='no-torch', workers=0), "
        f"registry=Registry({str(reg.home)!r})); "
        "print(r.report['recipe']['graph'], '|', sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "the parent's graph with the new head | []"


def test_a_parent_whose_graph_cannot_take_a_head_is_exported_from_pytorch(reg: Registry, colors: Path) -> None:
    half = convert_version_fp16(reg.get("tiny_cnn"), registry=reg, name="tiny_half")
    result = finetune(config(colors, "from-half", backbone="tiny_half"), registry=reg)
    assert result.stored is not None and result.stored.spec.precision == "fp32"
    graph = result.report["recipe"]["graph"]
    assert graph.startswith("exported from PyTorch") and f"{half.tag} is fp16" in graph
    assert result.report["metrics"]["accuracy"] >= 0.9


@pytest.mark.slow
@pytest.mark.data
def test_backbone_auto_on_real_photos_registers_the_best_offline_backbone(
    tmp_path: Path, lite0_registry: Registry
) -> None:
    data = shared_data("hymenoptera/train")
    photos = tmp_path / "photos"  # a part of the real photos, to keep three feature passes short
    for label in ("ants", "bees"):
        (photos / label).mkdir(parents=True)
        for p in sorted((data / label).glob("*.jpg"))[:30]:
            (photos / label / p.name).symlink_to(p)
    reg = Registry(tmp_path / "bentoml")
    src = lite0_registry.get("efficientnet_lite0")
    fields = src.spec.model_dump(exclude={"name", "version", "created_at", "files", "schema_version"})
    reg.register("efficientnet_lite0", {f: src.file(f) for f in src.spec.files}, fields)  # lite1, 2: first use
    result = finetune(FinetuneConfig(data=photos, backbone="auto", name="antsbees", batch_size=16), registry=reg)
    rows = result.report["recipe"]["backbones"]
    assert [r["backbone"].split(":")[0] for r in rows] == [f"efficientnet_lite{i}" for i in range(3)]
    best = min(rows, key=lambda r: r["cv_loss"])
    assert best["chosen"] and sum(r["chosen"] for r in rows) == 1
    assert result.stored is not None and result.stored.spec.parent == best["backbone"]
    assert result.report["metrics"]["accuracy"] >= 0.8
    report = json.loads(result.stored.file("report.json").read_text())
    assert report["recipe"]["backbones"] == rows
