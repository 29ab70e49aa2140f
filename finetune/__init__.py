"""Fine-tuning: adapt a registered backbone to a user's labelled images and register the result.

Two recipes: a linear probe (a new head on frozen features: seconds on a CPU) and a full fine-tune
(every layer, PyTorch, optionally across processes with torchrun). Both register ONE ONNX graph
with ``logits`` and ``features`` as a new version whose spec records the data fingerprint, the
split and the evaluation, and both can move an alias only if the new version is better.

    from finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(data=Path("photos"), backbone="efficientnet_lite0", name="antsbees"))
    print(result.stored.tag, result.report["metrics"]["accuracy"])
"""

from .config import FinetuneConfig
from .data import ImageSet, Sample, scan_dataset
from .errors import DatasetError, TrainingError
from .pipeline import FinetuneResult, finetune
from .promote import Promotion, promote_if_better
from .report import summary_lines
from .split import Split, make_split

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
