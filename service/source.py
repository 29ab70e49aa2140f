"""Where the model pool gets its versions: the local store, or a registry in object storage
(``registry_url``) with the local store as its verified cache.

The pool asks a :class:`ModelSource` which version a reference names now (``resolve``, polled
every ``swap_poll_seconds``), the aliases of a name (``aliases``: requests ask it on the event
loop, so it never waits on a network), and the files of a version (``get``; ``open`` for the
first load of a reference). ``resolve``, ``get`` and ``open`` may block: the pool calls them in a
worker thread.

:class:`LocalSource` reads the local store, as the service always has. :class:`RemoteSource`
resolves references in the bucket and pulls the version into the local store: every file checked
against its sha256, registered with its preflight, downloaded once per machine however many
workers ask at once (a pull takes a per-name file lock; the others then find the version cached).
A bucket that cannot be reached leaves the loaded versions serving: ``resolve`` raises one line,
which the pool keeps as the slot's error (``/models``, ``/readyz``); each failure is logged as one
warning and the bucket is asked again after 1 s, 2 s, 4 s ... up to ``load_retry_max_seconds``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from models import BackbonesError, InferenceModel, Registry, RegistryError, Settings
from models.inference import PREFLIGHT_DIR
from models.objectstore import public_url
from models.registry import Ref, StoredVersion
from models.remote import RemoteRegistry

log = logging.getLogger(__name__)

# The first wait after a failed start-up load (service/pool.py) or a bucket that did not answer;
# then doubled up to load_retry_max_seconds.
RETRY_FIRST_SECONDS = 1.0


class ModelSource(Protocol):
    """What the model pool asks of the registry it serves from."""

    def resolve(self, ref: str) -> tuple[str, str]: ...

    def aliases(self, name: str) -> dict[str, str]: ...

    def get(self, ref: str) -> StoredVersion: ...

    def open(self, ref: str, *, settings: Settings, threads: int, lone_threads: int = 0) -> InferenceModel: ...


class SourceUnavailableError(RegistryError):
    """The remote registry did not answer (unlike a damaged or missing version, this may pass by
    itself: the version is tried again later)."""


def source_for(settings: Settings, registry: Registry) -> ModelSource:
    """The remote registry ``registry_url`` names, cached in ``registry``; else ``registry`` itself."""
    if settings.registry_url:
        return RemoteSource(settings.registry_url, registry, retry_max_seconds=settings.load_retry_max_seconds)
    return LocalSource(registry)


class LocalSource:
    """Versions and aliases from the local store."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def resolve(self, ref: str) -> tuple[str, str]:
        return self.registry.resolve(ref)

    def aliases(self, name: str) -> dict[str, str]:
        return self.registry.aliases(name)

    def get(self, ref: str) -> StoredVersion:
        return self.registry.get(ref)

    def open(self, ref: str, *, settings: Settings, threads: int, lone_threads: int = 0) -> InferenceModel:
        """A catalog name with no version yet is exported on first use."""
        return InferenceModel.load(
            ref, registry=self.registry, settings=settings, threads=threads, preflight=True, lone_threads=lone_threads
        )


@dataclass
class _Failing:
    """A name whose lookups in the bucket failed: the error, and when to ask again."""

    kind: type[BackbonesError]
    message: str
    retry_in: float
    retry_at: float


class RemoteSource:
    """Versions resolved in a remote registry and pulled into the local store (see the module
    docstring). A catalog name the bucket lacks is not exported here: it is published from elsewhere."""

    def __init__(self, url: str, local: Registry, *, retry_max_seconds: float) -> None:
        self.url = url
        self.local = local
        self.retry_max_seconds = retry_max_seconds
        self._remote: RemoteRegistry | None = None
        self._books: dict[str, dict[str, str]] = {}  # the aliases last read, by name
        self._failing: dict[str, _Failing] = {}

    @property
    def remote(self) -> RemoteRegistry:
        """Opened on first use, in a worker thread: a bad URL is then a load error, not a crash."""
        if self._remote is None:
            self._remote = RemoteRegistry(self.url)
        return self._remote

    @property
    def where(self) -> str:
        """The bucket as messages name it (never credentials, even from a URL that carries them)."""
        return self._remote.url if self._remote is not None else public_url(self.url)

    def aliases(self, name: str) -> dict[str, str]:
        """The aliases of ``name`` as last read from the bucket (none before the first read)."""
        return dict(self._books.get(name, {}))

    def resolve(self, ref: str) -> tuple[str, str]:
        """As the bucket has it now; while the bucket is failing, the last error, without asking."""
        name = Ref.parse(ref).name
        failing = self._failing.get(name)
        if failing is not None and time.monotonic() < failing.retry_at:
            raise failing.kind(failing.message)
        try:
            found = self._lookup(ref)
        except BackbonesError as e:
            self._failed(name, e, warn=True)
            raise
        if self._failing.pop(name, None) is not None:
            log.warning("%s: %s answers again", ref, self.where)
        return found

    def _lookup(self, ref: str) -> tuple[str, str]:
        name = Ref.parse(ref).name
        book = self.remote.aliases(name)  # one read: the aliases shown and the version loaded agree
        found = self.remote.resolve(ref, book=book)
        self._books[name] = book
        return found

    def _failed(self, name: str, error: BackbonesError, *, warn: bool) -> None:
        previous = self._failing.get(name)
        wait = min(self.retry_max_seconds, max(RETRY_FIRST_SECONDS, 2 * previous.retry_in if previous else 0.0))
        self._failing[name] = _Failing(type(error), str(error), wait, time.monotonic() + wait)
        if warn:
            log.warning("%s: %s (serving what is loaded; next check in %.1f s)", name, error, wait)

    def get(self, ref: str) -> StoredVersion:
        """The version ``ref`` names, pulled into the local store unless it is there already.
        A failure of the store itself is :class:`SourceUnavailableError`."""
        downloaded: list[str] = []

        def count(label: str, size: int) -> Any:
            downloaded.append(label)
            return None

        started = time.monotonic()
        try:
            stored = self.remote.pull(ref, self.local, progress=count)
        except RegistryError as e:
            if type(e) is not RegistryError:  # a damaged or refused version: the pool gives up on it
                raise
            # the store's own failure (models/objectstore.py): checks back off; the pool logs it
            self._failed(Ref.parse(ref).name, e, warn=False)
            raise SourceUnavailableError(str(e)) from None
        self._failing.pop(stored.spec.name, None)
        if downloaded:
            log.warning(
                "%s: pulled from %s, verified and registered in %.1f s",
                stored.tag,
                self.where,
                time.monotonic() - started,
            )
        return stored

    def open(self, ref: str, *, settings: Settings, threads: int, lone_threads: int = 0) -> InferenceModel:
        """The first load of ``ref``: resolved in the bucket, pulled, preflighted (the pool retries
        a failure with its own backoff, so this always asks the bucket)."""
        name, version = self._lookup(ref)
        stored = self.get(f"{name}:{version}")
        return InferenceModel(
            stored,
            settings=settings,
            threads=threads,
            preflight=True,
            memo_dir=self.local.own_dir(PREFLIGHT_DIR),
            lone_threads=lone_threads,
        )
