"""decode_image on what real uploads contain. Every image is made here with Pillow/NumPy."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.errors import ImageError
from models.imaging import (
    ALLOWED_FORMATS,
    DRAFT_MARGIN,
    RGB_BYTES_PER_PIXEL,
    TILE_PIXELS,
    bytes_per_pixel,
    decode_image,
)
from models.preprocess import ImageLoader
from models.samples import synthetic_image
from models.spec import Preprocess

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 40) -> None:
    assert len(pixel) == 3
    assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= tol, (pixel, expected)


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# --- EXIF orientation -------------------------------------------------------------------------


def _oriented_pattern() -> Image.Image:
    """60x40 (w x h): red left half, blue right half, a green block in the top-left corner.

    The corner block tells rotations from mirrorings apart."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30] = RED
    a[:, 30:] = BLUE
    a[:10, :15] = GREEN
    return Image.fromarray(a, "RGB")


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# Where the stored image's regions end up on screen, as (x, y) sample points in the upright image.
@pytest.mark.parametrize(
    ("orientation", "size", "green_at", "red_at", "blue_at"),
    [
        (1, (60, 40), (3, 3), (20, 30), (50, 20)),
        # 6: rotate 90 degrees clockwise; the left half goes to the top, top-left to top-right.
        (6, (40, 60), (36, 3), (10, 20), (20, 50)),
        # 8: rotate 90 degrees counter-clockwise; the left half goes to the bottom, top-left to bottom-left.
        (8, (40, 60), (3, 56), (30, 40), (20, 10)),
        # 3: rotate 180 degrees; the left half goes to the right, top-left to bottom-right.
        (3, (60, 40), (56, 36), (50, 10), (10, 20)),
    ],
)
def test_exif_orientation_is_applied(orientation, size, green_at, red_at, blue_at):
    data = encode(_oriented_pattern(), "JPEG", quality=95, exif=_exif(orientation))
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.size == size
    assert_close(img.getpixel(green_at), GREEN)
    assert_close(img.getpixel(red_at), RED)
    assert_close(img.getpixel(blue_at), BLUE)


def test_exif_orientation_on_png():
    img = decode_image(encode(_oriented_pattern(), "PNG", exif=_exif(6)))
    assert img.size == (40, 60)
    assert img.getpixel((36, 3)) == GREEN
    assert img.getpixel((10, 20)) == RED


# --- modes ------------------------------------------------------------------------------------


def test_rgb_passes_through_exactly():
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    img = decode_image(encode(Image.fromarray(a, "RGB"), "PNG"))
    np.testing.assert_array_equal(pixels(img), a)


def test_grayscale_l_becomes_gray_rgb():
    a = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    img = decode_image(encode(Image.fromarray(a, "L"), "PNG"))
    out = pixels(img)
    assert out.shape == (4, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], a)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_one_bit_image(fmt):
    img1 = Image.new("1", (4, 3), 0)
    img1.putpixel((1, 2), 1)
    out = pixels(decode_image(encode(img1, fmt)))
    expected = np.zeros((3, 4), np.uint8)
    expected[2, 1] = 255
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


@pytest.mark.parametrize(
    "cmyk, rgb",
    [
        ((0, 255, 255, 0), RED),
        ((255, 0, 255, 0), GREEN),
        ((255, 255, 0, 0), BLUE),
        ((0, 0, 0, 0), WHITE),
        ((0, 0, 0, 255), (0, 0, 0)),
    ],
)
def test_cmyk_jpeg_colours(cmyk, rgb):
    data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB"
    assert_close(img.getpixel((8, 8)), rgb)


def _palette_image() -> Image.Image:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    p.putpixel((1, 1), 1)
    p.putpixel((2, 2), 2)
    return p


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_without_transparency(fmt):
    img = decode_image(encode(_palette_image(), fmt))
    assert img.getpixel((0, 0)) == (0, 0, 0)  # index 0 is black, not made transparent
    assert img.getpixel((1, 1)) == RED
    assert img.getpixel((2, 2)) == GREEN


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_composites_on_white(fmt):
    data = encode(_palette_image(), fmt, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    img = decode_image(data)
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 1)) == RED
    assert img.getpixel((2, 2)) == GREEN


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_rgba_alpha_composites_on_white(fmt):
    rgba = Image.new("RGBA", (3, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgba.putpixel((2, 0), (10, 20, 30, 128))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = pixels(decode_image(encode(rgba, fmt, **kwargs)))
    assert tuple(out[0, 0]) == WHITE  # fully transparent: the white background, not the hidden colour
    assert tuple(out[0, 1]) == (10, 20, 30)  # opaque: unchanged
    # half transparent: halfway between the colour and white
    np.testing.assert_allclose(out[0, 2], [132, 137, 142], atol=2)


def test_la_alpha_composites_on_white():
    la = Image.new("LA", (3, 1), (10, 0))
    la.putpixel((1, 0), (10, 255))
    la.putpixel((2, 0), (0, 128))
    data = encode(la, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = pixels(decode_image(data))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (10, 10, 10)
    np.testing.assert_allclose(out[0, 2], [127, 127, 127], atol=2)


@pytest.mark.parametrize(
    "mode, opaque, transparent_colour",
    [("L", 200, 0), ("RGB", (200, 100, 50), (0, 0, 0))],
)
def test_png_transparent_colour_composites_on_white(mode, opaque, transparent_colour):
    # Optimisers (pngcrush, optipng, oxipng) store an RGBA image with on/off alpha as L or RGB plus
    # a tRNS colour key; it must come out like the same image stored as RGBA or as a palette.
    img = Image.new(mode, (2, 1), transparent_colour)
    img.putpixel((1, 0), opaque)
    data = encode(img, "PNG", transparency=transparent_colour)
    assert Image.open(io.BytesIO(data)).info["transparency"] == transparent_colour
    out = decode_image(data)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == ((opaque,) * 3 if mode == "L" else opaque)


def test_16bit_grayscale_png_scales_range():
    a = np.array([[0, 257, 32896, 65535], [1000, 12850, 51400, 65280]], dtype=np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = pixels(decode_image(data))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 128, 255], [4, 50, 200, 254]])
    assert (pixels(decode_image(data)) == out[..., None]).all()  # gray: the channels are equal


def test_16bit_dark_image_is_not_read_as_8bit():
    # All values below 256: still 16-bit data, so near black, not clipped to mid-gray.
    a = np.array([[0, 100, 200, 255]], dtype=np.uint16)
    out = pixels(decode_image(encode(Image.fromarray(a), "PNG")))[..., 0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 1]])


def test_16bit_tiff():
    a = np.array([[0, 65535, 32896]], dtype=np.uint16)
    out = pixels(decode_image(encode(Image.fromarray(a), "TIFF")))[..., 0]
    np.testing.assert_array_equal(out, [[0, 255, 128]])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 100, 255, 7], [0, 100, 255, 7]),  # already in 0..255: kept
        ([0, 32896, 65535, 7], [0, 128, 255, 0]),  # 16-bit range: scaled, not clipped
        ([-5, 0, 70000, 65535], [0, 0, 255, 255]),  # out of range: clipped
    ],
)
def test_mode_i_tiff(values, expected):
    data = encode(Image.fromarray(np.array([values], dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = pixels(decode_image(data))
    np.testing.assert_array_equal(out[..., 0], [expected])
    np.testing.assert_array_equal(out[..., 2], [expected])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # 0..1 floats: scaled to 0..255
        ([0.0, 100.0, 255.0, 300.0], [0, 100, 255, 255]),  # 0..255 floats: kept, then clipped
        ([-1.0, 0.0, 2.0, 50.4], [0, 0, 2, 50]),
    ],
)
def test_mode_f_tiff(values, expected):
    data = encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = pixels(decode_image(data))
    np.testing.assert_array_equal(out[..., 1], [expected])


# --- animated images --------------------------------------------------------------------------


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]


@pytest.mark.parametrize(
    "fmt, kwargs",
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],
)
def test_animated_image_first_frame(fmt, kwargs):
    frames = _frames()
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    opened = Image.open(io.BytesIO(data))
    if not getattr(opened, "is_animated", False):
        pytest.skip(f"this Pillow writes no animated {fmt}")
    assert opened.n_frames == 3
    img = decode_image(data)
    assert img.size == (8, 6)
    assert_close(img.getpixel((4, 3)), RED, tol=2)


def test_animated_gif_decoded_after_seek_still_gives_first_frame(tmp_path):
    frames = _frames()
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with path.open("rb") as f:
        img = decode_image(f)
    assert img.getpixel((0, 0)) == RED


# --- refusals ---------------------------------------------------------------------------------


def test_empty_bytes():
    with pytest.raises(ImageError) as e:
        decode_image(b"")
    assert e.value.kind == "empty"
    assert "empty" in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        decode_image(path)
    assert e.value.kind == "empty"
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(2000),
        b"hello, this is not an image\n" * 10,
        b"\x89PNG\r\n\x1a\n",  # a PNG signature and nothing else
    ],
    ids=["random", "text", "png-signature-only"],
)
def test_non_image_bytes(data):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.kind == "undecodable"
    assert "JPEG" in str(e.value)  # says what is accepted


def test_truncated_jpeg():
    full = encode(synthetic_image(0), "JPEG", quality=90)
    decode_image(full)  # the whole file is fine
    with pytest.raises(ImageError) as e:
        decode_image(full[: len(full) // 2])
    assert e.value.kind == "undecodable"


def test_truncated_png():
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = encode(Image.fromarray(a, "RGB"), "PNG")
    with pytest.raises(ImageError) as e:
        decode_image(full[: len(full) // 2])
    assert e.value.kind == "undecodable"


def _png_declaring(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to declare ``width`` x ``height`` (with a valid CRC)."""
    data = bytearray(encode(Image.new("RGB", (1, 1), RED), "PNG"))
    # signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | ... 5 more bytes | CRC (4)
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_refused_before_decoding():
    data = _png_declaring(30000, 30000)
    assert Image.open(io.BytesIO(data)).size == (30000, 30000)  # the header is valid
    start = time.perf_counter()
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert e.value.kind == "too_large"
    assert "30000x30000" in str(e.value)


def test_max_pixels_boundary():
    data = encode(Image.new("RGB", (100, 50), RED), "PNG")
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=4999)
    assert e.value.kind == "too_large"


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM"])
def test_unsupported_format(fmt):
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself can read it
    assert fmt not in ALLOWED_FORMATS
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.kind == "unsupported_format"
    assert fmt in str(e.value)
    assert "PNG" in str(e.value)  # names what is accepted


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_allowed_formats_decode(fmt):
    img = decode_image(encode(Image.new("RGB", (9, 7), (40, 120, 200)), fmt))
    assert img.mode == "RGB"
    assert img.size == (9, 7)
    assert_close(img.getpixel((4, 3)), (40, 120, 200), tol=8)


# --- sources ----------------------------------------------------------------------------------


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "picture.png"
    _oriented_pattern().save(path)
    return path


@pytest.mark.parametrize("as_type", [str, Path])
def test_path_source(png_file, as_type):
    img = decode_image(as_type(png_file))
    assert img.size == (60, 40)
    assert img.getpixel((3, 3)) == GREEN


def test_file_object_source_is_left_open(png_file):
    # The caller owns the file: decode_image must neither close it nor need it afterwards.
    with png_file.open("rb") as f:
        img = decode_image(f)
        assert not f.closed
        f.seek(0)
        assert f.read() == png_file.read_bytes()
    assert img.getpixel((3, 3)) == GREEN


def test_bytesio_source_is_left_open(png_file):
    buf = io.BytesIO(png_file.read_bytes())
    decode_image(buf)
    assert not buf.closed
    assert buf.getvalue() == png_file.read_bytes()  # raises ValueError once closed


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, io.BytesIO])
def test_in_memory_sources(png_file, wrap):
    img = decode_image(wrap(png_file.read_bytes()))
    assert img.size == (60, 40)
    assert img.getpixel((50, 20)) == BLUE


def test_result_outlives_source_file(png_file):
    img = decode_image(png_file)
    png_file.unlink()  # the pixels were loaded: nothing still reads the file
    assert img.getpixel((50, 20)) == BLUE


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError) as e:
        decode_image(missing)
    assert e.value.kind == "undecodable"
    assert str(missing) in str(e.value)
    with pytest.raises(ImageError, match=r"nope\.jpg"):
        decode_image(str(missing))


def test_directory_path(tmp_path):
    with pytest.raises(ImageError) as e:
        decode_image(tmp_path)
    assert e.value.kind == "undecodable"


def test_image_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode_image(b"junk")


# --- draft decoding ---------------------------------------------------------------------------


def _flat_jpeg(size: tuple[int, int], **kwargs: object) -> bytes:
    return encode(Image.new("RGB", size, (120, 60, 200)), "JPEG", quality=85, **kwargs)


def test_draft_reduces_large_jpeg_but_keeps_margin():
    data = _flat_jpeg((3000, 2000))
    assert decode_image(data).size == (3000, 2000)
    img = decode_image(data, draft_short_side=256)
    assert img.width < 3000 and img.height < 2000
    assert min(img.size) >= DRAFT_MARGIN * 256
    assert img.width / img.height == pytest.approx(1.5, rel=0.01)
    assert_close(img.getpixel((10, 10)), (120, 60, 200), tol=8)


def test_draft_with_exif_rotation():
    data = _flat_jpeg((3000, 2000), exif=_exif(6))
    img = decode_image(data, draft_short_side=256)
    assert img.width < img.height < 3000  # rotated and reduced
    assert min(img.size) >= DRAFT_MARGIN * 256


@pytest.mark.parametrize(
    "draft_short_side, size",
    [
        (256, (3000, 2000)),
        (256, (2048, 2048)),
        (224, (4032, 3024)),
        (72, (1000, 750)),
        # resnet50 and mobilenet_v3_large resize to 232: the margin is 464 pixels
        (232, (1852, 1852)),
        (232, (3704, 3704)),
    ],
)
def test_draft_never_goes_below_margin(draft_short_side, size):
    img = decode_image(_flat_jpeg(size), draft_short_side=draft_short_side)
    assert img.size < size  # drafting happened
    assert min(img.size) >= DRAFT_MARGIN * draft_short_side, img.size


def test_draft_through_image_loader():
    data = _flat_jpeg((1852, 1852))
    loader = ImageLoader(Preprocess(resize=232, crop=224), draft=True)
    assert min(loader.decode(data).size) >= DRAFT_MARGIN * 232
    assert ImageLoader(Preprocess(resize=232, crop=224), draft=False).decode(data).size == (1852, 1852)


@pytest.mark.parametrize("size", [(800, 600), (1023, 1500)])
def test_draft_leaves_small_jpeg_alone(size):
    # the shorter side is below 2 * DRAFT_MARGIN * 256: no DCT scale can keep the margin
    assert decode_image(_flat_jpeg(size), draft_short_side=256).size == size


def test_draft_not_applied_to_png():
    data = encode(Image.new("RGB", (3000, 2000), (120, 60, 200)), "PNG")
    assert decode_image(data, draft_short_side=256).size == (3000, 2000)


def test_draft_output_close_to_full_decode():
    # The resize that follows hides the draft's coarser decode: the normalized inputs stay close.
    data = encode(synthetic_image(3, size=(2400, 1800)), "JPEG", quality=92)
    pre = Preprocess(resize=256, crop=224)
    drafted = ImageLoader(pre, draft=True)(data)
    full = ImageLoader(pre, draft=False)(data)
    assert ImageLoader(pre, draft=True).decode(data).size == (1200, 900)
    assert np.abs(drafted - full).mean() < 0.02


# --- limits by mode, and conversions without full-size intermediates ----------------------------


def old_to_rgb(img: Image.Image) -> Image.Image:
    """The conversions as they were before they ran by tiles (full-size float64 arrays, RGBA and a
    white RGBA background): the oracle that decoding must still match exactly."""
    mode = img.mode
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        arr8 = np.clip(np.rint(arr.astype(np.float64) / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            hi = float(np.nanmax(arr)) if not np.isnan(arr).all() else float("nan")
        arr = arr * 255.0 if hi <= 1.0 else arr
        return Image.fromarray(np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    return img.convert("RGB")


def assert_same_as_before(data: bytes, **kwargs: object) -> Image.Image:
    """Decode ``data`` and check the result against the oracle; return it."""
    out = decode_image(data, **kwargs)  # type: ignore[arg-type]
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        np.testing.assert_array_equal(pixels(out), np.asarray(old_to_rgb(opened)))
    return out


def ramp(size: tuple[int, int], hi: int, channels: int = 1) -> np.ndarray:
    """(height, width[, channels]) values 0..hi-1 varying along both axes: tiles that were pasted
    in the wrong place show."""
    w, h = size
    step = max(1, hi // 2048)
    x, y = np.arange(w, dtype=np.int64) * step, np.arange(h, dtype=np.int64) * step
    bands = [
        np.add.outer((y * (7 + 3 * c) % hi).astype(np.int32), (x * (13 + 2 * c) % hi).astype(np.int32)) % hi
        for c in range(channels)
    ]
    return bands[0] if channels == 1 else np.stack(bands, axis=-1)


def _floats(size: tuple[int, int]) -> Image.Image:
    a = (ramp(size, 1001) / 1000.0).astype(np.float32)  # 0..1: scaled to 0..255
    a[1, :5] = [np.nan, np.inf, -np.inf, -0.5, 0.5]  # not on the first pixel: Pillow's extrema skip them
    return Image.fromarray(a)


def _palette(size: tuple[int, int]) -> Image.Image:
    img = Image.frombytes("P", size, ramp(size, 256).astype(np.uint8).tobytes())
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    return img


def _gif(size: tuple[int, int]) -> bytes:
    first = _palette(size)
    return encode(first, "GIF", save_all=True, append_images=[first.rotate(180)], transparency=3)


# What each decoded mode takes per pixel, as the limit counts it (RGB: 3).
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "I;16": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "I": 4, "F": 4}
LIMIT = 2_500_000  # pixels: the worst images below cross several conversion tiles
# case -> (the mode Pillow decodes to, the encoded image of a given size)
WORST: dict[str, tuple[str, Callable[[tuple[int, int]], bytes]]] = {
    "16-bit grey PNG": ("I;16", lambda s: encode(Image.fromarray(ramp(s, 65536).astype(np.uint16)), "PNG")),
    "16-bit grey TIFF": ("I;16", lambda s: encode(Image.fromarray(ramp(s, 65536).astype(np.uint16)), "TIFF")),
    "32-bit int TIFF": (
        "I",
        lambda s: encode(Image.fromarray((ramp(s, 72000) - 1000).astype(np.int32)), "TIFF", compression="tiff_deflate"),
    ),
    "32-bit int TIFF, 0..255": ("I", lambda s: encode(Image.fromarray(ramp(s, 256).astype(np.int32)), "TIFF")),
    "float TIFF": ("F", lambda s: encode(_floats(s), "TIFF", compression="tiff_deflate")),
    "float TIFF, 0..255": ("F", lambda s: encode(Image.fromarray(ramp(s, 300).astype(np.float32) - 20.25), "TIFF")),
    "RGBA PNG": ("RGBA", lambda s: encode(Image.fromarray(ramp(s, 256, 4).astype(np.uint8), "RGBA"), "PNG")),
    "RGBA WebP": (
        "RGBA",
        lambda s: encode(Image.fromarray(ramp(s, 256, 4).astype(np.uint8), "RGBA"), "WEBP", lossless=True),
    ),
    "LA PNG": ("LA", lambda s: encode(Image.fromarray(ramp(s, 256, 2).astype(np.uint8), "LA"), "PNG")),
    "CMYK JPEG": (
        "CMYK",
        lambda s: encode(Image.frombytes("CMYK", s, ramp(s, 256, 4).astype(np.uint8).tobytes()), "JPEG", quality=90),
    ),
    "palette PNG, alpha per entry": ("P", lambda s: encode(_palette(s), "PNG", transparency=bytes(range(256)))),
    "palette BMP": ("P", lambda s: encode(_palette(s), "BMP")),
    "1-bit PNG": ("1", lambda s: encode(Image.fromarray(ramp(s, 256) > 100), "PNG")),
    "grey PNG, transparent colour": (
        "L",
        lambda s: encode(Image.fromarray(ramp(s, 256).astype(np.uint8)), "PNG", transparency=9),
    ),
    "GIF, 2 frames, transparent index": ("P", _gif),
    "RGB PNG": ("RGB", lambda s: encode(Image.fromarray(ramp(s, 256, 3).astype(np.uint8), "RGB"), "PNG")),
}


@pytest.mark.parametrize("case", list(WORST))
def test_worst_allowed_image_of_each_mode(case):
    mode, make = WORST[case]
    allowed = min(LIMIT, 3 * LIMIT // BYTES_PER_PIXEL[mode])
    size = (1000, allowed // 1000)  # exactly at the limit
    data = make(size)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == mode  # the mode under test is the one decoded
    assert assert_same_as_before(data, max_pixels=LIMIT).size == size
    # one row more: refused from the header, by the byte budget where a pixel takes over 3 bytes
    with pytest.raises(ImageError) as e:
        decode_image(make((size[0], size[1] + 1)), max_pixels=LIMIT)
    assert e.value.kind == "too_large"
    assert f"1000x{size[1] + 1}" in str(e.value)
    if BYTES_PER_PIXEL[mode] > 3:
        assert f"the limit is {3 * LIMIT:,} bytes" in str(e.value)
        assert f"{BYTES_PER_PIXEL[mode]} per pixel" in str(e.value)
    else:
        assert f"the limit is {LIMIT:,}" in str(e.value)


@pytest.mark.parametrize("case", ["16-bit grey PNG", "float TIFF", "RGBA PNG", "palette PNG, alpha per entry"])
def test_a_sliver_wider_than_a_tile_converts_like_the_whole(case):
    make = WORST[case][1]
    assert assert_same_as_before(make((TILE_PIXELS + 1234, 2))).size == (TILE_PIXELS + 1234, 2)


def test_rgb_keeps_the_full_pixel_limit():
    # A 40 M-pixel RGB JPEG is still allowed; the byte budget only ever binds on wider modes.
    assert BYTES_PER_PIXEL["RGB"] == RGB_BYTES_PER_PIXEL
    data = _png_declaring(8000, 5000)
    with pytest.raises(ImageError) as e:
        decode_image(data)  # the header passes both checks: decoding starts and finds no pixel data
    assert e.value.kind == "undecodable"
    with pytest.raises(ImageError) as e:
        decode_image(_png_declaring(8000, 5001))
    assert e.value.kind == "too_large"


def _png_header(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG signature and IHDR declaring a size and pixel layout, then IEND: no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("bit_depth", "colour_type", "mode", "kind"),
    [
        (16, 0, "I;16", "undecodable"),  # 2 bytes a pixel: 6000x6000 fits, decoding starts
        (8, 4, "LA", "undecodable"),
        (8, 2, "RGB", "undecodable"),
        (8, 6, "RGBA", "too_large"),  # 4 bytes a pixel: 144 MB, over the 120 MB budget
        (16, 6, "RGBA", "too_large"),
    ],
)
def test_byte_budget_is_checked_from_the_header(bit_depth, colour_type, mode, kind):
    # 6000x6000 is under the 40 M-pixel limit; a file with no pixel data shows whether the refusal
    # came from the header (too_large) or decoding was attempted (undecodable).
    data = _png_header(6000, 6000, bit_depth, colour_type)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == mode
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.kind == kind
    if kind == "too_large":
        assert "144,000,000 bytes" in str(e.value) and "120,000,000 bytes" in str(e.value)


def test_bytes_per_pixel_of_each_mode():
    assert {mode: bytes_per_pixel(mode) for mode in BYTES_PER_PIXEL} == BYTES_PER_PIXEL
    assert bytes_per_pixel("I;16B") == 2 and bytes_per_pixel("PA") == 2 and bytes_per_pixel("YCbCr") == 3


def test_multi_frame_images_count_their_first_frame_only():
    # Three frames of the allowed size: the limit is one frame's, and only the first is decoded.
    size = (100, 50)
    frames = [Image.new("RGBA", size, (c, 0, 0, 255)) for c in (200, 100, 50)]
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(tiff)) as opened:
        assert opened.n_frames == 3
    just_enough = -(-5000 * 4 // 3)  # 6667 pixels: a budget of 20,001 bytes for one 20,000-byte frame
    assert decode_image(tiff, max_pixels=just_enough).getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(ImageError, match="20,000 bytes"):
        decode_image(tiff, max_pixels=just_enough - 1)


def test_mpo_first_frame():
    frames = [Image.new("RGB", (64, 48), colour) for colour in (RED, BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    assert_close(decode_image(data).getpixel((10, 10)), RED, tol=4)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([np.nan, 0.25, 1.0, 0.5], [0, 64, 255, 128]),  # a NaN first pixel: the maximum is still 1.0
        ([np.nan, np.nan], [0, 0]),
        ([0.5, np.inf, np.nan], [0, 255, 0]),  # an infinite maximum: no scaling, 0.5 rounds to even
        ([-np.inf, 0.2, np.nan], [0, 51, 0]),
    ],
)
def test_mode_f_special_values(values, expected):
    data = encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")
    out = assert_same_as_before(data)
    np.testing.assert_array_equal(pixels(out)[..., 0], [expected])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_on_white_equals_alpha_composite_for_every_value_and_alpha(mode):
    values, alphas = np.mgrid[0:256, 0:256]  # every (value, alpha) pair once
    bands = [values, 255 - values, (7 * values) % 256][: 3 if mode == "RGBA" else 1]
    img = Image.fromarray(np.stack([*bands, alphas], axis=-1).astype(np.uint8), mode)
    assert_same_as_before(encode(img, "PNG"))


def test_the_upload_reaches_no_other_formats_parser():
    """A plugin of a format the service refuses sees at most a copy of the header, never the upload."""
    seen: list[int] = []

    class Hostile(ImageFile.ImageFile):
        format = "HOSTILE"

        def _open(self) -> None:
            assert self.fp is not None
            self.fp.seek(0, io.SEEK_END)
            seen.append(self.fp.tell())  # how many bytes this parser could read
            self._size = (1, 1)
            self._mode = "L"

    Image.register_open("HOSTILE", Hostile, lambda prefix: prefix.startswith(b"HOSTILE!"))
    try:
        data = b"HOSTILE!" + bytes(1_000_000)
        with pytest.raises(ImageError) as e:
            decode_image(data)
    finally:
        del Image.OPEN["HOSTILE"]
        Image.ID.remove("HOSTILE")
    assert e.value.kind == "unsupported_format" and "HOSTILE" in str(e.value)
    assert seen and max(seen) <= 4096 < len(data)


def test_damaged_accepted_format_is_undecodable_not_named_otherwise():
    png = encode(Image.new("RGB", (8, 8), RED), "PNG")
    with pytest.raises(ImageError) as e:
        decode_image(png[:20])  # a PNG signature and a cut IHDR
    assert e.value.kind == "undecodable"


def test_rgb_jpeg_photo_decodes_exactly_as_pillow_does():
    # Export parity tolerances rest on ordinary photos decoding the same as ever: no conversion.
    data = encode(synthetic_image(2, size=(1500, 1100)), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as plain:
        expected = np.asarray(plain.convert("RGB"))
    np.testing.assert_array_equal(pixels(decode_image(data)), expected)


def test_16bit_image_with_exif_orientation():
    a = np.zeros((40, 60), np.uint16)
    a[:10, :15] = 65535  # a white block top-left; after rotating 90 degrees clockwise: top-right
    out = decode_image(encode(Image.fromarray(a), "PNG", exif=_exif(6)))
    assert out.size == (40, 60)
    assert out.getpixel((36, 3)) == WHITE and out.getpixel((3, 3)) == (0, 0, 0)


@pytest.mark.parametrize(
    "fmt, kwargs",
    [("TIFF", {}), ("PNG", {}), ("GIF", {}), ("WEBP", {"lossless": True})],
)
def test_multi_frame_file_is_closed_after_decoding(tmp_path, fmt, kwargs):
    psutil = pytest.importorskip("psutil")
    frames = _frames()
    path = tmp_path / f"frames.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], **kwargs)
    img = decode_image(path)
    assert str(path) not in [f.path for f in psutil.Process().open_files()]
    assert_close(img.getpixel((4, 3)), RED, tol=2)  # the pixels outlive the file


@pytest.mark.parametrize("case", ["16-bit grey PNG", "float TIFF", "32-bit int TIFF, 0..255"])
def test_conversions_make_no_full_size_numpy_arrays(case):
    # 8 M pixels: one float64 copy of the image alone would take 64 MiB (before: at least two).
    data = WORST[case][1]((4000, 2000))
    assert _traced_peak(data) < 24 * 2**20


def _traced_peak(data: bytes) -> int:
    """The peak of Python-level allocations (numpy arrays, bytes) while decoding ``data``."""
    tracemalloc.start()
    try:
        decode_image(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Decodes, in a fresh interpreter, the file given as argv[1] and prints how much its peak RSS grew.
_RSS_CHILD = """
import sys
from pathlib import Path
from models.preprocess import ImageLoader
from models.spec import Preprocess

def kib(field):
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith(field + ":")).split()[1])

data = Path(sys.argv[1]).read_bytes()
loader = ImageLoader(Preprocess())
Path("/proc/self/clear_refs").write_text("5")  # the peak restarts here: imports do not count
before = kib("VmRSS")
loader(data)
print((kib("VmHWM") - before) * 1024)
"""


@pytest.mark.slow
def test_worst_16bit_image_peak_memory(tmp_path):
    """The largest 16-bit grey PNG the default limit allows (40 M pixels, small on disk): the process
    that decodes and preprocesses it grows by less than 8 bytes a pixel, less than one float64 copy
    of the image (before: about 20 bytes a pixel)."""
    size = (6324, 6325)  # at the 40 M-pixel limit
    data = WORST["16-bit grey PNG"][1](size)
    assert len(data) < 2 * 2**20
    path = tmp_path / "worst.png"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], capture_output=True, text=True, check=True)
    growth = int(done.stdout.strip())
    assert growth < 8 * size[0] * size[1], f"grew {growth / 2**20:.0f} MiB"
