"""The ``backbones`` command line. Results go to stdout (``--json``: JSON only); logs and
progress go to stderr; exit code 0 = everything worked, 1 = something failed, 2 = bad usage."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from models.imaging import image_paths
from models.inference import DEFAULT_TOP_K

from .common import Deferred, SettingOption, echo_json, handle_errors, open_registry
from .registry import models_group
from .remote import check_remote, local_version, publish, registry_option
from .serve import serve_cmd


class LazyGroup(click.Group):
    """A group whose ``lazy`` subcommands (name -> "module:attribute") are imported when they are
    run or listed: `backbones serve` in the service image, which ships neither the batch job nor
    the trainer, imports neither."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, _, attribute = self.lazy[name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy={"embed": "cli.embed:embed_cmd", "finetune": "cli.finetune:finetune_cmd"},
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.version_option(package_name="backbones")
def cli(verbose: int) -> None:
    """ImageNet-pretrained CNN backbones as verified ONNX model versions: export them from the
    catalog, keep them in a versioned registry ($BENTOML_HOME), classify and embed images.

    Model references: NAME (its 'production' alias if set, else the newest version),
    NAME:VERSION (a unique prefix is enough) or NAME@ALIAS. A catalog name with no version yet
    is exported on first use.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# -- export ---------------------------------------------------------------------------------


def _quantize_default(option: str) -> Deferred:
    """The default of a ``QuantizeOptions`` field (models/quantize.py imports PyTorch: read lazily)."""

    def read() -> Any:
        from dataclasses import fields

        from models.quantize import QuantizeOptions

        return next(f.default for f in fields(QuantizeOptions) if f.name == option)

    return Deferred(read)


@cli.command("export")
@click.argument("name")
@click.option("--as", "as_name", metavar="NEW_NAME", help="Register under this name instead of the catalog name.")
@click.option(
    "--verify-images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of photos to verify ONNX against PyTorch on (default: synthetic images).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Make an INT8 version (for CPUs) of NAME (a catalog name or a registered version, fine-tuned ones too).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16: make an FP16 version (for GPUs) of NAME, float32 inputs and outputs.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="--quantize: folder of photos (like those the model will see) to calibrate on; a seeded part is "
    "held out to measure agreement with the FP32 parent. --precision fp16: photos to compare on.",
)
@click.option(
    "--min-agreement",
    cls=SettingOption,
    setting="quantize_min_agreement",
    type=click.FloatRange(0, 1, min_open=True),
    help="Top-1 agreement with the FP32 parent the new version must reach.",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default=_quantize_default("method"),
    show_default=True,
    help="How activation ranges are chosen from the calibration photos.",
)
@click.option(
    "--holdout-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=_quantize_default("holdout_fraction"),
    show_default=True,
    help="Part of the calibration photos held out for the agreement gate.",
)
@click.option(
    "--float-first-convs",
    type=click.IntRange(min=0),
    default=_quantize_default("float_first_convs"),
    show_default=True,
    help="Keep the first N convolutions in float.",
)
@click.option(
    "--seed",
    type=int,
    default=_quantize_default("seed"),
    show_default=True,
    help="Seed of the calibration/held-out split.",
)
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print the registered version record as JSON.")
@handle_errors
def export_cmd(
    name: str,
    as_name: str | None,
    verify_images: Path | None,
    quantize: str | None,
    precision: str,
    calibration: Path | None,
    min_agreement: float | None,
    calibration_method: str,
    holdout_fraction: float,
    float_first_convs: int,
    seed: int,
    registry_url: str | None,
    as_json: bool,
) -> None:
    """Export catalog model NAME to ONNX, verify it against PyTorch and register it; or, with
    --quantize int8 / --precision fp16, convert NAME (catalog or registered) to INT8 / FP16.
    With a remote registry (--registry or BACKBONES_REGISTRY_URL) the new version is published
    there too, and a NAME only the remote has is pulled first.

    Prints the new tag (NAME:VERSION). Verification: onnx.checker, then ONNX Runtime vs PyTorch
    on preprocessed images (identical top-1, logits within the export's tolerance, reported with
    the tag and kept in the spec: see `models show`). INT8 and FP16 versions are
    compared with their FP32 parent instead (top-1 agreement >= --min-agreement, logit error and
    feature cosine recorded in the spec). On failure nothing is registered.
    """
    if as_name is not None:  # before any work; an empty name never falls back to the default
        from models.registry import validate_name

        validate_name(as_name)
    check_remote(registry_url)
    if quantize and precision != "fp32":
        raise click.UsageError(
            "--quantize int8 and --precision fp16 are two different versions: make them one at a time"
        )
    if quantize and calibration is None:
        raise click.UsageError(
            "--quantize int8 needs --calibration DIR: a folder of photos like those the model will see"
        )
    if not quantize and precision == "fp32":
        _export_fp32(name, as_name, verify_images, registry_url, as_json)
        return
    from models import get_settings

    registry = open_registry()
    threshold = min_agreement if min_agreement is not None else get_settings().quantize_min_agreement
    parent = local_version(name, registry_url)
    if quantize:
        from models.quantize import QuantizeOptions, quantize_version

        assert calibration is not None
        options = QuantizeOptions(
            min_agreement=threshold,
            method=calibration_method,  # type: ignore[arg-type]
            holdout_fraction=holdout_fraction,
            seed=seed,
            float_first_convs=float_first_convs,
        )
        if not as_json:
            click.echo(f"quantizing {parent.tag} to INT8 on {calibration} ...", err=True)
        stored = quantize_version(
            parent,
            list(image_paths([str(calibration)])),
            registry=registry,
            name=as_name or f"{parent.spec.name}_int8",
            options=options,
        )
    else:
        from models.fp16 import convert_version_fp16

        photos = calibration or verify_images
        if not as_json:
            click.echo(f"converting {parent.tag} to FP16 ...", err=True)
        stored = convert_version_fp16(
            parent,
            registry=registry,
            name=as_name or f"{parent.spec.name}_fp16",
            min_agreement=threshold,
            verify_sources=list(image_paths([str(photos)])) if photos else None,
        )
    publish(stored, registry_url, quiet=as_json)
    _report_version(
        stored,
        as_json,
        lambda ver: (
            f"{stored.spec.precision.upper()} vs FP32 parent on {ver['images']} held-out images: top-1 "
            f"agreement {ver['top1_agreement']:.1%} ({ver['top1_agreeing']}/{ver['images']}), max |dlogit| "
            f"{ver['max_abs_logit_diff']:.3g}, feature cosine >= {ver['feature_cosine_min']:.4f}"
        ),
    )


def _report_version(stored: Any, as_json: bool, summary: Callable[[dict[str, Any]], str]) -> None:
    """A new version: its spec as JSON, or the verification ``summary`` on stderr and the tag."""
    if as_json:
        echo_json(stored.spec.model_dump(mode="json"))
        return
    click.echo(summary(stored.spec.verification), err=True)
    click.echo(stored.tag)


def _export_fp32(
    name: str, as_name: str | None, verify_images: Path | None, registry_url: str | None, as_json: bool
) -> None:
    from models.export import export_catalog

    sources = list(image_paths([str(verify_images)]))[:16] if verify_images else None
    if not as_json:
        click.echo(f"exporting {name} ...", err=True)
    stored = export_catalog(name, registry=open_registry(), as_name=as_name, verify_sources=sources)
    publish(stored, registry_url, quiet=as_json)
    _report_version(
        stored,
        as_json,
        lambda ver: (
            f"verified on {ver['images']} images: max |dlogit| {ver['max_abs_logit_diff']:.1e}, "
            f"top-1 agreement {ver['top1_agreement']:.0%}"
        ),
    )


# -- classify -------------------------------------------------------------------------------


@cli.command("classify")
@click.argument("ref")
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-k", "--top-k", default=DEFAULT_TOP_K, show_default=True, type=click.IntRange(min=1), help="Classes per image."
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1, max=1024))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image and line.")
@handle_errors
def classify_cmd(ref: str, images: tuple[str, ...], top_k: int, batch_size: int, as_json: bool) -> None:
    """Classify IMAGES (files or folders) with model REF, no server needed.

    An image that cannot be read is reported on its own line (with "error" in --json) and the
    others are still classified; the exit code is then 1.
    """
    import numpy as np

    from models import ImageError, InferenceModel
    from models import top_k as topk

    model = InferenceModel.load(ref)
    paths = list(image_paths(images))
    failed = 0

    def emit(path: Path, preds: list[Any] | None, error: str | None) -> None:
        if as_json:
            obj: dict[str, Any] = {"path": str(path), "model": model.tag}
            if error is None:
                obj["predictions"] = [p.to_dict() for p in preds or []]
            else:
                obj["error"] = error
            echo_json(obj)
        elif error is not None:
            click.echo(f"{path}: error: {error}")
        else:
            click.echo(f"{path}  ({model.tag})")
            for p in preds or []:
                click.echo(f"  {p.score:7.4f}  {p.label} ({p.index})")

    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        arrays: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for path in chunk:
            try:
                arrays.append(model.loader(path))
                errors.append(None)
            except ImageError as e:
                arrays.append(None)
                errors.append(str(e))
        good = [a for a in arrays if a is not None]
        preds = iter(topk(model.run(np.stack(good)).logits, model.spec.labels, top_k) if good else [])
        for path, array, error in zip(chunk, arrays, errors, strict=True):
            if array is None:
                failed += 1
                emit(path, None, error)
            else:
                emit(path, next(preds), None)
    if failed:
        click.echo(f"{failed} of {len(paths)} image(s) could not be classified", err=True)
        sys.exit(1)


cli.add_command(models_group)
cli.add_command(serve_cmd)


def main() -> None:
    cli(prog_name="backbones")
