"""Training-time augmentation, kept apart from the one eval transform (:func:`models.eval_transform`).

``train_transform`` ends with the spec's own normalization, so the network sees training images on
the same scale as the images it will be served; only the geometry and the colours vary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from models.preprocess import eval_transform
from models.spec import Preprocess

# Milder than ImageNet training (scale down to 0.08): fine-tuning sets are small and their objects
# often fill the frame; cropping away 3/4 of the image removes the object too often.
CROP_SCALE = (0.25, 1.0)
JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}

TensorTransform = Callable[[Image.Image], torch.Tensor]


def train_transform(pre: Preprocess) -> TensorTransform:
    """RGB ``PIL.Image`` -> float tensor (3, crop, crop): RandomResizedCrop at the spec's crop and
    interpolation, horizontal flip, mild colour jitter, then the spec's mean/std. Uses torch's
    global RNG (seeded per epoch by the trainer, so that a resumed run draws the same crops)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T  # noqa: N812

    interpolation = InterpolationMode(pre.interpolation)  # the spec's names are torchvision's modes
    pipeline = T.Compose(
        [
            T.PILToTensor(),
            T.RandomResizedCrop(pre.crop, scale=CROP_SCALE, interpolation=interpolation, antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(**JITTER),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )
    return pipeline  # type: ignore[no-any-return]


def eval_tensor_transform(pre: Preprocess) -> TensorTransform:
    """The eval transform every other part of the project uses, as a tensor for PyTorch."""
    transform = eval_transform(pre)

    def apply(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(transform(img)))

    return apply
