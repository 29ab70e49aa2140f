"""decode_image on what real uploads contain. Every image is made here with Pillow/NumPy."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import ImageError
from models.imaging import ALLOWED_FORMATS, DRAFT_MARGIN, decode_image
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
