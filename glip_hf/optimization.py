"""AdamW parameter groups and the learning-rate schedule of a GLIP run (masked stage + unmasked tuning)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .arguments import TrainingArguments

# Tensors CLIP recipes exempt from weight decay: norms, biases, embedding tables, class token, temperature.
_NO_DECAY_NAMES = ("class_embedding", "logit_scale", "logit_bias")


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything exempt from decay."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                exempt = isinstance(sub, (nn.LayerNorm, nn.Embedding)) or param.ndim < 2 or name in _NO_DECAY_NAMES
                (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: list[nn.Module], args: TrainingArguments, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``modules``; ``fused`` (one kernel for all parameters) is for CUDA runs: on the CPU it is left off
    so that CPU results stay those of torch's default implementation."""
    return torch.optim.AdamW(
        parameter_groups(modules, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=fused or None,
    )


def lr_multiplier(step: int, main_steps: int, warmup_steps: int, tuning_steps: int, tuning_ratio: float) -> float:
    """Factor on the base learning rate at optimizer step ``step`` (0-based).

    Masked stage: linear warmup then cosine decay to 0 over ``main_steps``. Unmasked tuning: cosine decay from
    ``tuning_ratio`` (tuning lr / base lr) to 0 over ``tuning_steps``.
    """
    if step < main_steps:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, main_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    progress = (step - main_steps) / max(1, tuning_steps)
    return tuning_ratio * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, main_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * main_steps)
    ratio = args.unmasked_tuning_learning_rate / args.learning_rate
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, main_steps, warmup, args.unmasked_tuning_steps, ratio)
    )
