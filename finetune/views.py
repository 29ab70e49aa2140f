"""The linear probe's views of a training image, beside the eval view every other part uses.

The full fine-tune draws random crops (:mod:`finetune.augment`); the probe fits on fixed views that
are cached like the eval view, so they carry names rather than random draws: the eval view mirrored
left to right, and the eval transform (:func:`models.eval_transform`) at two more scales, each
mirrored too. Every view goes through the version's own preprocessing: its interpolation, crop
size and normalization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from models.preprocess import eval_transform
from models.spec import Preprocess

from .config import Views

CENTER = "center"
# The probe's views by --views, the eval view first.
VIEW_SETS: dict[Views, tuple[str, ...]] = {
    "center": (CENTER,),
    "flip": (CENTER, "flip"),
    "flip-crops": (CENTER, "flip", "wide", "wide-flip", "close", "close-flip"),
}
# The crops' scales as the resize of the shorter side: "wide" keeps all of it (resize = crop);
# "close" enlarges the image a seventh more than the eval view does, so the crop keeps less of it.
_SCALES: dict[str, Callable[[Preprocess], int]] = {
    "wide": lambda pre: pre.crop,
    "close": lambda pre: round(pre.resize * 8 / 7),
}


def _base(view: str) -> str:
    return CENTER if view == "flip" else view.removesuffix("-flip")


def probe_views(pre: Preprocess, names: Sequence[str]) -> Callable[[Image.Image], list[np.ndarray]]:
    """RGB ``PIL.Image`` -> its views ``names`` (of :data:`VIEW_SETS`), each as the eval transform
    makes it (float32, (3, crop, crop)): ``center`` is the eval view itself, ``flip`` and
    ``X-flip`` are the eval view and view X mirrored."""
    transforms: dict[str, Callable[[Image.Image], np.ndarray]] = {CENTER: eval_transform(pre)}
    for scale, resize in _SCALES.items():
        transforms[scale] = eval_transform(dataclasses.replace(pre, resize=resize(pre)))
    unknown = [n for n in names if _base(n) not in transforms]
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}; known: {', '.join(VIEW_SETS['flip-crops'])}")

    def views(img: Image.Image) -> list[np.ndarray]:
        made: dict[str, np.ndarray] = {}
        out = []
        for name in names:
            base = _base(name)
            if base not in made:
                made[base] = transforms[base](img)
            out.append(made[base] if base == name else np.ascontiguousarray(made[base][:, :, ::-1]))
        return out

    return views
