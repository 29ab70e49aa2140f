"""The one eval transform. The service, the batch job, export verification and fine-tune
evaluation all call :func:`eval_transform`; training augmentation lives in ``finetune/``.

It reproduces torchvision's ``Resize(int)`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL
images (the pipeline timm's eval transform uses) in NumPy, so that serving needs no PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .imaging import Source, decode_image
from .spec import Preprocess

Transform = Callable[[Image.Image], np.ndarray]

# Beyond this aspect ratio, only the source region under the crop is resampled. A 1x20000 sliver
# would otherwise be resized to 256 x 5,120,000 pixels (3.9 GB, 13 s) to keep a 224x224 window
# (found by tests/test_fuzz_imaging.py). Resampling a box uses the same filter centres and
# weights, but PIL's arithmetic for a box differs by up to 2/255 on a few percent of the pixels,
# so ordinary photos keep the exact torchvision path.
SLIVER_RATIO = 16


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision's rule: the shorter side becomes ``short_side``, the longer one is truncated."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def eval_transform(pre: Preprocess) -> Transform:
    """Build the eval transform: RGB ``PIL.Image`` -> float32 array of shape (3, crop, crop)."""
    resample = Image.Resampling[pre.interpolation.upper()]  # the spec's names are Pillow's filters
    # (x / 255 - mean) / std folded into one multiply-add per pixel.
    scale = (1.0 / (255.0 * np.asarray(pre.std, dtype=np.float32))).reshape(3, 1, 1)
    offset = (-np.asarray(pre.mean, dtype=np.float32) / np.asarray(pre.std, dtype=np.float32)).reshape(3, 1, 1)
    crop = pre.crop

    def transform(img: Image.Image) -> np.ndarray:
        if img.mode != "RGB":
            raise ValueError(f"eval_transform expects an RGB image, got mode {img.mode}; use decode_image")
        w, h = img.size
        nw, nh = resized_size(w, h, pre.resize)
        top = round((nh - crop) / 2.0)
        left = round((nw - crop) / 2.0)
        if max(w, h) > SLIVER_RATIO * min(w, h):
            sx, sy = w / nw, h / nh
            img = img.resize((crop, crop), resample, box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))
        else:
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), resample)
            img = img.crop((left, top, left + crop, top + crop))
        chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        return chw * scale + offset

    return transform


class ImageLoader:
    """Decode + eval transform for one model's preprocessing, with the project's decode settings."""

    def __init__(self, pre: Preprocess, *, max_pixels: int = 40_000_000, draft: bool = False) -> None:
        self.preprocess = pre
        self.transform = eval_transform(pre)
        self.max_pixels = max_pixels
        self.draft_short_side = pre.resize if draft else None

    def decode(self, source: Source) -> Image.Image:
        return decode_image(source, max_pixels=self.max_pixels, draft_short_side=self.draft_short_side)

    def __call__(self, source: Source) -> np.ndarray:
        return self.transform(self.decode(source))

    def batch(self, sources: Sequence[Source]) -> np.ndarray:
        return np.stack([self(s) for s in sources])
