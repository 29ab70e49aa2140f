"""The Ray engine on a real local Ray (2 CPUs): the same files, rows and vectors as the local
engine, and a job started by one engine resumed by the other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from embed import run_embed
from embed.output import ERRORS, MANIFEST
from models import Registry

from .test_embed import add_bad_photos, make_tree

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    from embed.ray_engine import init_local_ray

    init_local_ray(num_cpus=2)  # ray.init(num_cpus=2, include_dashboard=False), workers in this venv
    yield
    ray.shutdown()


def test_ray_writes_what_the_local_engine_writes(local_ray: None, tiny_registry: Registry, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    good = make_tree(photos)
    add_bad_photos(photos)
    opts = {"shard_size": 3, "top_k": 2, "registry": tiny_registry}
    local = run_embed("tiny_cnn", [str(photos)], tmp_path / "local", workers=0, batch_size=2, **opts)  # type: ignore[arg-type]
    remote = run_embed("tiny_cnn", [str(photos)], tmp_path / "ray", engine="ray", batch_size=3, **opts)  # type: ignore[arg-type]
    assert (remote.embedded, remote.errors, remote.shards_computed) == (6, 2, 3)
    assert (local.embedded, local.errors) == (remote.embedded, remote.errors)

    names = sorted(p.name for p in (tmp_path / "ray").glob("*.parquet"))
    assert (
        names
        == sorted(p.name for p in (tmp_path / "local").glob("*.parquet"))
        == [
            "part-00000.parquet",
            "part-00001.parquet",
            "part-00002.parquet",
        ]
    )
    for name in names:  # shard for shard: same schema (metadata included) and same rows
        a, b = pq.read_table(tmp_path / "local" / name), pq.read_table(tmp_path / "ray" / name)
        assert a.schema.equals(b.schema, check_metadata=True)
        assert a.column("id").equals(b.column("id")) and a.column("predictions").equals(b.column("predictions"))
        np.testing.assert_allclose(
            np.asarray(b.column("embedding").to_pylist()),
            np.asarray(a.column("embedding").to_pylist()),
            rtol=1e-6,
            atol=1e-6,
        )
    ds = pads.dataset(tmp_path / "ray", format="parquet").to_table()
    assert ds.column("path").to_pylist() == good
    assert (tmp_path / "ray" / ERRORS).read_text() == (tmp_path / "local" / ERRORS).read_text()
    manifest = json.loads((tmp_path / "ray" / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["runs"][-1]["engine"] == "ray"


def test_ray_resumes_a_job_the_local_engine_started(local_ray: None, tiny_registry: Registry, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_tree(photos) * 2  # 12 inputs, 4 shards of 3
    out = tmp_path / "emb"
    run_embed("tiny_cnn", paths, out, shard_size=3, workers=0, registry=tiny_registry)
    whole = pads.dataset(out, format="parquet").to_table()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    for n in (1, 3):
        (out / f"part-0000{n}.parquet").unlink()
    summary = run_embed("tiny_cnn", paths, out, shard_size=3, engine="ray", registry=tiny_registry)
    assert (summary.shards_computed, summary.shards_skipped, summary.images_computed) == (2, 2, 6)
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert (
        now["part-00000.parquet"] == kept["part-00000.parquet"]
        and now["part-00002.parquet"] == kept["part-00002.parquet"]
    )
    got = pads.dataset(out, format="parquet").to_table()
    assert got.column("id").equals(whole.column("id"))
    np.testing.assert_allclose(
        np.asarray(got.column("embedding").to_pylist()),
        np.asarray(whole.column("embedding").to_pylist()),
        rtol=1e-6,
        atol=1e-6,
    )


def test_shard_embedder_and_the_fragment_fallback(tiny_registry: Registry, tmp_path: Path) -> None:
    """The actor class without Ray: its vectors are the service's, and a shard that Ray split
    across write tasks (pieces in _fragments/) is joined into the same file as a whole one."""
    from embed import EmbedConfig, EmbedJob
    from embed.inputs import collect_inputs
    from embed.ray_actor import ShardEmbedder
    from embed.ray_sink import ShardLayout, _write_fragment, join_fragments, write_ray_shard
    from models import InferenceModel

    photos = tmp_path / "photos"
    good = make_tree(photos)
    add_bad_photos(photos)
    items = collect_inputs([str(photos)])
    stored = tiny_registry.get("tiny_cnn")
    job = EmbedJob(stored, items, tmp_path, EmbedConfig(shard_size=len(items), top_k=2))
    embedder = ShardEmbedder(
        str(stored.file("model.onnx")), stored.spec.files["model.onnx"], job.loader_config, 3, 1, 2, 2
    )
    rows = embedder(
        {
            "shard": np.zeros(len(items), np.int32),
            "pos": np.arange(len(items)),
            "id": np.array([it.id for it in items], dtype=object),
            "path": np.array([it.path for it in items], dtype=object),
        }
    )
    ok = rows["error"] == ""
    assert list(rows["path"][ok]) == good and set(rows["kind"][~ok]) == {"undecodable"}
    np.testing.assert_array_equal(rows["embedding"][ok], InferenceModel(stored).embed(good))

    def layout(out: Path) -> ShardLayout:
        out.mkdir()
        return ShardLayout(
            str(out), 32, 2, list(stored.spec.labels), {"backbones.model": stored.tag}, {0: (0, len(items))}
        )

    whole = layout(tmp_path / "whole")
    write_ray_shard(whole, 0, rows)
    pieces = layout(tmp_path / "pieces")
    order = np.random.default_rng(0).permutation(len(items))  # pieces in any order
    for part in (order[:3], order[3:5], order[5:]):
        _write_fragment(pieces, 0, {k: v[part] for k, v in rows.items()})
    assert len(list((tmp_path / "pieces" / "_fragments").glob("*.parquet"))) == 3
    records = join_fragments(pieces)
    assert [(r["shard"], r["rows"], len(r["errors"])) for r in records] == [(0, 6, 2)]
    assert not (tmp_path / "pieces" / "_fragments").exists()
    a, b = (
        pq.read_table(tmp_path / "whole" / "part-00000.parquet"),
        pq.read_table(tmp_path / "pieces" / "part-00000.parquet"),
    )
    assert a.equals(b) and a.schema.equals(b.schema, check_metadata=True)


def test_the_actor_plan_for_cpus_and_gpus() -> None:
    from embed.ray_engine import plan_actors

    cpu = plan_actors({"CPU": 8.0}, actors=None, gpus_per_actor=0.0, threads=None, workers=None)
    # one actor per 2 CPUs; two single-threaded ORT calls at once on micro-batches; one decode thread
    assert (cpu.actors, cpu.threads, cpu.runners, cpu.decode_threads, cpu.gpus) == (4, 1, 2, 1, 0.0)
    assert cpu.actors * cpu.cpus <= 8.0 - 0.25  # CPU left for the write tasks
    threads = plan_actors({"CPU": 8.0}, actors=2, gpus_per_actor=0.0, threads=3, workers=2)
    assert (threads.actors, threads.threads, threads.runners, threads.decode_threads) == (2, 3, 1, 2)
    gpu = plan_actors({"CPU": 16.0, "GPU": 2.0}, actors=None, gpus_per_actor=1.0, threads=None, workers=None)
    assert (gpu.actors, gpu.gpus, gpu.threads, gpu.runners, gpu.decode_threads) == (2, 1.0, 1, 1, 4)
