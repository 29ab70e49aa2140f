"""Labelled images as PyTorch batches for the full fine-tune: the training loader (augmented, one
shard per process) and the evaluation pass (the eval transform, its rows gathered across processes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.networks import Backbone
from models.preprocess import ImageLoader
from models.runtime import available_cores

from .augment import eval_tensor_transform, train_transform
from .data import Sample, image_source
from .distributed import DistContext, gather_rows

Decode = Callable[[Path | bytes], Image.Image]


def decode_workers(workers: int | None, world_size: int) -> int:
    """``workers`` when given, else a few per process, leaving a core to each process's own compute."""
    return workers if workers is not None else min(4, max(0, available_cores() // world_size - 1))


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(
        self, samples: Sequence[Sample], targets: np.ndarray, transform: Callable[[Any], torch.Tensor], decode: Decode
    ) -> None:
        self.paths = [s.path for s in samples]
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # an object is read here, in the loader's worker
        return self.transform(self.decode(image_source(self.paths[i]))), self.targets[i]


def training_batches(
    samples: Sequence[Sample],
    targets: np.ndarray,
    images: ImageLoader,
    ctx: DistContext,
    *,
    batch_size: int,
    seed: int,
    workers: int,
) -> tuple[DataLoader[tuple[torch.Tensor, int]], DistributedSampler[tuple[torch.Tensor, int]]]:
    """The augmented training loader of this process's shard, and its sampler (whose
    ``set_epoch`` reshuffles the shards each epoch)."""
    dataset = ImageDataset(samples, targets, train_transform(images.preprocess), images.decode)
    sampler: DistributedSampler[tuple[torch.Tensor, int]] = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=False
    )
    shard = math.ceil(len(dataset) / ctx.world_size)
    # a last batch of one image would give BatchNorm a batch statistic of one sample
    drop_last = shard % batch_size == 1 and shard > batch_size
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=ctx.device.type == "cuda",
    )
    return loader, sampler


def evaluate(
    net: Backbone,
    samples: Sequence[Sample],
    images: ImageLoader,
    ctx: DistContext,
    *,
    batch_size: int,
    workers: int,
    amp_dtype: torch.dtype | None,
) -> np.ndarray:
    """Logits of ``samples`` (eval transform, no augmentation), in their order; each process
    computes every ``world_size``-th sample and the rows are gathered on every process."""
    mine = [samples[i] for i in range(ctx.rank, len(samples), ctx.world_size)]
    unlabelled = np.zeros(len(mine), dtype=np.int64)  # the labels play no part here
    ds = ImageDataset(mine, unlabelled, eval_tensor_transform(images.preprocess), images.decode)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    net.eval()
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for x, _ in loader:
            x = x.to(ctx.device, non_blocking=True)
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, _ = net(x)
            out.append(logits.float().cpu())
    mine_logits = torch.cat(out) if out else torch.zeros((0, net.num_classes))
    per_rank = math.ceil(len(samples) / ctx.world_size)
    gathered = gather_rows(ctx, mine_logits, per_rank)
    order = [i for r in range(ctx.world_size) for i in range(r, len(samples), ctx.world_size)]
    result = np.zeros((len(samples), net.num_classes), dtype=np.float32)
    result[order] = gathered.numpy()
    return result
