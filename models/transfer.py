"""Moving one version's files between a local folder and a remote registry's store.

In the store a version is ``models/<name>/<version>/`` holding its files, its ``spec.json`` and,
written last and only if absent, the commit marker ``_committed.json`` (the sha256 of
``spec.json``, the file sizes, when and by whom). Readers see a version only once its marker
exists, so an upload killed at any moment leaves no visible version; its objects are leftovers
that the next push of the version overwrites and that a push of any version of the name removes
once they are older than a grace period (an upload in flight on another machine is not a leftover).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import IntegrityError, RegistryError
from .files import pid_alive
from .objectstore import Entry, Store
from .registry import _FILE_RE, _SHA256_RE, Registry, StoredVersion, _actor, _now, sha256_file
from .spec import ONNX_FILENAME, SPEC_FILENAME, VersionSpec

log = logging.getLogger(__name__)

MARKER = "_committed.json"  # never a version's file: those start with a letter or digit
# Uploads of other versions of a name left unfinished for this long are leftovers of a killed push.
LEFTOVER_GRACE_SECONDS = 3600.0

# label and size of one file -> an fsspec callback (a progress bar), or None
Progress = Callable[[str, int], Any]


def version_prefix(name: str, version: str) -> str:
    return f"models/{name}/{version}/"


def marker_doc(marker: bytes | None, tag: str, where: str) -> dict[str, Any]:
    """The parsed commit marker of a version, checked for the fields readers rely on."""
    try:
        doc = json.loads(marker or b"")
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec_sha256"), str):
        raise IntegrityError(f"{tag} in {where} has a damaged commit marker ({MARKER}); push it again")
    return doc


def checked_spec(spec_bytes: bytes | None, marker: dict[str, Any], tag: str, where: str) -> VersionSpec:
    """The version's spec, refused unless it is exactly what was committed."""
    if spec_bytes is None or hashlib.sha256(spec_bytes).hexdigest() != marker["spec_sha256"]:
        raise IntegrityError(
            f"{tag} in {where}: {SPEC_FILENAME} does not match the sha256 committed with it (changed or damaged "
            "in the store); refusing it. Push the version again from a good copy"
        )
    try:
        spec = VersionSpec.model_validate_json(spec_bytes)
    except ValidationError as e:
        raise IntegrityError(f"{tag} in {where} has an unreadable {SPEC_FILENAME} ({e.error_count()} errors)") from None
    if spec.tag != tag:
        raise IntegrityError(f"{tag} in {where} holds the spec of {spec.tag}; refusing it")
    return spec


def upload_version(store: Store, stored: StoredVersion, progress: Progress | None) -> tuple[str, int]:
    """Upload the files and ``spec.json`` of ``stored``, check what arrived, remove what does not
    belong, and return the marker to commit with and the bytes sent. Nothing is visible yet."""
    name, version = stored.spec.name, stored.spec.version
    prefix = version_prefix(name, version)
    names = [*stored.spec.files, SPEC_FILENAME]  # spec.json after the files it vouches for
    sizes = {f: stored.file(f).stat().st_size for f in names}
    for fname in names:
        callback = progress(f"{stored.tag} {fname}", sizes[fname]) if progress else None
        store.upload(prefix + fname, stored.file(fname), callback)
    arrived = {e.key[len(prefix) :]: e.size for e in store.list(prefix)}
    short = [f for f in names if arrived.get(f) != sizes[f]]
    if short:
        raise RegistryError(f"{stored.tag}: {', '.join(short)} did not arrive whole in {store.display}; push again")
    store.remove(prefix + f for f in arrived if f not in sizes and f != MARKER)  # a killed push's extras
    marker = {
        "spec_sha256": sha256_file(stored.file(SPEC_FILENAME)),
        "sizes": sizes,
        "pushed_at": _now().isoformat(),
        "by": _actor(),
    }
    return json.dumps(marker, indent=2), sum(sizes.values())


def remove_leftovers(store: Store, name: str, keep: str, grace_seconds: float) -> list[str]:
    """Remove uncommitted versions of ``name`` untouched for ``grace_seconds`` (and unfinished
    multipart uploads as old), except ``keep``, whose upload is about to overwrite them."""
    prefix = f"models/{name}/"
    by_version: dict[str, list[Entry]] = {}
    for entry in store.list(prefix):
        by_version.setdefault(entry.key[len(prefix) :].partition("/")[0], []).append(entry)
    cutoff = time.time() - grace_seconds
    removed = []
    for version, entries in by_version.items():
        committed = any(e.key.endswith("/" + MARKER) for e in entries)
        if version != keep and not committed and max(e.modified for e in entries) < cutoff:
            store.remove(e.key for e in entries)
            removed.append(version)
    store.abort_stale_uploads(prefix, cutoff)
    if removed:
        log.info("removed unfinished uploads of %s: %s", name, ", ".join(sorted(removed)))
    return removed


def download_version(
    store: Store, spec: VersionSpec, folder: Path, where: str, progress: Progress | None, sizes: dict[str, int]
) -> dict[str, Path]:
    """Download the files ``spec`` lists into ``folder``, each checked against its sha256."""
    unsafe = [f for f, d in spec.files.items() if not _FILE_RE.fullmatch(f) or not _SHA256_RE.fullmatch(d)]
    if unsafe or ONNX_FILENAME not in spec.files:
        raise IntegrityError(
            f"{spec.tag} in {where}: {SPEC_FILENAME} lists {', '.join(map(repr, unsafe)) or f'no {ONNX_FILENAME}'} "
            "(plain file names with sha256 digests expected); refusing it"
        )
    prefix = version_prefix(spec.name, spec.version)
    paths = {}
    for fname, digest in spec.files.items():
        target = folder / fname
        callback = progress(f"{spec.tag} {fname}", int(sizes.get(fname, 0))) if progress else None
        store.download(prefix + fname, target, callback)
        if not target.is_file():
            raise IntegrityError(f"{spec.tag} in {where}: {fname} is missing; push the version again")
        if sha256_file(target) != digest:
            raise IntegrityError(
                f"{spec.tag} in {where}: {fname} does not match the sha256 in its {SPEC_FILENAME} (changed or "
                "damaged in the store); nothing was pulled. Push the version again from a good copy"
            )
        paths[fname] = target
    return paths


def downloads_dir(local: Registry) -> Path:
    """Where pulls download into ``local`` (one ``<pid>-...`` folder each), cleared of what
    killed pulls left."""
    folder = local.own_dir("downloads")
    folder.mkdir(parents=True, exist_ok=True)
    for d in folder.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
    return folder
