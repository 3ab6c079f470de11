"""Zero-shot classification accuracy (top-1, top-5, mean per-class recall), as in CLIP_benchmark."""

import evaluate
import torch

from glip_hf.metrics import classification_metrics, metric_info

_DESCRIPTION = """
Top-1 and top-5 accuracy and mean per-class recall of class scores, the zero-shot classification metrics of
CLIP_benchmark. `predictions` are per-example class scores (logits or similarities), `references` class ids.
"""
_KWARGS = """
Args:
    predictions: list of per-example class scores (each a list of floats, one per class).
    references: list of class ids.
    num_classes: number of classes (default: length of the score lists).
Returns:
    top1, top5, mean_per_class_recall: fractions in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ZeroShotAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS)

    def _compute(self, predictions, references, num_classes=None):
        logits = torch.tensor(predictions, dtype=torch.float32)
        labels = torch.tensor(references, dtype=torch.long)
        return classification_metrics(logits, labels, num_classes or logits.shape[1])
