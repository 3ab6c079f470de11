"""AdamW parameter groups and the learning-rate schedule of a GLIP run (masked stage + unmasked tuning)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Schedule:
    """A run's learning-rate schedule, as factors on the base learning rate (see `lr_multiplier`): the masked stage
    (``main_steps`` optimizer steps, ``warmup_steps`` of them warmup), then ``tuning_steps`` of unmasked tuning."""

    main_steps: int
    warmup_steps: int
    tuning_steps: int
    tuning_ratio: float  # unmasked tuning lr / base lr

    @classmethod
    def of(cls, settings: Mapping[str, Any], main_steps: int) -> Schedule:
        """From a run's flat settings (``to_flat_dict`` of its arguments, or a checkpoint's ``run_config.yaml``)."""
        return cls(
            main_steps,
            settings["warmup_steps"] or math.ceil(settings["warmup_ratio"] * main_steps),
            settings["unmasked_tuning_steps"],
            settings["unmasked_tuning_learning_rate"] / settings["learning_rate"],
        )

    def multiplier(self, step: int) -> float:
        """Factor on the base learning rate at optimizer step ``step`` (0-based)."""
        return lr_multiplier(step, self.main_steps, self.warmup_steps, self.tuning_steps, self.tuning_ratio)

    def stage(self, step: int) -> str:
        """Where optimizer step ``step`` (0-based; or a checkpoint that has done ``step`` steps) falls."""
        if step < self.main_steps:
            return f"in its masked stage (step {step} of {self.main_steps})"
        if step < self.main_steps + self.tuning_steps:
            return f"in unmasked tuning (step {step - self.main_steps} of {self.tuning_steps})"
        return f"at the end of its run ({self.main_steps} masked + {self.tuning_steps} unmasked tuning steps)"


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function, not a callable object: LambdaLR saves and restores a callable object's attributes, which
    # would bring a checkpoint's schedule back over the resumed run's (see `restart_schedule`).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.multiplier(step))


def restart_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a checkpoint's state is loaded (``last_epoch``, the optimizer's lr): set the optimizer's lr and the
    last lr to what this run's schedule gives at ``last_epoch``, so that the first resumed update follows it. The
    same arithmetic as ``LambdaLR.step``, so an unchanged schedule resumes bit for bit."""
    step = scheduler.last_epoch
    values = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, value in zip(scheduler.optimizer.param_groups, values, strict=True):
        group["lr"] = value
    scheduler._last_lr = values  # what get_last_lr() reports (torch keeps no public setter)
