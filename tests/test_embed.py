"""The batch embedding job: its inputs, shard plan, output folder, resume, unreadable images, and
vectors equal to what the service computes (InferenceModel) and to ONNX Runtime run directly."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.embed import embed_cmd
from embed import run_embed
from embed.inputs import InputError, Item, ManifestError, collect_inputs
from embed.job import inputs_fingerprint, plan_shards
from embed.output import ERRORS, MANIFEST, SHARD_RECORDS, OutputError
from models import ImageLoader, InferenceModel, Registry, StoredVersion

from .conftest import ROOT, jpeg_bytes

# name -> synthetic image number; nested on purpose (folders are searched recursively)
TREE = {"p0.jpg": 0, "a/p1.jpg": 1, "a/p2.png": 2, "b/c/p3.jpg": 3, "b/p4.jpeg": 4, "z.jpg": 5}


def make_tree(root: Path) -> list[str]:
    """Photos under ``root`` (plus a file that is no image); returns them in the expected order."""
    for name, i in TREE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = jpeg_bytes(i, (96, 80))
        if name.endswith(".png"):
            Image.open(io.BytesIO(data)).save(path, format="PNG")
        else:
            path.write_bytes(data)
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return [str(root / n) for n in ("a/p1.jpg", "a/p2.png", "b/c/p3.jpg", "b/p4.jpeg", "p0.jpg", "z.jpg")]


def add_bad_photos(root: Path) -> list[str]:
    """A text file named .jpg and a truncated JPEG: real data is like that."""
    (root / "bad.jpg").write_text("this is text, not a JPEG")
    (root / "cut.jpg").write_bytes(jpeg_bytes(7, (200, 160))[:700])
    return [str(root / "bad.jpg"), str(root / "cut.jpg")]


def read_dir(out: Path) -> pa.Table:
    return pads.dataset(out, format="parquet").to_table()


# -- inputs --------------------------------------------------------------------------------------


def test_every_input_kind_in_a_deterministic_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder_order = make_tree(Path("photos"))
    assert [it.path for it in collect_inputs(["photos"])] == folder_order  # recursive, sorted
    assert [it.id for it in collect_inputs(["photos"])] == folder_order  # id = the path

    # glob: recursive, sorted, quoted patterns are expanded here, not by a shell
    globbed = collect_inputs(["photos/**/*.jpg"])
    assert [it.path for it in globbed] == sorted(p for p in folder_order if p.endswith(".jpg"))

    # manifests: CSV with ids, Parquet with integer ids and without, JSON lines with and without
    with open("with_ids.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "label"])
        w.writerow(["first", "photos/z.jpg", "x"])
        w.writerow(["second", "photos/a/p1.jpg", "y"])
    Path("no_ids.csv").write_text("path\nphotos/p0.jpg\n")
    pq.write_table(pa.table({"path": ["photos/b/p4.jpeg", "photos/p0.jpg"], "id": [7, 8]}), "ids.parquet")
    pq.write_table(pa.table({"path": ["photos/a/p2.png"]}), "no_ids.parquet")
    lists = Path("lists")
    lists.mkdir()
    # relative manifest paths resolve against the manifest's folder; absolute ones stay
    (lists / "m.jsonl").write_text(
        json.dumps({"path": "../photos/b/c/p3.jpg", "id": 42})
        + "\n\n"
        + json.dumps({"path": str(tmp_path / "photos" / "z.jpg")})
        + "\n"
    )
    items = collect_inputs(
        ["photos/p0.jpg", "with_ids.csv", "no_ids.csv", "ids.parquet", "no_ids.parquet", "lists/m.jsonl"]
    )
    assert items == [
        Item("photos/p0.jpg", "photos/p0.jpg"),
        Item("first", "photos/z.jpg"),
        Item("second", "photos/a/p1.jpg"),
        Item("photos/p0.jpg", "photos/p0.jpg"),
        Item("7", "photos/b/p4.jpeg"),
        Item("8", "photos/p0.jpg"),
        Item("photos/a/p2.png", "photos/a/p2.png"),
        Item("42", "lists/../photos/b/c/p3.jpg"),
        Item(str(tmp_path / "photos" / "z.jpg"), str(tmp_path / "photos" / "z.jpg")),
    ]
    assert all(Path(it.path).is_file() for it in items)
    assert collect_inputs(["photos", "with_ids.csv"]) == collect_inputs(["photos", "with_ids.csv"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.csv", "file,id\na.jpg,1\n", "has no 'path' column (columns: file, id)"),
        ("m.csv", "path,id\na.jpg,1\n,2\n", "line 3 has no 'path' value"),
        ("m.jsonl", '{"path": "a.jpg"}\n{"path": \n', "line 2 is not valid JSON"),
        ("m.jsonl", '{"file": "a.jpg"}\n', "line 1 has no 'path' key"),
        ("m.jsonl", '["a.jpg"]\n', "line 1 is not a JSON object"),
        ("m.parquet", "not parquet at all", "cannot read the Parquet manifest"),
    ],
)
def test_a_bad_manifest_is_one_clear_error(tmp_path: Path, name: str, content: str, message: str) -> None:
    manifest = tmp_path / name
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        collect_inputs([str(manifest)])


def test_a_parquet_manifest_without_the_path_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="has no 'path' column"):
        collect_inputs([str(tmp_path / "m.parquet")])
    # another column name can be chosen
    assert collect_inputs([str(tmp_path / "m.parquet")], path_column="file")[0].path == str(tmp_path / "a.jpg")


def test_inputs_that_name_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file, folder or manifest"):
        collect_inputs([str(tmp_path / "missing.jpg")])
    with pytest.raises(InputError, match="matches no files"):
        collect_inputs([str(tmp_path / "**" / "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        collect_inputs([str(tmp_path / "empty")])


def test_the_shard_plan_depends_only_on_the_inputs_and_the_shard_size() -> None:
    assert [(s.index, s.start, s.stop) for s in plan_shards(10, 4)] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert plan_shards(10, 4) == plan_shards(10, 4) and len(plan_shards(8, 4)) == 2
    items = [Item("a", "a.jpg"), Item("b", "b.jpg")]
    assert inputs_fingerprint(items) == inputs_fingerprint(list(items))
    assert inputs_fingerprint(items) != inputs_fingerprint(items[::-1])
    assert inputs_fingerprint(items) != inputs_fingerprint([Item("a", "a.jpg"), Item("c", "b.jpg")])


# -- the job ---------------------------------------------------------------------------------------


def test_vectors_equal_the_service_and_onnx_runtime_run_directly(tiny_registry: Registry, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    good = make_tree(photos)
    bad = add_bad_photos(photos)
    out = tmp_path / "emb"
    summary = run_embed(
        "tiny_cnn", [str(photos)], out, shard_size=3, batch_size=2, workers=1, top_k=3, registry=tiny_registry
    )
    assert (summary.inputs, summary.embedded, summary.errors) == (8, 6, 2)
    assert (summary.shards, summary.shards_computed, summary.shards_skipped) == (3, 3, 0)
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]

    table = read_dir(out)  # the folder reads as one dataset
    assert table.column("path").to_pylist() == good  # input order, unreadable images left out
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == (6, 32) and np.isfinite(emb).all() and np.abs(emb).sum() > 0

    model = InferenceModel(tiny_registry.get("tiny_cnn"))
    np.testing.assert_array_equal(emb, model.embed(good))
    session = ort.InferenceSession(str(model.stored.file("model.onnx")), providers=["CPUExecutionProvider"])
    loader = ImageLoader(model.spec.preprocess)
    for row, path in zip(emb, good, strict=True):
        (direct,) = session.run(["features"], {"input": loader(path)[None]})
        np.testing.assert_allclose(row, direct[0], rtol=1e-6, atol=1e-6)

    # --top-k: predictions as list<struct<index, label, score>>, ranked as classify ranks them
    preds = table.column("predictions").to_pylist()
    for got, want in zip(preds, model.classify(good, k=3), strict=True):
        assert [(p["index"], p["label"]) for p in got] == [(w.index, w.label) for w in want]
        np.testing.assert_allclose([p["score"] for p in got], [w.score for w in want], rtol=1e-6)

    # unreadable images: in the errors file, counted, never fatal
    errors = [json.loads(line) for line in (out / ERRORS).read_text().splitlines()]
    assert [e["path"] for e in errors] == bad
    assert all(e["kind"] == "undecodable" and e["error"] for e in errors)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["dim"] == 32 and manifest["top_k"] == 3
    assert manifest["counts"] == {"inputs": 8, "embedded": 6, "errors": 2, "shards_done": 3, "shards_total": 3}
    assert manifest["model"]["tag"] == model.tag
    assert manifest["model"]["spec_sha256"] == hashlib.sha256(model.stored.file("spec.json").read_bytes()).hexdigest()
    assert manifest["model"]["files"]["model.onnx"] == model.spec.files["model.onnx"]
    assert manifest["preprocessing"]["crop"] == 64 and "onnxruntime" in "".join(manifest["libraries"])

    frame = pd.read_parquet(out)  # pandas reads the folder too
    assert list(frame["path"]) == good and list(frame.columns) == ["id", "path", "embedding", "predictions"]


def test_micro_batches_on_concurrent_runners_give_the_vectors_of_one_call(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    """On a CPU the local engine splits each batch into micro-batches run on one thread per core
    at once; rows must come back in input order with the values of a single call."""
    from models.runtime import MICRO_BATCH, ConcurrentRunner

    photos = tmp_path / "photos"
    good = make_tree(photos)
    model = InferenceModel(tiny_registry.get("tiny_cnn"), threads=1)
    pixels = model.loader.batch(good)
    runner = ConcurrentRunner(model.run, 2)
    try:
        assert len(pixels) > MICRO_BATCH  # the split path, not the single call
        split = runner.run(pixels)
    finally:
        runner.close()
    whole = model.run(pixels)
    np.testing.assert_allclose(split.features, whole.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.logits, whole.logits, rtol=1e-5, atol=1e-6)

    out = tmp_path / "emb"
    summary = run_embed("tiny_cnn", [str(photos)], out, batch_size=8, workers=1, threads=None, registry=tiny_registry)
    emb = np.asarray(read_dir(out).column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(emb, whole.features, rtol=1e-5, atol=1e-6)
    assert summary.stats.runners >= 1


def _part_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("part-*.parquet"))}


def test_a_rerun_keeps_finished_shards_and_overwrite_starts_over(tiny_registry: Registry, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_tree(photos)
    out = tmp_path / "emb"
    kwargs = {"shard_size": 2, "batch_size": 2, "workers": 0, "registry": tiny_registry}
    first = run_embed("tiny_cnn", [str(photos)], out, **kwargs)  # type: ignore[arg-type]
    assert (first.shards, first.shards_computed) == (3, 3)
    before = _part_stats(out)
    whole = read_dir(out)

    again = run_embed("tiny_cnn", [str(photos)], out, **kwargs)  # type: ignore[arg-type]
    assert (again.shards_computed, again.shards_skipped, again.images_computed) == (0, 3, 0)
    assert _part_stats(out) == before

    (out / "part-00001.parquet").unlink()  # as if the job had died before this shard was renamed
    healed = run_embed("tiny_cnn", [str(photos)], out, **kwargs)  # type: ignore[arg-type]
    assert (healed.shards_computed, healed.images_computed) == (1, 2)
    after = _part_stats(out)
    assert {k: v for k, v in after.items() if k != "part-00001.parquet"} == {
        k: v for k, v in before.items() if k != "part-00001.parquet"
    }
    assert read_dir(out).equals(whole)

    fresh = run_embed("tiny_cnn", [str(photos)], out, overwrite=True, **kwargs)  # type: ignore[arg-type]
    assert (fresh.shards_computed, fresh.shards_skipped) == (3, 0)
    assert all(after[k] != v for k, v in _part_stats(out).items())  # every shard written anew
    assert read_dir(out).equals(whole)
    assert len(json.loads((out / MANIFEST).read_text())["runs"]) == 1  # --overwrite forgets the old runs


def test_refuses_to_resume_a_different_job(tiny_registry: Registry, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_tree(photos)
    out = tmp_path / "emb"
    run_embed("tiny_cnn", paths[:4], out, shard_size=2, workers=0, registry=tiny_registry)
    with pytest.raises(OutputError, match=r"different job \(inputs differ\).*--overwrite"):
        run_embed("tiny_cnn", paths[1:5], out, shard_size=2, workers=0, registry=tiny_registry)
    with pytest.raises(OutputError, match=r"\(shard_size differ\)"):
        run_embed("tiny_cnn", paths[:4], out, shard_size=3, workers=0, registry=tiny_registry)
    with pytest.raises(OutputError, match=r"\(top_k differ\)"):
        run_embed("tiny_cnn", paths[:4], out, shard_size=2, top_k=2, workers=0, registry=tiny_registry)
    assert read_dir(out).column("path").to_pylist() == paths[:4]  # untouched by the refusals
    redone = run_embed("tiny_cnn", paths[1:5], out, shard_size=2, workers=0, overwrite=True, registry=tiny_registry)
    assert redone.shards_computed == 2 and read_dir(out).column("path").to_pylist() == paths[1:5]


def test_a_folder_that_holds_something_else_is_refused(tiny_registry: Registry, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_tree(photos)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not empty .*notes.txt"):
        run_embed("tiny_cnn", [str(photos)], out, workers=0, registry=tiny_registry)
    run_embed("tiny_cnn", [str(photos)], out, workers=0, overwrite=True, registry=tiny_registry)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "part-00000.parquet").is_file()


# -- the CLI -----------------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.csv").write_text("file\na.jpg\n")
    (tmp_path / "m.jsonl").write_text("{oops\n")
    runner = CliRunner()
    cases = [
        ([str(tmp_path / "empty")], "error: no images found"),
        ([str(tmp_path / "m.csv")], "error: " + str(tmp_path / "m.csv") + " has no 'path' column"),
        ([str(tmp_path / "m.jsonl")], "line 1 is not valid JSON"),
        ([str(tmp_path / "nothing.jpg")], "error: no such file, folder or manifest"),
    ]
    for inputs, message in cases:
        result = runner.invoke(embed_cmd, ["tiny_cnn", *inputs, "--output", str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
    usage = runner.invoke(embed_cmd, ["tiny_cnn", "x.jpg", "--output", "o", "--ray-address", "auto"])
    assert usage.exit_code == 2 and "need --engine ray" in usage.stderr


def test_cli_options_take_their_defaults_and_help_from_the_job_config() -> None:
    """The job's defaults live in EmbedConfig only: an option whose default, help or bounds
    differ from its field's, or a default or a number typed into cli/embed.py, fails here."""
    import ast

    import click

    from embed import EmbedConfig

    options = {p.name: p for p in embed_cmd.params if isinstance(p, click.Option)}
    fields = EmbedConfig.model_fields
    assert set(fields) <= set(options)
    for name, info in fields.items():
        option = options[name]
        assert (option.default, option.help) == (info.default, info.description), name
    assert isinstance(options["batch_size"].type, click.IntRange)
    assert (options["batch_size"].type.min, options["batch_size"].type.max) == (1, 4096)
    assert options["batch_size"].default == EmbedConfig().batch_size

    tree = ast.parse((ROOT / "cli" / "embed.py").read_text())
    decorators = [d for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for d in f.decorator_list]
    options_typed = [d for d in decorators if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("option")]
    assert len(options_typed) == len(options)
    for call in options_typed:
        typed = [kw.arg for kw in call.keywords if kw.arg == "default"]
        numbers = [
            c.value
            for c in ast.walk(call)
            if isinstance(c, ast.Constant)
            and (
                (isinstance(c.value, int | float) and not isinstance(c.value, bool))
                or (isinstance(c.value, str) and any(ch.isdigit() for ch in c.value))
            )
        ]
        assert not typed and not numbers, f"line {call.lineno}: {ast.unparse(call)}"


@pytest.mark.slow
def test_cli_unknown_model_is_one_line(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    make_tree(photos)
    proc = run_cli("embed", "no_such_model", str(photos), "--output", str(tmp_path / "o"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'no_such_model'" in lines[0], proc.stderr


@pytest.mark.slow
def test_resume_after_the_job_is_killed(run_cli, tiny_registry: Registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    photos.mkdir()
    data = jpeg_bytes(0, (1024, 768))
    for i in range(400):
        (photos / f"p{i:03d}.jpg").write_bytes(data)
    (photos / "p150.jpg").write_text("a broken one")
    out = tmp_path / "emb"
    args = ["embed", "tiny_cnn", str(photos), "--output", str(out), "--shard-size", "8", "--batch-size", "4"]
    args += ["--workers", "1", "--json"]
    env = {**os.environ, "BENTOML_HOME": str(tiny_registry.home), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    helpers = psutil.Process(proc.pid).children(recursive=True)  # decode workers, resource tracker
    proc.kill()  # SIGKILL, half-way through
    proc.communicate()
    _, alive = psutil.wait_procs(helpers, timeout=30)
    assert not alive, f"processes of the killed job linger: {alive}"  # they notice and exit
    assert not list(Path("/dev/shm").glob(f"backbones-embed-{proc.pid}-*"))  # its decode buffer is gone too
    killed_at = _part_stats(out)
    assert 3 <= len(killed_at) < 50, "the job should have been killed half-way"
    assert json.loads((out / MANIFEST).read_text())["status"] == "running"

    resumed = run_cli(*args, home_dir=tiny_registry.home)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)  # --json: the summary only
    assert summary["shards"] == 50
    assert summary["shards_skipped"] == len(killed_at) and summary["shards_computed"] == 50 - len(killed_at)
    assert (summary["embedded"], summary["errors"]) == (399, 1)
    after = _part_stats(out)
    assert {k: after[k] for k in killed_at} == killed_at  # finished shards were not written again
    assert not list(out.glob(".*.tmp")) and json.loads((out / MANIFEST).read_text())["status"] == "complete"

    full = tmp_path / "full"
    run_embed("tiny_cnn", [str(photos)], full, shard_size=8, batch_size=4, workers=0, registry=tiny_registry)
    assert read_dir(out).equals(read_dir(full))  # same rows, same vectors as an uninterrupted run
    assert (out / ERRORS).read_text() == (full / ERRORS).read_text()
    assert len(list((out / SHARD_RECORDS).iterdir())) == 50


def test_decode_buffers_of_dead_jobs_are_removed(tmp_path: Path) -> None:
    from embed.decode_pool import SEGMENT_PREFIX, _remove_stale_segments

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = shm / f"{SEGMENT_PREFIX}{dead.stdout.strip()}-test", shm / f"{SEGMENT_PREFIX}{os.getpid()}-test"
    for f in (stale, live):
        f.write_bytes(b"x")
    try:
        _remove_stale_segments()
        assert not stale.exists() and live.exists()
    finally:
        for f in (stale, live):
            f.unlink(missing_ok=True)


# -- the job's environment: a full disk, an unwritable output, a small /dev/shm -----------------------


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[bool]:
    """A file system of its own at ``where``: True where this process may mount a tmpfs (root),
    False otherwise (``where`` is then a plain folder)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(where)], check=True)


def _pages(n: int) -> int:
    return -(-n // 4096)


@pytest.mark.slow
def test_a_full_disk_is_one_line_marks_the_job_failed_and_it_resumes_once_space_is_back(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    """A real full disk: a small tmpfs (as root), filled up to leave room for two and a half
    shards; where mounting is not allowed, a file-size limit (RLIMIT_FSIZE) below a shard's size
    makes writing it fail with EFBIG instead."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(96):
        (photos / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(i % 5, (64, 48)))
    opts = ["--shard-size", "16", "--top-k", "5", "--workers", "0", "--json"]
    scratch = tmp_path / "scratch"
    run_embed("tiny_cnn", [str(photos)], scratch, shard_size=16, top_k=5, workers=0, registry=tiny_registry)
    part, manifest = (scratch / "part-00000.parquet").stat().st_size, (scratch / MANIFEST).stat().st_size
    env = {**os.environ, "BENTOML_HOME": str(tiny_registry.home), "BENTOML_DO_NOT_TRACK": "true"}
    with _tmpfs(tmp_path / "disk", "size=1m") as mounted:
        out = tmp_path / "disk" / "emb"
        limit = None
        if mounted:  # the manifest, two shards (record + Parquet), a third record and half its Parquet file
            pp = _pages(part)
            assert pp >= 2, "the test needs shards of several pages"
            free = 4096 * (_pages(manifest) + 2 * (1 + pp) + 1 + pp // 2)
            st = os.statvfs(tmp_path / "disk")
            (tmp_path / "disk" / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free))
        else:
            limit = part - 1

        def preexec() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        cmd = [sys.executable, "-m", "cli", "embed", "tiny_cnn", str(photos), "--output", str(out), *opts]
        full = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=preexec, timeout=300)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 1 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
        why = "No space left on device" if mounted else "File too large"
        assert lines[0].startswith(f"error: cannot write {out}/") and why in lines[0], lines[0]
        kept = 2 if mounted else 0
        assert f"the {kept} finished shard(s) of 6 are kept: run the same command again to resume" in lines[0]
        failed = json.loads((out / MANIFEST).read_text())
        assert failed["status"] == "failed" and why in failed["error"] and failed["counts"]["shards_done"] == kept
        assert len(list(out.glob("part-*.parquet"))) == kept and not list(out.glob(".*.tmp"))

        (tmp_path / "disk" / "filler").unlink(missing_ok=True)  # space is back (or no limit)
        resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout)
        assert (summary["shards_skipped"], summary["shards_computed"]) == (kept, 6 - kept)
        assert json.loads((out / MANIFEST).read_text())["status"] == "complete"
        assert read_dir(out).equals(read_dir(scratch))


@pytest.mark.slow
def test_an_unwritable_output_is_one_clear_line(run_cli, tiny_registry: Registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A read-only file system (a tmpfs mounted read-only, as root); else a folder without write
    permission, or for root, which ignores permissions, a path under a file."""
    photos = tmp_path / "photos"
    make_tree(photos)
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
        ro, why = tmp_path / "ro", "Read-only file system"
        if not mounted and os.geteuid() != 0:
            ro.chmod(0o555)
            why = "Permission denied"
        elif not mounted:
            ro = ro / "a-file"
            ro.write_text("not a folder")
            why = "Not a directory"
        cases = [(ro / "emb", f"error: cannot create the folder {ro / 'emb'}: {why}")]
        if ro.is_dir():  # the folder exists: its lock file is the first write
            cases.append((ro, f"error: cannot write {ro / '_lock'}: {why}"))
        for out, message in cases:
            proc = run_cli("embed", "tiny_cnn", str(photos), "--output", str(out), home_dir=tiny_registry.home)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr
            assert lines[0].startswith(message) and "choose a writable --output" in lines[0], lines[0]


def test_a_small_dev_shm_means_fewer_buffers_then_pipes(
    tiny_version: StoredVersion, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The decode pool measures /dev/shm's free space; here it is told (shm_free) so as to force
    each fallback. The decoded images are the same every way."""
    from embed.decode import LoaderConfig, decode_chunk
    from embed.decode_pool import SHM_MAX_SHARE, DecodePool

    photos = tmp_path / "photos"
    paths = make_tree(photos) + add_bad_photos(photos)
    config = LoaderConfig.of(ImageLoader(tiny_version.spec.preprocess))
    want = decode_chunk(config.build(), paths)
    spans = [(a, min(a + 3, len(paths))) for a in range(0, len(paths), 3)]
    batch = 3 * 3 * 64 * 64 * 4  # bytes of one buffer: batch size 3, 64 x 64 crop
    cases = [  # bytes free -> chunks in flight, shared memory, what is logged
        (None, 3, True, None),
        (int(3 * batch / SHM_MAX_SHARE) + 1, 2, True, "2 decoded batches in flight instead of 3"),
        (int(1 * batch / SHM_MAX_SHARE) + 1, 3, False, "decoded images go through pipes instead"),
    ]
    for free, in_flight, shared, message in cases:
        caplog.clear()
        with DecodePool(config, 1, 3, shm_free=free) as pool:
            assert (pool.in_flight, pool.shared) == (in_flight, shared)
            pool.wait_ready()
            got = [(d.pixels.copy(), d.ok.copy(), dict(d.errors)) for d in pool.decoded(paths, spans)]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), want.pixels)
        assert np.array_equal(np.concatenate([g[1] for g in got]), want.ok)
        assert [k for g in got for k, _ in g[2].values()] == ["undecodable", "undecodable"]
        logged = [r.getMessage() for r in caplog.records if r.name == "embed.decode_pool"]
        assert (message is None and not logged) or (len(logged) == 1 and message in logged[0]), logged
