"""Evaluation metrics as plain torch functions, and the same metrics as ``evaluate`` modules shipped here.

``load_metric("zero_shot_accuracy")`` / ``load_metric("retrieval_recall")`` return ``evaluate.load(<folder in this
package>)``: they load offline, unlike Hub metrics such as ``evaluate.load("accuracy")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

METRIC_NAMES = ("zero_shot_accuracy", "retrieval_recall")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """CLIP_benchmark's ``top1``, ``top5`` and ``mean_per_class_recall``, as fractions in [0, 1].

    Args:
        logits: ``(N, C)`` class scores; labels: ``(N,)`` class ids. Classes absent from ``labels`` do not enter
            the per-class mean (their recall is undefined).
    """
    k = min(5, num_classes)
    correct = logits.topk(k, dim=-1).indices == labels[:, None]  # (N, k)
    top1 = correct[:, 0].float()
    recalls = [top1[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "top1": top1.mean().item(),
        "top5": correct.any(dim=-1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def retrieval_metrics(
    scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """CLIP_benchmark's retrieval recall@K.

    A text query is correct at K if its own image is among the K best images; an image query if any of its
    captions is among the K best texts. Ties are ranked by index (a stable sort), so results are deterministic.

    Args:
        scores: ``(T, I)`` similarity of every text to every image.
        text_to_image: ``(T,)`` the image each text describes.
    Returns:
        ``image_retrieval_recall@K`` and ``text_retrieval_recall@K`` for each K, fractions in [0, 1].
    """
    num_texts, num_images = scores.shape
    ranked_images = scores.sort(dim=1, descending=True, stable=True).indices  # (T, I)
    image_hits = ranked_images == text_to_image[:, None]  # (T, I): rank r holds the text's image
    ranked_texts = scores.t().sort(dim=1, descending=True, stable=True).indices  # (I, T)
    text_hits = text_to_image[ranked_texts] == torch.arange(num_images, device=scores.device)[:, None]  # (I, T)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[:, : min(k, num_images)].any(dim=1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits[:, : min(k, num_texts)].any(dim=1).float().mean().item()
    return metrics


def metric_info(description: str, inputs_description: str):
    """``evaluate.MetricInfo`` shared by the shipped modules: per-example score lists and integer references."""
    import datasets
    import evaluate

    features = datasets.Features(
        {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
    )
    return evaluate.MetricInfo(
        description=description, citation="", inputs_description=inputs_description, features=features
    )


def metric_path(name: str) -> Path:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose one of {METRIC_NAMES}.")
    return Path(__file__).parent / name


def load_metric(name: str):
    """The ``evaluate`` module of ``name``, loaded from this package (no network)."""
    import evaluate

    return evaluate.load(str(metric_path(name)))
