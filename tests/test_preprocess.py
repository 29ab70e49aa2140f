"""The eval transform against torchvision's PIL pipeline, and the Preprocess spec it is built from."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.catalog import get_entry
from models.errors import ImageError
from models.preprocess import ImageLoader, eval_transform, resized_size
from models.samples import synthetic_image
from models.spec import IMAGENET_MEAN, IMAGENET_STD, Preprocess

RESNET = Preprocess(resize=256, crop=224, interpolation="bilinear")
RESNET50_V2 = Preprocess(resize=232, crop=224, interpolation="bilinear")
BICUBIC = Preprocess(resize=256, crop=224, interpolation="bicubic")
LITE0 = Preprocess.from_crop_pct(224, 0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
TINY = Preprocess(resize=72, crop=64)
NEAREST = Preprocess(resize=160, crop=128, interpolation="nearest")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- resized_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, short, expected",
    [
        ((640, 480), 256, (341, 256)),  # landscape: the long side is truncated, not rounded
        ((480, 640), 256, (256, 341)),
        ((500, 500), 256, (256, 256)),
        ((100, 50), 72, (144, 72)),  # upscaling
        ((1000, 3), 232, (77333, 232)),
        ((333, 500), 232, (232, 348)),
    ],
)
def test_resized_size(size, short, expected):
    assert resized_size(*size, short) == expected


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (500, 500), (641, 479), (37, 1001), (999, 998)])
@pytest.mark.parametrize("short", [72, 232, 256])
def test_resized_size_matches_torchvision(size, short, tv):
    from torchvision.transforms.functional import _compute_resized_output_size

    w, h = size
    new_h, new_w = _compute_resized_output_size((h, w), [short])
    assert resized_size(w, h, short) == (new_w, new_h)


# --- the transform ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [(640, 480), (480, 640), (300, 300), (224, 224), (256, 256), (100, 60), (60, 100), (1, 1), (7, 500)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
@pytest.mark.parametrize("pre", [RESNET, LITE0, TINY], ids=["resnet", "lite0", "tiny"])
def test_output_shape_and_dtype(size, pre):
    out = eval_transform(pre)(Image.new("RGB", size, (30, 140, 250)))
    assert out.shape == (3, pre.crop, pre.crop)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.fixture(scope="module")
def tv():
    return pytest.importorskip("torchvision.transforms")


@pytest.fixture(scope="module")
def samples() -> list[Image.Image]:
    # the synthetic set's sizes: landscape, portrait, square, at or below 256 on the shorter side
    return [synthetic_image(i) for i in range(8)]


def _torchvision_pipeline(tv, pre: Preprocess):
    interpolation = {
        "bilinear": tv.InterpolationMode.BILINEAR,
        "bicubic": tv.InterpolationMode.BICUBIC,
        "nearest": tv.InterpolationMode.NEAREST,
    }[pre.interpolation]
    return tv.Compose(
        [
            tv.Resize(pre.resize, interpolation=interpolation),
            tv.CenterCrop(pre.crop),
            tv.ToTensor(),
            tv.Normalize(pre.mean, pre.std),
        ]
    )


@pytest.mark.parametrize(
    "pre",
    [RESNET, RESNET50_V2, BICUBIC, LITE0, TINY, NEAREST],
    ids=["bilinear-256", "bilinear-232", "bicubic-256", "lite0", "tiny", "nearest"],
)
def test_matches_torchvision(pre, tv, samples):
    ours, theirs = eval_transform(pre), _torchvision_pipeline(tv, pre)
    for i, img in enumerate(samples):
        expected = theirs(img).numpy()
        got = ours(img)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"image {i} {img.size}")


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (224, 224), (225, 223), (231, 1000)], ids=str)
def test_matches_torchvision_odd_and_small_sizes(size, tv):
    for pre in (RESNET50_V2, LITE0):
        img = synthetic_image(5, size=size)
        expected = _torchvision_pipeline(tv, pre)(img).numpy()
        np.testing.assert_allclose(eval_transform(pre)(img), expected, rtol=0, atol=1e-5)


def test_catalog_lite0_preprocess():
    # what test_matches_torchvision checks as LITE0 is what the catalog ships
    assert get_entry("efficientnet_lite0").preprocess == LITE0
    assert LITE0.resize == 256 and LITE0.crop == 224


@pytest.mark.parametrize("pre", [RESNET, LITE0], ids=["imagenet", "lite0"])
@pytest.mark.parametrize("value", [0, 255, 128])
def test_normalisation_of_flat_images(pre, value):
    out = eval_transform(pre)(Image.new("RGB", (300, 260), (value,) * 3))
    for c in range(3):
        expected = (value / 255.0 - pre.mean[c]) / pre.std[c]
        np.testing.assert_allclose(out[c], expected, rtol=0, atol=1e-5)


def test_white_maps_to_one_minus_mean_over_std():
    out = eval_transform(RESNET)(Image.new("RGB", (256, 256), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], [2.2489, 2.4286, 2.6400], atol=1e-4)


def test_channels_stay_in_rgb_order():
    out = eval_transform(LITE0)(Image.new("RGB", (256, 256), (255, 0, 0)))
    np.testing.assert_allclose(out[:, 100, 100], [1.0, -1.0, -1.0], atol=1e-6)


def test_center_crop_takes_the_middle():
    # A 256x356 portrait with a distinct 224x224 middle: only the middle must survive the crop.
    a = np.zeros((356, 256, 3), np.uint8)
    a[66:290, 16:240] = 255
    out = eval_transform(LITE0)(Image.fromarray(a, "RGB"))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_image_already_at_resize_is_not_resampled():
    a = np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    out = eval_transform(LITE0)(Image.fromarray(a, "RGB"))
    # no resize: the crop is the exact pixels, rows 16..240 and columns 38..262
    np.testing.assert_allclose(out, a[16:240, 38:262].transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-5)


def test_interpolation_matters():
    img = synthetic_image(4)  # 640x427: resized, so the filter shows
    bilinear = eval_transform(RESNET)(img)
    bicubic = eval_transform(BICUBIC)(img)
    assert np.abs(bilinear - bicubic).max() > 0.01


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "1", "I;16", "F"])
def test_transform_refuses_non_rgb(mode):
    with pytest.raises(ValueError, match=rf"RGB image.*mode {mode}.*decode_image"):
        eval_transform(RESNET)(Image.new(mode, (300, 300)))


# --- Preprocess -------------------------------------------------------------------------------


def test_preprocess_defaults():
    pre = Preprocess()
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resize": 200, "crop": 224},
        {"resize": 256, "crop": 0},
        {"resize": 256, "crop": -224},
        {"std": (0.229, 0.0, 0.225)},
        {"std": (0.229, 0.224, -0.225)},
        {"mean": (0.5, 0.5)},
        {"std": (0.5, 0.5, 0.5, 0.5)},
    ],
)
def test_preprocess_rejects(kwargs):
    with pytest.raises(ValueError, match="preprocess needs"):
        Preprocess(**kwargs)


def test_preprocess_crop_equal_to_resize_is_allowed():
    pre = Preprocess(resize=224, crop=224)
    out = eval_transform(pre)(synthetic_image(0))
    assert out.shape == (3, 224, 224)


@pytest.mark.parametrize(
    "crop, pct, resize",
    [(224, 0.875, 256), (224, 0.95, 235), (224, 0.9, 248), (288, 1.0, 288), (224, 0.965, 232), (64, 0.875, 73)],
)
def test_from_crop_pct(crop, pct, resize):
    pre = Preprocess.from_crop_pct(crop, pct)
    assert (pre.resize, pre.crop) == (resize, crop)


def test_from_crop_pct_passes_the_rest_through():
    pre = Preprocess.from_crop_pct(224, 0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert pre == Preprocess(resize=256, crop=224, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def test_preprocess_is_frozen_and_round_trips():
    pre = LITE0
    with pytest.raises(AttributeError):
        pre.crop = 100  # type: ignore[misc]
    assert Preprocess(**pre.to_dict()) == pre


# --- ImageLoader ------------------------------------------------------------------------------


def test_loader_decodes_and_transforms():
    img = synthetic_image(1)
    loader = ImageLoader(RESNET)
    np.testing.assert_allclose(loader(png(img)), eval_transform(RESNET)(img), atol=1e-6)


def test_loader_converts_before_transforming():
    # a fully transparent RGBA upload: composited on white by decode, then transformed
    rgba = Image.new("RGBA", (300, 256), (0, 0, 0, 0))
    out = ImageLoader(LITE0)(png(rgba))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_loader_batch_stacks():
    sources = [png(synthetic_image(i)) for i in range(3)] + [png(Image.new("L", (50, 90), 128))]
    batch = ImageLoader(TINY).batch(sources)
    assert batch.shape == (4, 3, 64, 64)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch[1], ImageLoader(TINY)(sources[1]), atol=0)
    assert not np.allclose(batch[0], batch[1])


def test_loader_batch_propagates_image_errors():
    with pytest.raises(ImageError) as e:
        ImageLoader(TINY).batch([png(synthetic_image(0)), b""])
    assert e.value.kind == "empty"


def test_loader_settings():
    assert ImageLoader(RESNET50_V2, draft=True).draft_short_side == 232
    assert ImageLoader(RESNET50_V2).draft_short_side is None  # off by default
    assert ImageLoader(RESNET50_V2, draft=False).draft_short_side is None
    loader = ImageLoader(TINY, max_pixels=100)
    with pytest.raises(ImageError) as e:
        loader(png(Image.new("RGB", (11, 10))))
    assert e.value.kind == "too_large"


def test_loader_applies_the_byte_budget():
    # 10x9 pixels fit a 100-pixel limit; as RGBA (4 bytes each) they exceed its 300-byte budget.
    loader = ImageLoader(TINY, max_pixels=100)
    assert loader(png(Image.new("RGB", (10, 9)))).shape == (3, 64, 64)
    with pytest.raises(ImageError) as e:
        loader(png(Image.new("RGBA", (10, 9))))
    assert e.value.kind == "too_large"
    assert "300 bytes" in str(e.value)


def test_loader_output_of_a_16bit_image_equals_its_8bit_twin():
    # 16-bit values v * 257 scale back to v exactly: the tensor is the 8-bit image's tensor.
    a = np.random.default_rng(3).integers(0, 256, (300, 400), dtype=np.uint16)
    sixteen = Image.fromarray(a * 257)
    assert sixteen.mode == "I;16"
    eight = Image.fromarray(a.astype(np.uint8))
    np.testing.assert_array_equal(ImageLoader(RESNET)(png(sixteen)), ImageLoader(RESNET)(png(eight)))
