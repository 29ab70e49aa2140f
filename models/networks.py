"""PyTorch modules as every backbone is exported: one input, two outputs ``(logits, features)``.

Each network is split at its own boundary between features and head (timm's
``reset_classifier`` / torchvision's last ``Linear``), so that fine-tuning swaps ``head`` and the
ONNX graph exposes the pooled pre-logits vector as ``features``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .errors import BackbonesError
from .spec import Architecture


class Backbone(nn.Module):
    """``body`` maps images to pooled features, ``head`` (a ``Linear``) maps features to logits."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    @property
    def feature_dim(self) -> int:
        return int(self.head.in_features)

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features

    def replace_head(self, num_classes: int) -> None:
        """A fresh ``Linear`` for ``num_classes`` on the same features (fine-tuning)."""
        self.head = nn.Linear(self.feature_dim, num_classes)


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise BackbonesError(f"{type(module).__name__} has no Linear classifier to split at")
    return found[-1]


def _set_submodule(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, value)


def split_torchvision(model: nn.Module) -> Backbone:
    """Split a torchvision classifier at its last ``Linear`` (``fc`` or ``classifier[-1]``)."""
    name, linear = _last_linear(model)
    _set_submodule(model, name, nn.Identity())
    return Backbone(model, linear)


def split_timm(model: nn.Module) -> Backbone:
    """Split a timm model: its classifier becomes the head, ``reset_classifier(0)`` leaves the
    pooled pre-logits features (what ``forward_head(pre_logits=True)`` returns)."""
    classifier = model.get_classifier()  # type: ignore[operator]
    if not isinstance(classifier, nn.Linear):
        raise BackbonesError(
            f"timm model {type(model).__name__} has a {type(classifier).__name__} classifier; "
            "only models with a Linear classifier can be exported"
        )
    head = copy.deepcopy(classifier)
    model.reset_classifier(0)  # type: ignore[operator]
    return Backbone(model, head)


class TinyCNN(nn.Module):
    """A few-layer CNN for tests and demos: the whole export -> serve -> fine-tune path in seconds."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_architecture(arch: Architecture) -> Backbone:
    """An uninitialised :class:`Backbone` of ``arch`` (weights come from a stored version)."""
    if arch.family == "timm":
        import timm

        return split_timm(timm.create_model(arch.name, pretrained=False, num_classes=arch.num_classes))
    if arch.family == "torchvision":
        import torchvision

        return split_torchvision(torchvision.models.get_model(arch.name, weights=None, num_classes=arch.num_classes))
    if arch.family == "builtin" and arch.name == "tiny_cnn":
        return split_torchvision(TinyCNN(num_classes=arch.num_classes))
    raise BackbonesError(f"unknown architecture {arch.family}/{arch.name}")


def load_weights(net: Backbone, path: Path) -> Backbone:
    """Load a version's ``weights.safetensors`` (never pickle) into ``net``; shapes must match."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackbonesError(
            f"{path} does not fit the architecture: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return net


def save_weights(net: Backbone, path: Path) -> None:
    from safetensors.torch import save_file

    # contiguous clones: safetensors refuses shared or strided storage
    save_file({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}, str(path))
