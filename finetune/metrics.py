"""Classification metrics from logits: accuracy, top-k, per-class precision/recall/F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.inference import softmax

from .config import config_default


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]`` = images of true class i predicted as class j."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def classification_report(
    logits: np.ndarray, y_true: np.ndarray, labels: Sequence[str], *, top_k: int = config_default("top_k")
) -> dict[str, Any]:
    """Metrics of ``logits`` (n, classes) against integer targets ``y_true``.

    ``top_k`` is capped at the class count (its value is reported as ``k``). A class with no
    validation image has recall ``None``; a class never predicted has precision ``None`` (it would
    be 0/0), and both are left out of the macro averages.
    """
    n, c = logits.shape
    if n == 0:
        raise ValueError("no validation images to evaluate")
    k = min(top_k, c)
    y_pred = logits.argmax(axis=1)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top_hit = (order == y_true[:, None]).any(axis=1)
    probs = softmax(logits)
    nll = -np.log(np.clip(probs[np.arange(n), y_true], 1e-12, 1.0))
    cm = confusion_matrix(y_true, y_pred, c)
    per_class: dict[str, dict[str, float | int | None]] = {}
    precisions, recalls, f1s = [], [], []
    for i, label in enumerate(labels):
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if precision is not None:
            precisions.append(precision)
        if recall is not None:
            recalls.append(recall)
        if f1 is not None:
            f1s.append(f1)
    return {
        "images": int(n),
        "accuracy": float((y_pred == y_true).mean()),
        "top_k": {"k": k, "accuracy": float(top_hit.mean())},
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_precision": float(np.mean(precisions)) if precisions else None,
        "macro_recall": float(np.mean(recalls)) if recalls else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "log_loss": float(nll.mean()),
        "per_class": per_class,
        "confusion": {"labels": list(labels), "matrix": cm.tolist()},
    }
