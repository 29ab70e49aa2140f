"""``backbones models``: the catalog of pretrained models and the registry of exported versions."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import echo_json, handle_errors
from .remote import add_remote_commands, registry_for, registry_option


@click.group("models")
def models_group() -> None:
    """The catalog of pretrained models and the registry of exported versions."""


@models_group.command("catalog")
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


@models_group.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@registry_option
@handle_errors
def models_list(name: str | None, as_json: bool, registry_url: str | None) -> None:
    """Registered versions (of NAME, or all), oldest first, with their aliases."""
    reg = registry_for(registry_url)
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


@models_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the version record as JSON.")
@registry_option
@handle_errors
def models_show(ref: str, as_json: bool, registry_url: str | None) -> None:
    """One version's record: preprocessing, labels, lineage, checksums, verification, aliases."""
    reg = registry_for(registry_url)
    stored = reg.get(ref)
    doc = stored.spec.model_dump(mode="json")
    doc["aliases"] = {a: v for a, v in reg.aliases(stored.spec.name).items()}
    doc["alias_history"] = reg.alias_history(stored.spec.name)
    doc["path"] = str(stored.path)
    doc["report_html"] = _html_report(reg, stored.spec.name, stored.spec.version)
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


@models_group.command("alias")
@click.argument("ref")
@click.argument("alias")
@click.option("--remove", is_flag=True, help="Remove ALIAS from REF's model instead of moving it.")
@click.option("--json", "as_json", is_flag=True, help="Print the recorded history event as JSON.")
@registry_option
@handle_errors
def models_alias(ref: str, alias: str, remove: bool, as_json: bool, registry_url: str | None) -> None:
    """Point ALIAS (production, staging, any name) at the version REF names.

    The move is atomic and recorded in an append-only history (see `models show`). A running
    service that follows the alias picks the new version up.
    """
    reg = registry_for(registry_url)
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


@models_group.command("delete")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Also delete a version that aliases point to (removes those aliases).")
@registry_option
@handle_errors
def models_delete(ref: str, force: bool, registry_url: str | None) -> None:
    """Delete one version (REF must be NAME:VERSION or NAME@ALIAS). A version that an alias
    points to is kept unless --force."""
    tag = registry_for(registry_url).delete(ref, force=force)
    click.echo(f"deleted {tag}")


add_remote_commands(models_group)


def _html_report(reg: Any, name: str, version: str) -> str | None:
    """Where a fine-tuned version's HTML report is on this machine (reports stay beside their run in
    the local store: they hold thumbnails of the training photos, so they are neither pushed nor served)."""
    from models import Registry

    if not isinstance(reg, Registry):
        return None
    from finetune.report_html import html_report_path

    html = html_report_path(reg, name, version)
    return str(html) if html.is_file() else None
