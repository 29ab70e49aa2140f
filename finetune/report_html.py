"""The HTML report of a fine-tuned version: one self-contained page to look at.

Metrics, what the recipe chose and why (the probe's cross-validation, the table of backbones, the
full fine-tune's epochs), per-class precision and recall, the confusion matrix, and every
misclassified validation image as a small embedded JPEG with its true and predicted labels and
scores. Inline CSS, no script, no link out: the file can be mailed or opened offline. Every text
that comes from the data (labels are folder names, paths are the user's) is HTML-escaped.

The page lives beside the run, not in the version (``<home>/backbones/runs/NAME/VERSION/``):
it holds thumbnails of the user's photos, which have no place in a model artifact that is pushed
and served; ``backbones models show REF`` prints where it is.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import Registry
from models.files import write_atomic
from models.inference import softmax
from models.preprocess import ImageLoader

from .data import Sample

log = logging.getLogger(__name__)

HTML_FILENAME = "report.html"
RUNS_DIRNAME = "runs"
THUMBNAIL_SIDE = 160  # px, the longer side: about 5 kB a photo at JPEG quality 80
_THUMBNAIL_QUALITY = 80

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .7em;border:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.chosen{font-weight:bold;background:#eef8ee}
.metrics td{font-size:1.2em}.gallery{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;width:180px;border:1px solid #ddd;padding:.4em;font-size:12px}
figure img{display:block;margin:0 auto .3em;max-width:170px;max-height:170px}
.bad{color:#b00}.muted{color:#777}
"""


@dataclass(frozen=True)
class Miss:
    """One misclassified validation image."""

    rel: str
    true: str
    predicted: str
    score_predicted: float
    score_true: float
    thumbnail: str | None  # base64 JPEG, None when the file could not be read again


def html_report_path(registry: Registry, name: str, version: str) -> Path:
    """Where the HTML report of ``name:version`` is (it may not exist: exported versions have none)."""
    return registry.own_dir(RUNS_DIRNAME, name, version, HTML_FILENAME)


def _thumbnail(loader: ImageLoader, sample: Sample) -> str | None:
    """A small JPEG of ``sample``, decoded again from its file or its object's bytes."""
    try:
        img = loader.decode(sample.source())
    except Exception as e:  # moved or changed since the run, or the store is away: the gallery says so
        log.warning("no thumbnail of %s: %s", sample.path, e)
        return None
    img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_THUMBNAIL_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def misclassified(
    samples: Sequence[Sample], logits: np.ndarray, labels: Sequence[str], loader: ImageLoader, *, workers: int = 2
) -> list[Miss]:
    """Every sample whose top-1 class is not its label, most confident mistakes first."""
    probs = softmax(logits)
    index = {label: i for i, label in enumerate(labels)}
    wrong = [i for i, s in enumerate(samples) if int(probs[i].argmax()) != index[s.label]]
    wrong.sort(key=lambda i: -float(probs[i].max()))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        thumbs = list(pool.map(lambda i: _thumbnail(loader, samples[i]), wrong))
    return [
        Miss(
            rel=samples[i].rel,
            true=samples[i].label,
            predicted=labels[int(probs[i].argmax())],
            score_predicted=float(probs[i].max()),
            score_true=float(probs[i][index[samples[i].label]]),
            thumbnail=thumb,
        )
        for i, thumb in zip(wrong, thumbs, strict=True)
    ]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else _e(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1, chosen: int | None = None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned, row ``chosen`` is highlighted."""
    head = "".join(f"<th{' class=l' if i < left else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f"<td{' class=l' if i < left else ''}>{_num(v)}</td>" for i, v in enumerate(row))
        body.append(f"<tr{' class=chosen' if r == chosen else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _confusion(report: dict[str, Any]) -> str:
    conf = report["metrics"]["confusion"]
    labels, matrix = conf["labels"], conf["matrix"]
    head = '<th class="l">true \\ predicted</th>' + "".join(f"<th>{_e(x)}</th>" for x in labels)
    rows = []
    for i, (label, row) in enumerate(zip(labels, matrix, strict=True)):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            shade = int(255 - 150 * count / total)
            color = f"rgb({shade},255,{shade})" if i == j else f"rgb(255,{shade},{shade})"
            cells.append(f'<td style="background:{color}">{count}</td>')
        rows.append(f'<tr><th class="l">{_e(label)}</th>{"".join(cells)}</tr>')
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _recipe(report: dict[str, Any]) -> str:
    r = report["recipe"]
    parts = [f"<p>{_e(r.get('description', ''))}; new version: {_e(r.get('graph', ''))}.</p>"]
    if r.get("why"):
        parts.append(f"<p><b>Chosen:</b> {_e(r['why'])}.</p>")
    if r.get("selection_rule"):
        parts.append(f"<p class=muted>Rule: {_e(r['selection_rule'])}; views: {_e(', '.join(r['views']))}.</p>")
    if r.get("cross_validation"):
        rows = [
            [f"{c['weight_decay']:g}", c["loss"], c["accuracy"], c["balanced_accuracy"]] for c in r["cross_validation"]
        ]
        chosen = [c["weight_decay"] for c in r["cross_validation"]].index(r["weight_decay"])
        parts.append(
            _table(["weight decay", "out-of-fold log loss", "accuracy", "balanced accuracy"], rows, chosen=chosen)
        )
    if r.get("backbones"):
        parts.append(f"<h2>Backbones</h2><p>{_e(r['backbone_choice'])}.</p>")
        rows = [
            [b["backbone"], f"{b['weight_decay']:g}", b["cv_loss"], b["cv_accuracy"], b["val_accuracy"],
             b["features_seconds"], b["fit_seconds"]]
            for b in r["backbones"]
        ]  # fmt: skip
        header = ["backbone", "weight decay", "CV log loss", "CV accuracy", "val accuracy", "features s", "fit s"]
        parts.append(_table(header, rows, chosen=[b["chosen"] for b in r["backbones"]].index(True)))
    if r.get("history"):
        rows = [[h["epoch"], h["train_loss"], h["selection_loss"], h["selection_accuracy"]] for h in r["history"]]
        parts.append(f"<p>Best epoch {_e(r['best_epoch'])} (chosen on {_e(r['selection']['images'])} images held out "
                     "of the training split).</p>")  # fmt: skip
        parts.append(_table(["epoch", "train loss", "selection loss", "selection accuracy"], rows))
    return "".join(parts)


def _gallery(misses: Sequence[Miss]) -> str:
    if not misses:
        return "<p>None: every validation image was classified correctly.</p>"
    figures = []
    for m in misses:
        img = (
            f'<img alt="{_e(m.rel)}" src="data:image/jpeg;base64,{m.thumbnail}">'
            if m.thumbnail
            else '<p class="muted">(the file could not be read again)</p>'
        )
        figures.append(
            f"<figure>{img}<figcaption><span class=bad>predicted <b>{_e(m.predicted)}</b> "
            f"{m.score_predicted:.3f}</span><br>true <b>{_e(m.true)}</b> {m.score_true:.3f}<br>"
            f'<span class="muted">{_e(m.rel)}</span></figcaption></figure>'
        )
    return f'<div class="gallery">{"".join(figures)}</div>'


def render_html(report: dict[str, Any], misses: Sequence[Miss]) -> str:
    """The page, from a finished run's ``report`` (as ``--json`` prints it) and its mistakes."""
    m, data = report["metrics"], report["data"]
    counts = data["counts"]
    title = f"{report.get('model', report['name'])}: {report['mode']} on {report['backbone']}"
    headline = _table(
        ["val accuracy", f"top-{m['top_k']['k']}", "balanced accuracy", "macro F1", "log loss", "val images"],
        [[m["accuracy"], m["top_k"]["accuracy"], m["balanced_accuracy"], m["macro_f1"], m["log_loss"], m["images"]]],
        left=0,
    )
    per_class = _table(
        ["class", "precision", "recall", "F1", "val images", "train images"],
        [[label, r["precision"], r["recall"], r["f1"], r["support"], counts["train"].get(label, 0)]
         for label, r in m["per_class"].items()],
    )  # fmt: skip
    notes = "".join(f"<li>{_e(w)}</li>" for w in report.get("warnings", []))
    skipped = "".join(f"<li>{_e(s['path'])}: {_e(s['reason'])}</li>" for s in data.get("skipped", []))
    promotion = report.get("promotion")
    sections = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{sum(counts["train"].values())} training and {sum(counts["val"].values())} validation '
        f"images, {len(report['labels'])} classes, from {_e(data['source'])}; split seed {_e(report['split']['seed'])}; "
        f"dataset fingerprint {_e(data['fingerprint'][:16])}…</p>",
        f'<div class="metrics">{headline}</div>',
        f"<h2>How it was trained</h2>{_recipe(report)}",
        f"<h2>Per class</h2>{per_class}",
        f"<h2>Confusion matrix</h2>{_confusion(report)}",
        f"<h2>Misclassified validation images ({len(misses)})</h2>{_gallery(misses)}",
    ]
    if promotion:
        sections.append(f"<h2>Promotion</h2><p>{_e(promotion['alias'])}: {_e(promotion['reason'])}</p>")
    if notes or skipped:
        sections.append(f"<h2>Data notes</h2><ul>{notes}{skipped}</ul>")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n"
    )


def write_html_report(path: Path, report: dict[str, Any], misses: Sequence[Miss]) -> Path:
    """Write the page to ``path`` atomically (a reader sees the old page or the new, whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_html(report, misses).encode("utf-8"))
    return path
