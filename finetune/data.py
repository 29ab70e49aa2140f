"""Labelled image sets as users hand them over: an ImageFolder or a CSV manifest, on disk or in
object storage (``s3://bucket/prefix``, listed recursively; a manifest's paths may be object URLs).

``scan_dataset`` lists the images with their label and the key of their content (the key of the
feature cache and of the overlap check): the sha256 of a file, for an object a sha256 over the
checksum its store gives (:mod:`finetune.objects`; no object is downloaded to scan). It reads every
file once but decodes none: files that are missing, empty or not images at all are set aside as
:class:`Unreadable` here; files (and objects) that look like images but do not decode are found by
the readability pass (:func:`check_readable`, or the feature extraction of the linear probe, which
decodes each new image anyway).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from models.imaging import IMAGE_SUFFIXES
from models.registry import sha256_file
from models.storage import StorageError, is_url, read_object, resolve_location

from .errors import DatasetError
from .objects import ObjectInfo, dataset_url, head_objects, inspect_object, list_prefix, read_manifest_object

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".txt")

Location = Path | str  # a local file or folder, or an object's URL (scheme://bucket/key)


@dataclass(frozen=True)
class Sample:
    """One usable-looking image: ``path`` is its file or its object's URL, ``rel`` its path
    relative to the set's root (as fingerprinted), ``sha256`` the key of its content (the file's
    sha256, or the sha256 of the object's checksum: see the module docstring)."""

    path: Location
    rel: str
    label: str
    sha256: str
    format: str

    def source(self) -> Path | bytes:
        """What the image loader decodes: the file, or the object's bytes (read now)."""
        return image_source(self.path)

    def identity(self) -> str:
        """The file (resolved) or the object this sample is read from."""
        return self.path if isinstance(self.path, str) else str(self.path.resolve())


def image_source(path: Location) -> Path | bytes:
    """A file as it is (the loader opens it), an object's bytes. A missing object raises
    :class:`~models.errors.ImageError`, a store that cannot be reached ``StorageError``."""
    return read_object(path) if isinstance(path, str) else path


@dataclass(frozen=True)
class Unreadable:
    """A file that was listed but cannot be used, and why."""

    rel: str
    label: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.rel, "label": self.label, "reason": self.reason}


@dataclass
class ImageSet:
    """A scanned dataset. ``classes`` lists every class the set declares, including folders that
    hold no image (an ImageFolder's empty class is an error the checks report by name)."""

    source: Location
    root: Location
    kind: Literal["folder", "csv"]
    samples: list[Sample]
    classes: list[str]
    unreadable: list[Unreadable] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files that are not images by their name

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {label: c.get(label, 0) for label in self.classes}

    def without(self, bad: dict[str, str]) -> ImageSet:
        """This set minus the samples whose sha256 is in ``bad`` (sha256 -> reason), which move to
        ``unreadable``."""
        keep = [s for s in self.samples if s.sha256 not in bad]
        dropped = [Unreadable(s.rel, s.label, bad[s.sha256]) for s in self.samples if s.sha256 in bad]
        return ImageSet(self.source, self.root, self.kind, keep, self.classes, self.unreadable + dropped, self.ignored)


def _inspect(path: Path) -> tuple[str, str] | str:
    """``(sha256, format)`` of a file, or the reason it cannot be an image. Reads the header only."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        digest = sha256_file(path)
        with Image.open(path) as img:
            fmt = img.format or "unknown"
    except FileNotFoundError:
        return "no such file"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError) as e:
        return f"cannot read: {e}"
    return digest, fmt


def _build(
    source: Location,
    root: Location,
    kind: Literal["folder", "csv"],
    entries: Sequence[tuple[Location, str, str]],
    classes: list[str],
    ignored: list[str],
    workers: int,
    objects: Mapping[str, ObjectInfo | str] | None = None,
) -> ImageSet:
    """The set of ``entries`` (location, rel, label); ``objects``: what the store said about the
    URLs among them (listing entries, or why one cannot be used)."""
    known = objects or {}

    def inspect(location: Location) -> tuple[str, str] | str:
        return _inspect(location) if isinstance(location, Path) else inspect_object(location, known[location])

    samples, unreadable = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib and file reads release the GIL
        results = list(pool.map(lambda e: inspect(e[0]), entries))
    for (path, rel, label), res in zip(entries, results, strict=True):
        if isinstance(res, str):
            unreadable.append(Unreadable(rel, label, res))
        else:
            samples.append(Sample(path, rel, label, res[0], res[1]))
    return ImageSet(source, root, kind, samples, classes, unreadable, ignored)


def _layout(root: Location, classes: Sequence[str], files: Iterable[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """An ImageFolder's images as ``(rel, label)`` and the files it ignores, from the paths of its
    files relative to ``root`` (sorted as paths are)."""
    if not classes:
        raise DatasetError(
            f"{root} has no class folders; an ImageFolder holds one sub-folder per class "
            f"(e.g. {root}/ants/*.jpg, {root}/bees/*.jpg), or pass a CSV manifest (path,label)"
        )
    entries: list[tuple[str, str]] = []
    ignored: list[str] = []
    for rel in sorted(files, key=lambda r: r.split("/")):
        parts = rel.split("/")
        if not parts[-1] or any(p.startswith(".") for p in parts):  # a folder marker, or hidden
            continue
        if len(parts) > 1 and posixpath.splitext(rel)[1].lower() in IMAGE_SUFFIXES:
            entries.append((rel, parts[0]))
        else:  # not an image by its name, or beside the class folders (no class)
            ignored.append(rel)
    if ignored:
        log.info("%s: ignored %d file(s) that are not images by name, e.g. %s", root, len(ignored), ignored[0])
    return entries, ignored


def scan_folder(root: Location, *, workers: int = 2) -> ImageSet:
    """An ImageFolder: each sub-folder of ``root`` is a class (its name is the label); images are
    found recursively inside it. Hidden files and folders are ignored, as are files whose names
    are not image names and files beside the class folders (both listed in ``ignored``). In object
    storage, ``root`` is a prefix and each sub-prefix a class."""
    if isinstance(root, str):
        listing = list_prefix(root)
        classes = sorted({rel.split("/")[0] for rel in listing if "/" in rel and not rel.startswith(".")})
        entries, ignored = _layout(root, classes, listing)
        objects = {f"{root}/{rel}": listing[rel] for rel, _ in entries}
        located: list[tuple[Location, str, str]] = [(f"{root}/{rel}", rel, label) for rel, label in entries]
        return _build(root, root, "folder", located, classes, ignored, workers, objects)
    root = root.resolve()
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [f.name for f in root.iterdir() if f.is_file()]
    files += [f.relative_to(root).as_posix() for d in class_dirs for f in d.rglob("*") if f.is_file()]
    entries, ignored = _layout(root, [d.name for d in class_dirs], files)
    located = [(root / rel, rel, label) for rel, label in entries]
    return _build(root, root, "folder", located, [d.name for d in class_dirs], ignored, workers)


def scan_manifest(manifest: Location, *, workers: int = 2) -> ImageSet:
    """A CSV manifest of ``path,label`` rows (a header row ``path,label`` is optional), a file or
    an object. Paths may be object URLs; relative paths are read against the manifest's folder (or
    prefix). A listed file or object that is missing is counted as unreadable."""
    root: Location
    if isinstance(manifest, str):
        text, root = read_manifest_object(manifest), manifest.rsplit("/", 1)[0]
    else:
        manifest = manifest.resolve()
        root = manifest.parent
        try:
            text = manifest.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read the manifest {manifest}: {e}") from None
    entries: list[tuple[Location, str, str]] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{manifest}, line {lineno}: expected two columns 'path,label', got {row!r}")
        raw, label = row[0].strip(), row[1].strip()
        try:
            location = resolve_location(raw, str(root))
        except StorageError as e:
            raise DatasetError(f"{manifest}, line {lineno}: {e}") from None
        entries.append(
            (location if is_url(location) else Path(location), raw if is_url(raw) else Path(raw).as_posix(), label)
        )
    if not entries:
        raise DatasetError(f"the manifest {manifest} lists no images (expected rows of 'path,label')")
    classes = sorted({label for _, _, label in entries})
    objects = head_objects(sorted({loc for loc, _, _ in entries if isinstance(loc, str)}))
    return _build(manifest, root, "csv", entries, classes, [], workers, objects)


def scan_dataset(source: Location, *, workers: int = 2) -> ImageSet:
    """An ImageFolder (a directory, or a prefix in object storage) or a CSV manifest (a file or an
    object) -> :class:`ImageSet`."""
    if isinstance(source, str) and is_url(source):
        url = dataset_url(source)
        if posixpath.splitext(url)[1].lower() in MANIFEST_SUFFIXES:
            return scan_manifest(url, workers=workers)
        return scan_folder(url, workers=workers)
    source = Path(source).expanduser()
    if source.is_dir():
        return scan_folder(source, workers=workers)
    if source.is_file():
        if source.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DatasetError(f"{source} is a file but not a CSV manifest (expected .csv with rows 'path,label')")
        return scan_manifest(source, workers=workers)
    raise DatasetError(f"no such dataset: {source} (expected an ImageFolder directory or a CSV manifest)")


def check_readable(
    samples: Iterable[Sample], decode: Callable[[Path | bytes], object], *, workers: int = 2
) -> dict[str, str]:
    """Decode every sample once; returns sha256 -> reason for those that fail (the rest are fine).
    A store that cannot be reached stops the run (its images are not bad)."""

    def attempt(s: Sample) -> tuple[str, str | None]:
        try:
            decode(s.source())
        except StorageError:
            raise
        except Exception as e:  # every way a file can fail to decode is a reason to skip it
            return s.sha256, str(e) or type(e).__name__
        return s.sha256, None

    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow decodes with the GIL released
        return {sha: why for sha, why in pool.map(attempt, samples) if why is not None}


def odd_formats(samples: Sequence[Sample], share: float = 0.05) -> list[Sample]:
    """Samples whose file format is rare in the set (under ``share`` of it). Crawled data holds
    placeholders ("image not found" GIFs among JPEG photos) that decode fine; these are worth a look."""
    if not samples:
        return []
    counts = Counter(s.format for s in samples)
    rare = {fmt for fmt, n in counts.items() if n < share * len(samples)}
    return [s for s in samples if s.format in rare]


def fingerprint(samples: Iterable[Sample]) -> str:
    """sha256 over the sorted (relative path, label, content sha256) of ``samples``: two runs with
    the same fingerprint saw the same files under the same labels."""
    h = hashlib.sha256()
    for rel, label, digest in sorted((s.rel, s.label, s.sha256) for s in samples):
        h.update(f"{rel}\t{label}\t{digest}\n".encode())
    return h.hexdigest()
