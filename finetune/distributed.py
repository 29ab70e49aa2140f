"""Distributed data parallel plumbing for the full fine-tune.

Under ``torchrun`` (detected with torch's own ``is_torchelastic_launched``; torchrun's variables are
read by ``init_process_group`` itself), each process trains on its shard: NCCL on GPUs, gloo on the
CPU. Outside torchrun the same code runs as a world of one. PyTorch is imported where it is used:
the linear probe, which never trains in PyTorch, holds a :class:`DistContext` without importing it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device_name: str = "cpu"  # as torch.device takes it: "cpu", "cuda", "cuda:1"
    backend: str | None = None

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device(self.device_name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(choice: str) -> torch.device:
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from .errors import TrainingError

            raise TrainingError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
        return torch.device("cuda")
    return torch.device("cpu")


def launched() -> bool:
    """True inside a process started by ``torchrun``."""
    import torch.distributed as dist

    return dist.is_torchelastic_launched()


@contextlib.contextmanager
def process_group(device_choice: str) -> Iterator[DistContext]:
    """Join the process group when started by torchrun (and leave it on exit); yields the context."""
    import torch
    import torch.distributed as dist

    device = pick_device(device_choice)
    if not launched():
        yield DistContext(device_name=str(device))
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        # one GPU per process; torchrun numbers processes on a node from 0
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    log.info("process %d of %d (%s, %s)", rank, world, backend, device)
    try:
        yield DistContext(rank=rank, world_size=world, device_name=str(device), backend=backend)
    finally:
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a copy; ``values`` stays as it was)."""
    import torch.distributed as dist

    out = values.detach().clone().to(ctx.device)
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def gather_rows(ctx: DistContext, rows: torch.Tensor, count: int) -> torch.Tensor:
    """Concatenate every process's ``rows`` (shape (m, ...), m may differ by process, padded here)
    in rank order; ``count`` = the largest m over processes."""
    if not ctx.distributed:
        return rows
    import torch
    import torch.distributed as dist

    padded = torch.zeros((count, *rows.shape[1:]), dtype=rows.dtype, device=ctx.device)
    padded[: rows.shape[0]] = rows.to(ctx.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], dtype=torch.int64, device=ctx.device))
    parts = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)]).cpu()


def sync_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics drift apart between the
    per-step broadcasts DDP does), so that evaluation and the saved weights agree across processes."""
    if ctx.distributed:
        import torch.distributed as dist

        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)
