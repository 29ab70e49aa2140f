"""Checkpoints of a full fine-tune, with no pickle anywhere.

Tensors (weights, the best weights so far, the optimizer's moment estimates) are safetensors
files; everything else (optimizer hyperparameters per group, the LR scheduler, the AMP grad scaler,
the epoch, the freeze state, the history and the run's identity) is JSON. One checkpoint is a
folder ``checkpoints/epoch-NNNN`` written under a temporary name and renamed; ``latest.json``,
replaced atomically, names the newest complete one. A run killed at any moment therefore resumes
from the last whole epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.files import write_atomic

from .errors import TrainingError

FORMAT = 1
LATEST = "latest.json"


@dataclass
class TrainState:
    """Where a run stands after ``epoch`` completed epochs."""

    epoch: int = 0
    step: int = 0
    best_loss: float = float("inf")
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training time before this checkpoint (so a resumed run reports the sum)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_loss": self.best_loss if self.best_loss != float("inf") else None,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "history": self.history,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        best = d.get("best_loss")
        return cls(
            epoch=int(d["epoch"]),
            step=int(d["step"]),
            best_loss=float("inf") if best is None else float(best),
            best_epoch=int(d["best_epoch"]),
            epochs_without_improvement=int(d["epochs_without_improvement"]),
            history=list(d["history"]),
            seconds=float(d.get("seconds", 0.0)),
        )


def _tensor_state(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module_state.items()}


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_files`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def save_checkpoint(
    run_dir: Path,
    *,
    identity: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    best_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
    train_state: TrainState,
    frozen: bool,
) -> Path:
    """Write one complete checkpoint and point ``latest.json`` at it; older ones are removed."""
    from safetensors.torch import save_file

    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"epoch-{train_state.epoch:04d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=".incomplete-"))
    try:
        save_file(_tensor_state(model_state), str(tmp / "model.safetensors"))
        save_file(_tensor_state(best_state), str(tmp / "best.safetensors"))
        opt_tensors, opt_meta = optimizer_to_files(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        # LambdaLR keeps its functions out of its state (None, or a partial's empty __dict__)
        scheduler = dict(scheduler_state)
        _write_json(
            tmp / "state.json",
            {
                "format": FORMAT,
                "identity": identity,
                "train": train_state.to_dict(),
                "frozen": frozen,
                "optimizer": opt_meta,
                "scheduler": scheduler,
                "scaler": scaler_state,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json(run_dir / LATEST, {"checkpoint": final.name})
    for old in ckpts.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    identity: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    scaler_state: dict[str, Any] | None
    train_state: TrainState
    frozen: bool

    def check_identity(self, identity: dict[str, Any], run_dir: Path) -> None:
        """Refuse to resume a run whose ``identity`` (data, labels, options) is not this checkpoint's,
        naming the first differences."""
        diff = sorted(k for k in set(self.identity) | set(identity) if self.identity.get(k) != identity.get(k))
        if diff:
            shown = "; ".join(f"{k}: {self.identity.get(k)!r} -> {identity.get(k)!r}" for k in diff[:4])
            raise TrainingError(
                f"the checkpoint in {run_dir} belongs to a different run ({shown}); resume with the same data "
                "and options, or run without --resume to start over"
            )


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"{pointer} is unreadable ({e}); delete {run_dir} to start over") from None
    path = run_dir / "checkpoints" / name
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors + JSON only)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "state.json").read_text())
        if meta.get("format") != FORMAT:
            raise TrainingError(f"{path} has checkpoint format {meta.get('format')}, this version reads {FORMAT}")
        return Checkpoint(
            path=path,
            identity=meta["identity"],
            model_state=load_file(str(path / "model.safetensors")),
            best_state=load_file(str(path / "best.safetensors")),
            optimizer_state=optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]),
            scheduler_state=meta["scheduler"],
            scaler_state=meta.get("scaler"),
            train_state=TrainState.from_dict(meta["train"]),
            frozen=bool(meta["frozen"]),
        )
    except TrainingError:
        raise
    except Exception as e:  # a damaged checkpoint: say which and how to start over
        raise TrainingError(f"cannot read the checkpoint {path} ({e}); delete it to start over") from None


def clear(run_dir: Path) -> None:
    """Remove a run's checkpoints (after its version is registered, or when starting over)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / LATEST).unlink(missing_ok=True)
