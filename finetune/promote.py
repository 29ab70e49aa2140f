"""The promotion gate: move an alias to the new version only if it is better on the same validation set.

Both versions are evaluated the same way: their own registered ONNX graph and eval preprocessing
(the serving path, through the feature cache), on the same validation images. Accuracy decides;
a tie does not promote. The gate cannot promote a worse model by accident:

- the validation images it compares on played no part in training the new version: the linear
  probe chooses its penalty (and its backbone) by cross-validation on the training split, and the
  full fine-tune chooses its epoch on images held out of the training split;
- with fewer validation images than ``gate_min_images`` (:class:`~finetune.config.FinetuneConfig`)
  the gate refuses to compare, unless forced (``force_promotion``): one image would be several
  points of accuracy;
- the alias moves by compare-and-set: only if it still points where it pointed when the versions
  were compared (:meth:`models.Registry.compare_and_set_alias`); a concurrent move wins, and this
  promotion says so;
- an alias that points to a version that no longer exists is an error (``error`` is set), not
  "nothing to beat"; a missing alias is simply set.

Labels: the version the alias points to must classify the same label set. The same names in a
different order are compared name by name; a different set of names is a different task, and the
gate refuses to move the alias (it says so, and names the command that would move it by hand).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from models import BackbonesError, Registry, RegistryError, Settings, StoredVersion, UnknownModelError

from .config import config_default
from .data import Sample
from .features import extract_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Promotion:
    """What the gate did. ``error``: it could not judge (the alias points to a missing or damaged
    version), which the CLI reports with exit status 1."""

    alias: str
    promoted: bool
    new_tag: str
    new_accuracy: float | None
    old_tag: str | None
    old_accuracy: float | None
    reason: str
    error: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        """One line for the terminal, with both figures."""
        name = self.new_tag.split(":")[0]
        figures = ""
        if self.new_accuracy is not None and self.old_accuracy is not None:
            figures = f" (new {self.new_tag} {self.new_accuracy:.4f} vs {self.old_tag} {self.old_accuracy:.4f})"
        verdict = f"{name}@{self.alias} -> {self.new_tag}" if self.promoted else f"{name}@{self.alias} not moved"
        return f"promotion: {verdict}: {'error: ' if self.error else ''}{self.reason}{figures}"


@dataclass(frozen=True)
class Verdict:
    """The gate's decision before the alias is touched: ``promotion`` holds if the alias still
    points to ``expected`` (a version, or ``None``: not set) when it is moved."""

    promotion: Promotion
    expected: str | None


def version_accuracy(
    stored: StoredVersion,
    samples: Sequence[Sample],
    *,
    registry: Registry,
    settings: Settings | None = None,
    batch_size: int = config_default("batch_size"),
) -> float:
    """Accuracy of ``stored`` on ``samples`` (true labels by name), compared by label name so that
    a version whose classes are in another order is judged fairly."""
    table = extract_features(stored, samples, registry=registry, settings=settings, batch_size=batch_size)
    usable = [s for s in samples if s.sha256 in table.index]
    if len(usable) != len(samples):
        raise BackbonesError(f"{len(samples) - len(usable)} validation image(s) could not be read for {stored.tag}")
    _, logits = table.rows(usable)
    predicted = np.asarray(stored.spec.labels)[logits.argmax(1)]
    truth = np.asarray([s.label for s in usable])
    return float((predicted == truth).mean())


def compare(
    registry: Registry,
    new: StoredVersion,
    alias: str,
    val: Sequence[Sample],
    *,
    min_images: int = config_default("gate_min_images"),
    force: bool = config_default("force_promotion"),
    settings: Settings | None = None,
    batch_size: int = config_default("batch_size"),
) -> Verdict:
    """Evaluate ``new`` and the version ``<name>@<alias>`` on ``val``, touching nothing."""
    name = new.spec.name
    new_acc = version_accuracy(new, val, registry=registry, settings=settings, batch_size=batch_size)

    def verdict(
        promoted: bool, reason: str, old: str | None = None, old_acc: float | None = None, **kw: Any
    ) -> Verdict:
        return Verdict(Promotion(alias, promoted, new.tag, new_acc, old, old_acc, reason, **kw), expected)

    expected = None
    try:
        expected = registry.aliases(name).get(alias)
        if expected is None:
            return verdict(True, f"{name}@{alias} did not exist yet: set it")
        old = registry.get(f"{name}:{expected}")
    except UnknownModelError:
        return verdict(
            False,
            f"{name}@{alias} points to {expected}, which is no version of {name} (deleted?); that is not "
            f"'nothing to beat': point the alias at a version by hand (backbones models alias {new.tag} {alias})",
            error=True,
        )
    except BackbonesError as e:  # the old version (or the alias file) is damaged: say so, leave the alias alone
        return verdict(False, f"cannot evaluate {name}@{alias}: {e}", error=True)
    if set(old.spec.labels) != set(new.spec.labels):
        only_old = sorted(set(old.spec.labels) - set(new.spec.labels))[:5]
        only_new = sorted(set(new.spec.labels) - set(old.spec.labels))[:5]
        return verdict(
            False,
            f"{old.tag} classifies other labels (only there: {only_old}; only here: {only_new}), so the two "
            f"are not the same task; move it by hand if that is meant: backbones models alias {new.tag} {alias}",
            old.tag,
        )
    if len(val) < min_images and not force:
        return verdict(
            False,
            f"only {len(val)} validation image(s), fewer than the {min_images} the gate compares on (one image is "
            f"{100 / max(len(val), 1):.1f} points of accuracy): too few to tell; give more validation images "
            "(--val-dir, --val-fraction), or --force-promotion to compare anyway",
            old.tag,
        )
    old_acc = version_accuracy(old, val, registry=registry, settings=settings, batch_size=batch_size)
    if new_acc > old_acc:
        return verdict(True, "better accuracy", old.tag, old_acc)
    reason = "same accuracy (a tie does not promote)" if new_acc == old_acc else "not better"
    return verdict(False, reason, old.tag, old_acc)


def commit(registry: Registry, verdict: Verdict) -> Promotion:
    """Move the alias as ``verdict`` decided, if it still points where it did when compared."""
    p = verdict.promotion
    if not p.promoted:
        return p
    try:
        registry.compare_and_set_alias(p.new_tag, p.alias, verdict.expected)
    except RegistryError as e:
        return replace(p, promoted=False, reason=f"{e}; the comparison no longer holds (run the gate again)")
    return p


def promote_if_better(
    registry: Registry,
    new: StoredVersion,
    alias: str,
    val: Sequence[Sample],
    *,
    min_images: int = config_default("gate_min_images"),
    force: bool = config_default("force_promotion"),
    settings: Settings | None = None,
    batch_size: int = config_default("batch_size"),
) -> Promotion:
    """Evaluate ``new`` and the version ``<name>@<alias>`` on ``val``; move the alias only if the new
    version's accuracy is strictly higher (or the alias does not exist yet), see the module docstring."""
    verdict = compare(
        registry, new, alias, val, min_images=min_images, force=force, settings=settings, batch_size=batch_size
    )
    return commit(registry, verdict)
