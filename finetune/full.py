"""Full fine-tune: every layer trains, starting from a registered version's PyTorch weights.

Recipe (:mod:`finetune.optim`): AdamW with a linear warmup then a cosine decay (per step), the new
head faster than the pretrained body, class-weighted cross-entropy with label smoothing, an
optional first phase with the body frozen (its BatchNorm layers in eval mode, so their running
statistics stay the pretrained ones), mixed precision on CUDA (bfloat16 where supported, else
float16 with a grad scaler). The epoch is chosen on a seeded, stratified share of the training
split held out of training (``selection_fraction``): early stopping on its loss keeps the best
epoch's weights, and the validation split is measured once, at the end, by those weights, so that
the report and the promotion gate judge on images that chose nothing.
One checkpoint per epoch; a resumed run continues exactly where the checkpoint left off (same
optimizer state, schedule, freeze state, and the same random crops, which are seeded per epoch and
process). Under torchrun each process trains on its shard of every epoch (DistributedDataParallel)
and validation is split across processes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.networks import Backbone
from models.preprocess import ImageLoader
from models.runtime import available_cores

from . import checkpoint as ckpt
from .config import FinetuneConfig
from .data import Sample, fingerprint
from .distributed import DistContext, all_reduce_sum, barrier, sync_buffers
from .errors import TrainingError
from .images import decode_workers, evaluate, training_batches
from .optim import Optimization, seed_epoch, set_frozen, train_mode
from .split import Split, stratified_split

log = logging.getLogger(__name__)

# The options that decide what a full fine-tune computes from its data: the report lists them, and
# every checkpoint records them so that a resume with any of them changed is refused.
RECIPE_OPTIONS = (
    "epochs",
    "lr",
    "backbone_lr_scale",
    "weight_decay",
    "warmup_epochs",
    "freeze_epochs",
    "patience",
    "label_smoothing",
    "selection_fraction",
    "batch_size",
    "seed",
    "amp",
)


def recipe_options(config: FinetuneConfig) -> dict[str, Any]:
    """:data:`RECIPE_OPTIONS` of ``config``, with the weight decay the full fine-tune uses."""
    return {k: config.full_weight_decay if k == "weight_decay" else getattr(config, k) for k in RECIPE_OPTIONS}


def selection_split(split: Split, config: FinetuneConfig) -> Split:
    """``split.train`` divided into the images trained on (``train``) and those that choose the
    epoch (``val``): ``selection_fraction`` of each class, seeded by ``seed``."""
    counts = split.counts(split.train)
    few = [label for label, n in counts.items() if n < 2]
    if few:
        raise TrainingError(
            f"class {', '.join(repr(c) for c in few)} has fewer than 2 training images; the full fine-tune holds "
            "out some of each class's training images to choose its epoch (add images, or use --mode linear)"
        )
    train, select = stratified_split(split.train, split.labels, config.selection_fraction, config.seed)
    return Split(split.labels, train, select, split.seed, config.selection_fraction)


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


class FullTrainer:
    """One full fine-tune of ``net`` (body pretrained, head new or kept) on ``split``, in steps:
    :meth:`restore` (resume, or start over), :meth:`run_epoch` until :attr:`done`, then
    :meth:`result`; :meth:`train` runs exactly that. ``images`` decodes with the parent's
    preprocessing and the project's decode settings.

    ``identity`` (backbone, labels, data fingerprints) is stored with each checkpoint, with the
    recipe options and the world size; a resume refuses a checkpoint whose identity differs.
    """

    def __init__(
        self,
        net: Backbone,
        config: FinetuneConfig,
        split: Split,
        images: ImageLoader,
        ctx: DistContext,
        *,
        run_dir: Path,
        identity: dict[str, Any],
    ) -> None:
        self.net, self.config, self.ctx, self.run_dir = net, config, ctx, run_dir
        self.images = images
        self.identity = {**identity, **recipe_options(config), "world_size": ctx.world_size}
        self.workers = decode_workers(config.workers, ctx.world_size)
        if ctx.world_size > 1 and ctx.device.type == "cpu":
            torch.set_num_threads(max(1, available_cores() // ctx.world_size))
        self.val = split.val
        fit = selection_split(split, config)
        self.select, self.select_targets = fit.val, fit.targets(fit.val)
        self.batches, self.sampler = training_batches(
            fit.train,
            fit.targets(fit.train),
            images,
            ctx,
            batch_size=config.batch_size,
            seed=config.seed,
            workers=self.workers,
        )
        net.to(ctx.device)
        self.opt = Optimization.build(
            net, config, fit.class_weights(), device=ctx.device, steps_per_epoch=len(self.batches)
        )
        self.state = ckpt.TrainState()
        self.best_state = copy.deepcopy(net.state_dict())
        self.resumed_from = 0
        self.stopped_early = self.interrupted = False
        self._parallel: nn.Module | None = None
        self._parallel_frozen: bool | None = None

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.config.epochs or self.stopped_early or self.interrupted

    def train(self, progress: bool = False) -> FullResult:
        """The whole run: restore, epochs until done, the best epoch's weights."""
        self.restore()
        show = progress and self.ctx.is_main
        with tqdm(
            total=self.config.epochs, initial=self.state.epoch, desc="epochs", unit="ep", disable=not show
        ) as bar:
            while not self.done:
                row = self.run_epoch(progress)
                bar.update(1)
                bar.set_postfix(sel_acc=f"{row['selection_accuracy']:.3f}", sel_loss=f"{row['selection_loss']:.3f}")
        return self.result()

    def restore(self) -> None:
        """Continue the run folder's checkpoint (``config.resume``), or clear it and start over."""
        found = ckpt.latest_checkpoint(self.run_dir)
        if self.config.resume:
            if found is None:
                raise TrainingError(
                    f"no checkpoint to resume in {self.run_dir}; run again without --resume to start over"
                )
            self._resume(ckpt.load_checkpoint(found))
        elif found is not None and self.ctx.is_main:
            log.warning("starting over: the checkpoint in %s is replaced (pass --resume to continue it)", self.run_dir)
            ckpt.clear(self.run_dir)
        barrier(self.ctx)

    def _resume(self, saved: ckpt.Checkpoint) -> None:
        saved.check_identity(self.identity, self.run_dir)
        self.net.load_state_dict(saved.model_state)
        self.best_state = {k: v.to(self.ctx.device) for k, v in saved.best_state.items()}
        set_frozen(self.net, saved.frozen)
        self.opt.load(saved.optimizer_state, saved.scheduler_state, saved.scaler_state)
        self.state = saved.train_state
        self.resumed_from = self.state.epoch
        log.info("resuming %s after epoch %d of %d", self.run_dir, self.state.epoch, self.config.epochs)

    def run_epoch(self, progress: bool = False) -> dict[str, Any]:
        """Train one epoch, score it on the selection images, keep the best weights, write the
        checkpoint and decide whether to stop; returns the epoch's row of the history."""
        epoch = self.state.epoch
        frozen = epoch < self.config.freeze_epochs
        t0 = time.perf_counter()
        train_loss = self._train(epoch, frozen, progress)
        loss, accuracy = self._score()
        self.state.epoch += 1
        row = self._record(frozen, train_loss, loss, accuracy, time.perf_counter() - t0)
        self._save(frozen)
        self._decide_stop()
        return row

    def _model(self, frozen: bool) -> nn.Module:
        """The network to train this epoch: wrapped in DDP under torchrun."""
        if self._parallel is None or self._parallel_frozen != frozen:
            # DDP records which parameters need gradients when it is built: rebuild at a phase change
            device = self.ctx.device
            self._parallel = (
                DistributedDataParallel(self.net, device_ids=[device] if device.type == "cuda" else None)
                if self.ctx.distributed
                else self.net
            )
            self._parallel_frozen = frozen
        return self._parallel

    def _train(self, epoch: int, frozen: bool, progress: bool) -> float:
        """One pass over this process's shard; returns the mean training loss over all processes."""
        set_frozen(self.net, frozen)
        model = self._model(frozen)
        seed_epoch(self.config.seed, epoch, self.ctx.rank)
        self.sampler.set_epoch(epoch)
        train_mode(self.net, frozen)
        device, amp_dtype = self.ctx.device, self.opt.amp_dtype
        loss_sum = torch.zeros(2, dtype=torch.float64)
        show = progress and self.ctx.is_main
        for x, y in tqdm(self.batches, desc=f"epoch {epoch + 1}", leave=False, disable=not show):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, _ = model(x)
                loss = self.opt.criterion(logits.float(), y)
            self.opt.step(loss)
            self.state.step += 1
            loss_sum += torch.tensor([float(loss.detach()) * len(y), len(y)], dtype=torch.float64)
        totals = all_reduce_sum(self.ctx, loss_sum)
        sync_buffers(self.ctx, self.net)
        return float(totals[0]) / max(float(totals[1]), 1.0)

    def _evaluate(self, samples: Sequence[Sample]) -> np.ndarray:
        batch_size, amp_dtype = self.config.batch_size, self.opt.amp_dtype
        return evaluate(
            self.net, samples, self.images, self.ctx, batch_size=batch_size, workers=self.workers, amp_dtype=amp_dtype
        )

    def _score(self) -> tuple[float, float]:
        """Loss (class-weighted, no smoothing) and accuracy on the selection images."""
        logits = self._evaluate(self.select)
        loss = float(self.opt.val_criterion(torch.from_numpy(logits), torch.from_numpy(self.select_targets)))
        return loss, float((logits.argmax(1) == self.select_targets).mean())

    def _record(self, frozen: bool, train_loss: float, loss: float, accuracy: float, seconds: float) -> dict[str, Any]:
        state = self.state
        if loss < state.best_loss - 1e-6:
            state.best_loss, state.best_epoch, state.epochs_without_improvement = loss, state.epoch, 0
            self.best_state = copy.deepcopy(self.net.state_dict())
        else:
            state.epochs_without_improvement += 1
        lrs = self.opt.learning_rates()
        row = {
            "epoch": state.epoch,
            "frozen": frozen,
            "train_loss": train_loss,
            "selection_loss": loss,
            "selection_accuracy": accuracy,
            "lr_head": lrs["head"],
            "lr_backbone": lrs["body"],
            "seconds": seconds,
        }
        state.history.append(row)
        state.seconds += seconds
        log.info(
            "epoch %d/%d%s: train loss %.4f, selection loss %.4f, selection accuracy %.4f",
            state.epoch,
            self.config.epochs,
            " (backbone frozen)" if frozen else "",
            train_loss,
            loss,
            accuracy,
        )
        return row

    def _save(self, frozen: bool) -> None:
        if self.ctx.is_main:
            ckpt.save_checkpoint(
                self.run_dir,
                identity=self.identity,
                model_state=self.net.state_dict(),
                best_state=self.best_state,
                **self.opt.state(),
                train_state=self.state,
                frozen=frozen,
            )
        barrier(self.ctx)

    def _decide_stop(self) -> None:
        """Early stopping, or the stop asked for by ``stop_after_epochs``, before the last epoch."""
        state, config = self.state, self.config
        if state.epoch >= config.epochs:
            return
        if state.epochs_without_improvement >= config.patience:
            log.info("early stop after epoch %d: no better selection loss for %d epochs", state.epoch, config.patience)
            self.stopped_early = True
        elif config.stop_after_epochs is not None and state.epoch >= config.stop_after_epochs:
            log.warning("stopping after epoch %d as asked; resume with --resume", state.epoch)
            self.interrupted = True

    def result(self) -> FullResult:
        """The best epoch's weights (moved to the CPU) and their validation logits (the first and
        only time the validation images are seen)."""
        self.net.load_state_dict(self.best_state)
        # an interrupted run registers nothing: no final evaluation
        val_logits = np.zeros((0, self.net.num_classes), np.float32) if self.interrupted else self._evaluate(self.val)
        self.net.to("cpu").eval()
        set_frozen(self.net, False)
        amp_dtype = self.opt.amp_dtype
        return FullResult(
            net=self.net,
            val_logits=val_logits,
            state=self.state,
            stopped_early=self.stopped_early,
            interrupted=self.interrupted,
            resumed_from_epoch=self.resumed_from,
            device=str(self.ctx.device),
            amp_dtype=str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
            world_size=self.ctx.world_size,
            details={
                "steps_per_epoch": len(self.batches),
                "selection": {
                    "images": len(self.select),
                    "fraction": self.config.selection_fraction,
                    "fingerprint": fingerprint(self.select),
                },
                "warmup_steps": self.opt.warmup_steps,
                "workers": self.workers,
            },
        )
