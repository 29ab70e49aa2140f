"""Deterministic synthetic photos-like images for export verification where no real photos are
given: smooth gradients, shapes, texture and noise at varied sizes and aspect ratios."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_SIZES = ((320, 240), (240, 320), (500, 375), (256, 256), (640, 427), (300, 500), (224, 224), (800, 600))


def synthetic_image(i: int, size: tuple[int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(1000 + i)
    w, h = size or _SIZES[i % len(_SIZES)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        fx, fy = (float(v) for v in rng.uniform(0.002, 0.03, 2))
        ph = float(rng.uniform(0, 6.28))
        base[..., c] = 127 + 90 * np.sin(fx * xx + fy * yy + ph)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.5))))


def synthetic_jpegs(n: int = 8) -> list[bytes]:
    """``n`` synthetic images encoded as JPEG, so that verification runs the real decode path."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic_image(i).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
