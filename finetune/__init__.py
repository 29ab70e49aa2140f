"""Fine-tuning: adapt a registered backbone to a user's labelled images and register the result.

Two recipes: a linear probe (a new head on frozen features, fitted in one solve) and a full
fine-tune (every layer, PyTorch, optionally across processes with torchrun); docs/benchmarks.md
has what each costs. Both register ONE ONNX graph with ``logits`` and ``features`` as a new
version whose spec records the data fingerprint, the split and the evaluation, and both can move
an alias only if the new version is better.

    from finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(data=Path("photos"), backbone="efficientnet_lite0", name="antsbees"))
    print(result.stored.tag, result.report["metrics"]["accuracy"])

Only the config and the errors are imported with the package; the rest (PyTorch among it) on
first use, so that ``backbones --help`` builds its options from :class:`FinetuneConfig` quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import FinetuneConfig
from .errors import DatasetError, TrainingError

if TYPE_CHECKING:
    from .data import ImageSet, Sample, scan_dataset
    from .pipeline import FinetuneResult, finetune
    from .promote import Promotion, promote_if_better
    from .report import summary_lines
    from .split import Split, make_split

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    "ImageSet": "data",
    "Sample": "data",
    "scan_dataset": "data",
    "FinetuneResult": "pipeline",
    "finetune": "pipeline",
    "Promotion": "promote",
    "promote_if_better": "promote",
    "summary_lines": "report",
    "Split": "split",
    "make_split": "split",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DatasetError",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageSet",
    "Promotion",
    "Sample",
    "Split",
    "TrainingError",
    "finetune",
    "make_split",
    "promote_if_better",
    "scan_dataset",
    "summary_lines",
]
