"""Memory-lean MLPs: the same function as CLIP's MLP, one MLP-wide tensor kept for backward instead of three.

CLIP's MLP is ``fc2(act(fc1(x)))``. For backward, autograd keeps ``fc1``'s output (the activation's input), whatever
the activation keeps besides (``quick_gelu``, ``x * sigmoid(1.702 x)``, keeps ``sigmoid(1.702 x)`` too) and the
activation's output (``fc2``'s input): three ``(B, T, intermediate)`` tensors per layer, the widest ones of the step.
open_clip's ViT-B/16 (``nn.GELU``) keeps two. [`LeanMLP`] keeps only ``fc1``'s output and recomputes the activation
in backward (one extra elementwise pass over it), for any activation without trainable parameters of its own
(one with them, e.g. ``prelu``, runs the plain MLP). Forward values are bit-identical (the same
operations); gradients are equal up to rounding. What it buys and costs: ``benchmarks/activation_memory.py`` and
``docs/benchmarks.md``.

Under ``torch.compile`` the compiler plans what backward keeps for the whole graph, so there [`LeanMLP`] runs the
activation and ``fc2`` as an activation checkpoint (``torch.utils.checkpoint``): the compiler recomputes what
backward needs of the region, the activation (backward never needs ``fc2``'s product). Same tensors kept as in eager
mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from transformers.models.clip.modeling_clip import CLIPMLP

from .modeling_glip import is_plain_linear


class _ActivationLinear(torch.autograd.Function):
    """``act(x) @ weight.T + bias``, keeping ``x`` (and the weight) for backward; ``act(x)`` is recomputed there."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        device = x.device.type
        ctx.activation = activation
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(activation(x), weight, bias)  # under the caller's autocast, as the plain MLP

    @staticmethod
    @once_differentiable  # the recomputed activation is detached: a second derivative would miss terms
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            x_ = x.detach().requires_grad_()
            activated = ctx.activation(x_)  # the forward's values, recomputed
        flat_grad = grad.reshape(-1, grad.shape[-1])  # (B*T, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_activated = grad @ weight.to(grad.dtype)  # (..., intermediate)
            (grad_x,) = torch.autograd.grad(activated, x_, grad_activated)
        if ctx.needs_input_grad[1]:
            flat_activated = activated.detach().reshape(-1, activated.shape[-1]).to(grad.dtype)
            grad_weight = (flat_grad.t() @ flat_activated).to(weight.dtype)  # (out, intermediate)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None


class LeanMLP(CLIPMLP):
    """CLIP's MLP keeping only ``fc1``'s output for backward. Input and output ``(..., hidden_size)``.

    Same parameters, names and checkpoint as `CLIPMLP`; built from one with [`LeanMLP.from_mlp`] (no copy).
    """

    @classmethod
    def from_mlp(cls, mlp: CLIPMLP) -> LeanMLP:
        lean = cls.__new__(cls)
        nn.Module.__init__(lean)
        lean.config, lean.activation_fn, lean.fc1, lean.fc2 = mlp.config, mlp.activation_fn, mlp.fc1, mlp.fc2
        return lean

    def _recomputes(self, hidden_states: torch.Tensor) -> bool:
        """Whether backward may recompute the activation: autograd records, an ``fc2`` that is read rather than
        called (`is_plain_linear`: not a LoRA wrapper, no hooks), an activation without trainable parameters
        (backward differentiates it by its input only)."""
        return (
            torch.is_grad_enabled()
            and hidden_states.requires_grad
            and is_plain_linear(self.fc2)
            and not any(p.requires_grad for p in getattr(self.activation_fn, "parameters", tuple)())
        )

    def _activation_fc2(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(hidden_states))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)  # (..., intermediate)
        if not self._recomputes(hidden_states):
            return self._activation_fc2(hidden_states)
        if torch.compiler.is_compiling():
            # The compiler plans what backward keeps for the whole graph (it would merge a recomputation written
            # in backward with the forward's); a checkpoint tells it to recompute the region's tensors backward
            # needs: the activation's output. No custom policy: one that saved fc2's product made the compiler keep
            # it inside transformers' gradient checkpointing, and torch warns about any custom policy.
            return checkpoint(self._activation_fc2, hidden_states, use_reentrant=False)
        return _ActivationLinear.apply(hidden_states, self.fc2.weight, self.fc2.bias, self.activation_fn)


def use_lean_activations(model: nn.Module) -> int:
    """Replace every transformers `CLIPMLP` in ``model`` by a [`LeanMLP`] sharing its layers; returns how many."""
    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is CLIPMLP:
                setattr(module, name, LeanMLP.from_mlp(child))
                replaced += 1
    return replaced
