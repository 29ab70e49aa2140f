"""A registry in object storage (``BACKBONES_REGISTRY_URL=s3://bucket/prefix``), with the local
store (:class:`~models.registry.Registry`) as its verified cache.

Layout below the URL::

    models/<name>/<version>/model.onnx, weights.safetensors, spec.json   the version's files
    models/<name>/<version>/_committed.json                              written last: it is visible
    aliases/<name>.json                                                  aliases and their history

The guarantees of the local store hold here too. A version is visible only once all its files are
uploaded and checked and its commit marker is created (a create-only write); versions are
immutable. Every pulled file is checked against its sha256 before the version is registered
locally under the same name and version. Alias moves are compare-and-swap on the alias file (S3
``If-Match``/``If-None-Match``), retried on a lost race, so concurrent moves all land in the
append-only history and none is lost.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IntegrityError, RegistryError, UnknownModelError
from .objectstore import Store, open_store, require_conditional
from .registry import (
    _NAME_RE,
    PRODUCTION,
    Ref,
    Registry,
    StoredVersion,
    _alias_doc_ok,
    _registry_name,
    apply_alias_change,
    release_for_deletion,
    sha256_file,
    validate_name,
)
from .spec import SPEC_FILENAME, VersionSpec
from .transfer import (
    LEFTOVER_GRACE_SECONDS,
    MARKER,
    Progress,
    checked_spec,
    download_version,
    downloads_dir,
    marker_doc,
    remove_leftovers,
    upload_version,
    version_prefix,
)

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 30  # alias moves retried after a lost race; each retry waits a little longer


@dataclass(frozen=True)
class RemoteVersion:
    """A committed version in the remote registry whose spec matched its commit marker."""

    spec: VersionSpec
    url: str
    spec_sha256: str
    sizes: dict[str, int]

    @property
    def tag(self) -> str:
        return self.spec.tag

    @property
    def path(self) -> str:
        return self.url


@dataclass(frozen=True)
class Pushed:
    tag: str
    uploaded: bool  # False: the remote already held this version
    sent: int  # bytes uploaded


class RemoteRegistry:
    """Model versions and aliases in object storage; see the module docstring for the layout."""

    def __init__(self, url: str, *, leftover_grace_seconds: float = LEFTOVER_GRACE_SECONDS) -> None:
        self.store: Store = open_store(url)
        self.url = self.store.display
        self.leftover_grace_seconds = leftover_grace_seconds

    def __repr__(self) -> str:
        return f"RemoteRegistry({self.url!r})"

    # -- reading --------------------------------------------------------------------------

    def _committed(self, name: str | None = None) -> dict[str, set[str]]:
        """name -> its committed versions, from one listing."""
        found: dict[str, set[str]] = {}
        for entry in self.store.list(f"models/{name}/" if name else "models/"):
            parts = entry.key.split("/")
            if len(parts) == 4 and parts[3] == MARKER and _NAME_RE.fullmatch(parts[1]) and _NAME_RE.fullmatch(parts[2]):
                found.setdefault(parts[1], set()).add(parts[2])
        return found

    def names(self) -> list[str]:
        return sorted(self._committed())

    def _load_many(self, name: str, versions: builtins.list[str], strict: bool) -> builtins.list[RemoteVersion]:
        keys = [version_prefix(name, v) + f for v in versions for f in (MARKER, SPEC_FILENAME)]
        blobs = self.store.read_many(keys)
        loaded = []
        for v in versions:
            prefix, tag = version_prefix(name, v), f"{name}:{v}"
            try:
                marker = marker_doc(blobs[prefix + MARKER], tag, self.url)
                spec = checked_spec(blobs[prefix + SPEC_FILENAME], marker, tag, self.url)
            except IntegrityError as e:
                if strict:
                    raise
                log.warning("skipping %s", e)
                continue
            sizes = marker["sizes"] if isinstance(marker.get("sizes"), dict) else {}
            loaded.append(RemoteVersion(spec, f"{self.url}/{prefix.rstrip('/')}", marker["spec_sha256"], sizes))
        return loaded

    def versions(self, name: str) -> builtins.list[VersionSpec]:
        """The committed versions of ``name``, oldest first (one with a damaged spec is skipped)."""
        name = _registry_name(name)
        found = sorted(self._committed(name).get(name, ()))
        specs = [r.spec for r in self._load_many(name, found, strict=False)]
        return sorted(specs, key=lambda s: (s.created_at, s.version))

    def list(self, name: str | None = None) -> builtins.list[VersionSpec]:
        names = [_registry_name(name)] if name else self.names()
        return [s for n in names for s in self.versions(n)]

    def resolve(self, ref: str | Ref, *, book: dict[str, str] | None = None) -> tuple[str, str]:
        """``(name, version)`` for a reference, by the local registry's rules. ``book``: the aliases
        of the name as the caller already read them, so that what it shows and what resolves agree."""
        r = Ref.parse(ref) if isinstance(ref, str) else ref
        committed = self._committed(r.name).get(r.name, set())
        if book is None:
            book = self.aliases(r.name) if r.alias or not r.version else {}
        if r.alias:
            if r.alias not in book:
                known = ", ".join(sorted(book)) or "none"
                raise UnknownModelError(f"{r.name} has no alias {r.alias!r} in {self.url} (aliases: {known})")
            if book[r.alias] not in committed:
                raise UnknownModelError(
                    f"{r.name}@{r.alias} points to {book[r.alias]!r}, which is not a version of {r.name} in {self.url}"
                )
            return r.name, book[r.alias]
        if not committed:
            known = ", ".join(self.names()) or "none yet"
            raise UnknownModelError(f"no model {r.name!r} in {self.url} (there: {known})")
        if r.version:
            return r.name, r.pick_version(committed, self.url)
        if book.get(PRODUCTION) in committed:
            return r.name, book[PRODUCTION]
        newest = self.versions(r.name)
        if not newest:
            raise IntegrityError(f"every version of {r.name} in {self.url} is damaged; push them again")
        return r.name, newest[-1].version

    def get(self, ref: str | Ref) -> RemoteVersion:
        """The committed version ``ref`` names, its spec checked against its commit marker (the
        files are checked when pulled)."""
        name, version = self.resolve(ref)
        return self._load_many(name, [version], strict=True)[0]

    # -- aliases --------------------------------------------------------------------------

    def _alias_key(self, name: str) -> str:
        return f"aliases/{validate_name(name)}.json"

    def _alias_doc(self, name: str, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {"name": name, "aliases": {}, "history": []}
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not _alias_doc_ok(doc):
            raise RegistryError(f"the alias file of {name} in {self.url} is malformed; restore it")
        return doc  # type: ignore[no-any-return]

    def aliases(self, name: str) -> dict[str, str]:
        name = _registry_name(name)
        return dict(self._alias_doc(name, self.store.read(self._alias_key(name)))["aliases"])

    def alias_history(self, name: str) -> builtins.list[dict[str, Any]]:
        name = _registry_name(name)
        return builtins.list(self._alias_doc(name, self.store.read(self._alias_key(name)))["history"])

    def _change_alias(self, name: str, alias: str, version: str | None) -> dict[str, Any]:
        """Read the alias file, change it, write it back only if nobody wrote in between; else
        read again and redo the change on top of theirs."""
        require_conditional(self.store)
        key, event_id = self._alias_key(name), uuid.uuid4().hex
        for attempt in range(CAS_ATTEMPTS):
            current = self.store.read_versioned(key)
            doc = self._alias_doc(name, current[0] if current else None)
            # a write whose answer was lost, retried after all: it is already in the history
            done = [e for e in doc["history"] if isinstance(e, dict) and e.get("id") == event_id]
            if done:
                return done[0]  # type: ignore[no-any-return]
            event = apply_alias_change(doc, name, alias, version, where=f" in {self.url}", id=event_id)
            data = json.dumps(doc, indent=2).encode()
            if self.store.create(key, data) if current is None else self.store.replace(key, data, current[1]):
                return event
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))  # someone moved it first
        raise RegistryError(
            f"{name}@{alias} in {self.url} kept changing under {CAS_ATTEMPTS} attempts to move it; try again"
        )

    def set_alias(self, ref: str, alias: str) -> dict[str, Any]:
        """Point ``alias`` at the version ``ref`` names; returns the history event."""
        validate_name(alias, "alias")
        if alias == "latest":
            raise RegistryError("'latest' is reserved: a bare name already means the newest version")
        name, version = self.resolve(ref)
        return self._change_alias(name, alias, version)

    def remove_alias(self, name: str, alias: str) -> dict[str, Any]:
        return self._change_alias(_registry_name(name), validate_name(alias, "alias"), None)

    # -- deletion -------------------------------------------------------------------------

    def delete(self, ref: str, *, force: bool = False) -> str:
        """Delete one version: its commit marker first (it disappears at once), then its files.
        A version an alias points to is kept unless ``force``. Returns the deleted tag."""
        name, version = release_for_deletion(self, ref, force=force, where=f" in {self.url}")
        prefix = version_prefix(name, version)
        self.store.remove([prefix + MARKER])
        self.store.remove(e.key for e in self.store.list(prefix))
        return f"{name}:{version}"

    # -- copying versions -----------------------------------------------------------------

    def push(self, local: Registry, ref: str, *, progress: Progress | None = None) -> Pushed:
        """Copy the version ``ref`` names in ``local`` (checked first) here, under the same name
        and version. Pushing a version the remote already holds is a no-op; one it holds with
        other content is refused (versions are immutable)."""
        stored = local.get(ref)
        prefix = version_prefix(stored.spec.name, stored.spec.version)
        remove_leftovers(self.store, stored.spec.name, stored.spec.version, self.leftover_grace_seconds)
        if self._same_as_committed(stored, self.store.read(prefix + MARKER)):
            return Pushed(stored.tag, False, 0)
        marker, sent = upload_version(self.store, stored, progress)
        if not self.store.create(prefix + MARKER, marker.encode()):  # the step that makes it visible
            self._same_as_committed(stored, self.store.read(prefix + MARKER))  # a concurrent push won
            return Pushed(stored.tag, False, 0)
        log.info("pushed %s to %s", stored.tag, self.url)
        return Pushed(stored.tag, True, sent)

    def _same_as_committed(self, stored: StoredVersion, marker: bytes | None) -> bool:
        if marker is None:
            return False
        if marker_doc(marker, stored.tag, self.url)["spec_sha256"] != sha256_file(stored.file(SPEC_FILENAME)):
            raise RegistryError(
                f"{stored.tag} already exists in {self.url} with other content; versions are immutable "
                "(register a new version and push that)"
            )
        return True

    def pull(self, ref: str, local: Registry, *, progress: Progress | None = None) -> StoredVersion:
        """The version ``ref`` names, in ``local`` under the same name and version: downloaded,
        every file checked against its sha256, then registered (preflight included). A version
        the local store already holds, checked and identical, is not downloaded again; pulls of
        one name on one machine take turns, so it is downloaded once however many ask."""
        name, version = self.resolve(ref)
        with local.lock(name, "pull"):
            remote = self._load_many(name, [version], strict=True)[0]
            cached = self._cached(local, remote)
            if cached is not None:
                return cached
            with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=downloads_dir(local)) as tmp:
                files = download_version(self.store, remote.spec, Path(tmp), self.url, progress, remote.sizes)
                fields = remote.spec.model_dump(exclude={"name", "version", "created_at", "files"})
                stored = local.register(name, files, fields, version=version, created_at=remote.spec.created_at)
        if sha256_file(stored.file(SPEC_FILENAME)) != remote.spec_sha256:
            log.warning("%s: the local spec.json differs in form from the remote one (same content)", stored.tag)
        log.info("pulled %s from %s", stored.tag, self.url)
        return stored

    def _cached(self, local: Registry, remote: RemoteVersion) -> StoredVersion | None:
        if remote.spec.version not in {s.version for s in local.versions(remote.spec.name)}:
            return None
        stored = local.get(remote.tag)  # checked: a modified local copy is refused, not used
        if sha256_file(stored.file(SPEC_FILENAME)) != remote.spec_sha256:
            raise RegistryError(
                f"the local {remote.tag} differs from the one in {self.url}; delete the local copy "
                f"(backbones models delete {remote.tag}) and pull again"
            )
        return stored
