"""Property-based fuzzing of decode -> preprocess (models/imaging.py, models/preprocess.py).

Whatever the bytes, the only outcomes allowed are an :class:`ImageError` of a declared kind with
a message, or a correct tensor: shape (3, crop, crop), float32, finite. A short run is part of
the suite; ``make fuzz`` runs long (``BACKBONES_FUZZ_EXAMPLES`` examples per property).

Found by this file and fixed: extreme aspect ratios (a 1x20000 sliver was resized to 256 x
5,120,000 pixels, 3.9 GB and 13 s, before the crop). The byte budget of each decoded mode and the
tiled conversions (equal to the full-size ones they replaced) are properties here too.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.errors import IMAGE_ERROR_KINDS, ImageError
from models.imaging import ALLOWED_FORMATS, tiles
from models.preprocess import SLIVER_RATIO, ImageLoader, eval_transform, resized_size
from models.samples import synthetic_image
from models.spec import Preprocess

from .conftest import fuzz_budget
from .test_imaging import BYTES_PER_PIXEL, assert_same_as_before

# damaged files make Pillow warn (skipped TIFF tags, corrupt EXIF) before it raises or recovers
pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore::UserWarning")]


SHORT_RUN_EXAMPLES = 100  # per property in `make test`; `make fuzz` sets BACKBONES_FUZZ_EXAMPLES=2000
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints its reproducing example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    **fuzz_budget(SHORT_RUN_EXAMPLES),  # the short run draws the same examples every time
)

PRE = Preprocess(resize=72, crop=64, interpolation="bicubic")  # small: fast, same code paths
LOADER = ImageLoader(PRE, max_pixels=4_000_000)

# modes Pillow can write, with formats that store each (all of them decode to RGB)
MODE_FORMATS: dict[str, list[str]] = {
    "1": ["PNG", "BMP", "TIFF", "GIF"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "BMP", "GIF", "TIFF"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
    "RGBA": ["PNG", "TIFF", "WEBP", "GIF"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "YCbCr": ["JPEG", "TIFF"],
}


def check_outcome(source: Any, loader: ImageLoader = LOADER) -> np.ndarray | ImageError:
    """Decode + preprocess ``source``; return the tensor, or the declared image error it raised
    (anything else propagates and fails the test)."""
    try:
        out = loader(source)
    except ImageError as e:
        assert e.kind in IMAGE_ERROR_KINDS, e.kind
        assert str(e)
        return e
    crop = loader.preprocess.crop
    assert out.shape == (3, crop, crop) and out.dtype == np.float32
    assert np.isfinite(out).all()
    return out


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def base_image(seed: int, mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    shape = (size[1], size[0])
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, int(rng.choice([256, 65536])), shape).astype(np.int32))
    if mode == "F":  # 0..1 floats, or 0..255
        return Image.fromarray((rng.random(shape) * float(rng.choice([1.0, 255.0]))).astype(np.float32))
    if mode == "P":
        return rgb.quantize(colors=int(rng.integers(2, 256)))
    return rgb.convert(mode)


@st.composite
def valid_images(draw: st.DrawFn, max_side: int = 3000, max_pixels: int = 200_000) -> tuple[bytes, str, str]:
    """A real encoded image of any mode and format, extreme aspect ratios included."""
    mode = draw(st.sampled_from(sorted(MODE_FORMATS)))
    fmt = draw(st.sampled_from(MODE_FORMATS[mode]))
    w = draw(st.integers(1, max_side))
    h = draw(st.integers(1, max(1, min(max_side, max_pixels // w))))
    img = base_image(draw(st.integers(0, 2**16)), mode, (w, h))
    kwargs: dict[str, Any] = {}
    if fmt == "GIF" and draw(st.booleans()):  # animated
        kwargs = {"save_all": True, "append_images": [img.rotate(90)], "duration": 40}
    if fmt == "PNG" and mode in ("L", "RGB", "P") and draw(st.booleans()):
        kwargs["transparency"] = 0 if mode != "RGB" else (0, 0, 0)
    return encode(img, fmt, **kwargs), mode, fmt


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real JPEG/PNG/GIF/WebP/BMP/TIFF, truncated, with bytes flipped, inserted or spliced."""
    data = bytearray(draw(valid_images(max_side=200, max_pixels=20_000))[0])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "flip", "insert", "splice"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "truncate":
            del data[pos:]
        elif action == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:  # a header followed by anything: size fields and chunk lengths lie
            data[pos:] = draw(st.binary(max_size=256))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    out = check_outcome(data)
    if not data:
        assert isinstance(out, ImageError) and out.kind == "empty"


@FUZZ
@given(mutated_images())
def test_mutated_real_images(data: bytes) -> None:
    check_outcome(data)


@FUZZ
@given(valid_images())
def test_every_mode_format_and_aspect_ratio_decodes(image: tuple[bytes, str, str]) -> None:
    data, mode, fmt = image
    out = check_outcome(data)
    assert isinstance(out, np.ndarray), f"a valid {mode} {fmt} image was refused: {out}"


@FUZZ
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 30_000_000))
def test_pixel_limit_is_enforced_before_decoding(w: int, h: int, limit: int) -> None:
    data = encode(Image.new("L", (w, h)), "PNG")  # compresses to little whatever its size
    out = check_outcome(data, ImageLoader(PRE, max_pixels=limit))
    if w * h > limit:
        assert isinstance(out, ImageError) and out.kind == "too_large"
    else:
        assert isinstance(out, np.ndarray)


@FUZZ
@given(st.sampled_from(sorted(BYTES_PER_PIXEL)), st.integers(1, 1500), st.integers(1, 1500), st.integers(1, 3_000_000))
def test_byte_budget_of_every_mode_is_enforced(mode: str, w: int, h: int, limit: int) -> None:
    """Refused iff the pixels exceed the limit or their bytes, in the decoded mode, exceed 3 x limit."""
    data = encode(Image.new(mode, (w, h)), MODE_FORMATS[mode][0])
    out = check_outcome(data, ImageLoader(PRE, max_pixels=limit))
    if w * h > limit or w * h * BYTES_PER_PIXEL[mode] > 3 * limit:
        assert isinstance(out, ImageError) and out.kind == "too_large"
    else:
        assert isinstance(out, np.ndarray)


@FUZZ
@given(valid_images(max_side=1200, max_pixels=60_000))
def test_every_mode_decodes_as_before(image: tuple[bytes, str, str]) -> None:
    """Conversions by tiles, through Pillow's point tables and alpha pastes, give exactly the
    pixels the full-size float64 and RGBA conversions gave."""
    assert_same_as_before(image[0])


@FUZZ
@given(st.integers(1, 700), st.integers(1, 700), st.integers(1, 50_000))
def test_tiles_cover_the_image_once(w: int, h: int, tile_pixels: int) -> None:
    count = np.zeros((h, w), np.int32)
    for left, top, right, bottom in tiles(w, h, tile_pixels):
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert (right - left) * (bottom - top) <= tile_pixels
        count[top:bottom, left:right] += 1
    assert (count == 1).all()


@FUZZ
@given(
    st.integers(1, 40_000),
    st.integers(1, 40_000),
    st.sampled_from(["bilinear", "bicubic", "nearest"]),
    st.integers(1, 512),
    st.integers(0, 64),
)
def test_transform_of_any_rgb_size(w: int, h: int, interpolation: str, crop: int, extra: int) -> None:
    if w * h > 2_000_000:  # keep the image itself small; the sizes it resizes to are what is fuzzed
        w, h = (w, max(1, 2_000_000 // w)) if w > h else (max(1, 2_000_000 // h), h)
    pre = Preprocess(resize=crop + extra, crop=crop, interpolation=interpolation)  # type: ignore[arg-type]
    img = Image.new("RGB", (w, h), (200, 30, 90))
    out = eval_transform(pre)(img)
    assert out.shape == (3, crop, crop) and out.dtype == np.float32 and np.isfinite(out).all()
    # a uniform image stays uniform through any resampling: the normalisation is right everywhere
    expected = (np.array([200, 30, 90]) / 255.0 - np.array(pre.mean)) / np.array(pre.std)
    assert np.allclose(out[:, 0, 0], expected, atol=1e-4) and float(np.ptp(out, axis=(1, 2)).max()) < 1e-5


def _small_samples() -> dict[str, bytes]:
    rgb = base_image(7, "RGB", (24, 18))
    turned = rgb.rotate(90)  # frames of one size
    return {
        "animated GIF": encode(rgb.quantize(16), "GIF", save_all=True, append_images=[turned.quantize(16)]),
        "GIF": encode(rgb.quantize(4), "GIF"),
        "animated PNG": encode(rgb, "PNG", save_all=True, append_images=[turned]),
        "animated WebP": encode(rgb, "WEBP", save_all=True, append_images=[turned]),
        "JPEG": encode(rgb, "JPEG"),
        "TIFF": encode(rgb, "TIFF"),
        "BMP": encode(rgb, "BMP"),
    }


@pytest.mark.parametrize(("name", "data"), list(_small_samples().items()))
def test_every_prefix_and_many_byte_flips_of_real_files(name: str, data: bytes) -> None:
    """Exhaustive over truncation points (a truncated animated GIF used to raise IndexError and
    struct.error while its frames were counted), and flips spread over the whole file."""
    cases = [data[:i] for i in range(len(data))]
    for i in range(0, len(data), max(1, len(data) // 200)):
        for value in (0x00, 0xFF, data[i] ^ 0x01):
            flipped = bytearray(data)
            flipped[i] = value
            cases.append(bytes(flipped))
    outcomes = [check_outcome(c) for c in cases]
    assert isinstance(outcomes[0], ImageError) and outcomes[0].kind == "empty"
    assert any(isinstance(o, ImageError) and o.kind == "undecodable" for o in outcomes), name


def test_declared_kinds_all_have_an_http_status() -> None:
    from service.errors import IMAGE_KINDS_TO_STATUS

    assert set(IMAGE_KINDS_TO_STATUS) == IMAGE_ERROR_KINDS
    assert all(400 <= s < 500 for s in IMAGE_KINDS_TO_STATUS.values())
    assert {fmt for fmts in MODE_FORMATS.values() for fmt in fmts} <= ALLOWED_FORMATS


@pytest.mark.parametrize("size", [(20, 400), (400, 20), (3, 900), (700, 17)])
def test_slivers_resample_only_the_crop_and_stay_close_to_the_full_resize(size: tuple[int, int]) -> None:
    img = synthetic_image(5, (max(size), max(size))).resize(size)
    assert max(size) > SLIVER_RATIO * min(size)
    pre = Preprocess(resize=256, crop=224, interpolation="bicubic")
    got = eval_transform(pre)(img)
    # the exact torchvision path: resize the whole image, then crop
    nw, nh = resized_size(*size, pre.resize)
    top, left = round((nh - pre.crop) / 2), round((nw - pre.crop) / 2)
    full = img.resize((nw, nh), Image.Resampling.BICUBIC).crop((left, top, left + pre.crop, top + pre.crop))
    want = (np.asarray(full, np.float32).transpose(2, 0, 1) / 255 - np.reshape(pre.mean, (3, 1, 1))) / np.reshape(
        pre.std, (3, 1, 1)
    )
    assert float(np.abs(got - want).max()) <= 2.5 / 255 / min(pre.std)


def test_a_huge_sliver_is_cheap() -> None:
    """1 x 40,000 pixels: before the fix, a 256 x 10,240,000 intermediate (7.9 GB)."""
    out = check_outcome(encode(Image.new("RGB", (1, 40_000), (9, 9, 9)), "PNG"), ImageLoader(Preprocess()))
    assert isinstance(out, np.ndarray) and out.shape == (3, 224, 224)
