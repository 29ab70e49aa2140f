"""How the full fine-tune moves the weights: AdamW over four parameter groups (the new head at
``lr``, the pretrained body at ``lr * backbone_lr_scale``, weight decay on weight matrices and
kernels only), a per-step linear warmup then cosine decay, class-weighted cross-entropy with label
smoothing, mixed precision on CUDA, and the frozen-body phase."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from models.networks import Backbone

from .config import FinetuneConfig


def param_groups(net: Backbone, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Four groups, always in this order (a checkpoint's optimizer state maps onto them):
    body with and without decay, head with and without decay."""
    groups = []
    body_lr = config.lr * config.backbone_lr_scale
    for part, module, lr in (("body", net.body, body_lr), ("head", net.head, config.lr)):
        decay = [p for p in module.parameters() if p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.ndim <= 1]
        groups.append({"name": part, "params": decay, "lr": lr, "weight_decay": config.full_weight_decay})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def autocast_dtype(device: torch.device, amp: bool) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype on CUDA (None: full precision) and whether a grad scaler is needed."""
    if device.type != "cuda" or not amp:
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def set_frozen(net: Backbone, frozen: bool) -> None:
    for p in net.body.parameters():
        p.requires_grad_(not frozen)


def train_mode(net: Backbone, frozen: bool) -> None:
    net.train()
    if frozen:
        net.body.eval()  # BatchNorm keeps the pretrained running statistics; dropout is off


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # every epoch draws from its own stream: a resumed run repeats an uninterrupted one
    torch.manual_seed((seed * 1_000_003 + epoch * 7919 + rank) % (2**63))


@dataclass
class Optimization:
    """The optimizer, its schedule, the AMP grad scaler and the losses of one run."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.CrossEntropyLoss  # training: class weights and label smoothing
    val_criterion: nn.CrossEntropyLoss  # validation: class weights only, on the CPU
    amp_dtype: torch.dtype | None
    warmup_steps: int

    @classmethod
    def build(
        cls,
        net: Backbone,
        config: FinetuneConfig,
        class_weights: list[float],
        *,
        device: torch.device,
        steps_per_epoch: int,
    ) -> Optimization:
        """For ``net`` (already on ``device``) and ``config.epochs`` of ``steps_per_epoch`` steps."""
        amp_dtype, use_scaler = autocast_dtype(device, config.amp)
        total = steps_per_epoch * config.epochs
        warmup = min(round(config.warmup_epochs * steps_per_epoch), total // 2)
        optimizer = torch.optim.AdamW(param_groups(net, config))
        weights = torch.tensor(class_weights, dtype=torch.float32, device=device)
        return cls(
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total)),
            scaler=torch.amp.GradScaler("cuda", enabled=use_scaler),
            criterion=nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing),
            val_criterion=nn.CrossEntropyLoss(weight=weights.cpu()),
            amp_dtype=amp_dtype,
            warmup_steps=warmup,
        )

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` (scaled when float16 needs it), then one schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def learning_rates(self) -> dict[str, float]:
        """The current learning rate of each parameter group, by its name."""
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def state(self) -> dict[str, Any]:
        """The keyword arguments of :func:`finetune.checkpoint.save_checkpoint` that hold this state."""
        return {
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load(self, optimizer_state: dict[str, Any], scheduler_state: dict[str, Any], scaler_state: Any) -> None:
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
