"""The versioned model registry, on BentoML's model store.

A version is ``$BENTOML_HOME/models/<name>/<version>/`` holding BentoML's ``model.yaml`` plus
``model.onnx``, ``spec.json`` and ``weights.safetensors``. Versions are immutable: ``spec.json``
records the sha256 of every file, BentoML's metadata records the sha256 of ``spec.json``, and a
version whose files changed is refused when it is loaded.

Registration is atomic: the version is assembled in a staging folder on the same file system and
moved into the store with one ``rename``, so a process killed at any moment leaves either a whole
version or none. Aliases (``production``, ``staging``, any name) are movable pointers kept in
``$BENTOML_HOME/backbones/aliases/<name>.json``, replaced atomically, with an append-only history.

References: ``name`` (its ``production`` alias if set, else the newest version), ``name:version``
(a unique prefix of the version is enough) and ``name@alias``.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import IntegrityError, RegistryError, UnknownModelError
from .files import fsync_dir, pid_alive, write_atomic
from .preflight import expectation, preflight
from .settings import Settings, get_settings
from .spec import ONNX_FILENAME, SPEC_FILENAME, VersionSpec

log = logging.getLogger(__name__)

PRODUCTION = "production"
BACKBONES_LABEL = "backbones"
# BentoML's tag rule: lowercase alphanumerics, '_', '-', '.', starting and ending alphanumeric.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")  # used with fullmatch: "x\n" is not "x"
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a plain file name inside a version
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def validate_name(value: str, what: str = "model name") -> str:
    """Names, versions and aliases must be safe path components and valid BentoML tags."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise RegistryError(
            f"invalid {what} {value!r}: use 1-63 lowercase letters, digits, '_', '-' or '.', "
            "starting and ending with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Ref:
    """A parsed model reference."""

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Ref:
        # taken as given: a reference with spaces or a newline around it names nothing
        if "@" in ref:
            name, _, alias = ref.partition("@")
            return cls(_registry_name(name), alias=validate_name(alias, "alias"))
        if ":" in ref:
            name, _, version = ref.partition(":")
            return cls(_registry_name(name), version=validate_name(version, "version"))
        return cls(_registry_name(ref))

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version else self.name

    def pick_version(self, versions: Collection[str], where: str = "") -> str:
        """The one of ``versions`` this reference's version names: itself, or the only one it is
        a prefix of (the local and the remote registry's rule; ``where`` names the remote)."""
        assert self.version, "a reference with a version"
        if self.version in versions:
            return self.version
        matches = sorted(v for v in versions if v.startswith(self.version))
        if len(matches) == 1:
            return matches[0]
        place = f" in {where}" if where else ""
        if matches:
            raise UnknownModelError(f"{self} is ambiguous{place}: matches {', '.join(matches)}")
        known = ", ".join(sorted(versions))
        raise UnknownModelError(f"{self.name} has no version {self.version!r}{place} (versions: {known})")


def _registry_name(name: str) -> str:
    # catalog names of timm models (timm/<model>) contain one '/', which a store path cannot
    if "/" not in name:
        return validate_name(name)
    prefix, _, model = name.partition("/")
    if prefix != "timm" or "/" in model:
        raise RegistryError(f"invalid model name {name!r}: only timm/<model> may contain '/'")
    try:
        return validate_name(f"timm-{model}".lower())
    except RegistryError:
        raise RegistryError(f"invalid model name {name!r}: not a timm model name") from None


@dataclass(frozen=True)
class StoredVersion:
    """A registered version whose files have been checked against its spec."""

    spec: VersionSpec
    path: Path

    @property
    def tag(self) -> str:
        return self.spec.tag

    def file(self, name: str) -> Path:
        return self.path / name


def _now() -> datetime:
    return datetime.now(UTC)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _write_bento_model_yaml(folder: Path, name: str, version: str, spec: VersionSpec, spec_sha256: str) -> None:
    """BentoML's own record of the model (``model.yaml``), written with BentoML's classes so that
    ``bentoml models list/get`` see every version; checked by reading it back."""
    from bentoml import Tag
    from bentoml._internal.models.model import Model, ModelContext, ModelInfo, ModelOptions

    info = ModelInfo(
        tag=Tag(name, version),
        module="",
        labels={BACKBONES_LABEL: "1", "parent": re.sub(r"[^a-z0-9._-]", "_", spec.parent.lower())[:63]},
        options=ModelOptions(),
        metadata={"spec_sha256": spec_sha256},
        context=ModelContext(framework_name="onnx", framework_versions=dict(spec.exporter)),
        signatures={},
        api_version="v1",
        creation_time=spec.created_at,
    )
    with open(folder / "model.yaml", "w", encoding="utf8") as f:
        info.dump(f)
    Model.from_path(folder)  # raises if BentoML cannot read what was written


def release_for_deletion(registry: Any, ref: str, *, force: bool, where: str = "") -> tuple[str, str]:
    """The ``(name, version)`` a delete of ``ref`` removes, after the aliases pointing to it are
    removed (``force``) or the delete is refused; shared by the local and the remote registry."""
    r = Ref.parse(ref)
    if not r.version and not r.alias:
        raise RegistryError(f"name a version to delete: {r.name}:<version> or {r.name}@<alias>")
    name, version = registry.resolve(r)
    pointing = sorted(a for a, v in registry.aliases(name).items() if v == version)
    if pointing and not force:
        raise RegistryError(
            f"{name}:{version} is the target of alias {', '.join(pointing)}{where}; move the alias first "
            f"(backbones models alias {name}:<other version> {pointing[0]}) or pass --force"
        )
    for a in pointing:
        registry.remove_alias(name, a)
    return name, version


def apply_alias_change(
    doc: dict[str, Any], name: str, alias: str, version: str | None, *, where: str = "", **extra: Any
) -> dict[str, Any]:
    """Point ``alias`` at ``version`` (None: remove it) in an alias document and append the event to
    its history; returns the event. The local registry and the remote one keep the same documents."""
    previous = doc["aliases"].get(alias)
    if version is None:
        if previous is None:
            raise UnknownModelError(f"{name} has no alias {alias!r}{where}")
        del doc["aliases"][alias]
    else:
        doc["aliases"][alias] = version
    event = {
        "at": _now().isoformat(),
        "alias": alias,
        "action": "remove" if version is None else "set",
        "version": version,
        "previous": previous,
        "by": _actor(),
        **extra,
    }
    doc["history"].append(event)
    return event


def _alias_doc_ok(doc: Any) -> bool:
    """An alias file as this module writes it: alias -> version names, and a list of events."""
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("aliases"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in doc["aliases"].items())
        and isinstance(doc.get("history"), list)
    )


class Registry:
    """Model versions and aliases under one BentoML home (``BENTOML_HOME``)."""

    def __init__(self, home: Path | str | None = None, *, settings: Settings | None = None) -> None:
        if home is None:
            home = (settings or get_settings()).bentoml_home
        if home is None:
            from bentoml._internal.configuration.containers import BentoMLContainer

            home = BentoMLContainer.bentoml_home.get()
        self.home = Path(home).expanduser().resolve()
        self.settings = settings
        self.models_dir = self.home / "models"
        self._own = self.home / "backbones"
        self._staging = self._own / "staging"
        self._aliases = self._own / "aliases"
        self._locks = self._own / "locks"

    def own_dir(self, *parts: str) -> Path:
        """A folder of the project's own inside the store, beside BentoML's (aliases, staging,
        feature caches, fine-tuning runs, TensorRT caches); not created here."""
        return self._own.joinpath(*parts)

    # -- store plumbing -------------------------------------------------------------------

    def _ensure_dirs(self) -> None:
        for d in (self.models_dir, self._staging, self._aliases, self._locks):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self, name: str, purpose: str = "meta") -> Iterator[None]:
        """An exclusive lock on ``name`` across processes. ``purpose`` keeps locks that can be
        held at once apart (an export on first use registers, which takes the ``meta`` lock);
        flock is not re-entrant, so a lock must never be taken twice by one process."""
        self._ensure_dirs()
        with open(self._locks / f"{validate_name(name)}.{purpose}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _clean_staging(self) -> None:
        """Remove what processes killed mid-registration left behind (their pid is gone)."""
        if not self._staging.is_dir():
            return
        for d in self._staging.iterdir():
            pid = d.name.split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)

    def _version_dirs(self, name: str) -> list[Path]:
        d = self.models_dir / name
        if not d.is_dir():
            return []
        return [p for p in d.iterdir() if p.is_dir() and (p / SPEC_FILENAME).is_file()]

    def _write_latest(self, name: str) -> None:
        """BentoML's ``latest`` pointer (used by ``bentoml models get name``), kept accurate."""
        specs = self.versions(name)
        if specs:
            write_atomic(self.models_dir / name / "latest", specs[-1].version.encode())

    # -- registration ---------------------------------------------------------------------

    def new_version_id(self, name: str) -> str:
        from bentoml import Tag

        return str(Tag(validate_name(name), None).make_new_version().version)

    def register(
        self,
        name: str,
        files: Mapping[str, Path],
        spec_fields: Mapping[str, Any],
        *,
        version: str | None = None,
        created_at: datetime | None = None,
    ) -> StoredVersion:
        """Register ``files`` (name in the version -> source path) as a new immutable version.

        ``spec_fields`` are the :class:`VersionSpec` fields other than name, version,
        created_at and files, which are filled here (``version`` and ``created_at`` given: a copy
        of a version from another registry). Returns the stored, checked version.
        """
        validate_name(name)
        version = validate_name(version, "version") if version else self.new_version_id(name)
        self._ensure_dirs()
        self._clean_staging()
        for fname in files:
            if fname in (SPEC_FILENAME, "model.yaml") or not _FILE_RE.fullmatch(fname):
                raise RegistryError(
                    f"invalid file name {fname!r} for a version (plain names only; {SPEC_FILENAME} is written here)"
                )
        if ONNX_FILENAME not in files:
            raise RegistryError(
                f"a version needs its {ONNX_FILENAME}; got only {', '.join(sorted(files)) or 'no files'}"
            )

        staged = self._staging / f"{os.getpid()}-{uuid.uuid4().hex}"
        target = self.models_dir / name / version
        try:
            staged.mkdir(parents=True)
            for fname, src in files.items():
                shutil.copyfile(src, staged / fname)
            # what is hashed and checked is the copy that will be stored, not its source
            digests = {fname: sha256_file(staged / fname) for fname in files}
            try:
                spec = VersionSpec(
                    name=name, version=version, created_at=created_at or _now(), files=digests, **dict(spec_fields)
                )
            except ValidationError as e:
                raise RegistryError(f"invalid spec for {name}: {e}") from None
            preflight(staged / ONNX_FILENAME, expectation(spec), sha256=digests[ONNX_FILENAME], settings=self.settings)
            spec_bytes = spec.model_dump_json(indent=2).encode()
            (staged / SPEC_FILENAME).write_bytes(spec_bytes)
            _write_bento_model_yaml(staged, name, version, spec, hashlib.sha256(spec_bytes).hexdigest())
            # everything reaches the disk before it becomes visible in the store
            for f in staged.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
            if target.exists():
                raise RegistryError(f"{name}:{version} already exists; versions are immutable")
            os.rename(staged, target)  # the atomic step: a whole version appears, or none
            fsync_dir(self.models_dir / name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        with self.lock(name):
            self._write_latest(name)
        log.info("registered %s", spec.tag)
        return StoredVersion(spec=spec, path=target)

    # -- reading --------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(d.name for d in self.models_dir.iterdir() if d.is_dir() and self._version_dirs(d.name))

    def _read_spec(self, vdir: Path) -> VersionSpec:
        tag = f"{vdir.parent.name}:{vdir.name}"
        try:
            spec = VersionSpec.model_validate_json((vdir / SPEC_FILENAME).read_bytes())
        except (OSError, ValidationError) as e:
            raise IntegrityError(f"{tag} has an unreadable spec.json ({e})") from None
        if spec.tag != tag:
            raise IntegrityError(f"{tag} holds the spec of {spec.tag}; refusing to load it")
        return spec

    def versions(self, name: str) -> list[VersionSpec]:
        """The versions of ``name``, oldest first (unchecked: for listing)."""
        specs = []
        for vdir in self._version_dirs(name):
            try:
                specs.append(self._read_spec(vdir))
            except IntegrityError as e:
                log.warning("skipping %s", e)
        return sorted(specs, key=lambda s: (s.created_at, s.version))

    def list(self, name: str | None = None) -> list[VersionSpec]:
        names = [_registry_name(name)] if name else self.names()
        return [s for n in names for s in self.versions(n)]

    def resolve(self, ref: str | Ref) -> tuple[str, str]:
        """``(name, version)`` for a reference, without touching the version's files."""
        r = Ref.parse(ref) if isinstance(ref, str) else ref
        if r.alias:
            book = self.aliases(r.name)
            if r.alias not in book:
                known = ", ".join(sorted(book)) or "none"
                raise UnknownModelError(f"{r.name} has no alias {r.alias!r} (aliases: {known})")
            target = book[r.alias]
            # the alias file is data on disk: what it names must be a version of this model
            if (
                not isinstance(target, str)
                or not _NAME_RE.fullmatch(target)
                or not (self.models_dir / r.name / target).is_dir()
            ):
                raise UnknownModelError(f"{r.name}@{r.alias} points to {target!r}, which is not a version of {r.name}")
            return r.name, target
        versions = [s.version for s in self.versions(r.name)]
        if r.version and r.version not in versions and (self.models_dir / r.name / r.version / SPEC_FILENAME).is_file():
            self._read_spec(self.models_dir / r.name / r.version)  # raises why it is not listed
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise UnknownModelError(f"no registered model {r.name!r} (registered: {known})")
        if r.version:
            return r.name, r.pick_version(versions)
        book = self.aliases(r.name)
        if PRODUCTION in book and book[PRODUCTION] in versions:
            return r.name, book[PRODUCTION]
        return r.name, versions[-1]

    def get(self, ref: str | Ref, *, verify: bool = True) -> StoredVersion:
        """The version ``ref`` names, with every file checked against its recorded sha256."""
        name, version = self.resolve(ref)
        vdir = self.models_dir / name / version
        spec = self._read_spec(vdir)
        if verify:
            self.verify(vdir, spec)
        return StoredVersion(spec=spec, path=vdir)

    def verify(self, vdir: Path, spec: VersionSpec) -> None:
        from bentoml._internal.models.model import Model

        tag = f"{vdir.parent.name}:{vdir.name}"
        if spec.tag != tag:
            raise IntegrityError(f"{tag} holds the spec of {spec.tag}; refusing to load it")
        unsafe = [f for f in spec.files if not _FILE_RE.fullmatch(f) or not _SHA256_RE.fullmatch(spec.files[f])]
        if unsafe or ONNX_FILENAME not in spec.files:
            raise IntegrityError(
                f"{tag}: spec.json lists {'files ' + ', '.join(map(repr, unsafe)) if unsafe else f'no {ONNX_FILENAME}'} "
                "(plain file names with sha256 digests expected); refusing to load it"
            )
        try:
            expected_spec = Model.from_path(vdir).info.metadata.get("spec_sha256")
        except Exception as e:
            raise IntegrityError(f"{tag}: BentoML's model.yaml is unreadable ({e})") from None
        problems = []
        if expected_spec != sha256_file(vdir / SPEC_FILENAME):
            problems.append(SPEC_FILENAME)
        for fname, digest in spec.files.items():
            path = vdir / fname
            if not path.is_file():
                problems.append(f"{fname} (missing)")
            elif sha256_file(path) != digest:
                problems.append(fname)
        if problems:
            raise IntegrityError(
                f"{tag} was modified after registration ({', '.join(problems)} changed); refusing to load it. "
                f"Register a new version (export or fine-tune again) and delete this one: backbones models delete {tag}"
            )

    # -- aliases --------------------------------------------------------------------------

    def _alias_path(self, name: str) -> Path:
        return self._aliases / f"{validate_name(name)}.json"

    def _alias_doc(self, name: str) -> dict[str, Any]:
        path = self._alias_path(name)
        if not path.is_file():
            return {"name": name, "aliases": {}, "history": []}
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RegistryError(f"the alias file of {name} is unreadable ({type(e).__name__}); restore it") from None
        if not _alias_doc_ok(doc):
            raise RegistryError(f"the alias file of {name} is malformed (expected aliases and history); restore it")
        return doc  # type: ignore[no-any-return]

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version for ``name``."""
        return dict(self._alias_doc(_registry_name(name))["aliases"])

    def alias_history(self, name: str) -> builtins.list[dict[str, Any]]:
        """Every alias change of ``name``, oldest first (append-only)."""
        return builtins.list(self._alias_doc(_registry_name(name))["history"])

    def _change_alias(
        self, name: str, alias: str, version: str | None, *, check: bool = False, expected: str | None = None
    ) -> dict[str, Any]:
        """``check``: change it only if it points to ``expected`` (``None``: is not set) right now."""
        with self.lock(name):
            doc = self._alias_doc(name)
            previous = doc["aliases"].get(alias)
            if check and previous != expected:
                raise RegistryError(
                    f"{name}@{alias} points to {previous or 'no version'} now, not {expected or 'no version'} "
                    "as when it was read: it moved meanwhile, and was left as it is"
                )
            event = apply_alias_change(doc, name, alias, version)
            write_atomic(self._alias_path(name), json.dumps(doc, indent=2).encode())
            return event

    def set_alias(self, ref: str, alias: str) -> dict[str, Any]:
        """Point ``alias`` at the version ``ref`` names; returns the history event."""
        name, version = self._alias_target(ref, alias)
        return self._change_alias(name, alias, version)

    def compare_and_set_alias(self, ref: str, alias: str, expected: str | None) -> dict[str, Any]:
        """:meth:`set_alias`, only if ``alias`` still points to version ``expected`` (``None``: is
        not set), checked under the lock; else :class:`RegistryError`, and nothing changes."""
        name, version = self._alias_target(ref, alias)
        return self._change_alias(name, alias, version, check=True, expected=expected)

    def _alias_target(self, ref: str, alias: str) -> tuple[str, str]:
        validate_name(alias, "alias")
        if alias == "latest":
            raise RegistryError("'latest' is reserved: a bare name already means the newest version")
        return self.resolve(ref)

    def remove_alias(self, name: str, alias: str) -> dict[str, Any]:
        return self._change_alias(_registry_name(name), validate_name(alias, "alias"), None)

    # -- deletion -------------------------------------------------------------------------

    def delete(self, ref: str, *, force: bool = False) -> str:
        """Delete one version. A version an alias points to is kept unless ``force`` (which also
        removes those aliases, recorded in their history). Returns the deleted tag."""
        name, version = release_for_deletion(self, ref, force=force)
        self._ensure_dirs()
        trash = self._staging / f"{os.getpid()}-{uuid.uuid4().hex}"
        with self.lock(name):
            os.rename(self.models_dir / name / version, trash)  # disappears from the store at once
            if self._version_dirs(name):
                self._write_latest(name)
            else:
                shutil.rmtree(self.models_dir / name, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
        return f"{name}:{version}"
