"""Fine-tuning data: ImageFolder and CSV scanning, readability, checks, the split, the fingerprint.
No model is involved: these run in well under a second each."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from finetune import DatasetError, make_split, scan_dataset
from finetune.data import check_readable, fingerprint, odd_formats
from finetune.split import precheck
from models.imaging import decode_image
from tests.test_finetune_support import color_image, make_dataset


def test_image_folder_scan_labels_hashes_and_fingerprint(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 3, "red": 4})
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / ".DS_Store").write_bytes(b"\0")
    s = scan_dataset(root)
    assert s.kind == "folder" and s.classes == ["blue", "red"]
    assert s.counts() == {"blue": 3, "red": 4}
    assert s.ignored == ["red/notes.txt"]
    assert {x.rel for x in s.samples} >= {"blue/blue_000.jpg", "red/red_003.jpg"}
    assert all(len(x.sha256) == 64 and x.format == "JPEG" for x in s.samples)
    before = fingerprint(s.samples)
    assert fingerprint(scan_dataset(root).samples) == before  # stable
    shutil.move(root / "red" / "red_000.jpg", root / "blue" / "red_000.jpg")  # a label changes
    moved = fingerprint(scan_dataset(root).samples)
    assert moved != before
    color_image("blue", 99).save(root / "blue" / "red_000.jpg")  # the content changes
    assert fingerprint(scan_dataset(root).samples) not in (before, moved)


def test_csv_manifest_relative_paths_header_and_missing_files(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "imgs", {"blue": 2, "red": 2})
    manifest = tmp_path / "train.csv"
    absolute = (root / "red" / "red_001.jpg").resolve()
    manifest.write_text(
        "path,label\n"
        "imgs/blue/blue_000.jpg,blue\n"
        "imgs/blue/blue_001.jpg, blue\n"
        "imgs/red/red_000.jpg,red\n"
        f"{absolute},red\n"
        "imgs/red/gone.jpg,red\n"
    )
    s = scan_dataset(manifest)
    assert s.kind == "csv" and s.root == tmp_path.resolve()
    assert s.counts() == {"blue": 2, "red": 2}
    assert [(u.rel, u.reason) for u in s.unreadable] == [("imgs/red/gone.jpg", "no such file")]
    # the same images as an ImageFolder have the same content hashes
    assert {x.sha256 for x in s.samples} == {x.sha256 for x in scan_dataset(root).samples}

    bad = tmp_path / "bad.csv"
    bad.write_text("imgs/blue/blue_000.jpg,blue\nimgs/red/red_000.jpg\n")
    with pytest.raises(DatasetError, match=r"line 2: expected two columns"):
        scan_dataset(bad)


def test_a_dataset_that_is_not_there_or_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    color_image("red", 0).save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DatasetError, match="no class folders"):
        scan_dataset(tmp_path / "flat")


def test_one_class_is_refused(tmp_path: Path) -> None:
    s = scan_dataset(make_dataset(tmp_path / "data", {"red": 5}))
    with pytest.raises(DatasetError, match=r"at least two classes, found 1 \('red'\)"):
        precheck(s)
    with pytest.raises(DatasetError, match="at least two classes"):
        make_split(s)


def test_an_empty_class_is_refused_by_name(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 4, "red": 4})
    (root / "green").mkdir()
    (root / "green" / "readme.txt").write_text("photos to come")
    with pytest.raises(DatasetError, match=r"class 'green' \(no image files\) has no usable image"):
        precheck(scan_dataset(root))


def _broken_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "ok.jpg"
    color_image("red", 50).save(good)
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "text.jpg").write_text("this is not a photo")
    (folder / "empty.png").write_bytes(b"")
    return ["empty.png", "text.jpg", "truncated.jpg"]


def test_unreadable_files_are_found_counted_and_skipped(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 4, "red": 4})
    names = _broken_files(root / "red")
    s = scan_dataset(root)
    # missing, empty or non-image files are caught by the scan (headers only) ...
    assert sorted(u.rel for u in s.unreadable) == ["red/empty.png", "red/text.jpg"]
    # ... a file that starts like a JPEG but does not decode, by the readability pass
    bad = check_readable(s.samples, decode_image)
    assert [x.rel for x in s.samples if x.sha256 in bad] == ["red/truncated.jpg"]
    usable = s.without(bad)
    assert sorted(u.rel for u in usable.unreadable) == [f"red/{n}" for n in names]
    assert usable.counts() == {"blue": 4, "red": 5}  # the good extra file stays
    split = make_split(usable, val_fraction=0.25)
    assert "red/truncated.jpg" not in {x.rel for x in split.train + split.val}


def test_a_class_whose_every_file_is_unreadable_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 4})
    (root / "red").mkdir()
    (root / "red" / "a.jpg").write_text("nope")
    (root / "red" / "b.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"class 'red' \(2 unreadable file\(s\)\) has no usable image"):
        make_split(scan_dataset(root))


def test_stratified_split_is_seeded_disjoint_and_per_class(tmp_path: Path) -> None:
    s = scan_dataset(make_dataset(tmp_path / "data", {"blue": 10, "red": 20}))
    a = make_split(s, val_fraction=0.2, seed=1)
    assert a.counts(a.val) == {"blue": 2, "red": 4}
    assert a.counts(a.train) == {"blue": 8, "red": 16}
    assert not {x.sha256 for x in a.train} & {x.sha256 for x in a.val}
    assert a.val_fraction == 0.2 and a.seed == 1 and a.labels == ["blue", "red"]
    again = make_split(scan_dataset(tmp_path / "data"), val_fraction=0.2, seed=1)
    assert [x.rel for x in again.val] == [x.rel for x in a.val]
    other = make_split(s, val_fraction=0.2, seed=2)
    assert [x.rel for x in other.val] != [x.rel for x in a.val]
    # a new class does not reshuffle the others
    make_dataset(tmp_path / "data", {"green": 5})
    grown = make_split(scan_dataset(tmp_path / "data"), val_fraction=0.2, seed=1)
    assert [x.rel for x in grown.val if x.label != "green"] == [x.rel for x in a.val]
    # every class keeps one image on each side
    tiny = make_split(scan_dataset(make_dataset(tmp_path / "two", {"blue": 2, "red": 2})), val_fraction=0.01)
    assert tiny.counts(tiny.val) == {"blue": 1, "red": 1} == tiny.counts(tiny.train)


def test_a_class_with_one_image_cannot_be_split(tmp_path: Path) -> None:
    s = scan_dataset(make_dataset(tmp_path / "data", {"blue": 1, "red": 5}))
    with pytest.raises(DatasetError, match=r"class 'blue' has 1 usable image.*--val-dir"):
        make_split(s)


def test_strong_imbalance_is_warned_about_and_weighted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = scan_dataset(make_dataset(tmp_path / "data", {"blue": 40, "red": 8}))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        split = make_split(s, val_fraction=0.25)
    assert any("strong class imbalance" in w and "'blue' has 30" in w for w in split.warnings)
    assert "strong class imbalance" in caplog.text
    blue, red = split.class_weights()
    assert red == pytest.approx(blue * 30 / 6)  # each class weighs the same in the loss
    balanced = make_split(scan_dataset(make_dataset(tmp_path / "even", {"blue": 8, "red": 8})))
    assert balanced.class_weights() == [1.0, 1.0] and not balanced.warnings


def test_duplicates_collapse_and_conflicting_labels_are_dropped(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 6, "red": 6})
    shutil.copy(root / "blue" / "blue_000.jpg", root / "blue" / "copy.jpg")  # same label: one kept
    shutil.copy(root / "red" / "red_000.jpg", root / "blue" / "mislabelled.jpg")  # two labels: both out
    split = make_split(scan_dataset(root), val_fraction=0.2)
    used = {x.rel for x in split.train + split.val}
    assert "blue/copy.jpg" not in used and "blue/blue_000.jpg" in used
    assert "blue/mislabelled.jpg" not in used and "red/red_000.jpg" not in used
    reasons = {r["path"]: r["reason"] for r in split.removed}
    assert reasons["blue/copy.jpg"] == "same content as blue/blue_000.jpg"
    assert "labelled blue and red" in reasons["red/red_000.jpg"]
    assert len(split.warnings) == 2


def test_val_dir_overlap_by_path_and_by_content_leaves_training(tmp_path: Path) -> None:
    train_root = make_dataset(tmp_path / "train", {"blue": 6, "red": 6})
    val_root = make_dataset(tmp_path / "val", {"blue": 2, "red": 2}, start=100)
    shutil.copy(train_root / "red" / "red_001.jpg", val_root / "red" / "renamed.jpg")  # same content
    manifest = tmp_path / "val.csv"  # and a manifest naming a training file itself
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(val_root.rglob("*.jpg"))]
    manifest.write_text("\n".join([*rows, "train/blue/blue_002.jpg,blue"]) + "\n")
    split = make_split(scan_dataset(train_root), scan_dataset(manifest))
    train_rels = {x.rel for x in split.train}
    assert "red/red_001.jpg" not in train_rels and "blue/blue_002.jpg" not in train_rels
    assert len(split.train) == 10 and len(split.val) == 6
    assert not {x.sha256 for x in split.train} & {x.sha256 for x in split.val}
    assert not {x.path for x in split.train} & {x.path for x in split.val}
    assert split.val_fraction is None
    reasons = {r["path"]: r["reason"] for r in split.removed}
    assert reasons == {
        "red/red_001.jpg": "the same content is in the validation data",
        "blue/blue_002.jpg": "the same file is in the validation data",
    }
    assert any("also in the validation data" in w for w in split.warnings)


def test_the_same_folder_for_train_and_val_leaves_nothing_to_train_on(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 3, "red": 3})
    with pytest.raises(DatasetError, match="after removing files shared with validation"):
        make_split(scan_dataset(root), scan_dataset(root))


def test_val_classes_must_exist_in_training(tmp_path: Path) -> None:
    train = scan_dataset(make_dataset(tmp_path / "train", {"blue": 3, "red": 3}))
    val = scan_dataset(make_dataset(tmp_path / "val", {"blue": 1, "green": 1}, start=50))
    with pytest.raises(DatasetError, match="classes the training data lacks: green"):
        make_split(train, val)


def test_rare_formats_are_pointed_out(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"blue": 20, "red": 20})
    color_image("red", 77).convert("P").save(root / "red" / "imageNotFound.gif")
    s = scan_dataset(root)
    assert [x.rel for x in odd_formats(s.samples)] == ["red/imageNotFound.gif"]
