"""Decoding what real uploads contain into an RGB ``PIL.Image``.

Handles EXIF orientation, grayscale, CMYK, palette and alpha (composited on white), 16-bit and
float images, and animated images (first frame). Refuses, before decoding pixels, files that
declare more pixels than allowed. On request, large JPEGs are decoded at a reduced DCT scale
("draft"), never below twice the size the preprocessing resizes to: much faster, but not within
the export parity tolerance (docs/benchmarks.md), hence off by default.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

# Formats accepted from users. Others (PDF, EPS, ICO, PSD, ...) are refused: some of Pillow's
# plugins are large attack surfaces for little use in photo classification.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
# The file names taken for images when a folder is searched (the allowed formats' usual suffixes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"})

# How much larger than the resize target the draft-decoded image must stay. Even so, drafting
# moves logits by up to ~0.5 on multi-megapixel photos (benchmarks/bench_inference.py), far beyond
# the 1e-3 parity tolerance: it is opt-in (settings.draft_decoding), off by default.
DRAFT_MARGIN = 2

# Pillow's own bomb check only warns below 2x its limit; ours is explicit (settings.max_image_pixels).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

Source = bytes | str | Path | BinaryIO

# What Pillow's parsers raise on damaged files. Beyond OSError and ValueError, a truncated GIF
# raises IndexError or struct.error while counting its frames (found by tests/test_fuzz_imaging.py).
_PARSE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error)


def _open(source: Source) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("the image is empty (0 bytes)", kind="empty")
        fp: BinaryIO | str | Path = io.BytesIO(source)
    else:
        fp = source
        if isinstance(source, str | Path):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"no such image file: {source}", kind="undecodable")
            if path.stat().st_size == 0:
                raise ImageError(f"the image is empty (0 bytes): {source}", kind="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=None)
    except UnidentifiedImageError:
        raise ImageError(
            f"not an image this service can read (expected one of: {', '.join(sorted(ALLOWED_FORMATS))})",
            kind="undecodable",
        ) from None
    except _PARSE_ERRORS as e:
        raise ImageError(f"cannot decode the image: {e}", kind="undecodable") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        # a transparent colour (PNG tRNS, GIF transparent index) becomes alpha, composited below
        img = img.convert("RGBA")
        mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        # 16-bit data keeps its range: scale 0..65535 to 0..255 instead of clipping at 255.
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        arr8 = np.clip(np.rint(arr.astype(np.float64) / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        arr = arr * 255.0 if hi <= 1.0 else arr
        arr8 = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(
    source: Source,
    *,
    max_pixels: int = 40_000_000,
    draft_short_side: int | None = None,
) -> Image.Image:
    """Decode ``source`` (bytes, a path or a binary file) into an upright RGB image.

    ``draft_short_side``: the shorter side the caller will resize to; large JPEGs are then decoded
    at the smallest DCT scale that keeps the shorter side at least ``DRAFT_MARGIN`` times that.
    Raises :class:`ImageError` with ``kind`` set for every way the input can be unusable.
    """
    img = _open(source)
    try:
        fmt = img.format or "unknown"
        if fmt not in ALLOWED_FORMATS:
            raise ImageError(
                f"unsupported image format {fmt}; accepted: {', '.join(sorted(ALLOWED_FORMATS))}",
                kind="unsupported_format",
            )
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"the image declares an empty size {width}x{height}", kind="undecodable")
        if width * height > max_pixels:
            raise ImageError(
                f"the image declares {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                kind="too_large",
            )
        if getattr(img, "is_animated", False):
            img.seek(0)  # animated GIF/WebP/PNG: the first frame
        if draft_short_side and fmt in ("JPEG", "MPO"):
            target = DRAFT_MARGIN * draft_short_side
            short = min(width, height)
            if short >= 2 * target:
                # ceil division: the requested shorter side is exactly ``target``, never one pixel less
                img.draft("RGB", (-(-width * target // short), -(-height * target // short)))
        img.load()
        upright = ImageOps.exif_transpose(img)
        return _to_rgb(upright if upright is not None else img)
    except ImageError:
        raise
    except (*_PARSE_ERRORS, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode the image: {e}", kind="undecodable") from None
    finally:
        # exif_transpose and convert return new images: close the file-backed original, unless
        # it was opened on a file object the caller owns (Pillow would close that too).
        if not hasattr(source, "read"):
            img.close()


def image_paths(inputs: Sequence[str | Path]) -> Iterator[Path]:
    """Files as given; folders searched recursively for image files (by suffix), in sorted order."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p
