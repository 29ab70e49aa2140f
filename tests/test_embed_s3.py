"""The batch job on object storage, against a real S3 API server (moto's, on a local port; see
tests/s3server.py): prefixes and manifests of object URLs in, shards as whole objects out, the
same vectors as from disk, kills and resumes on both engines, a job lock on the bucket, and one
clear line for a bad URL, missing credentials or an endpoint that does not answer. No file or
message ever carries the access key or the secret."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embed import run_embed
from embed.inputs import Item, collect_inputs
from embed.output import OutputError
from models import InferenceModel, Registry

from .conftest import ROOT, SHARED_DATA, jpeg_bytes
from .test_embed import add_bad_photos, make_tree

if TYPE_CHECKING:
    from .s3server import S3Server

pytest_plugins = ("tests.s3server",)  # the session's S3 server: the fixture ``s3``
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    """The same photos on disk and under ``s3://embed-in/photos`` (the test tree, two unreadable
    files, and real photos from ../shared/data/hymenoptera where present); returns the folder,
    the prefix and the relative names of the readable ones in listing order."""
    local = tmp_path_factory.mktemp("photos")
    good = [str(Path(p).relative_to(local)) for p in make_tree(local)]
    add_bad_photos(local)
    real = SHARED_DATA / "hymenoptera" / "train"
    if real.is_dir():
        for kind in ("ants", "bees"):
            for p in sorted((real / kind).glob("*.jpg"))[:2]:
                (local / "real" / kind).mkdir(parents=True, exist_ok=True)
                (local / "real" / kind / p.name).write_bytes(p.read_bytes())
                good.append(f"real/{kind}/{p.name}")
    url = s3.bucket("embed-in") + "/photos"
    for f in local.rglob("*"):
        if f.is_file():
            s3.put(f"{url}/{f.relative_to(local)}", f.read_bytes())
    return local, url, sorted(good)


def _table(s3: S3Server, url: str) -> pq.Table:
    return pq.read_table(io.BytesIO(s3.fs.cat_file(url)))


def _secrets(s3: S3Server) -> list[str]:
    return [s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"]]


def _no_secrets(s3: S3Server, prefix: str) -> None:
    for key in s3.keys(prefix):
        data = s3.fs.cat_file(key)
        assert not [s for s in _secrets(s3) if s.encode() in data], key


# -- S3 to S3 --------------------------------------------------------------------------------------


def test_s3_to_s3_writes_what_disk_to_disk_writes(
    s3: S3Server, photos: tuple[Path, str, list[str]], tiny_registry: Registry, tmp_path: Path
) -> None:
    local, url, good = photos
    opts = {"shard_size": 3, "batch_size": 2, "workers": 1, "top_k": 2, "registry": tiny_registry}
    disk = run_embed("tiny_cnn", [str(local)], tmp_path / "disk", **opts)  # type: ignore[arg-type]
    out = s3.bucket("embed-out") + "/s3-to-s3/"  # a trailing slash names the same prefix
    summary = run_embed("tiny_cnn", [url], out, **opts)  # type: ignore[arg-type]
    out = out.rstrip("/")
    assert summary.output == out
    assert (summary.inputs, summary.embedded, summary.errors) == (len(good) + 2, len(good), 2)
    assert (summary.shards, summary.shards_computed) == (disk.shards, disk.shards)

    # whole objects, the manifest and the errors file beside them, no lock or temporary left
    parts = [f"part-{i:05d}" for i in range(disk.shards)]
    assert s3.keys(out) == sorted(
        [f"{out}/_errors.jsonl", f"{out}/_manifest.json"]
        + [f"{out}/_shards/{p}.json" for p in parts]
        + [f"{out}/{p}.parquet" for p in parts]
    )
    for p in parts:  # shard for shard: the same rows and vectors, paths as URLs
        a, b = pq.read_table(tmp_path / "disk" / f"{p}.parquet"), _table(s3, f"{out}/{p}.parquet")
        assert a.schema.equals(b.schema, check_metadata=True)
        assert [x.replace(str(local), url) for x in a.column("path").to_pylist()] == b.column("path").to_pylist()
        np.testing.assert_array_equal(
            np.asarray(a.column("embedding").to_pylist()), np.asarray(b.column("embedding").to_pylist())
        )
        assert a.column("predictions").equals(b.column("predictions"))

    # the prefix reads as one dataset (the _ objects are skipped), in input order
    dataset = pads.dataset(out.removeprefix("s3://"), filesystem=s3.fs, format="parquet").to_table()
    assert dataset.column("id").to_pylist() == [f"{url}/{g}" for g in good]
    errors = [json.loads(line) for line in s3.fs.cat_file(f"{out}/_errors.jsonl").splitlines()]
    assert [(e["path"], e["kind"]) for e in errors] == [
        (f"{url}/bad.jpg", "undecodable"),
        (f"{url}/cut.jpg", "undecodable"),
    ]
    manifest = json.loads(s3.fs.cat_file(f"{out}/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"]["embedded"] == len(good)
    _no_secrets(s3, out)

    again = run_embed("tiny_cnn", [url], out, **opts)  # type: ignore[arg-type]
    assert (again.shards_computed, again.shards_skipped) == (0, disk.shards)


def test_manifests_with_object_urls(
    s3: S3Server, photos: tuple[Path, str, list[str]], tiny_registry: Registry, tmp_path: Path
) -> None:
    local, url, _ = photos
    bucket = url.rsplit("/", 1)[0]
    listed = tmp_path / "list.csv"  # a local manifest of URLs (and a local path), one object missing
    with open(listed, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerows([["a", f"{url}/p0.jpg"], ["b", f"{url}/gone.jpg"], ["c", str(local / "z.jpg")]])
    # a manifest in the bucket: relative paths resolve against its prefix, URLs stay
    remote = s3.put(
        f"{bucket}/lists/m.jsonl",
        (
            json.dumps({"path": "../photos/a/p1.jpg", "id": 1}) + "\n" + json.dumps({"path": f"{url}/b/p4.jpeg"})
        ).encode(),
    )
    items = collect_inputs([str(listed), remote, f"{url}/b/**/*.jp*g"])
    assert items == [
        Item("a", f"{url}/p0.jpg"),
        Item("b", f"{url}/gone.jpg"),
        Item("c", str(local / "z.jpg")),
        Item("1", f"{url}/a/p1.jpg"),
        Item(f"{url}/b/p4.jpeg", f"{url}/b/p4.jpeg"),
        Item(f"{url}/b/c/p3.jpg", f"{url}/b/c/p3.jpg"),
        Item(f"{url}/b/p4.jpeg", f"{url}/b/p4.jpeg"),
    ]
    out = s3.bucket("embed-out") + "/manifests"
    summary = run_embed("tiny_cnn", [str(listed), remote], out, workers=0, registry=tiny_registry)
    assert (summary.embedded, summary.errors) == (4, 1)
    (error,) = [json.loads(line) for line in s3.fs.cat_file(f"{out}/_errors.jsonl").splitlines()]
    assert error == {
        "id": "b",
        "path": f"{url}/gone.jpg",
        "kind": "undecodable",
        "error": f"no such object: {url}/gone.jpg",
    }
    table = _table(s3, f"{out}/part-00000.parquet")
    assert table.column("id").to_pylist() == ["a", "c", "1", f"{url}/b/p4.jpeg"]
    want = InferenceModel(tiny_registry.get("tiny_cnn")).embed(
        [str(local / n) for n in ("p0.jpg", "z.jpg", "a/p1.jpg", "b/p4.jpeg")]
    )
    np.testing.assert_array_equal(np.asarray(table.column("embedding").to_pylist(), dtype=np.float32), want)


def test_a_second_job_on_the_same_prefix_is_refused_and_a_dead_ones_lock_taken_over(
    s3: S3Server, photos: tuple[Path, str, list[str]], tiny_registry: Registry
) -> None:
    from embed.bucket_lock import bucket_lock

    _, url, _ = photos
    out = s3.bucket("embed-out") + "/locked"
    held = rf"another embedding job \(host .*pid {os.getpid()}.*writing to {out}"
    with bucket_lock(s3.fs, f"{out}/_lock"), pytest.raises(OutputError, match=held):  # this process holds it
        run_embed("tiny_cnn", [url], out, workers=0, registry=tiny_registry)
    assert not s3.keys(out)  # released, and the refused job wrote nothing

    # a lock of another machine, refreshed just now: refused; once stale (here: at once) taken over
    foreign = {"host": "elsewhere", "boot": "x", "pid": 1, "started_at": "then"}
    s3.put(f"{out}/_lock", json.dumps(foreign).encode())
    with pytest.raises(OutputError, match=r"host elsewhere, pid 1, started then"):
        run_embed("tiny_cnn", [url], out, workers=0, registry=tiny_registry)
    with bucket_lock(s3.fs, f"{out}/_lock", stale_s=0):
        assert json.loads(s3.fs.cat_file(f"{out}/_lock"))["pid"] == os.getpid()
    assert not s3.keys(out)


# -- kill and resume, both engines -------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_manifest(s3: S3Server) -> str:
    """400 rows over 40 large photos in the bucket (and one broken object), as an S3 manifest."""
    bucket = s3.bucket("embed-big")
    data = [jpeg_bytes(i % 7, (1024, 768)) for i in range(40)]
    for i, d in enumerate(data):
        s3.put(f"{bucket}/big/p{i:02d}.jpg", d)
    s3.put(f"{bucket}/big/broken.jpg", b"a broken one")
    rows = ["id,path"] + [f"r{r:03d},big/p{r % 40:02d}.jpg" for r in range(400)]
    rows[151] = "r150,big/broken.jpg"
    return s3.put(f"{bucket}/rows.csv", ("\n".join(rows) + "\n").encode())


def _kill_midway(args: list[str], out: str, s3: S3Server, home: Path, parts: int) -> None:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len([k for k in s3.keys(out) if k.endswith(".parquet")]) >= parts:
            break
        time.sleep(0.05)
    helpers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # SIGKILL: no clean-up of any kind
    _, err = proc.communicate()
    assert proc.returncode == -9, f"the job ended by itself before it was killed: {err.decode()[-2000:]}"
    _, alive = psutil.wait_procs(helpers, timeout=10)
    for p in alive:  # Ray's agents outlive their driver by a minute: end them now
        p.kill()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_kill_and_resume_from_s3_to_s3(
    engine: str,
    s3: S3Server,
    big_manifest: str,
    run_cli,
    tiny_registry: Registry,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    bucket = s3.bucket(f"embed-resume-{engine}", versioned=True)  # every write of a key is a version
    out = f"{bucket}/emb"
    args = ["embed", "tiny_cnn", big_manifest, "--output", out, "--shard-size", "8", "--batch-size", "4"]
    args += ["--engine", engine, "--json"] + (["--workers", "1"] if engine == "local" else [])
    _kill_midway(args, out, s3, tiny_registry.home, parts=3 if engine == "local" else 2)
    killed = {k for k in s3.keys(out) if k.endswith(".parquet")}
    assert 2 <= len(killed) < 50, "the job should have been killed half-way"
    assert f"{out}/_lock" in s3.keys(out)  # a SIGKILL leaves the lock object behind
    assert json.loads(s3.fs.cat_file(f"{out}/_manifest.json"))["status"] == "running"

    resumed = run_cli(*args, home_dir=tiny_registry.home)  # the lock of a dead process on this machine: taken over
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["shards"], summary["shards_skipped"]) == (50, len(killed))
    assert summary["shards_computed"] == 50 - len(killed) and (summary["embedded"], summary["errors"]) == (399, 1)
    versions = s3.versions(bucket.removeprefix("s3://"), "emb/")
    assert all(versions[k.split("/", 3)[3]] == 1 for k in killed)  # finished shards were not written again
    assert f"{out}/_lock" not in s3.keys(out)
    assert json.loads(s3.fs.cat_file(f"{out}/_manifest.json"))["status"] == "complete"

    whole = tmp_path / "whole"  # the same rows and vectors as an uninterrupted run
    run_embed("tiny_cnn", [big_manifest], whole, shard_size=8, batch_size=4, workers=0, registry=tiny_registry)
    got = pads.dataset(out.removeprefix("s3://"), filesystem=s3.fs, format="parquet").to_table()
    want = pads.dataset(whole, format="parquet").to_table()
    assert got.column("id").equals(want.column("id"))
    np.testing.assert_allclose(
        np.asarray(got.column("embedding").to_pylist()), np.asarray(want.column("embedding").to_pylist()), atol=1e-6
    )
    assert s3.fs.cat_file(f"{out}/_errors.jsonl") == (whole / "_errors.jsonl").read_bytes()
    _no_secrets(s3, out)


def test_a_store_that_stops_answering_fails_the_job_in_one_line(
    s3: S3Server, tiny_registry: Registry, tmp_path: Path
) -> None:
    """A store of its own, stopped while a job reads from it: the job stops with one line,
    keeps its finished shards and is marked failed in its manifest."""
    from .s3server import serve

    with serve() as flaky:
        flaky.bucket("flaky")
        data = jpeg_bytes(0, (1024, 768))
        manifest = tmp_path / "m.csv"
        manifest.write_text("path\n" + "".join(flaky.put(f"s3://flaky/p{i:03d}.jpg", data) + "\n" for i in range(300)))
        out = tmp_path / "emb"
        args = ["embed", "tiny_cnn", str(manifest), "--output", str(out), "--shard-size", "8", "--batch-size", "4"]
        env = {**os.environ, "BENTOML_HOME": str(tiny_registry.home), "BENTOML_DO_NOT_TRACK": "true"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args, "--workers", "1"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        flaky.process.terminate()
        _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: cannot read s3://flaky/p") and "are kept: run the same command again" in lines[0]
    manifest_doc = json.loads((out / "_manifest.json").read_text())
    assert manifest_doc["status"] == "failed" and manifest_doc["error"] in lines[0]
    assert 2 <= manifest_doc["counts"]["shards_done"] == len(list(out.glob("part-*.parquet"))) < 38


# -- the Ray engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(s3: S3Server) -> Iterator[None]:
    """A local Ray started after the S3 server, so that its workers see the AWS variables."""
    ray = pytest.importorskip("ray")
    from embed.ray_engine import init_local_ray

    init_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_from_s3_to_s3(
    s3: S3Server, photos: tuple[Path, str, list[str]], local_ray: None, tiny_registry: Registry
) -> None:
    _, url, good = photos
    out = s3.bucket("embed-out")
    opts = {"shard_size": 3, "top_k": 2, "registry": tiny_registry}
    local = run_embed("tiny_cnn", [url], f"{out}/ray-ref", workers=0, batch_size=2, **opts)  # type: ignore[arg-type]
    remote = run_embed("tiny_cnn", [url], f"{out}/ray", engine="ray", batch_size=3, **opts)  # type: ignore[arg-type]
    assert (remote.embedded, remote.errors, remote.shards_computed) == (len(good), 2, local.shards)
    assert [k.removeprefix(f"{out}/ray") for k in s3.keys(f"{out}/ray")] == [
        k.removeprefix(f"{out}/ray-ref") for k in s3.keys(f"{out}/ray-ref")
    ]
    for i in range(local.shards):
        a, b = _table(s3, f"{out}/ray-ref/part-{i:05d}.parquet"), _table(s3, f"{out}/ray/part-{i:05d}.parquet")
        assert a.schema.equals(b.schema, check_metadata=True) and a.column("id").equals(b.column("id"))
        np.testing.assert_allclose(
            np.asarray(b.column("embedding").to_pylist()), np.asarray(a.column("embedding").to_pylist()), atol=1e-6
        )
    assert s3.fs.cat_file(f"{out}/ray/_errors.jsonl") == s3.fs.cat_file(f"{out}/ray-ref/_errors.jsonl")
    _no_secrets(s3, f"{out}/ray")


def test_the_model_reaches_a_node_that_cannot_see_the_registry(local_ray: None, tiny_registry: Registry) -> None:
    """On a cluster without a shared file system the actors get the model through Ray's object
    store, checked against its sha256."""
    import ray

    from embed.ray_actor import _model_bytes

    stored = tiny_registry.get("tiny_cnn")
    sha = stored.spec.files["model.onnx"]
    ref = [ray.put(stored.file("model.onnx").read_bytes())]
    assert _model_bytes("/nowhere/model.onnx", sha, ref) == stored.file("model.onnx").read_bytes()
    with pytest.raises(RuntimeError, match="does not match the sha256"):
        _model_bytes("/nowhere/model.onnx", "0" * 64, ref)
    with pytest.raises(RuntimeError, match="is not visible on this Ray node"):
        _model_bytes("/nowhere/model.onnx", sha, None)
    # the driver's file, changed after the job read its spec, is refused as read
    copy = Path(tiny_registry.home).parent / "swapped.onnx"
    copy.write_bytes(stored.file("model.onnx").read_bytes() + b"x")
    with pytest.raises(RuntimeError, match="does not match the sha256"):
        _model_bytes(str(copy), sha, None)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


# -- one clear line ------------------------------------------------------------------------------------


def test_bad_urls_and_settings_are_one_clear_line(
    s3: S3Server,
    photos: tuple[Path, str, list[str]],
    run_cli,
    tiny_registry: Registry,  # type: ignore[no-untyped-def]
) -> None:
    _, url, _ = photos
    out = s3.bucket("embed-out") + "/never"
    no_credentials = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }
    cases = [
        (
            [url, "--output", "s3://no-such-bucket/x"],
            {},
            "cannot write to s3://no-such-bucket/x: there is no bucket 'no-such-bucket'",
        ),
        (["s3://no-such-bucket/photos", "--output", out], {}, "there is no bucket 'no-such-bucket'"),
        ([f"{url}/nothing-here", "--output", out], {}, f"no such file, folder or manifest: {url}/nothing-here"),
        (
            ["gs://photos/a", "--output", out],
            {},
            "unknown scheme 'gs://' in 'gs://photos/a': use a local path or s3://",
        ),
        ([url, "--output", "ftp://host/x"], {}, "unknown scheme 'ftp://'"),
        ([f"s3://{':'.join(_secrets(s3))}@embed-in/photos", "--output", out], {}, "credentials in a URL are refused"),
        ([url, "--output", f"gs://{':'.join(_secrets(s3))}@b/x"], {}, "credentials in a URL are refused"),
        ([url, "--output", out], no_credentials, "no AWS credentials found"),
        (
            [url, "--output", out],
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_MAX_ATTEMPTS": "1"},
            "does not answer (check AWS_ENDPOINT_URL",
        ),
    ]
    for args, env, message in cases:
        proc = run_cli("embed", "tiny_cnn", *args, home_dir=tiny_registry.home, extra_env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0], lines[0]
        assert not [s for s in _secrets(s3) if s in proc.stderr + proc.stdout]
    assert not s3.keys(out)
