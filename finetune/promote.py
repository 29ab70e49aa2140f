"""The promotion gate: move an alias to the new version only if it is better on the same validation set.

Both versions are evaluated the same way: their own registered ONNX graph and eval preprocessing
(the serving path, through the feature cache), on the same validation images. Accuracy decides;
a tie does not promote. A missing alias is simply set.

Labels: the version the alias points to must classify the same label set. The same names in a
different order are compared name by name; a different set of names is a different task, and the
gate refuses to move the alias (it says so, and names the command that would move it by hand).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models import BackbonesError, Registry, Settings, StoredVersion, UnknownModelError

from .config import config_default
from .data import Sample
from .features import extract_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Promotion:
    alias: str
    promoted: bool
    new_tag: str
    new_accuracy: float | None
    old_tag: str | None
    old_accuracy: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        """One line for the terminal, with both figures."""
        name = self.new_tag.split(":")[0]
        figures = ""
        if self.new_accuracy is not None and self.old_accuracy is not None:
            figures = f" (new {self.new_tag} {self.new_accuracy:.4f} vs {self.old_tag} {self.old_accuracy:.4f})"
        verdict = f"{name}@{self.alias} -> {self.new_tag}" if self.promoted else f"{name}@{self.alias} not moved"
        return f"promotion: {verdict}: {self.reason}{figures}"


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


def promote_if_better(
    registry: Registry,
    new: StoredVersion,
    alias: str,
    val: Sequence[Sample],
    *,
    settings: Settings | None = None,
    batch_size: int = config_default("batch_size"),
) -> Promotion:
    """Evaluate ``new`` and the version ``<name>@<alias>`` on ``val``; move the alias only if the new
    version's accuracy is strictly higher (or the alias does not exist yet)."""
    name = new.spec.name
    labels = new.spec.labels
    new_acc = version_accuracy(new, val, registry=registry, settings=settings, batch_size=batch_size)
    try:
        old = registry.get(f"{name}@{alias}")
    except UnknownModelError:
        registry.set_alias(new.tag, alias)
        return Promotion(alias, True, new.tag, new_acc, None, None, f"{name}@{alias} did not exist yet: set it")
    except BackbonesError as e:  # the old version is damaged: say so, leave the alias alone
        return Promotion(alias, False, new.tag, new_acc, None, None, f"cannot evaluate {name}@{alias}: {e}")
    if set(old.spec.labels) != set(labels):
        only_old = sorted(set(old.spec.labels) - set(labels))[:5]
        only_new = sorted(set(labels) - set(old.spec.labels))[:5]
        return Promotion(
            alias,
            False,
            new.tag,
            new_acc,
            old.tag,
            None,
            f"{old.tag} classifies other labels (only there: {only_old}; only here: {only_new}), so the two "
            f"are not the same task; move it by hand if that is meant: backbones models alias {new.tag} {alias}",
        )
    old_acc = version_accuracy(old, val, registry=registry, settings=settings, batch_size=batch_size)
    if new_acc > old_acc:
        registry.set_alias(new.tag, alias)
        return Promotion(alias, True, new.tag, new_acc, old.tag, old_acc, "better accuracy")
    reason = "same accuracy (a tie does not promote)" if new_acc == old_acc else "not better"
    return Promotion(alias, False, new.tag, new_acc, old.tag, old_acc, reason)
