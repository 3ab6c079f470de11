"""One training step of a GLIP run: encode both towers, the contrastive loss, backward (with feature-cached
accumulation over micro-batches). Kept apart from the loop so that benchmarks time exactly this code without the
data stack."""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _encode(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_embeds, text_embeds)``, each ``(B, D)``, L2-normalised, in at least float32 for the loss.

    An empty micro-batch (every sample skipped) runs one placeholder row and keeps none of it: CLIP cannot run on
    zero rows, and under DDP every process must run the model to take part in the gradient all-reduce."""
    rows = batch["pixel_values"].shape[0]
    if rows == 0:
        batch = {
            "pixel_values": batch["pixel_values"].new_zeros(1, *batch["pixel_values"].shape[1:]),  # (1, 3, S, S)
            "input_ids": batch["input_ids"].new_zeros(1, batch["input_ids"].shape[1]),  # (1, L)
            "attention_mask": batch["attention_mask"].new_ones(1, batch["attention_mask"].shape[1]),  # (1, L)
        }
    out = model(
        input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
    )
    dtype = torch.promote_types(out.image_embeds.dtype, torch.float32)  # bf16/fp16 features are upcast
    return out.image_embeds[:rows].to(dtype), out.text_embeds[:rows].to(dtype)


def train_step(model, loss_fn, unwrapped, micro_batches: list[dict], accelerator: Accelerator) -> torch.Tensor:
    """Forward and backward of one optimizer step over ``micro_batches``; returns the (detached) loss.

    The temperature is read from ``unwrapped`` (the model without its wrappers) after each forward pass: under FSDP
    it is a whole, differentiable parameter only then.

    With several micro-batches the loss is that of their union (open_clip's ``accum_freq`` feature caching): a
    no-grad pass caches every micro-batch's features, then each micro-batch is re-encoded with gradients and the
    full-batch loss back-propagated through it alone. The RNG state of each first pass is replayed so that both
    passes draw the same patch masks: the gradient equals that of one big batch.
    """
    if len(micro_batches) == 1:
        images, texts = _encode(model, micro_batches[0])
        loss = loss_fn(images, texts, unwrapped.logit_scale)
        accelerator.backward(loss)
        return loss.detach()
    states, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state(accelerator.device))
            cached.append(_encode(model, batch))
    last = len(micro_batches) - 1
    for j, batch in enumerate(micro_batches):
        _set_rng_state(states[j], accelerator.device)
        with accelerator.no_sync(model) if j < last else contextlib.nullcontext():
            images, texts = _encode(model, batch)
            logit_scale = unwrapped.logit_scale
            all_images = torch.cat([c[0] for c in cached[:j]] + [images] + [c[0] for c in cached[j + 1 :]])
            all_texts = torch.cat([c[1] for c in cached[:j]] + [texts] + [c[1] for c in cached[j + 1 :]])
            # Loss parameters (temperature, SigLIP bias) get their gradient once, on the synchronised pass.
            loss = loss_fn(all_images, all_texts, logit_scale if j == last else logit_scale.detach(), j != last)
            accelerator.backward(loss)
    return loss.detach()
