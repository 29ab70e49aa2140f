"""``backbones finetune``: adapt a backbone to labelled images and register the result as a new version."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from pydantic.fields import FieldInfo

from finetune import FinetuneConfig

from .common import F, echo_json, handle_errors, open_registry
from .remote import check_remote, local_version, publish, registry_option


class DatasetLocation(click.ParamType):
    """A local folder or file that exists (a Path), or an object store URL (``s3://bucket/prefix``,
    checked for its scheme, bucket and the absence of credentials; listed when the run starts)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        from models.storage import StorageError, check_url, is_url

        if isinstance(value, str) and is_url(value):
            try:
                return check_url(value)
            except StorageError as e:
                self.fail(str(e), param, ctx)
        return click.Path(exists=True, path_type=Path).convert(value, param, ctx)  # type: ignore[no-any-return]


# What the command line adds to a config field: a metavar, or a stricter type (a folder that must exist).
_CLI_EXTRAS: dict[str, dict[str, Any]] = {
    "backbone": {"metavar": "REF"},
    "name": {"metavar": "NAME"},
    "promote_if_better": {"metavar": "ALIAS"},
    "val_dir": {"type": DatasetLocation()},
    "run_dir": {"type": click.Path(file_okay=False, path_type=Path)},
}

# a field's limit -> the click range's end, and whether the end is excluded
_LIMITS = {"ge": ("min", False), "gt": ("min", True), "le": ("max", False), "lt": ("max", True)}


def _click_type(field: FieldInfo) -> click.ParamType | None:
    """The click type of a config field: its choices, or its number type with the field's limits."""
    annotation = field.annotation
    if typing.get_origin(annotation) is types.UnionType:  # X | None: None is the option not given
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice(typing.get_args(annotation))
    if annotation is Path:
        return click.Path(path_type=Path)
    if annotation not in (int, float):
        return None
    limits: dict[str, Any] = {}
    for m in field.metadata:  # pydantic's annotated_types objects: Ge(ge=1), Lt(lt=1), ...
        for attr, (end, is_open) in _LIMITS.items():
            if hasattr(m, attr):
                limits.update({end: getattr(m, attr), f"{end}_open": is_open})
    if not limits:
        return click.INT if annotation is int else click.FLOAT
    return click.IntRange(**limits) if annotation is int else click.FloatRange(**limits)


def _config_option(name: str, field: FieldInfo) -> Callable[[F], F]:
    """One option made from a :class:`FinetuneConfig` field: its default, limits and help text."""
    flag = "--" + name.replace("_", "-")
    settings: dict[str, Any] = {"help": field.description}
    if field.is_required():
        settings["required"] = True
    else:
        settings.update(default=field.default, show_default=True)
    if field.annotation is bool:
        settings["is_flag"] = True
        if field.default:  # a switch that is on unless turned off
            flag = f"{flag}/--no-{flag[2:]}"
    else:
        settings["type"] = _click_type(field)
    return click.option(flag, name, **{**settings, **_CLI_EXTRAS.get(name, {})})


def _config_options(command: F) -> F:
    """Every :class:`FinetuneConfig` field but ``data`` (the DATA_DIR argument) as an option, in the
    config's order."""
    for name, field in reversed(FinetuneConfig.model_fields.items()):
        if name != "data":
            command = _config_option(name, field)(command)
    return command


@click.command("finetune")
@click.argument("data_dir", metavar="DATA_DIR", type=DatasetLocation())
@_config_options
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Full: processes (GPUs) to train with, via torchrun (DDP; gloo on the CPU).",
)
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print only the final report as JSON.")
@handle_errors
def finetune_cmd(
    data_dir: Path | str, as_json: bool, nproc_per_node: int, registry_url: str | None, **options: Any
) -> None:
    """Fine-tune --backbone on DATA_DIR and register the result as a new version of --name.

    DATA_DIR is an ImageFolder (one sub-folder per class, the folder name is the label) or a CSV
    manifest of `path,label` rows (relative paths against the CSV's folder), on disk or in
    object storage: s3://bucket/prefix (each sub-prefix a class, listed recursively) or
    s3://bucket/train.csv; a manifest's paths may be s3:// URLs. Objects are never downloaded to
    be hashed: their features are cached under the store's checksum (ETag), so a re-run reads
    only new or changed objects. Credentials and endpoint: the AWS variables (AWS_ENDPOINT_URL
    for MinIO and other S3-compatible stores), AWS_PROFILE, or a workload identity. Validation comes
    from --val-dir, or from a stratified, seeded --val-fraction split of DATA_DIR. Unreadable
    files are reported and skipped; duplicates and files shared with --val-dir are left out of
    training; fewer than two classes or an empty class is an error.

    \b
    --mode linear: a regularised linear head on the backbone's cached ONNX features.
    --mode full: every layer, AdamW, warmup + cosine, checkpoints, --resume, early stopping.

    --backbone a,b or --backbone auto (linear): a probe on each backbone; the one with the lowest
    cross-validated loss on the training split is registered, all of them are in the report.

    The new version (one ONNX graph with logits and features, verified like any export) holds
    report.json and confusion.png; an HTML report with the misclassified validation images is
    written beside the run (`backbones models show NAME` prints where, and the metrics). With
    --promote-if-better ALIAS, NAME@ALIAS moves to it only if it is more accurate than the
    version ALIAS points to on the same validation images (a tie does not move it; a version
    with other labels is a different task and is never replaced this way; fewer than
    --gate-min-images validation images refuse to compare; the alias moves only if nobody moved
    it meanwhile). An alias that points to a deleted version leaves the alias alone and exits 1.
    """
    from pydantic import ValidationError

    ctx = click.get_current_context()
    # only what was typed goes to the config: its own defaults are the ones the options show
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    _check_combination(given, options["mode"], nproc_per_node)
    try:
        config = FinetuneConfig(data=data_dir, **given)
    except ValidationError as e:
        raise click.UsageError(str(e)) from None

    if not as_json:
        click.echo(f"fine-tuning {config.backbone} on {data_dir} ({config.mode}) ...", err=True)
    check_remote(registry_url)
    for backbone in _remote_backbones(config.backbone, registry_url):
        local_version(backbone, registry_url)  # only the remote registry has it: pulled and verified
    if nproc_per_node > 1:
        report = _run_distributed(config, nproc_per_node)
    else:
        from finetune import finetune

        report = finetune(config, progress=True).report
    publish(open_registry().get(report["model"]), registry_url, quiet=as_json)
    if as_json:
        echo_json(report)
    else:
        _print_summary(report)
    _check_promotion(report)


def _remote_backbones(backbone: str, registry_url: str | None) -> list[str]:
    """The registered backbones named in ``--backbone`` (not ``auto``, not catalog names) when a
    remote registry is set: those may have to be pulled first."""
    from models import get_settings
    from models.catalog import find_entry

    if backbone == "auto" or not (registry_url if registry_url is not None else get_settings().registry_url):
        return []
    return [b for b in backbone.split(",") if b and find_entry(b) is None]


def _check_combination(given: dict[str, Any], mode: str, nproc_per_node: int) -> None:
    """Refuse options that cannot go together (``given``: the options typed on the command line)."""
    if "val_dir" in given and "val_fraction" in given:
        raise click.UsageError("give --val-dir or --val-fraction, not both")
    gate = [k for k in ("gate_min_images", "force_promotion") if k in given]
    if gate and "promote_if_better" not in given:
        raise click.UsageError(f"--{gate[0].replace('_', '-')} applies with --promote-if-better only")
    if mode != "linear":
        if "views" in given:
            raise click.UsageError("--views applies to --mode linear only (the full fine-tune draws random crops)")
        return
    full_only = [k for k in FinetuneConfig.full_only_fields() if k in given]
    if full_only or nproc_per_node > 1:
        flag = "--" + (full_only or ["nproc-per-node"])[0].replace("_", "-")
        raise click.UsageError(
            f"{flag} applies to --mode full only; the linear probe has no epochs (its head is fitted in one solve)"
        )


def _run_distributed(config: FinetuneConfig, nproc: int) -> dict[str, Any]:
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
    from finetune.report import CONFUSION_FILENAME, REPORT_FILENAME

    if report.get("interrupted"):
        t = report["recipe"]
        click.echo(
            f"stopped after epoch {t['epochs_run']} of {t['options']['epochs']} as asked; nothing registered. "
            f"Continue with the same command and --resume (checkpoint in {t['run_dir']})"
        )
        return
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"  files  {report['version_path']}/{REPORT_FILENAME}, {CONFUSION_FILENAME}")
    if report.get("report_html"):
        click.echo(f"  report  {report['report_html']}")
    promotion = report.get("promotion")
    if promotion:
        from finetune import Promotion

        click.echo(Promotion(**promotion).line())
    click.echo(report["model"])


def _check_promotion(report: dict[str, Any]) -> None:
    """Exit 1 (after the report) when the gate could not judge: the alias points to a missing or
    damaged version."""
    from models import BackbonesError

    promotion = report.get("promotion") or {}
    if promotion.get("error"):
        raise BackbonesError(f"{report['model']} is registered, but the alias was not moved: {promotion['reason']}")
