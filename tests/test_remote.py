"""The registry in object storage, against a real S3 API server (moto's standalone server, started
on a free local port, as s3fs's own tests do) and a shared folder (``file://``): the store's
conditional writes, push and pull with tampering caught, pushes killed at several moments,
concurrent alias moves from two processes, the CLI, and bad URLs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from models import IntegrityError, Registry, RegistryError, StoredVersion, UnknownModelError
from models.objectstore import open_store
from models.remote import RemoteRegistry
from models.spec import ONNX_FILENAME, SPEC_FILENAME, WEIGHTS_FILENAME
from models.transfer import MARKER

from .conftest import ROOT

if TYPE_CHECKING:
    from .s3server import S3Server

pytest_plugins = ("tests.s3server",)  # the session's S3 server: the fixture ``s3``
pytestmark = pytest.mark.slow


@pytest.fixture
def s3_url(s3: S3Server) -> str:
    """An empty registry in a bucket of its own, below a prefix."""
    return s3.bucket(f"reg-{uuid.uuid4().hex[:12]}") + "/team/registry"


@pytest.fixture(params=["s3", "file"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        (tmp_path / "shared").mkdir()
        return f"file://{tmp_path / 'shared'}"
    return str(request.getfixturevalue("s3_url"))


@pytest.fixture(scope="module")
def two_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, list[StoredVersion]]:
    """A local registry with two versions of the tiny CNN (shared by the module: do not modify)."""
    from models.export import export_catalog

    reg = Registry(tmp_path_factory.mktemp("two-tiny") / "bentoml")
    first = export_catalog("tiny_cnn", registry=reg)
    fields = first.spec.model_dump(exclude={"name", "version", "created_at", "files"})
    files = {f: first.file(f) for f in first.spec.files}
    second = reg.register("tiny_cnn", files, {**fields, "parent": first.tag})
    return reg, [first, second]


def objects(url: str, prefix: str) -> list[str]:
    return sorted(e.key for e in open_store(url).list(prefix))


def tamper(url: str, key: str) -> None:
    store = open_store(url)
    data = bytearray(store.read(key) or b"")
    data[len(data) // 2] ^= 0x01
    store.write(key, bytes(data))


# -- the store's conditional writes --------------------------------------------------------


def test_the_store_honours_conditional_writes(any_url: str) -> None:
    store = open_store(any_url)
    assert store.create("aliases/x.json", b"first") is True
    assert store.create("aliases/x.json", b"second") is False  # If-None-Match: * -> 412
    got = store.read_versioned("aliases/x.json")
    assert got is not None and got[0] == b"first"
    stale = got[1]
    assert store.replace("aliases/x.json", b"writer one", stale) is True
    assert store.replace("aliases/x.json", b"writer two", stale) is False  # If-Match: stale ETag -> 412
    assert store.read("aliases/x.json") == b"writer one"


# -- push and pull ---------------------------------------------------------------------------


def test_push_then_pull_gives_the_identical_version(
    s3_url: str, tiny_registry: Registry, tiny_version: StoredVersion, registry: Registry
) -> None:
    remote = RemoteRegistry(s3_url)
    pushed = remote.push(tiny_registry, "tiny_cnn")
    assert pushed.uploaded and pushed.tag == tiny_version.tag and pushed.sent > 0
    assert [s.tag for s in remote.list()] == [tiny_version.tag] and remote.names() == ["tiny_cnn"]
    assert remote.get("tiny_cnn").spec == tiny_version.spec
    prefix = f"models/tiny_cnn/{tiny_version.spec.version}/"
    assert objects(s3_url, prefix) == sorted(
        prefix + f for f in (ONNX_FILENAME, WEIGHTS_FILENAME, SPEC_FILENAME, MARKER)
    )
    assert remote.push(tiny_registry, "tiny_cnn").uploaded is False  # already there: a no-op

    pulled = remote.pull("tiny_cnn", registry)
    assert pulled.tag == tiny_version.tag and pulled.spec == tiny_version.spec
    for fname in (ONNX_FILENAME, WEIGHTS_FILENAME, SPEC_FILENAME):
        assert pulled.file(fname).read_bytes() == tiny_version.file(fname).read_bytes(), fname
    assert registry.get(tiny_version.tag).spec.files == tiny_version.spec.files  # checked by the local store

    # the local copy is a verified cache: a second pull downloads nothing (the damage below would be caught)
    tamper(s3_url, prefix + ONNX_FILENAME)
    assert remote.pull(f"tiny_cnn:{tiny_version.spec.version[:6]}", registry).path == pulled.path


@pytest.mark.parametrize("damaged", [ONNX_FILENAME, WEIGHTS_FILENAME, SPEC_FILENAME])
def test_tampering_in_the_bucket_is_caught_on_pull_and_nothing_is_registered(
    s3_url: str, tiny_registry: Registry, tiny_version: StoredVersion, registry: Registry, damaged: str
) -> None:
    remote = RemoteRegistry(s3_url)
    remote.push(tiny_registry, tiny_version.tag)
    tamper(s3_url, f"models/tiny_cnn/{tiny_version.spec.version}/{damaged}")
    with pytest.raises(IntegrityError, match=f"{damaged} does not match the sha256") as caught:
        remote.pull(tiny_version.tag, registry)
    assert "\n" not in str(caught.value) and tiny_version.tag in str(caught.value)
    assert registry.list() == []
    downloads = registry.own_dir("downloads")
    assert not downloads.exists() or not any(downloads.iterdir())  # the partial download is gone


def test_versions_are_immutable_in_the_remote(
    s3_url: str, tiny_registry: Registry, tiny_version: StoredVersion, registry: Registry
) -> None:
    remote = RemoteRegistry(s3_url)
    remote.push(tiny_registry, tiny_version.tag)
    # the same name and version with other content, registered elsewhere
    fields = tiny_version.spec.model_dump(exclude={"name", "version", "created_at", "files"})
    files = {f: tiny_version.file(f) for f in tiny_version.spec.files}
    registry.register("tiny_cnn", files, {**fields, "parent": "catalog:other"}, version=tiny_version.spec.version)
    with pytest.raises(RegistryError, match="already exists in .* with other content; versions are immutable"):
        remote.push(registry, tiny_version.tag)
    assert remote.get(tiny_version.tag).spec.parent == tiny_version.spec.parent


# -- pushes killed at several moments ------------------------------------------------------

KILLED_PUSH = """
import os, signal, sys
from models import Registry
from models.objectstore import Store
from models.remote import RemoteRegistry

home, url, ref, moment = sys.argv[1:5]
store_class = type(RemoteRegistry(url).store)
real_upload, real_create, uploads = Store.upload, store_class.create, []

def upload(self, key, source, callback=None):
    real_upload(self, key, source, callback)
    uploads.append(key)
    if moment.startswith("after-upload-") and len(uploads) == int(moment.rpartition("-")[2]):
        os.kill(os.getpid(), signal.SIGKILL)

def create(self, key, data):
    if moment == "before-marker":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_create(self, key, data)

Store.upload, store_class.create = upload, create
RemoteRegistry(url).push(Registry(home), ref)
print("pushed")
"""


@pytest.mark.parametrize("moment", ["after-upload-1", "after-upload-2", "after-upload-3", "before-marker"])
def test_a_killed_push_leaves_no_visible_version_and_the_next_push_cleans_up(
    s3_url: str, two_tiny: tuple[Registry, list[StoredVersion]], registry: Registry, moment: str
) -> None:
    local, (first, second) = two_tiny
    child = subprocess.run(
        [sys.executable, "-c", KILLED_PUSH, str(local.home), s3_url, first.tag, moment],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    first_prefix = f"models/tiny_cnn/{first.spec.version}/"
    assert objects(s3_url, first_prefix), "the push was killed before it uploaded anything"
    remote = RemoteRegistry(s3_url)
    assert remote.list() == [] and remote.names() == []
    with pytest.raises(UnknownModelError, match="no model 'tiny_cnn'"):
        remote.pull(first.tag, registry)

    # a push of another version keeps what may be an upload in flight elsewhere...
    assert remote.push(local, second.tag).uploaded
    assert objects(s3_url, first_prefix)
    # ...and removes it once it is older than the grace period (even when it has nothing to upload)
    assert RemoteRegistry(s3_url, leftover_grace_seconds=0).push(local, second.tag).uploaded is False
    assert objects(s3_url, first_prefix) == []

    # the killed version pushes whole afterwards
    child = subprocess.run(
        [sys.executable, "-c", KILLED_PUSH, str(local.home), s3_url, first.tag, "never"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0 and "pushed" in child.stdout, child.stderr[-2000:]
    assert {s.tag for s in remote.list()} == {first.tag, second.tag}
    assert remote.pull(first.tag, registry).spec == first.spec


def test_a_killed_push_of_the_same_version_is_overwritten_whole(
    s3_url: str, two_tiny: tuple[Registry, list[StoredVersion]], registry: Registry
) -> None:
    local, (first, _) = two_tiny
    prefix = f"models/tiny_cnn/{first.spec.version}/"
    store = open_store(s3_url)
    store.write(prefix + ONNX_FILENAME, b"half an upload")  # what a killed push of this version left
    store.write(prefix + "stray.bin", b"not part of the version")
    assert RemoteRegistry(s3_url).list() == []
    assert RemoteRegistry(s3_url).push(local, first.tag).uploaded
    assert objects(s3_url, prefix) == sorted(
        prefix + f for f in (ONNX_FILENAME, WEIGHTS_FILENAME, SPEC_FILENAME, MARKER)
    )
    assert RemoteRegistry(s3_url).pull(first.tag, registry).spec == first.spec


def test_unfinished_multipart_uploads_are_aborted(s3_url: str, two_tiny: tuple[Registry, list[StoredVersion]]) -> None:
    local, (first, second) = two_tiny
    store = open_store(s3_url)
    bucket, _, root = s3_url.removeprefix("s3://").partition("/")
    key = f"{root}/models/tiny_cnn/{first.spec.version}/{ONNX_FILENAME}"
    store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)  # a big upload, killed
    assert store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    RemoteRegistry(s3_url, leftover_grace_seconds=0).push(local, second.tag)
    assert not store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")


# -- concurrent alias moves ------------------------------------------------------------------

MOVER = """
import os, sys, time
from models.remote import RemoteRegistry

url, ref, moves, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
remote = RemoteRegistry(url)
remote.aliases("tiny_cnn")  # connected and ready
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for _ in range(moves):
    remote.set_alias(ref, "production")
print("done", flush=True)
"""


def test_two_processes_moving_one_alias_lose_no_move(
    any_url: str, two_tiny: tuple[Registry, list[StoredVersion]], tmp_path: Path
) -> None:
    local, versions = two_tiny
    remote = RemoteRegistry(any_url)
    for v in versions:
        remote.push(local, v.tag)
    moves, go = 12, tmp_path / "go"
    movers = [
        subprocess.Popen(
            [sys.executable, "-c", MOVER, any_url, v.tag, str(moves), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    for m in movers:
        assert m.stdout is not None and m.stdout.readline().strip() == "ready"
    go.touch()
    for m in movers:
        out, err = m.communicate(timeout=180)
        assert m.returncode == 0 and out.strip() == "done", err[-2000:]

    history = remote.alias_history("tiny_cnn")
    assert len(history) == 2 * moves
    targets = [e["version"] for e in history]
    assert sorted(targets) == sorted([v.spec.version for v in versions] * moves)  # every move is there
    previous = None
    for event in history:  # each move saw the one before it: none was overwritten unseen
        assert event["previous"] == previous
        previous = event["version"]
    assert remote.aliases("tiny_cnn") == {"production": history[-1]["version"]}
    assert remote.resolve("tiny_cnn") == ("tiny_cnn", history[-1]["version"])


def test_aliases_and_delete_in_the_remote(any_url: str, two_tiny: tuple[Registry, list[StoredVersion]]) -> None:
    local, (first, second) = two_tiny
    remote = RemoteRegistry(any_url)
    for v in (first, second):
        remote.push(local, v.tag)
    assert remote.resolve("tiny_cnn") == ("tiny_cnn", second.spec.version)  # no production: the newest
    event = remote.set_alias(first.tag, "production")
    assert event["previous"] is None and event["version"] == first.spec.version
    assert remote.resolve("tiny_cnn") == ("tiny_cnn", first.spec.version)
    with pytest.raises(RegistryError, match="target of alias production"):
        remote.delete(first.tag)
    assert remote.delete("tiny_cnn@production", force=True) == first.tag
    assert [s.tag for s in remote.list()] == [second.tag]
    assert remote.aliases("tiny_cnn") == {}
    assert [e["action"] for e in remote.alias_history("tiny_cnn")] == ["set", "remove"]
    assert objects(any_url, f"models/tiny_cnn/{first.spec.version}/") == []
    with pytest.raises(UnknownModelError, match="has no alias 'production'"):
        remote.resolve("tiny_cnn@production")


def test_a_store_without_conditional_writes_refuses_alias_moves(
    two_tiny: tuple[Registry, list[StoredVersion]],
) -> None:
    local, (first, _) = two_tiny
    remote = RemoteRegistry(f"memory://backbones-{uuid.uuid4().hex[:8]}")
    remote.push(local, first.tag)  # versions still appear whole
    assert [s.tag for s in remote.list()] == [first.tag]
    with pytest.raises(RegistryError, match="no conditional writes"):
        remote.set_alias(first.tag, "production")


# -- the command line ----------------------------------------------------------------------


def test_cli_push_pull_list_alias_show_delete(run_cli, s3_url: str, tiny_registry: Registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tag = tiny_registry.get("tiny_cnn").tag
    pushed = run_cli("models", "push", "tiny_cnn", "--registry", s3_url, "--json", home_dir=tiny_registry.home)
    assert pushed.returncode == 0, pushed.stderr
    result = json.loads(pushed.stdout)
    assert result["bytes"] > 0 and result == {
        "tag": tag,
        "registry": s3_url,
        "uploaded": True,
        "bytes": result["bytes"],
    }
    again = run_cli(
        "models", "push", "tiny_cnn", extra_env={"BACKBONES_REGISTRY_URL": s3_url}, home_dir=tiny_registry.home
    )
    assert again.returncode == 0 and again.stdout.strip() == tag and "already" in again.stderr

    listed = run_cli("models", "list", "--registry", s3_url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["tag"] for r in json.loads(listed.stdout)] == [tag]
    moved = run_cli("models", "alias", tag, "production", "--registry", s3_url)
    assert moved.returncode == 0 and moved.stdout.strip() == f"tiny_cnn@production -> {tag}", moved.stderr
    shown = run_cli("models", "show", "tiny_cnn", "--json", extra_env={"BACKBONES_REGISTRY_URL": s3_url})
    doc = json.loads(shown.stdout)
    assert doc["aliases"] == {"production": tag.partition(":")[2]} and doc["path"].startswith(s3_url + "/models/")

    pulled = run_cli("models", "pull", "tiny_cnn@production", "--registry", s3_url)  # into an empty local store
    assert pulled.returncode == 0 and pulled.stdout.strip() == tag, pulled.stderr
    local = run_cli("models", "list", "--json", extra_env={"BACKBONES_REGISTRY_URL": ""})
    assert [r["tag"] for r in json.loads(local.stdout)] == [tag]
    cached = run_cli("models", "pull", tag, "--registry", s3_url, "--json")
    assert json.loads(cached.stdout)["downloaded"] is False

    refused = run_cli("models", "delete", tag, "--registry", s3_url)
    assert refused.returncode == 1 and "target of alias production" in refused.stderr
    deleted = run_cli("models", "delete", tag, "--force", "--registry", s3_url)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {tag}"
    assert json.loads(run_cli("models", "list", "--registry", s3_url, "--json").stdout) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["models", "list", "--registry", "s3://"], {}, "names no bucket"),
        (["models", "list", "--registry", "ftp2://host/x"], {}, "unknown scheme 'ftp2'"),
        (["models", "list", "--registry", "gs://bucket/x"], {}, "install gcsfs"),
        (["models", "list", "--registry", "bucket/x"], {}, "has no scheme"),
        (["models", "list", "--registry", "s3://AKIDEXAMPLE:s3cr3t@bucket/x"], {}, "carries credentials"),
        (["models", "list", "--registry", "file:///nonexistent/registry"], {}, "does not exist"),
        (["models", "pull", "tiny_cnn"], {"BACKBONES_REGISTRY_URL": ""}, "no remote registry"),
        (["models", "show", "nope", "--registry", "s3://no-such-bucket-here/x"], {}, "bucket does not exist"),
        (
            ["models", "list", "--registry", "s3://bucket/x"],
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}", "AWS_MAX_ATTEMPTS": "1"},
            "Could not connect",
        ),
    ],
)
def test_bad_registry_urls_get_one_clear_line(
    run_cli, s3: S3Server, args: list[str], env: dict[str, str], message: str
) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = run_cli(*args, extra_env=env)
    assert result.returncode == 1, result.stderr
    assert message.lower() in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert "s3cr3t" not in result.stderr
    assert time.monotonic() - started < 60


def test_credentials_never_reach_the_logs(run_cli, s3_url: str) -> None:  # type: ignore[no-untyped-def]
    secrets = {"AWS_SECRET_ACCESS_KEY": "secret-key-never-logged", "AWS_SESSION_TOKEN": "session-token-never-logged"}
    result = run_cli("-vv", "models", "list", "--registry", s3_url, "--json", extra_env=secrets)
    assert result.returncode == 0, result.stderr
    assert "DEBUG" in result.stderr  # debug logging was on
    for secret in secrets.values():
        assert secret not in result.stderr + result.stdout


@pytest.mark.slow
def test_export_and_conversion_publish_to_the_remote(run_cli, s3_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`export` with a remote registry publishes the new version; a conversion of a version only the
    remote has pulls it first and publishes its result; without a remote nothing is published."""
    env = {"BACKBONES_REGISTRY_URL": s3_url}
    exported = run_cli("export", "tiny_cnn", extra_env=env)
    assert exported.returncode == 0, exported.stderr
    tag = exported.stdout.strip()
    assert "published to" in exported.stderr
    remote = [r["tag"] for r in json.loads(run_cli("models", "list", "--json", extra_env=env).stdout)]
    assert remote == [tag]

    elsewhere = tmp_path / "another-machine"  # an empty local store: the parent is only in the bucket
    converted = run_cli("export", tag, "--as", "tiny_fp16", "--precision", "fp16", home_dir=elsewhere, extra_env=env)
    assert converted.returncode == 0, converted.stderr
    fp16 = converted.stdout.strip()
    remote = {r["tag"] for r in json.loads(run_cli("models", "list", "--json", extra_env=env).stdout)}
    assert remote == {tag, fp16}
    local = {r["tag"] for r in json.loads(run_cli("models", "list", "--json", home_dir=elsewhere).stdout)}
    assert local == {tag, fp16}  # the parent was pulled, verified, into the local cache

    plain = run_cli("export", "tiny_cnn", extra_env={"BACKBONES_REGISTRY_URL": ""}, home_dir=tmp_path / "alone")
    assert plain.returncode == 0 and "published" not in plain.stderr


@pytest.mark.slow
def test_finetune_publishes_to_the_remote(run_cli, s3_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from .conftest import jpeg_bytes

    data = tmp_path / "data"
    for c, label in enumerate(("ants", "bees")):
        (data / label).mkdir(parents=True)
        for i in range(8):
            (data / label / f"{i}.jpg").write_bytes(jpeg_bytes(10 * c + i))
    proc = run_cli("finetune", str(data), "--backbone", "tiny_cnn", "--name", "tinyft", "--registry", s3_url, "--json")
    assert proc.returncode == 0, proc.stderr
    tag = json.loads(proc.stdout)["model"]
    remote = [r["tag"] for r in json.loads(run_cli("models", "list", "tinyft", "--json", "--registry", s3_url).stdout)]
    assert remote == [tag]


@pytest.mark.parametrize("url", ["s3://", "ftp://unreachable.invalid/x"])
def test_a_bad_remote_fails_before_any_work(run_cli, url: str) -> None:  # type: ignore[no-untyped-def]
    """`export --registry` with a URL that cannot be used fails in one line before exporting:
    nothing is registered locally and nothing is half-published."""
    proc = run_cli("export", "tiny_cnn", "--registry", url)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: registry URL")
    assert "exporting" not in proc.stderr
    assert json.loads(run_cli("models", "list", "--json").stdout) == []
