"""Labelled image sets as users hand them over: an ImageFolder or a CSV manifest.

``scan_dataset`` lists the images with their label and the sha256 of their content (the key of the
feature cache and of the overlap check). It reads every file once but decodes none: files that are
missing, empty or not images at all are set aside as :class:`Unreadable` here; files that look like
images but do not decode are found by the readability pass (:func:`check_readable`, or the feature
extraction of the linear probe, which decodes each new image anyway).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from models.imaging import IMAGE_SUFFIXES
from models.registry import sha256_file

from .errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One usable-looking image: ``rel`` is its path relative to the set's root (as fingerprinted)."""

    path: Path
    rel: str
    label: str
    sha256: str
    format: str


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

    source: Path
    root: Path
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
    source: Path,
    root: Path,
    kind: Literal["folder", "csv"],
    entries: Sequence[tuple[Path, str, str]],
    classes: list[str],
    ignored: list[str],
    workers: int,
) -> ImageSet:
    samples, unreadable = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib and file reads release the GIL
        results = list(pool.map(lambda e: _inspect(e[0]), entries))
    for (path, rel, label), res in zip(entries, results, strict=True):
        if isinstance(res, str):
            unreadable.append(Unreadable(rel, label, res))
        else:
            samples.append(Sample(path, rel, label, res[0], res[1]))
    return ImageSet(source, root, kind, samples, classes, unreadable, ignored)


def scan_folder(root: Path, *, workers: int = 2) -> ImageSet:
    """An ImageFolder: each sub-folder of ``root`` is a class (its name is the label); images are
    found recursively inside it. Hidden files and folders are ignored, as are files whose names
    are not image names and files beside the class folders (both listed in ``ignored``)."""
    root = root.resolve()
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(
            f"{root} has no class folders; an ImageFolder holds one sub-folder per class "
            f"(e.g. {root}/ants/*.jpg, {root}/bees/*.jpg), or pass a CSV manifest (path,label)"
        )
    entries: list[tuple[Path, str, str]] = []
    # files beside the class folders belong to no class
    ignored = sorted(f.name for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
    for d in class_dirs:
        for f in sorted(d.rglob("*")):
            rel_parts = f.relative_to(root).parts
            if not f.is_file() or any(p.startswith(".") for p in rel_parts):
                continue
            rel = "/".join(rel_parts)
            if f.suffix.lower() in IMAGE_SUFFIXES:
                entries.append((f, rel, d.name))
            else:
                ignored.append(rel)
    if ignored:
        log.info("%s: ignored %d file(s) that are not images by name, e.g. %s", root, len(ignored), ignored[0])
    return _build(root, root, "folder", entries, [d.name for d in class_dirs], ignored, workers)


def scan_manifest(csv_path: Path, *, workers: int = 2) -> ImageSet:
    """A CSV manifest of ``path,label`` rows (a header row ``path,label`` is optional). Relative
    paths are read against the CSV's folder. A listed file that is missing is counted as unreadable."""
    csv_path = csv_path.resolve()
    root = csv_path.parent
    entries: list[tuple[Path, str, str]] = []
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the manifest {csv_path}: {e}") from None
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{csv_path}, line {lineno}: expected two columns 'path,label', got {row!r}")
        raw, label = row[0].strip(), row[1].strip()
        path = Path(raw) if Path(raw).is_absolute() else root / raw
        entries.append((path, Path(raw).as_posix(), label))
    if not entries:
        raise DatasetError(f"the manifest {csv_path} lists no images (expected rows of 'path,label')")
    classes = sorted({label for _, _, label in entries})
    return _build(csv_path, root, "csv", entries, classes, [], workers)


def scan_dataset(source: Path, *, workers: int = 2) -> ImageSet:
    """An ImageFolder (a directory) or a CSV manifest (a file) -> :class:`ImageSet`."""
    source = Path(source).expanduser()
    if source.is_dir():
        return scan_folder(source, workers=workers)
    if source.is_file():
        if source.suffix.lower() not in (".csv", ".txt"):
            raise DatasetError(f"{source} is a file but not a CSV manifest (expected .csv with rows 'path,label')")
        return scan_manifest(source, workers=workers)
    raise DatasetError(f"no such dataset: {source} (expected an ImageFolder directory or a CSV manifest)")


def check_readable(samples: Iterable[Sample], decode: Callable[[Path], object], *, workers: int = 2) -> dict[str, str]:
    """Decode every sample once; returns sha256 -> reason for those that fail (the rest are fine)."""

    def attempt(s: Sample) -> tuple[str, str | None]:
        try:
            decode(s.path)
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
