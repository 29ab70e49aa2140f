"""Full fine-tune: every layer trains, starting from a registered version's PyTorch weights.

Recipe: AdamW with a linear warmup then a cosine decay (per step); the new head learns at ``lr``,
the pretrained body at ``lr * backbone_lr_scale``; weight decay on weight matrices and kernels
only; class-weighted cross-entropy with label smoothing; an optional first phase with the body
frozen (its BatchNorm layers in eval mode, so their running statistics stay the pretrained ones);
mixed precision on CUDA (bfloat16 where supported, else float16 with a grad scaler); early stopping
on the validation loss, keeping the best epoch's weights. One checkpoint per epoch; a resumed run
continues exactly where the checkpoint left off (same optimizer state, schedule, freeze state, and
the same random crops, which are seeded per epoch and process). Under torchrun each process trains
on its shard of every epoch (DistributedDataParallel) and validation is split across processes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.imaging import decode_image
from models.networks import Backbone
from models.runtime import available_cores
from models.spec import Preprocess

from . import checkpoint as ckpt
from .augment import eval_tensor_transform, train_transform
from .data import Sample
from .distributed import DistContext, all_reduce_sum, barrier, gather_rows, sync_buffers
from .errors import TrainingError

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_DECAY = 0.05


@dataclass(frozen=True)
class FullOptions:
    epochs: int
    lr: float
    backbone_lr_scale: float
    weight_decay: float
    warmup_epochs: float
    freeze_epochs: int
    patience: int
    label_smoothing: float
    batch_size: int
    seed: int
    amp: bool
    workers: int | None
    stop_after_epochs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("workers", "stop_after_epochs")}


@dataclass
class FullResult:
    """``net`` holds the best epoch's weights (CPU, eval mode); ``val_logits`` are its outputs on the
    validation samples, in their order. ``interrupted``: stopped by ``stop_after_epochs``."""

    net: Backbone
    val_logits: np.ndarray
    state: ckpt.TrainState
    stopped_early: bool
    interrupted: bool
    resumed_from_epoch: int
    device: str
    amp_dtype: str | None
    world_size: int
    details: dict[str, Any] = field(default_factory=dict)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(
        self, samples: Sequence[Sample], targets: np.ndarray, transform: Callable[[Any], torch.Tensor], decode: Any
    ) -> None:
        self.paths = [s.path for s in samples]
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.decode(self.paths[i])), self.targets[i]


def _param_groups(net: Backbone, opts: FullOptions) -> list[dict[str, Any]]:
    """Four groups, always in this order (a checkpoint's optimizer state maps onto them):
    body with and without decay, head with and without decay."""
    groups = []
    for part, module, lr in (("body", net.body, opts.lr * opts.backbone_lr_scale), ("head", net.head, opts.lr)):
        decay = [p for p in module.parameters() if p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.ndim <= 1]
        groups.append({"name": f"{part}", "params": decay, "lr": lr, "weight_decay": opts.weight_decay})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _set_frozen(net: Backbone, frozen: bool) -> None:
    for p in net.body.parameters():
        p.requires_grad_(not frozen)


def _train_mode(net: Backbone, frozen: bool) -> None:
    net.train()
    if frozen:
        net.body.eval()  # BatchNorm keeps the pretrained running statistics; dropout is off


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # every epoch draws from its own stream: a resumed run repeats an uninterrupted one
    torch.manual_seed((seed * 1_000_003 + epoch * 7919 + rank) % (2**63))


def _identity(opts: FullOptions, base: dict[str, Any], world_size: int) -> dict[str, Any]:
    return {**base, **opts.to_dict(), "world_size": world_size}


def _autocast(device: torch.device, amp: bool) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype on CUDA (None: full precision) and whether a grad scaler is needed."""
    if device.type != "cuda" or not amp:
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def evaluate(
    net: Backbone,
    samples: Sequence[Sample],
    targets: np.ndarray,
    pre: Preprocess,
    decode: Any,
    ctx: DistContext,
    *,
    batch_size: int,
    workers: int,
    amp_dtype: torch.dtype | None,
) -> np.ndarray:
    """Logits of ``samples`` (eval transform, no augmentation), in their order; each process
    computes every ``world_size``-th sample and the rows are gathered on every process."""
    mine = list(range(ctx.rank, len(samples), ctx.world_size))
    ds = ImageDataset([samples[i] for i in mine], targets[mine], eval_tensor_transform(pre), decode)
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


def train_full(
    net: Backbone,
    *,
    pre: Preprocess,
    train: Sequence[Sample],
    train_targets: np.ndarray,
    val: Sequence[Sample],
    val_targets: np.ndarray,
    class_weights: Sequence[float],
    opts: FullOptions,
    ctx: DistContext,
    run_dir: Path,
    identity: dict[str, Any],
    resume: bool,
    max_pixels: int,
    draft: bool,
    progress: bool = False,
) -> FullResult:
    """Train ``net`` (body pretrained, head new or kept) and return the best epoch's weights.

    ``identity`` (backbone, labels, data fingerprints) is stored with each checkpoint; ``resume``
    refuses a checkpoint whose identity or options differ, naming the differences.
    """
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    device = ctx.device
    amp_dtype, use_scaler = _autocast(device, opts.amp)
    decode = partial(decode_image, max_pixels=max_pixels, draft_short_side=pre.resize if draft else None)
    cores = available_cores()
    workers = opts.workers if opts.workers is not None else min(4, max(0, cores // ctx.world_size - 1))
    if ctx.world_size > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, cores // ctx.world_size))
    full_identity = _identity(opts, identity, ctx.world_size)

    train_ds = ImageDataset(train, train_targets, train_transform(pre), decode)
    sampler: DistributedSampler[tuple[torch.Tensor, int]] = DistributedSampler(
        train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=opts.seed, drop_last=False
    )
    shard = math.ceil(len(train_ds) / ctx.world_size)
    # a last batch of one image would give BatchNorm a batch statistic of one sample
    drop_last = shard % opts.batch_size == 1 and shard > opts.batch_size
    loader = DataLoader(
        train_ds,
        batch_size=opts.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    total = steps_per_epoch * opts.epochs
    warmup = min(round(opts.warmup_epochs * steps_per_epoch), total // 2)

    net.to(device)
    optimizer = torch.optim.AdamW(_param_groups(net, opts))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total))
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    weights = torch.tensor(list(class_weights), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=opts.label_smoothing)
    val_criterion = nn.CrossEntropyLoss(weight=weights.cpu())

    state = ckpt.TrainState()
    best_state = copy.deepcopy(net.state_dict())
    resumed_from = 0
    found = ckpt.latest_checkpoint(run_dir)
    if resume:
        if found is None:
            raise TrainingError(f"no checkpoint to resume in {run_dir}; run again without --resume to start over")
        saved = ckpt.load_checkpoint(found)
        diff = sorted(
            k for k in set(saved.identity) | set(full_identity) if saved.identity.get(k) != full_identity.get(k)
        )
        if diff:
            shown = "; ".join(f"{k}: {saved.identity.get(k)!r} -> {full_identity.get(k)!r}" for k in diff[:4])
            raise TrainingError(
                f"the checkpoint in {run_dir} belongs to a different run ({shown}); resume with the same data "
                "and options, or run without --resume to start over"
            )
        net.load_state_dict(saved.model_state)
        best_state = {k: v.to(device) for k, v in saved.best_state.items()}
        _set_frozen(net, saved.frozen)
        optimizer.load_state_dict(saved.optimizer_state)
        scheduler.load_state_dict(saved.scheduler_state)
        if saved.scaler_state:
            scaler.load_state_dict(saved.scaler_state)
        state = saved.train_state
        resumed_from = state.epoch
        log.info("resuming %s after epoch %d of %d", run_dir, state.epoch, opts.epochs)
    elif found is not None and ctx.is_main:
        log.warning("starting over: the checkpoint in %s is replaced (pass --resume to continue it)", run_dir)
        ckpt.clear(run_dir)
    barrier(ctx)

    stopped_early = interrupted = False
    ddp: nn.Module | None = None
    ddp_frozen: bool | None = None
    epoch_bar = tqdm(
        total=opts.epochs, initial=state.epoch, desc="epochs", unit="ep", disable=not (progress and ctx.is_main)
    )
    while state.epoch < opts.epochs:
        epoch = state.epoch
        frozen = epoch < opts.freeze_epochs
        _set_frozen(net, frozen)
        if ddp is None or ddp_frozen != frozen:
            # DDP records which parameters need gradients when it is built: rebuild at a phase change
            ddp = (
                DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
                if ctx.distributed
                else net
            )
            ddp_frozen = frozen
        _seed_epoch(opts.seed, epoch, ctx.rank)
        sampler.set_epoch(epoch)
        _train_mode(net, frozen)
        t0 = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not (progress and ctx.is_main)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, _ = ddp(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state.step += 1
            loss_sum += torch.tensor([float(loss.detach()) * len(y), len(y)], dtype=torch.float64)
        totals = all_reduce_sum(ctx, loss_sum)
        sync_buffers(ctx, net)
        val_logits = evaluate(
            net, val, val_targets, pre, decode, ctx, batch_size=opts.batch_size, workers=workers, amp_dtype=amp_dtype
        )
        val_loss = float(val_criterion(torch.from_numpy(val_logits), torch.from_numpy(val_targets)))
        val_acc = float((val_logits.argmax(1) == val_targets).mean())
        state.epoch += 1
        improved = val_loss < state.best_loss - 1e-6
        if improved:
            state.best_loss, state.best_epoch, state.epochs_without_improvement = val_loss, state.epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            state.epochs_without_improvement += 1
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
        state.history.append(
            {
                "epoch": state.epoch,
                "frozen": frozen,
                "train_loss": float(totals[0]) / max(float(totals[1]), 1.0),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr_head": groups["head"],
                "lr_backbone": groups["body"],
                "seconds": time.perf_counter() - t0,
            }
        )
        state.seconds += time.perf_counter() - t0
        epoch_bar.update(1)
        epoch_bar.set_postfix(val_acc=f"{val_acc:.3f}", val_loss=f"{val_loss:.3f}")
        log.info(
            "epoch %d/%d%s: train loss %.4f, val loss %.4f, val accuracy %.4f",
            state.epoch,
            opts.epochs,
            " (backbone frozen)" if frozen else "",
            state.history[-1]["train_loss"],
            val_loss,
            val_acc,
        )
        if ctx.is_main:
            ckpt.save_checkpoint(
                run_dir,
                identity=full_identity,
                model_state=net.state_dict(),
                best_state=best_state,
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                scaler_state=scaler.state_dict() if use_scaler else None,
                train_state=state,
                frozen=frozen,
            )
        barrier(ctx)
        if state.epochs_without_improvement >= opts.patience and state.epoch < opts.epochs:
            log.info("early stop after epoch %d: no better val loss for %d epochs", state.epoch, opts.patience)
            stopped_early = True
            break
        if opts.stop_after_epochs is not None and state.epoch >= opts.stop_after_epochs and state.epoch < opts.epochs:
            log.warning("stopping after epoch %d as asked; resume with --resume", state.epoch)
            interrupted = True
            break
    epoch_bar.close()

    net.load_state_dict(best_state)
    if interrupted:
        final_logits = np.zeros((0, net.num_classes), np.float32)
    else:
        final_logits = evaluate(
            net, val, val_targets, pre, decode, ctx, batch_size=opts.batch_size, workers=workers, amp_dtype=amp_dtype
        )
    net.to("cpu").eval()
    _set_frozen(net, False)
    return FullResult(
        net=net,
        val_logits=final_logits,
        state=state,
        stopped_early=stopped_early,
        interrupted=interrupted,
        resumed_from_epoch=resumed_from,
        device=str(device),
        amp_dtype=str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        world_size=ctx.world_size,
        details={"steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "workers": workers},
    )
