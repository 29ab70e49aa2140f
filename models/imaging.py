"""Decoding what real uploads contain into an RGB ``PIL.Image``.

Handles EXIF orientation, grayscale, CMYK, palette and alpha (composited on white), 16-bit and
float images, and animated images (first frame). Only the accepted formats' parsers ever see the
upload. Before any pixel is decoded, refuses files that declare more pixels than allowed, or whose
first frame would take more bytes in its own mode (16-bit, 32-bit int, float, CMYK, alpha) than an
RGB image of the allowed pixel count. Conversions to 8-bit RGB run tile by tile, so that no
full-size intermediate (float, RGBA) is ever made. On request, large JPEGs are decoded at a reduced
DCT scale ("draft"), never below twice the size the preprocessing resizes to: much faster, but not
within the export parity tolerance (docs/benchmarks.md), hence off by default.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageMode, ImageOps, UnidentifiedImageError

from .errors import ImageError

# Formats accepted from users. Others (PDF, EPS, ICO, PSD, ...) are refused: some of Pillow's
# plugins are large attack surfaces for little use in photo classification.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
# The file names taken for images when a folder is searched (the allowed formats' usual suffixes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"})
# The plugins Image.open may try: MPO files are opened by the JPEG plugin, which has no MPO entry.
_OPEN_FORMATS = tuple(sorted(ALLOWED_FORMATS - {"MPO"}))

# The byte budget of one decoded image is the allowed pixel count times an RGB pixel's 3 bytes:
# an RGB image may have every allowed pixel, a 4-byte mode (RGBA, CMYK, I, F) three quarters of them.
RGB_BYTES_PER_PIXEL = 3

# How much larger than the resize target the draft-decoded image must stay. Even so, drafting
# moves logits by up to ~0.5 on multi-megapixel photos (benchmarks/bench_inference.py), far beyond
# the 1e-3 parity tolerance: it is opt-in (settings.draft_decoding), off by default.
DRAFT_MARGIN = 2

# Conversions to RGB run on tiles of at most this many pixels: their temporaries stay a few MiB
# whatever the image size.
TILE_PIXELS = 1 << 20

# Pillow's own bomb check only warns below 2x its limit and is process-wide; ours is explicit and
# per call (the pixel count and byte budget above, from the header, on the frame that is decoded).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

Source = bytes | str | Path | BinaryIO

# What Pillow's parsers raise on damaged files. Beyond OSError and ValueError, a truncated GIF
# raises IndexError or struct.error while counting its frames (found by tests/test_fuzz_imaging.py).
_PARSE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error)

# How much of a refused file is read to name its format (see _other_format).
_HEADER_BYTES = 4096

# 16-bit value -> 8-bit value: 0..65535 scaled to 0..255 and rounded, as a table to index with.
_SCALE_16_TO_8 = np.rint(np.arange(65536) / 257.0).astype(np.uint8)
_ACCEPTED = ", ".join(sorted(ALLOWED_FORMATS))


def _read_head(source: Source) -> bytes:
    """The first bytes of ``source`` (which Image.open has just failed to identify)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source[:_HEADER_BYTES])
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as f:
                return f.read(_HEADER_BYTES)
        source.seek(0)
        return source.read(_HEADER_BYTES)
    except (OSError, ValueError, AttributeError):
        return b""


def _other_format(head: bytes) -> str | None:
    """The format of a file the accepted formats could not open, if another Pillow plugin knows it.

    None for a file that an accepted format claims by its signature (a damaged one) and for an
    unknown file. Other formats are identified as Image.open would (signatures alone mistake a TGA
    for a CUR), on a copy of the file's first bytes, never decoded: the upload itself only ever
    reaches the accepted formats' parsers.
    """
    Image.init()
    prefix = head[:16]
    for fmt in _OPEN_FORMATS:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                return None
        except (IndexError, TypeError, ValueError, struct.error):
            continue  # a signature check reading past the end of a very short file
    others = [fmt for fmt in Image.OPEN if fmt not in ALLOWED_FORMATS]
    try:
        with Image.open(io.BytesIO(head), formats=others) as im:
            return im.format
    except Exception:  # whatever a parser raises on a header that is not its format: unnamed
        return None


def _open(source: Source) -> ImageFile.ImageFile:
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
        return Image.open(fp, formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        other = _other_format(_read_head(source))
        if other is not None:
            raise _unsupported(other) from None
        raise ImageError(
            f"not an image this service can read (expected one of: {_ACCEPTED})", kind="undecodable"
        ) from None
    except _PARSE_ERRORS as e:
        raise ImageError(f"cannot decode the image: {e}", kind="undecodable") from None


def _unsupported(fmt: str) -> ImageError:
    return ImageError(f"unsupported image format {fmt}; accepted: {_ACCEPTED}", kind="unsupported_format")


def bytes_per_pixel(mode: str) -> int:
    """What one pixel of ``mode`` takes decoded: 2 for 16-bit grey, 4 for RGBA, CMYK, I and F."""
    try:
        m = ImageMode.getmode(mode)
    except KeyError:
        return 4  # a mode this Pillow does not describe: as wide as the widest
    return len(m.bands) * np.dtype(m.typestr).itemsize


def _check_size(img: Image.Image, max_pixels: int) -> None:
    """Refuse, from the header, an image whose (first) frame is too large to decode."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image declares an empty size {width}x{height}", kind="undecodable")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(
            f"the image declares {width}x{height} = {pixels:,} pixels; the limit is {max_pixels:,}",
            kind="too_large",
        )
    per_pixel = bytes_per_pixel(img.mode)
    budget = RGB_BYTES_PER_PIXEL * max_pixels
    if pixels * per_pixel > budget:
        raise ImageError(
            f"the image declares {width}x{height} pixels of mode {img.mode}, {pixels * per_pixel:,} bytes "
            f"decoded ({per_pixel} per pixel); the limit is {budget:,} bytes "
            f"({RGB_BYTES_PER_PIXEL} per pixel for {max_pixels:,} pixels)",
            kind="too_large",
        )


def tiles(width: int, height: int, tile_pixels: int = TILE_PIXELS) -> Iterator[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) of at most ``tile_pixels`` that cover the image once."""
    tile_w = min(width, tile_pixels)
    tile_h = max(1, tile_pixels // tile_w)
    for top in range(0, height, tile_h):
        for left in range(0, width, tile_w):
            yield left, top, min(left + tile_w, width), min(top + tile_h, height)


def _by_tiles(img: Image.Image, to_rgb: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``to_rgb``, a per-pixel conversion, applied tile by tile into one RGB image."""
    out = Image.new("RGB", img.size)
    for box in tiles(*img.size):
        out.paste(to_rgb(img.crop(box)), box[:2])
    return out


def _gray_by_tiles(img: Image.Image, to_uint8: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """``to_uint8``, applied to the values of each tile, as a grey RGB image."""
    return _by_tiles(img, lambda tile: Image.fromarray(to_uint8(np.asarray(tile))).convert("RGB"))


def _on_white(img: Image.Image) -> Image.Image:
    """Alpha, or a transparent colour, composited on white. Pasting through the alpha band gives
    exactly what Image.alpha_composite over opaque white gives, without another full-size image."""
    out = Image.new("RGB", img.size, (255, 255, 255))
    if img.mode in ("RGBA", "LA"):
        out.paste(img, (0, 0), img)
        return out
    for box in tiles(*img.size):  # P, L or RGB with a transparent colour; premultiplied alpha
        rgba = img.crop(box).convert("RGBA")
        out.paste(rgba, box[:2], rgba)
    return out


def _nanmax(img: Image.Image) -> float:
    """The largest value of a float image, NaN ignored (NaN if all are). Pillow's extrema skip NaN,
    but a NaN first pixel makes them NaN: only then are the tiles scanned."""
    hi = float(img.getextrema()[1])  # type: ignore[arg-type]
    if not math.isnan(hi):
        return hi
    for box in tiles(*img.size):
        hi = float(np.fmax(hi, np.fmax.reduce(np.asarray(img.crop(box)), axis=None)))
    return hi


def _float_to_uint8(a: np.ndarray, scale: float) -> np.ndarray:
    """``a * scale`` rounded and clipped to 0..255 (NaN -> 0), in float64 as before tiling: on one tile."""
    f = a.astype(np.float64)
    f *= scale
    np.rint(f, out=f)
    np.nan_to_num(f, copy=False)
    np.clip(f, 0, 255, out=f)
    return f.astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        # alpha, or a transparent colour (PNG tRNS, GIF transparent index), composited on white
        return _on_white(img)
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit data keeps its range: 0..65535 scaled to 0..255 instead of clipped at 255.
        if mode != "I" or img.getextrema()[1] > 255:  # type: ignore[operator]
            return _gray_by_tiles(img, lambda a: _SCALE_16_TO_8[np.clip(a, 0, 65535)])
        return _gray_by_tiles(img, lambda a: np.clip(a, 0, 255).astype(np.uint8))
    if mode == "F":
        scale = 255.0 if _nanmax(img) <= 1.0 else 1.0  # 0..1 floats become 0..255
        return _gray_by_tiles(img, lambda a: _float_to_uint8(a, scale))
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV: Pillow converts without intermediates


def _decode(img: ImageFile.ImageFile, max_pixels: int, draft_short_side: int | None) -> Image.Image:
    fmt = img.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise _unsupported(fmt)
    if getattr(img, "is_animated", False):
        img.seek(0)  # animated GIF/WebP/PNG, multi-page TIFF, MPO: the first frame
    _check_size(img, max_pixels)
    if draft_short_side and fmt in ("JPEG", "MPO"):
        width, height = img.size
        target = DRAFT_MARGIN * draft_short_side
        short = min(width, height)
        if short >= 2 * target:
            # ceil division: the requested shorter side is exactly ``target``, never one pixel less
            img.draft("RGB", (-(-width * target // short), -(-height * target // short)))
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # no copy when the image is already upright
    return _to_rgb(img)


def decode_image(
    source: Source,
    *,
    max_pixels: int = 40_000_000,
    draft_short_side: int | None = None,
) -> Image.Image:
    """Decode ``source`` (bytes, a path or a binary file) into an upright RGB image.

    ``max_pixels`` bounds the pixel count, and ``RGB_BYTES_PER_PIXEL * max_pixels`` the bytes of
    the decoded frame in its own mode (see :func:`bytes_per_pixel`).
    ``draft_short_side``: the shorter side the caller will resize to; large JPEGs are then decoded
    at the smallest DCT scale that keeps the shorter side at least ``DRAFT_MARGIN`` times that.
    Raises :class:`ImageError` with ``kind`` set for every way the input can be unusable.
    """
    # Leaving ``with`` closes the file Pillow opened (never a caller's file object); the pixels stay.
    with _open(source) as img:
        try:
            return _decode(img, max_pixels, draft_short_side)
        except ImageError:
            raise
        except (*_PARSE_ERRORS, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot decode the image: {e}", kind="undecodable") from None


def image_paths(inputs: Sequence[str | Path]) -> Iterator[Path]:
    """Files as given; folders searched recursively for image files (by suffix), in sorted order."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p
