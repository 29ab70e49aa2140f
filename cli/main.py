"""The ``backbones`` command line. Results go to stdout (``--json``: JSON only); logs and
progress go to stderr; exit code 0 = everything worked, 1 = something failed, 2 = bad usage."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from models.imaging import image_paths

from .common import echo_json, handle_errors, open_registry
from .embed import embed_cmd
from .finetune import finetune_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


# -- models -------------------------------------------------------------------------------


@cli.group()
def models() -> None:
    """The catalog of pretrained models and the registry of exported versions."""


@models.command("catalog")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@handle_errors
def models_catalog(as_json: bool) -> None:
    """Pretrained models that can be exported, where their weights come from, and which work
    offline (bundled weights, or weights already in the local cache)."""
    from models import catalog
    from models.weights import available, cache_path

    rows: list[dict[str, Any]] = []
    for e in catalog():
        rows.append(
            {
                "name": e.name,
                "family": e.family,
                "weights": e.weights,
                "feature_dim": e.feature_dim,
                "num_classes": e.num_classes,
                "preprocess": e.preprocess.to_dict(),
                "offline": available(e),
                "cache": str(cache) if (cache := cache_path(e)) else None,
                "description": e.description,
            }
        )
    if as_json:
        echo_json(rows)
        return
    click.echo(f"{'NAME':20} {'DIM':>5} {'INPUT':>9} {'OFFLINE':8} WEIGHTS")
    for r in rows:
        pre = r["preprocess"]
        offline = "yes" if r["offline"] else "no"
        click.echo(
            f"{r['name']:20} {r['feature_dim']:>5} {pre['resize']:>4}/{pre['crop']:<4} {offline:8} {r['weights']}"
        )
    click.echo(f"{'timm/<name>':20} {'':>5} {'':>9} {'cached?':8} any timm model with pretrained weights")
    click.echo("\nOFFLINE=no: the weights download on first export (or fill the cache named in `--json`).")


def _version_row(spec: Any, aliases: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "tag": spec.tag,
        "name": spec.name,
        "version": spec.version,
        "created_at": spec.created_at.isoformat(),
        "parent": spec.parent,
        "num_classes": spec.num_classes,
        "feature_dim": spec.feature_dim,
        "precision": spec.precision,
        "aliases": aliases.get(spec.version, []),
    }


@models.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@handle_errors
def models_list(name: str | None, as_json: bool) -> None:
    """Registered versions (of NAME, or all), oldest first, with their aliases."""
    reg = open_registry()
    rows = []
    for spec in reg.list(name):
        by_version: dict[str, list[str]] = {}
        for alias, version in reg.aliases(spec.name).items():
            by_version.setdefault(version, []).append(alias)
        rows.append(_version_row(spec, by_version))
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no registered versions yet; export one: backbones export efficientnet_lite0")
        return
    click.echo(f"{'TAG':44} {'CREATED':20} {'CLASSES':>7} {'DIM':>5}  {'PARENT':28} ALIASES")
    for r in rows:
        click.echo(
            f"{r['tag']:44} {r['created_at'][:19]:20} {r['num_classes']:>7} {r['feature_dim']:>5}  "
            f"{r['parent']:28} {','.join(sorted(r['aliases']))}"
        )


@models.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the version record as JSON.")
@handle_errors
def models_show(ref: str, as_json: bool) -> None:
    """One version's record: preprocessing, labels, lineage, checksums, verification, aliases."""
    reg = open_registry()
    stored = reg.get(ref)
    doc = stored.spec.model_dump(mode="json")
    doc["aliases"] = {a: v for a, v in reg.aliases(stored.spec.name).items()}
    doc["alias_history"] = reg.alias_history(stored.spec.name)
    doc["path"] = str(stored.path)
    from finetune.report_html import html_report_path

    html = html_report_path(reg, stored.spec.name, stored.spec.version)
    doc["report_html"] = str(html) if html.is_file() else None
    if as_json:
        echo_json(doc)
        return
    s = stored.spec
    pre = s.preprocess
    click.echo(f"{s.tag}")
    click.echo(f"  created      {s.created_at.isoformat()}")
    click.echo(f"  parent       {s.parent}   architecture {s.architecture.family}/{s.architecture.name}")
    click.echo(f"  classes      {s.num_classes}: {', '.join(s.labels[:5])}{' ...' if s.num_classes > 5 else ''}")
    click.echo(f"  features     {s.feature_dim}")
    click.echo(
        f"  preprocess   resize {pre.resize} ({pre.interpolation}), crop {pre.crop}, mean {pre.mean}, std {pre.std}"
    )
    ver = s.verification
    if ver:
        click.echo(
            f"  verified     {ver.get('images')} images, max |dlogit| {ver.get('max_abs_logit_diff', 0):.1e}, "
            f"top-1 agreement {ver.get('top1_agreement', 0):.0%}"
        )
    if s.conversion:
        conv = s.conversion
        click.echo(f"  precision    {s.precision} from {conv.get('parent')}: {conv.get('method')}")
        cal = conv.get("calibration")
        if cal:
            click.echo(
                f"  calibration  {cal['calibration_images']} photos + {cal['holdout_images']} held out, "
                f"fingerprint {cal['fingerprint'][:16]}..., gate top-1 agreement >= {conv.get('min_agreement')}"
            )
    if s.training:
        metrics = s.training.get("metrics", {})
        click.echo(f"  training     {json.dumps(metrics)[:200]}")
    for fname, digest in s.files.items():
        click.echo(f"  file         {fname}  sha256 {digest[:16]}...")
    aliases = ", ".join(f"{a} -> {v}" for a, v in doc["aliases"].items()) or "none"
    click.echo(f"  aliases      {aliases}")
    click.echo(f"  path         {stored.path}")
    if doc["report_html"]:
        click.echo(f"  report       {doc['report_html']}")


@models.command("alias")
@click.argument("ref")
@click.argument("alias")
@click.option("--remove", is_flag=True, help="Remove ALIAS from REF's model instead of moving it.")
@click.option("--json", "as_json", is_flag=True, help="Print the recorded history event as JSON.")
@handle_errors
def models_alias(ref: str, alias: str, remove: bool, as_json: bool) -> None:
    """Point ALIAS (production, staging, any name) at the version REF names.

    The move is atomic and recorded in an append-only history (see `models show`). A running
    service that follows the alias picks the new version up.
    """
    reg = open_registry()
    if remove:
        from models.registry import Ref

        event = reg.remove_alias(Ref.parse(ref).name, alias)
    else:
        event = reg.set_alias(ref, alias)
    if as_json:
        echo_json(event)
        return
    name = _ref_name(ref)
    if remove:
        click.echo(f"{name}@{alias} removed (was {event['previous']})")
    else:
        was = f" (was {event['previous']})" if event["previous"] else ""
        click.echo(f"{name}@{alias} -> {name}:{event['version']}{was}")


def _ref_name(ref: str) -> str:
    from models.registry import Ref

    return Ref.parse(ref).name


@models.command("delete")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Also delete a version that aliases point to (removes those aliases).")
@handle_errors
def models_delete(ref: str, force: bool) -> None:
    """Delete one version (REF must be NAME:VERSION or NAME@ALIAS). A version that an alias
    points to is kept unless --force."""
    tag = open_registry().delete(ref, force=force)
    click.echo(f"deleted {tag}")


# -- export ---------------------------------------------------------------------------------


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
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Top-1 agreement with the FP32 parent the new version must reach [default: BACKBONES_QUANTIZE_MIN_AGREEMENT, 0.98].",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    show_default=True,
    help="How activation ranges are chosen from the calibration photos.",
)
@click.option(
    "--holdout-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Part of the calibration photos held out for the agreement gate.",
)
@click.option(
    "--float-first-convs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Keep the first N convolutions in float.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration/held-out split.")
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
    as_json: bool,
) -> None:
    """Export catalog model NAME to ONNX, verify it against PyTorch and register it; or, with
    --quantize int8 / --precision fp16, convert NAME (catalog or registered) to INT8 / FP16.

    Prints the new tag (NAME:VERSION). Verification: onnx.checker, then ONNX Runtime vs PyTorch
    on preprocessed images (identical top-1, max |dlogit| <= 1e-3). INT8 and FP16 versions are
    compared with their FP32 parent instead (top-1 agreement >= --min-agreement, logit error and
    feature cosine recorded in the spec). On failure nothing is registered.
    """
    if as_name is not None:  # before any work; an empty name never falls back to the default
        from models.registry import validate_name

        validate_name(as_name)
    if quantize and precision != "fp32":
        raise click.UsageError(
            "--quantize int8 and --precision fp16 are two different versions: make them one at a time"
        )
    if quantize and calibration is None:
        raise click.UsageError(
            "--quantize int8 needs --calibration DIR: a folder of photos like those the model will see"
        )
    if not quantize and precision == "fp32":
        _export_fp32(name, as_name, verify_images, as_json)
        return
    from models import get_settings
    from models.export import ensure_version

    registry = open_registry()
    threshold = min_agreement if min_agreement is not None else get_settings().quantize_min_agreement
    parent = ensure_version(name, registry)
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


def _export_fp32(name: str, as_name: str | None, verify_images: Path | None, as_json: bool) -> None:
    from models.export import export_catalog

    sources = list(image_paths([str(verify_images)]))[:16] if verify_images else None
    if not as_json:
        click.echo(f"exporting {name} ...", err=True)
    stored = export_catalog(name, registry=open_registry(), as_name=as_name, verify_sources=sources)
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
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
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


# -- serve ----------------------------------------------------------------------------------

# Environment variables that make BentoML 1.4 run workers without respawn (bentoml.serving.running_inside_container).
CONTAINER_MARKERS = ("BENTOML_CONTAINERIZED", "BENTOCLOUD_DEPLOYMENT_URL")


@cli.command("serve")
@click.option(
    "--model",
    "refs",
    multiple=True,
    metavar="REF",
    help="A model to serve (repeat for several; the first is the default). Default: efficientnet_lite0.",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("-p", "--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=None,
    help="Worker processes (default: BACKBONES_WORKERS, else one per core on a CPU, 1 on a GPU).",
)
@handle_errors
def serve_cmd(refs: tuple[str, ...], host: str, port: int, workers: int | None) -> None:
    """Serve classification and embedding over HTTP (BentoML), on PORT.

    Endpoints: POST /classify and POST /embed (multipart field 'image'; optional 'model' and
    'top_k'), GET /models, /livez, /readyz, /metrics, and the OpenAPI page at /. A served NAME or
    NAME@ALIAS follows its alias: `backbones models alias` switches the running service to the new
    version without failing a request. Tuning knobs (workers, runners, batch size, queue limit,
    threads): see the README's Configuration table.
    """
    import os

    from models import get_settings
    from models.registry import Ref

    settings = get_settings()  # a bad BACKBONES_* value fails here, in one line, not in a server worker
    chosen = list(refs) or settings.served_refs()
    for ref in chosen:
        Ref.parse(ref)  # a bad reference fails here too
    os.environ["BACKBONES_SERVE_MODELS"] = ",".join(chosen)
    if workers is not None:
        os.environ["BACKBONES_WORKERS"] = str(workers)
    # Inside a container BentoML does not restart a worker that dies (the container would be
    # restarted instead, losing every worker's requests): the arbiter replaces dead workers here.
    for name in CONTAINER_MARKERS:
        os.environ.pop(name, None)
    args = [sys.executable, "-m", "bentoml", "serve", "service.bento:Backbones", "--host", host, "--port", str(port)]
    click.echo(f"serving {', '.join(chosen)} on http://{host}:{port}", err=True)
    sys.stdout.flush()
    os.execv(sys.executable, args)


cli.add_command(finetune_cmd)
cli.add_command(embed_cmd)


def main() -> None:
    cli(prog_name="backbones")
