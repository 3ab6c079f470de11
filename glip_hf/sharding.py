"""What fully sharded data parallel (FSDP, through Accelerate) changes for a GLIP run, in one place.

- FSDP (torch's FSDP1 and FSDP2 alike) refuses 0-dim parameters, and CLIP's temperature ``logit_scale`` is one:
  `make_shardable` turns every 0-dim parameter into a 1-element one before the model is prepared, and
  `full_state_dict` turns them back when the model is saved, so that the saved model is a plain CLIP/GLIP checkpoint.
- Outside the model's forward pass a sharded parameter holds only this process's shard (FSDP1: a view, empty on the
  processes that do not own it; FSDP2: a ``DTensor``): the loop reads the temperature after the forward pass (where
  FSDP leaves the root module's parameters gathered until backward), and logs it with `parameter_value`.
- ``accelerator.clip_grad_norm_`` measures FSDP's sharded gradients only when it is given exactly the model's
  parameters: `gradient_norm` adds the (replicated) gradients of the loss module's own parameters to that norm.
- Accelerate 1.15 turns FSDP on only for GPU-like devices: a CPU run launched with an FSDP config silently runs plain
  data parallel instead; `check_launch` (``launch.py``) stops it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType


def uses_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def make_shardable(model: torch.nn.Module) -> list[str]:
    """Replace every 0-dim parameter of ``model`` by a 1-element one with the same value (before the optimizer is
    built). Returns their names; `full_state_dict` restores their shape when the model is saved."""
    names = []
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, attr, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            names.append(name)
    model._glip_scalar_parameters = names
    return names


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prepared ``model``'s full state dict on the main process (all processes call this: FSDP gathers the shards;
    the other processes get what Accelerate gives them, possibly nothing), with the shapes `make_shardable`
    changed restored and the names of the model itself (``torch.compile``'s ``_orig_mod.`` prefix removed: Accelerate
    unwraps DDP but keeps the compiled wrapper, whose names no ``from_pretrained`` reads)."""
    state = {name.removeprefix("_orig_mod."): value for name, value in accelerator.get_state_dict(model).items()}
    for name in getattr(accelerator.unwrap_model(model), "_glip_scalar_parameters", []):
        if name in state:
            state[name] = state[name].reshape(())
    return state


def parameter_value(accelerator: Accelerator, param: torch.Tensor) -> float:
    """The value of a 1-element parameter, whether plain, an FSDP2 ``DTensor`` or an FSDP1 shard view (a collective
    under FSDP: every process calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor().item()
    if not uses_fsdp(accelerator):
        return param.item()
    local = param.detach().reshape(-1).float()  # FSDP1: the element on the process(es) whose shard holds it
    total = torch.stack([local.sum(), torch.tensor(float(local.numel()), device=local.device)])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def gradient_norm(
    accelerator: Accelerator, model: torch.nn.Module, extra: list[torch.nn.Parameter], max_norm: float
) -> torch.Tensor:
    """Clip the gradients of ``model`` (as prepared) and of ``extra`` (parameters outside the model, their gradients
    already the same on every process) to a total norm of ``max_norm``; returns the total norm before clipping, a
    plain 0-dim tensor."""
    params = list(model.parameters())
    if not uses_fsdp(accelerator) or not any(p.grad is not None for p in extra):
        return _plain(accelerator.clip_grad_norm_(params + extra, max_norm))
    # FSDP measures its sharded gradients only for exactly its model's parameters: measure, then clip by one factor.
    sharded = _plain(accelerator.clip_grad_norm_(params, math.inf))
    replicated = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in extra if p.grad is not None]))
    total = torch.linalg.vector_norm(torch.stack([sharded.to(replicated), replicated]))
    factor = min(1.0, max_norm / (total.item() + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
    for param in params + extra:
        if param.grad is not None:
            param.grad.mul_(factor)
    return total


def _plain(norm: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm
