"""The evaluation report of a fine-tuned version: JSON, a confusion-matrix PNG, a terminal summary.

The report is stored with the version twice: its headline figures and provenance in the spec's
``training`` field (``backbones models show``), and whole as ``report.json`` next to
``confusion.png`` in the version's folder.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .data import ImageSet, Sample, fingerprint
from .split import Split

REPORT_FILENAME = "report.json"
CONFUSION_FILENAME = "confusion.png"

# Beyond this many classes the confusion matrix stays in report.json only (spec.json stays small).
SPEC_CONFUSION_MAX_CLASSES = 50
_MAX_SIDE = 1600  # pixels of the matrix itself; beyond ~100 classes the cells shrink below 16 px


class Timing:
    """The report's ``timing`` section: seconds per phase of a run, in the order they ran."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start


def data_section(train_set: ImageSet, val_set: ImageSet | None, split: Split, odd: Sequence[Sample]) -> dict[str, Any]:
    """The report's ``data`` section: where the images came from, their fingerprints and counts,
    and what was left out and why (``odd``: the files in a rare format)."""
    skipped = [u.to_dict() for u in train_set.unreadable] + [
        {**u.to_dict(), "set": "validation"} for u in (val_set.unreadable if val_set else [])
    ]
    used_from_data = split.train + (split.val if val_set is None else [])
    formats: dict[str, int] = {}
    for s in split.train + split.val:
        formats[s.format] = formats.get(s.format, 0) + 1
    return {
        "source": str(train_set.source),
        "kind": train_set.kind,
        "val_source": str(val_set.source) if val_set else None,
        "fingerprint": fingerprint(used_from_data),
        "train_fingerprint": fingerprint(split.train),
        "val_fingerprint": fingerprint(split.val),
        "counts": {"train": split.counts(split.train), "val": split.counts(split.val)},
        "formats": formats,
        "skipped": skipped,
        "removed": split.removed,
        "ignored_count": len(train_set.ignored) + (len(val_set.ignored) if val_set else 0),
        "odd_format_files": [s.rel for s in odd],
    }


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> Image.Image:
    """Rows = true class, columns = predicted class; each cell's blue is its share of the row, and
    its count is written in it where the cells are large enough to read."""
    n = len(labels)
    cell = max(4, min(64, _MAX_SIDE // max(n, 1)))
    font = _font(max(8, min(16, cell // 3)))
    names = [label if len(label) <= 18 else label[:16] + ".." for label in labels]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textlength(s, font=font) for s in names), default=0) if cell >= 12 else 0
    margin_left = int(text_w) + 70
    margin_top = int(text_w) + 70
    title = title or "confusion matrix (rows: true, columns: predicted)"
    width = max(margin_left + n * cell + 20, int(probe.textlength(title, font=font)) + 20)
    height = margin_top + n * cell + 20
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black", font=font)
    draw.text((margin_left, margin_top - 22), "predicted", fill="gray", font=font)
    draw.text((8, margin_top - 22), "true", fill="gray", font=font)
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            color = (shade, shade, 255) if i != j else (shade, 255, shade)
            x0, y0 = margin_left + j * cell, margin_top + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color, outline=(200, 200, 200))
            if cell >= 24:
                text = str(count)
                tw = draw.textlength(text, font=font)
                draw.text((x0 + (cell - tw) / 2, y0 + cell / 2 - 7), text, fill="black", font=font)
    if cell >= 12:
        for k, name in enumerate(names):
            y = margin_top + k * cell + cell / 2 - 7
            draw.text((margin_left - 8 - draw.textlength(name, font=font), y), name, fill="black", font=font)
            # column names, written sideways
            label_img = Image.new("RGB", (int(draw.textlength(name, font=font)) + 4, 18), "white")
            ImageDraw.Draw(label_img).text((2, 1), name, fill="black", font=font)
            rotated = label_img.rotate(90, expand=True)
            img.paste(rotated, (margin_left + k * cell + cell // 2 - 9, margin_top - 30 - rotated.height))
    return img


def write_report_files(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """``report.json`` and ``confusion.png`` in ``folder``; returns them by their name in the version."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / REPORT_FILENAME
    json_path.write_text(json.dumps(report, indent=2, default=str))
    conf = report["metrics"]["confusion"]
    title = (
        f"{report.get('name', '')}: val accuracy {report['metrics']['accuracy']:.3f} (rows: true, columns: predicted)"
    )
    png_path = folder / CONFUSION_FILENAME
    draw_confusion(conf["matrix"], conf["labels"], title).save(png_path, format="PNG", optimize=True)
    return {REPORT_FILENAME: json_path, CONFUSION_FILENAME: png_path}


def spec_training(report: dict[str, Any]) -> dict[str, Any]:
    """What goes into the version's spec (``training``): everything but the bulky lists, with the
    headline figures first under ``metrics`` (``models show`` prints that)."""
    m = report["metrics"]
    headline = {
        "accuracy": m["accuracy"],
        f"top{m['top_k']['k']}_accuracy": m["top_k"]["accuracy"],
        "macro_f1": m["macro_f1"],
        "balanced_accuracy": m["balanced_accuracy"],
        "log_loss": m["log_loss"],
        "val_images": m["images"],
    }
    out = {k: v for k, v in report.items() if k not in ("metrics", "data")}
    data = dict(report["data"])
    for bulky in ("skipped", "removed"):
        items = data.get(bulky) or []
        data[bulky] = items[:20]
        data[f"{bulky}_count"] = len(items)
    out["data"] = data
    out["metrics"] = headline
    out["per_class"] = m["per_class"]
    if len(m["confusion"]["labels"]) <= SPEC_CONFUSION_MAX_CLASSES:
        out["confusion"] = m["confusion"]
    out["files"] = [REPORT_FILENAME, CONFUSION_FILENAME]
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A human summary of ``report`` for the terminal."""
    m = report["metrics"]
    data = report["data"]
    counts = data["counts"]
    lines = [
        f"{report.get('model', report['name'])}  ({report['mode']} on {report['backbone']}, "
        f"{sum(counts['train'].values())} train / {sum(counts['val'].values())} val images, {len(report['labels'])} classes)",
        f"  val accuracy {m['accuracy']:.4f}   top-{m['top_k']['k']} {m['top_k']['accuracy']:.4f}   "
        f"macro F1 {_fmt(m['macro_f1'], 4)}   balanced accuracy {_fmt(m['balanced_accuracy'], 4)}   "
        f"log loss {m['log_loss']:.4f}",
    ]
    width = max(8, *(len(c) for c in report["labels"]))
    lines.append(f"  {'class':{width}}  precision  recall     f1  support  train")
    for label, row in m["per_class"].items():
        lines.append(
            f"  {label:{width}}  {_fmt(row['precision']):>9}  {_fmt(row['recall']):>6}  {_fmt(row['f1']):>5}  "
            f"{row['support']:>7}  {counts['train'].get(label, 0):>5}"
        )
    if len(report["labels"]) <= 12:
        lines.append("  confusion (rows: true, columns: predicted)")
        for label, row in zip(report["labels"], m["confusion"]["matrix"], strict=True):
            lines.append(f"    {label:{width}}  " + " ".join(f"{v:>5}" for v in row))
    lines.extend(_recipe_lines(report["recipe"]))
    timing = report["timing"]
    lines.append("  time  " + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items() if isinstance(v, float)))
    feats = report.get("features")
    if feats:
        lines.append(f"  features  {feats['computed']} computed, {feats['cached']} from the cache")
    if data.get("skipped"):
        first = data["skipped"][0]
        lines.append(f"  skipped {len(data['skipped'])} unreadable file(s), e.g. {first['path']}: {first['reason']}")
    for w in report.get("warnings", []):
        lines.append(f"  warning: {w}")
    lines.append(f"  dataset fingerprint {data['fingerprint'][:16]}…  split seed {report['split']['seed']}")
    return lines


def _recipe_lines(recipe: dict[str, Any]) -> list[str]:
    """What the recipe chose and why: the probe's penalty and its table of backbones, or the full
    fine-tune's epoch."""
    lines = []
    if recipe.get("why"):
        views = recipe.get("views") or []
        lines.append(f"  probe  {recipe['why']}" + (f"; views: {', '.join(views)}" if len(views) > 1 else ""))
    for row in recipe.get("backbones", []):
        lines.append(
            f"  {'*' if row['chosen'] else ' '} backbone {row['backbone']:44} CV log loss {_fmt(row['cv_loss'], 4)}  "
            f"CV acc {_fmt(row['cv_accuracy'], 4)}  val acc {_fmt(row['val_accuracy'], 4)}  "
            f"features {row['features_seconds']:.1f}s  fit {row['fit_seconds']:.1f}s"
        )
    if recipe.get("backbone_choice"):
        lines.append(f"  chosen  {recipe['backbone_choice']}")
    if recipe.get("selection"):
        sel = recipe["selection"]
        lines.append(
            f"  epoch  {recipe['best_epoch']} of {recipe['epochs_run']}, chosen on {sel['images']} training images "
            "held out for it (not the validation split)"
        )
    return lines
