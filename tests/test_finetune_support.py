"""Datasets the fine-tuning tests make: reddish vs bluish (vs greenish) photos, each one different,
so that even the tiny random CNN's features separate the classes and a probe can learn them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from finetune import FinetuneConfig

COLORS = {"blue": (50, 70, 200), "green": (60, 190, 70), "red": (205, 55, 45)}


def color_image(label: str, i: int, size: tuple[int, int] = (80, 64), *, seed: int = 0) -> Image.Image:
    """A photo-like image of ``label``'s colour: noise, a few grey shapes, a varied size. Every
    (label, i, seed) gives different pixels (content hashes never collide by accident)."""
    rng = np.random.default_rng([seed, i, sum(map(ord, label))])
    w, h = size[0] + int(rng.integers(0, 24)), size[1] + int(rng.integers(0, 24))
    base = np.asarray(COLORS[label], dtype=np.float32) + rng.normal(0, 12, 3)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        grey = int(rng.integers(60, 200))
        draw.rectangle((x0, y0, x0 + int(rng.integers(4, 20)), y0 + int(rng.integers(4, 20))), fill=(grey,) * 3)
    return img


def make_dataset(root: Path, counts: dict[str, int], *, seed: int = 0, start: int = 0) -> Path:
    """An ImageFolder at ``root`` with ``counts[label]`` JPEGs per class (``start`` offsets the
    image numbers, so two folders made with different ``start`` share no content)."""
    for label, n in counts.items():
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            color_image(label, i, seed=seed).save(d / f"{label}_{i:03d}.jpg", quality=92)
    return root


def config(data: Path | str, name: str, **kwargs: Any) -> FinetuneConfig:
    """A config for the tiny CNN with the defaults the tests want (small batches, one worker)."""
    values: dict[str, Any] = {"backbone": "tiny_cnn", "name": name, "batch_size": 8, "workers": 0, **kwargs}
    return FinetuneConfig(data=data, **values)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
