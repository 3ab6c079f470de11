"""Evaluation of CLIP-style models: zero-shot classification (more tasks in later sections of this module)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import decode_image


@torch.inference_mode()
def zero_shot_classifier(
    model, tokenizer, class_names: Sequence[str], templates: Sequence[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Class embeddings averaged over prompt templates (in embedding space), as in CLIP.

    Returns:
        ``(C, D)`` L2-normalised class weights.
    """
    weights = []
    for name in class_names:
        prompts = [template.format(name) for template in templates]
        text = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        embeds = F.normalize(model.get_text_features(**text).pooler_output.float(), dim=-1)  # (T, D)
        weights.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(weights)


def iterate_image_batches(
    rows: Sequence, image_processor, image_column: str, batch_size: int, skipped: list[int]
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """``(pixel_values (B, 3, S, S), row indices)`` batches; rows whose image does not decode are skipped and
    their count added to ``skipped[0]``."""
    images, indices = [], []
    for index, row in enumerate(rows):
        try:
            images.append(decode_image(row[image_column]))
            indices.append(index)
        except Exception:  # any decoding failure skips the sample
            skipped[0] += 1
        if len(images) == batch_size:
            yield image_processor(images=images, return_tensors="pt")["pixel_values"], indices
            images, indices = [], []
    if images:
        yield image_processor(images=images, return_tensors="pt")["pixel_values"], indices


@torch.inference_mode()
def encode_images(
    model, batches, device: torch.device | str = "cpu", total: int | None = None, desc: str = "images"
) -> tuple[torch.Tensor, list[int]]:
    """L2-normalised image features ``(N, D)`` for every decodable row, and the rows they belong to."""
    features, kept = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else None
    for pixel_values, indices in tqdm(batches, total=total, desc=desc, leave=False):
        with autocast or contextlib.nullcontext():
            embeds = model.get_image_features(pixel_values=pixel_values.to(device)).pooler_output
        features.append(F.normalize(embeds.float(), dim=-1))
        kept.extend(indices)
    return torch.cat(features) if features else torch.zeros(0, 0), kept


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """CLIP_benchmark's ``top1``, ``top5`` and ``mean_per_class_recall`` (fractions in [0, 1]).

    Args:
        logits: ``(N, C)`` scores; labels: ``(N,)`` class ids.
    """
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices  # (N, k)
    correct = topk == labels[:, None]
    top1 = correct[:, 0].float()
    recalls = [top1[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "top1": top1.mean().item(),
        "top5": correct.any(dim=-1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def evaluate_zero_shot(
    model,
    tokenizer,
    image_processor,
    dataset,
    class_names: Sequence[str],
    templates: Sequence[str],
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict:
    """Zero-shot classification of ``dataset`` rows; ``{"metrics", "num_samples", "num_skipped"}``."""
    import datasets

    if isinstance(dataset, datasets.Dataset) and isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    classifier = zero_shot_classifier(model, tokenizer, class_names, templates, device)
    skipped = [0]
    batches = iterate_image_batches(dataset, image_processor, image_column, batch_size, skipped)
    features, kept = encode_images(model, batches, device, total=math.ceil(len(dataset) / batch_size))
    labels = torch.tensor([dataset[i][label_column] for i in kept])
    logits = features @ classifier.t()
    return {
        "metrics": classification_metrics(logits, labels, len(class_names)),
        "num_samples": len(kept),
        "num_skipped": skipped[0],
    }
