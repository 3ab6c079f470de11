"""Image-text retrieval recall@K, as in CLIP_benchmark."""

import evaluate
import torch

from glip_hf.metrics import metric_info, retrieval_metrics

_DESCRIPTION = """
Recall@K for text-to-image retrieval (a text finds its image among the K best) and image-to-text retrieval (an
image finds any of its captions among the K best texts), as reported by CLIP_benchmark. One example per text query.
"""
_KWARGS = """
Args:
    predictions: list, one per text, of its similarity to every image (a list of floats of the same length).
    references: list, one per text, of the index of the image it describes.
    ks: recall cut-offs (default (1, 5, 10)).
Returns:
    image_retrieval_recall@K and text_retrieval_recall@K for each K: fractions in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS)

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        scores = torch.tensor(predictions, dtype=torch.float32)
        return retrieval_metrics(scores, torch.tensor(references, dtype=torch.long), ks)
