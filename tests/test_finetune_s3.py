"""Fine-tuning from object storage, against a real S3 API server (moto's, on a local port; see
tests/s3server.py): an s3:// ImageFolder and manifests of object URLs train exactly what the same
images on disk train (linear probe and full fine-tune); the feature cache is keyed by the objects'
checksums (a re-run embeds nothing, an overwritten object is embedded again); unreadable and
missing objects are skipped and reported as files are; a bad URL is one line; and the CLI trains
from a bucket and publishes to a registry in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from cli.main import cli
from finetune import FinetuneResult, finetune
from finetune.report_html import html_report_path
from models import Registry, StoredVersion
from models.export import export_catalog
from models.remote import RemoteRegistry
from models.spec import WEIGHTS_FILENAME

from .conftest import assert_clear_error, jpeg_bytes
from .test_finetune_support import color_image, config, make_dataset

if TYPE_CHECKING:
    from .s3server import S3Server

pytest_plugins = ("tests.s3server",)  # the session's S3 server: the fixture ``s3``
pytestmark = pytest.mark.slow

THUMBNAIL = "data:image/jpeg;base64,"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry of this module's own with tiny_cnn exported once (its feature cache included)."""
    r = Registry(tmp_path_factory.mktemp("s3-probe") / "bentoml")
    export_catalog("tiny_cnn", registry=r)
    return r


def overlapping(root: Path, n: int, *, seed: int) -> Path:
    """An ImageFolder of two classes whose colours overlap (a third of each class has the other's
    colour), so that some validation images are misclassified. Each seed gives other pixels."""
    for label, colors in (("ants", ["blue", "blue", "red"]), ("bees", ["red", "red", "blue"])):
        (root / label).mkdir(parents=True)
        for i in range(n):
            color_image(colors[i % 3], i, seed=seed).save(root / label / f"{label}_{i:03d}.jpg", quality=92)
    return root


def upload(s3: S3Server, local: Path, url: str) -> str:
    """Every file under ``local`` to the same relative keys under ``url``; returns ``url``."""
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.put(f"{url}/{f.relative_to(local).as_posix()}", f.read_bytes())
    return url


def _weights(stored: StoredVersion | None) -> dict[str, np.ndarray]:
    assert stored is not None
    return load_file(str(stored.file(WEIGHTS_FILENAME)))


def _thumbnails(reg: Registry, result: FinetuneResult) -> int:
    stored = result.stored
    assert stored is not None
    return html_report_path(reg, stored.spec.name, stored.spec.version).read_text().count(THUMBNAIL)


def assert_same_training(got: FinetuneResult, want: FinetuneResult) -> None:
    """Same labels, counts, split, metrics and head (up to float tolerance) from other locations."""
    a, b = got.report, want.report
    assert a["labels"] == b["labels"]
    assert a["data"]["counts"] == b["data"]["counts"]
    assert a["metrics"]["confusion"] == b["metrics"]["confusion"]
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss"):
        assert a["metrics"][metric] == pytest.approx(b["metrics"][metric], abs=1e-6), metric
    mine, theirs = _weights(got.stored), _weights(want.stored)
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_allclose(mine[k], theirs[k], atol=1e-5, err_msg=k)


def test_an_s3_folder_and_manifests_of_urls_train_what_the_local_folder_trains(
    s3: S3Server, reg: Registry, tmp_path: Path
) -> None:
    local = overlapping(tmp_path / "photos", 12, seed=1)
    bucket = s3.bucket("ft-same")
    folder = upload(s3, local, f"{bucket}/photos")
    rows = sorted(f.relative_to(local).as_posix() for f in local.rglob("*.jpg"))
    # on disk, a manifest of absolute URLs; in the bucket, one of paths relative to its own prefix
    urls = tmp_path / "urls.csv"
    urls.write_text("path,label\n" + "".join(f"{folder}/{r},{r.split('/')[0]}\n" for r in rows))
    relative = s3.put(f"{bucket}/lists/train.csv", "".join(f"../photos/{r},{r.split('/')[0]}\n" for r in rows).encode())

    want = finetune(config(local, "on-disk"), registry=reg)
    assert want.report["features"]["computed"] == 24
    misses = _thumbnails(reg, want)
    assert misses > 0  # the gallery has something to show
    for source in (folder, str(urls), relative):
        got = finetune(config(source, "in-bucket"), registry=reg)
        assert got.report["data"]["source"] == source
        assert_same_training(got, want)
        # the misclassified images are drawn from the objects' bytes
        assert _thumbnails(reg, got) == misses
    # the manifests name the objects the folder run embedded: their features came from the cache
    assert (got.report["features"]["computed"], got.report["features"]["cached"]) == (0, 24)


def test_a_rerun_embeds_nothing_and_an_overwritten_object_is_embedded_again(
    s3: S3Server, reg: Registry, tmp_path: Path
) -> None:
    local = overlapping(tmp_path / "photos", 10, seed=2)  # pixels of its own: nothing cached yet
    folder = upload(s3, local, s3.bucket("ft-cache") + "/photos")

    first = finetune(config(folder, "cached"), registry=reg).report["features"]
    assert (first["computed"], first["cached"]) == (20, 0)
    again = finetune(config(folder, "cached"), registry=reg).report["features"]
    assert (again["computed"], again["cached"]) == (0, 20)

    changed = color_image("red", 999, seed=2)
    path = tmp_path / "changed.jpg"
    changed.save(path, quality=92)
    s3.put(f"{folder}/ants/ants_004.jpg", path.read_bytes())  # same key, new content
    third = finetune(config(folder, "cached"), registry=reg).report["features"]
    assert (third["computed"], third["cached"]) == (1, 19)


def test_unreadable_and_missing_objects_are_skipped_and_reported_as_files_are(
    s3: S3Server, reg: Registry, tmp_path: Path
) -> None:
    local = make_dataset(tmp_path / "photos", {"blue": 6, "red": 6}, seed=3)
    good = (local / "red" / "red_000.jpg").read_bytes()
    (local / "red" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (local / "red" / "empty.jpg").write_bytes(b"")
    (local / "blue" / "notes.jpg").write_text("not a photo")
    bucket = s3.bucket("ft-skips")
    upload(s3, local, f"{bucket}/photos")
    rows = [f"photos/{f.relative_to(local).as_posix()},{f.parent.name}" for f in sorted(local.rglob("*.jpg"))]
    text = "path,label\n" + "\n".join([*rows, "photos/blue/gone.jpg,blue"]) + "\n"
    (tmp_path / "list.csv").write_text(text)  # the same rows beside the folder on disk and in the bucket
    s3.put(f"{bucket}/list.csv", text.encode())

    on_disk = finetune(config(tmp_path / "list.csv", "skips-disk"), registry=reg).report
    in_bucket = finetune(config(f"{bucket}/list.csv", "skips-s3"), registry=reg).report
    disk = {s["path"]: s["reason"] for s in on_disk["data"]["skipped"]}
    remote = {s["path"]: s["reason"] for s in in_bucket["data"]["skipped"]}
    bad = {"photos/blue/gone.jpg", "photos/blue/notes.jpg", "photos/red/empty.jpg", "photos/red/truncated.jpg"}
    assert set(disk) == set(remote) == bad
    assert (disk["photos/blue/gone.jpg"], remote["photos/blue/gone.jpg"]) == ("no such file", "no such object")
    assert disk["photos/red/empty.jpg"] == remote["photos/red/empty.jpg"] == "empty file (0 bytes)"
    assert disk["photos/red/truncated.jpg"] == remote["photos/red/truncated.jpg"]
    assert "cannot decode" in remote["photos/red/truncated.jpg"]
    # on disk the scan reads the header; in a bucket nothing is read before the feature pass
    assert disk["photos/blue/notes.jpg"] == "not an image"
    assert remote["photos/blue/notes.jpg"].startswith("not an image")
    assert on_disk["data"]["counts"] == in_bucket["data"]["counts"]
    for report in (on_disk, in_bucket):
        assert "4 unreadable file(s) skipped (listed in the report)" in report["warnings"]


def test_the_full_fine_tune_reads_its_batches_from_the_bucket(s3: S3Server, reg: Registry, tmp_path: Path) -> None:
    """Training and validation prefixes: the loader's workers read the objects, every epoch."""
    train = make_dataset(tmp_path / "train", {"blue": 8, "red": 8}, seed=4)
    val = make_dataset(tmp_path / "val", {"blue": 3, "red": 3}, seed=4, start=100)
    bucket = s3.bucket("ft-full")
    urls = upload(s3, train, f"{bucket}/train"), upload(s3, val, f"{bucket}/val")
    options = {"mode": "full", "epochs": 2, "lr": 1e-2, "warmup_epochs": 0.5, "workers": 1}
    want = finetune(config(train, "full-disk", val_dir=val, run_dir=tmp_path / "a", **options), registry=reg)
    got = finetune(config(urls[0], "full-s3", val_dir=urls[1], run_dir=tmp_path / "b", **options), registry=reg)
    assert got.report["split"]["val_dir"] == urls[1]
    assert [h["train_loss"] for h in got.report["recipe"]["history"]] == pytest.approx(
        [h["train_loss"] for h in want.report["recipe"]["history"]], abs=1e-5
    )
    assert_same_training(got, want)


def test_the_cli_trains_from_a_bucket_and_publishes_to_a_registry_in_it(  # type: ignore[no-untyped-def]
    run_cli, s3: S3Server, tmp_path: Path
) -> None:
    local = make_dataset(tmp_path / "photos", {"blue": 6, "red": 6}, seed=5)
    bucket = s3.bucket("ft-cli")
    folder = upload(s3, local, f"{bucket}/photos")
    registry = f"{bucket}/registry"
    args = ["finetune", f"{folder}/", "--backbone", "tiny_cnn", "--name", "colors", "--registry", registry, "--json"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["data"]["source"] == folder  # the trailing slash names the same prefix
    assert report["features"]["computed"] == 12 and report["data"]["counts"]["val"] == {"blue": 1, "red": 1}
    assert report["model"] in [v.tag for v in RemoteRegistry(registry).list("colors")]
    again = json.loads(run_cli(*args).stdout)
    assert again["features"]["computed"] == 0 and again["features"]["cached"] == 12


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("s3://ft-no-such-bucket/photos", "cannot list s3://ft-no-such-bucket/photos: there is no bucket"),
        ("{bucket}/nothing-here", "no such dataset: {bucket}/nothing-here (nothing is stored under this prefix)"),
        ("{bucket}/empty", "{bucket}/empty has no class folders"),
        ("{bucket}/missing.csv", "cannot read the manifest {bucket}/missing.csv: no such object or prefix"),
        ("{bucket}/photos/ants/a.jpg", "{bucket}/photos/ants/a.jpg is an object, not a prefix"),
    ],
    ids=["no-bucket", "no-prefix", "empty-prefix", "no-manifest", "an-object"],
)
def test_a_dataset_url_that_names_no_images_is_one_line(  # type: ignore[no-untyped-def]
    run_cli, s3: S3Server, where: str, message: str
) -> None:
    bucket = s3.bucket("ft-errors")
    s3.put(f"{bucket}/empty/", b"")  # a folder made in a console: a marker object, nothing in it
    s3.put(f"{bucket}/photos/ants/a.jpg", jpeg_bytes(0))
    proc = run_cli("finetune", where.format(bucket=bucket), "--backbone", "tiny_cnn", "--name", "x", "--json")
    assert_clear_error(proc, f"error: {message.format(bucket=bucket)}")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_command_says_it_takes_urls_and_refuses_credentials_in_one() -> None:
    assert "s3://bucket/prefix" in CliRunner().invoke(cli, ["finetune", "--help"]).output
    result = CliRunner().invoke(cli, ["finetune", "s3://AKIDX:s3cr3t@bucket/photos", "--backbone", "x", "--name", "x"])
    assert result.exit_code == 2 and "credentials in a URL are refused" in result.output
    assert "s3cr3t" not in result.output
