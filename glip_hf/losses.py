"""Contrastive losses over the global batch.

Each process contributes its image and text features; features are all-gathered *with gradients*, and each process
computes the loss of its own rows against every column (open_clip's ``local_loss`` with ``gather_with_grad``). The
distributed-data-parallel gradient average then equals the gradient of one process on the concatenated batch.
Processes may hold different numbers of rows (samples skipped for bad data): features are padded for the gather.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# CLIP caps the learnable temperature so that logits are scaled by at most 100.
MAX_LOGIT_SCALE = math.log(100.0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_row_counts(rows: int, device: torch.device) -> list[int]:
    """Rows of every process (this one holds ``rows``): one all-gather and one wait for the device, so a loss
    asks once per step, not once per gathered tensor."""
    if not _distributed():
        return [rows]
    size = torch.tensor([rows], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in torch.cat(sizes).tolist()]


def gather_with_grad(features: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, int, float]:
    """All-gather ``features`` (B_local, D) from every process, keeping the autograd graph.

    ``sizes`` are every process's row counts (`global_row_counts`), gathered here if not given.
    Returns:
        ``(all_features (B_global, D), offset, weight)``: ``offset`` is the index of this process's first row and
        ``weight = world_size * B_local / B_global`` turns this process's mean loss into its share of the global
        mean once distributed data parallel averages gradients (1 when every process holds as many rows).
    """
    if not _distributed():
        return features, 0, 1.0
    from torch.distributed.nn.functional import all_gather

    if sizes is None:
        sizes = global_row_counts(features.shape[0], features.device)
    padded = F.pad(features, (0, 0, 0, max(sizes) - features.shape[0]))
    gathered = all_gather(padded)  # differentiable: gradients flow back to the owning process
    rank, total = dist.get_rank(), sum(sizes)
    weight = len(sizes) * features.shape[0] / max(1, total)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sum(sizes[:rank]), weight


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP over the global batch.

    Args:
        image_embeds, text_embeds: (B_local, D) L2-normalised features of this process.
        logit_scale: scalar, the *log* of the temperature's inverse (as `CLIPModel.logit_scale`).
    Returns:
        Scalar: mean over this process's rows of the image->text and text->image cross-entropies (times the
        gather weight, so that the average over processes is the mean over the global batch).
    """
    sizes = global_row_counts(image_embeds.shape[0], image_embeds.device)  # the texts' are the same
    all_images, offset, weight = gather_with_grad(image_embeds, sizes)
    all_texts, _, _ = gather_with_grad(text_embeds, sizes)
    scale = logit_scale.exp()
    logits_per_image = scale * image_embeds @ all_texts.t()  # (B_local, B_global)
    logits_per_text = scale * text_embeds @ all_images.t()  # (B_local, B_global)
    if image_embeds.shape[0] == 0:  # every sample of this process was skipped: contribute nothing, stay in sync
        return logits_per_image.sum() + logits_per_text.sum()
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    return weight * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss of SigLIP (arXiv 2303.15343) of this process's images against all texts.

    Returns:
        Scalar: ``-sum log sigmoid(z_ij * (t * x_i . y_j + b)) / B_local`` with ``z_ij = 1`` on matching pairs.
    """
    all_texts, offset, weight = gather_with_grad(text_embeds)
    logits = logit_scale.exp() * image_embeds @ all_texts.t() + logit_bias  # (B_local, B_global)
    rows = torch.arange(image_embeds.shape[0], device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + offset] = 1.0
    return -weight * F.logsigmoid(signs * logits).sum() / max(1, image_embeds.shape[0])


class ContrastiveLoss(nn.Module):
    """The run's loss as a module, so that SigLIP's learnable bias is trained and checkpointed with the model."""

    def __init__(self, kind: str = "clip", bias_init: float = -10.0):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {kind!r}.")
        self.kind = kind
        self.logit_bias = nn.Parameter(torch.tensor(bias_init)) if kind == "siglip" else None

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        detach_parameters: bool = False,
    ) -> torch.Tensor:
        """``detach_parameters`` stops gradients to the loss's own parameters (used by feature-cached accumulation,
        where the full-batch loss is back-propagated once per micro-batch)."""
        if self.kind == "siglip":
            bias = self.logit_bias.detach() if detach_parameters else self.logit_bias
            return siglip_loss(image_embeds, text_embeds, logit_scale, bias)
        return clip_loss(image_embeds, text_embeds, logit_scale)
