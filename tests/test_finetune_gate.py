"""The promotion gate cannot promote a worse model: too few validation images refuse unless forced,
the alias moves by compare-and-set (a race is refused, not lost), an alias to a deleted version
is an error, and the full fine-tune chooses its epoch on images that are not the gate's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune import finetune, scan_dataset
from finetune.full import selection_split
from finetune.promote import commit, compare
from finetune.split import make_split
from models import Registry, RegistryError, StoredVersion
from models.export import export_catalog
from tests.test_finetune_support import config, make_dataset


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    r = Registry(tmp_path_factory.mktemp("gate") / "bentoml")
    export_catalog("tiny_cnn", registry=r)
    return r


def _swapped(root: Path, seed: int) -> Path:
    """Red and blue photos with the labels the wrong way round: a version trained on them is bad."""
    data = make_dataset(root, {"blue": 10, "red": 10}, seed=seed)
    (data / "red").rename(data / "tmp")
    (data / "blue").rename(data / "red")
    (data / "tmp").rename(data / "blue")
    return data


def _version(stored: StoredVersion | None) -> str:
    assert stored is not None
    return stored.spec.version


def test_compare_and_set_moves_an_alias_only_from_where_it_was(reg: Registry, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 4, "red": 4}, seed=51)
    a = finetune(config(data, "cas"), registry=reg).stored
    b = finetune(config(data, "cas", seed=1), registry=reg).stored
    assert a is not None and b is not None
    with pytest.raises(RegistryError, match="points to no version now, not .* as when it was read"):
        reg.compare_and_set_alias(a.tag, "production", expected=b.spec.version)
    reg.compare_and_set_alias(a.tag, "production", expected=None)
    with pytest.raises(RegistryError, match=f"cas@production points to {a.spec.version} now, not no version"):
        reg.compare_and_set_alias(b.tag, "production", expected=None)
    reg.compare_and_set_alias(b.tag, "production", expected=a.spec.version)
    assert reg.aliases("cas") == {"production": b.spec.version}
    assert [h["version"] for h in reg.alias_history("cas")] == [
        a.spec.version,
        b.spec.version,
    ]  # refusals leave no trace


def test_too_few_validation_images_refuse_to_compare_unless_forced(reg: Registry, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 10, "red": 10}, seed=52)
    weak = finetune(config(_swapped(tmp_path / "swapped", 53), "few", promote_if_better="production"), registry=reg)
    assert weak.promotion is not None and weak.promotion.promoted  # nothing to compare with: set

    good = finetune(config(data, "few", promote_if_better="production"), registry=reg)
    p = good.promotion
    assert p is not None and not p.promoted and not p.error
    assert "only 4 validation image(s), fewer than the 30 the gate compares on" in p.reason
    assert "--force-promotion" in p.reason and p.old_accuracy is None
    assert reg.aliases("few")["production"] == _version(weak.stored)

    forced = finetune(config(data, "few", promote_if_better="production", force_promotion=True), registry=reg)
    f = forced.promotion
    assert f is not None and f.promoted and f.reason == "better accuracy"
    assert f.new_accuracy is not None and f.old_accuracy is not None and f.new_accuracy > f.old_accuracy
    assert reg.aliases("few")["production"] == _version(forced.stored)


def test_an_alias_moved_between_compare_and_set_is_left_where_it_was_moved(reg: Registry, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 10, "red": 10}, seed=54)
    weak = finetune(config(_swapped(tmp_path / "swapped", 55), "race", promote_if_better="production"), registry=reg)
    good = finetune(config(data, "race"), registry=reg)
    other = finetune(config(data, "race", seed=2), registry=reg)
    assert good.stored is not None and other.stored is not None
    val = make_split(scan_dataset(data), None, seed=0).val
    assert len(val) == 4

    verdict = compare(reg, good.stored, "production", val, min_images=4)
    assert verdict.promotion.promoted and verdict.expected == _version(weak.stored)
    reg.set_alias(other.stored.tag, "production")  # another process promotes meanwhile
    p = commit(reg, verdict)
    assert not p.promoted and not p.error
    assert "it moved meanwhile" in p.reason and "the comparison no longer holds" in p.reason
    assert reg.aliases("race")["production"] == _version(other.stored)

    # the next comparison starts from where the alias is now
    assert compare(reg, good.stored, "production", val, min_images=4).expected == _version(other.stored)


def test_an_alias_to_a_deleted_version_is_an_error_not_nothing_to_beat(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 10, "red": 10}, seed=56)
    first = finetune(config(data, "gone", promote_if_better="production"), registry=reg).stored
    assert first is not None
    shutil.rmtree(first.path)  # deleted behind the registry's back (bentoml models delete, rm -r)
    second = finetune(config(data, "gone", seed=3, promote_if_better="production"), registry=reg)
    p = second.promotion
    assert p is not None and not p.promoted and p.error
    assert f"points to {first.spec.version}, which is no version of gone" in p.reason
    assert reg.aliases("gone")["production"] == first.spec.version  # left alone

    # the CLI prints the report, then says so in one line and exits 1
    from cli.main import cli
    from models import get_settings

    monkeypatch.setenv("BENTOML_HOME", str(reg.home))
    get_settings.cache_clear()
    try:
        args = ["finetune", str(data), "--backbone", "tiny_cnn", "--name", "gone", "--promote-if-better", "production"]
        result = CliRunner().invoke(cli, [*args, "--seed", "4"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "promotion: gone@production not moved: error: gone@production points to" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gone:") and "is registered, but the alias was not moved" in last


def test_the_full_fine_tune_chooses_its_epoch_on_images_the_gate_does_not_compare_on(
    reg: Registry, tmp_path: Path
) -> None:
    data = make_dataset(tmp_path / "data", {"blue": 12, "red": 12}, seed=57)
    cfg = config(data, "epochs", mode="full", epochs=3, lr=1e-2, warmup_epochs=0.5, run_dir=tmp_path / "run")
    split = make_split(scan_dataset(data), None, seed=cfg.seed)
    fit = selection_split(split, cfg)
    train, select, val = ({s.sha256 for s in part} for part in (fit.train, fit.val, split.val))
    assert train | select == {s.sha256 for s in split.train} and not train & select
    assert not select & val and len(select) == 4  # 15 % of 10 training images per class, rounded

    result = finetune(cfg, registry=reg)
    recipe = result.report["recipe"]
    assert recipe["selection"]["images"] == 4 and recipe["options"]["selection_fraction"] == 0.15
    losses = [h["selection_loss"] for h in recipe["history"]]
    assert recipe["best_epoch"] == 1 + losses.index(min(losses))
    assert all("val_loss" not in h for h in recipe["history"])
    assert result.report["metrics"]["images"] == 4  # the validation split, measured once at the end
