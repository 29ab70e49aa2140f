"""``backbones finetune``: adapt a backbone to labelled images and register the result as a new version."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from .common import echo_json, handle_errors

_MODES = ("linear", "full")


@click.command("finetune")
@click.argument("data_dir", metavar="DATA_DIR", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--backbone",
    required=True,
    metavar="REF",
    help="Model to start from: catalog name, NAME, NAME:VERSION or NAME@ALIAS.",
)
@click.option("--name", required=True, metavar="NAME", help="Registry name of the new version.")
@click.option(
    "--mode",
    type=click.Choice(_MODES),
    default="linear",
    show_default=True,
    help="linear: new head on frozen features; full: train every layer.",
)
@click.option("--epochs", type=click.IntRange(min=1), help="Full fine-tune epochs  [default: 10]")
@click.option(
    "--val-dir",
    type=click.Path(exists=True, path_type=Path),
    help="Validation ImageFolder or CSV (instead of a split of DATA_DIR).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each class held out for validation  [default: 0.2]",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the split, the initialisation and the augmentation."
)
@click.option(
    "--promote-if-better",
    metavar="ALIAS",
    help="Move NAME@ALIAS to the new version only if it is more accurate on the same validation images.",
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Full: peak learning rate of the new head  [default: 1e-3]",
)
@click.option("--backbone-lr-scale", type=click.FloatRange(0, 1), help="Full: backbone LR = lr x this  [default: 0.1]")
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    help="Linear: L2 strength (default: chosen by cross-validation); full: AdamW decay (default 0.05).",
)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), help="Full: linear warmup length  [default: 1]")
@click.option(
    "--freeze-epochs", type=click.IntRange(min=0), help="Full: first epochs with the backbone frozen  [default: 0]"
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    help="Full: stop after this many epochs without a better val loss  [default: 3]",
)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), help="Full  [default: 0.1]")
@click.option(
    "--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="k of the top-k accuracy in the report."
)
@click.option(
    "--imbalance-ratio",
    type=click.FloatRange(min=1, min_open=True),
    default=3.0,
    show_default=True,
    help="Warn when the largest class has this many times the images of the smallest.",
)
@click.option("--workers", type=click.IntRange(min=0), help="Decode workers (default: from the cores).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Full fine-tune device.",
)
@click.option("--amp/--no-amp", default=True, show_default=True, help="Full: mixed precision on CUDA.")
@click.option("--resume", is_flag=True, help="Full: continue the run interrupted in --run-dir (same data and options).")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Full: checkpoints  [default: $BENTOML_HOME/backbones/runs/NAME]",
)
@click.option(
    "--stop-after-epochs",
    type=click.IntRange(min=1),
    help="Full: stop after this epoch with its checkpoint written, registering nothing (continue with --resume).",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Full: processes (GPUs) to train with, via torchrun (DDP; gloo on the CPU).",
)
@click.option("--json", "as_json", is_flag=True, help="Print only the final report as JSON.")
@handle_errors
def finetune_cmd(data_dir: Path, as_json: bool, nproc_per_node: int, **options: Any) -> None:
    """Fine-tune --backbone on DATA_DIR and register the result as a new version of --name.

    DATA_DIR is an ImageFolder (one sub-folder per class, the folder name is the label) or a CSV
    manifest of `path,label` rows (relative paths against the CSV's folder). Validation comes
    from --val-dir, or from a stratified, seeded --val-fraction split of DATA_DIR. Unreadable
    files are reported and skipped; duplicates and files shared with --val-dir are left out of
    training; fewer than two classes or an empty class is an error.

    \b
    --mode linear (default): a regularised linear head on the backbone's cached ONNX features.
    --mode full: every layer, AdamW, warmup + cosine, checkpoints, --resume, early stopping.

    The new version (one ONNX graph with logits and features, verified like any export) holds
    report.json and confusion.png; `backbones models show NAME` prints its metrics. With
    --promote-if-better ALIAS, NAME@ALIAS moves to it only if it is more accurate than the
    version ALIAS points to on the same validation images (a tie does not move it; a version
    with other labels is a different task and is never replaced this way).
    """
    from pydantic import ValidationError

    from finetune import FinetuneConfig

    if options["val_dir"] is not None and options["val_fraction"] is not None:
        raise click.UsageError("give --val-dir or --val-fraction, not both")
    if options["mode"] == "linear":
        full_only = [
            k
            for k in (
                "epochs",
                "lr",
                "backbone_lr_scale",
                "warmup_epochs",
                "freeze_epochs",
                "patience",
                "label_smoothing",
                "stop_after_epochs",
            )
            if options[k] is not None
        ]
        if options["resume"]:
            full_only.append("resume")
        if full_only or nproc_per_node > 1:
            raise click.UsageError(
                f"--{(full_only or ['nproc-per-node'])[0].replace('_', '-')} applies to --mode full only; the linear probe "
                "has no epochs (its head is fitted in one solve)"
            )
    values = {k: v for k, v in options.items() if v is not None}
    try:
        config = FinetuneConfig(data=data_dir, **values)
    except ValidationError as e:
        raise click.UsageError(str(e)) from None

    if not as_json:
        click.echo(f"fine-tuning {config.backbone} on {data_dir} ({config.mode}) ...", err=True)
    if nproc_per_node > 1:
        report = _run_distributed(config, nproc_per_node)
    else:
        from finetune import finetune

        report = finetune(config, progress=True).report
    if as_json:
        echo_json(report)
        return
    _print_summary(report)


def _run_distributed(config: Any, nproc: int) -> dict[str, Any]:
    """Start ``torchrun`` with ``nproc`` processes of ``finetune.train`` on the same options."""
    from models import BackbonesError

    with tempfile.TemporaryDirectory(prefix="backbones-finetune-") as tmp:
        cfg, out = Path(tmp) / "config.json", Path(tmp) / "report.json"
        cfg.write_text(config.model_dump_json())
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "finetune.train", "--config", str(cfg), "--report-out", str(out), "--progress",
        ]  # fmt: skip
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise BackbonesError(f"the distributed run failed (exit status {proc.returncode}); its errors are above")
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def _print_summary(report: dict[str, Any]) -> None:
    from finetune import summary_lines

    if report.get("interrupted"):
        t = report["recipe"]
        click.echo(
            f"stopped after epoch {t['epochs_run']} of {t['options']['epochs']} as asked; nothing registered. "
            f"Continue with the same command and --resume (checkpoint in {t['run_dir']})"
        )
        return
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"  files  {report['version_path']}/report.json, confusion.png")
    promotion = report.get("promotion")
    if promotion:
        from finetune import Promotion

        click.echo(Promotion(**promotion).line())
    click.echo(report["model"])
