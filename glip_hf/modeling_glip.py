"""GLIP models: transformers' CLIP with patch tokens dropped after the vision embeddings (arXiv 2403.15837).

Only the vision embeddings differ from CLIP. In training (``model.train()``) with ``mask_ratio > 0`` they keep
``k = max(1, int(N * (1 - mask_ratio)))`` patches chosen by [`glip_hf.masking`] plus the CLS token, so every
encoder layer runs on ``k + 1`` tokens. The patch projection runs on the kept patches only. In eval mode the
model is exactly CLIP; [`masked_inference`] turns masking on (or off) explicitly for evaluation.

The attention layers are CLIP's with one change in training mode, [`GLIPAttention`]: one fused q/k/v projection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPPreTrainedModel,
    CLIPVisionEmbeddings,
    eager_attention_forward,
)

from .configuration_glip import MASKING_FIELDS, GLIPConfig, GLIPVisionConfig
from .masking import gather_patches, keep_indices_from_offset, masking_offset, num_kept_patches


@dataclass(frozen=True)
class MaskingSpec:
    """What the vision embeddings apply in one forward pass."""

    mask_ratio: float
    mask_strategy: str
    mask_sigma: float
    generator: torch.Generator | None = field(default=None, compare=False)  # None: the global RNG (training)


class GLIPVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP's vision embeddings, dropping patch tokens when masking is active.

    Position embeddings are added before dropping, so a kept patch keeps its position; the CLS token is always
    kept. Output ``(B, 1 + k, D)`` when masking, else ``(B, 1 + N, D)`` exactly as CLIP.
    """

    def __init__(self, config: GLIPVisionConfig):
        if not all(hasattr(config, name) for name in MASKING_FIELDS):
            raise ValueError(
                f"a {type(config).__name__} has no masking fields; build GLIP models from a GLIPConfig "
                "(GLIPConfig(**clip_config.to_dict()) turns a CLIP config into one) or load them with from_pretrained."
            )
        super().__init__(config)
        grid = self.image_size // self.patch_size
        # 1 - pdf for the configured grid, on the model's device; other grids/sigmas are computed on the fly.
        self.register_buffer(
            "mask_offset", masking_offset(grid, config.mask_strategy, config.mask_sigma), persistent=False
        )
        self._offset_key = ((grid, grid), config.mask_strategy, config.mask_sigma)
        self.masking_override: MaskingSpec | None = None  # set by `masked_inference`

    def _apply(self, fn, recurse: bool = True):
        # The prior is a function of the config: after every move or cast, recompute it in float32 on the buffer's
        # new device. A cast would round it (bf16 moves 1 - pdf by up to 0.002 and changes masks), and `to_empty`
        # (meta-device init, FSDP materialisation) leaves it as uninitialised memory. Built outside inference mode
        # (no inference tensor left behind) and put back in shared memory after `share_memory()`.
        super()._apply(fn, recurse)
        moved = self.mask_offset
        if moved.device.type != "meta":
            with torch.inference_mode(False):
                self.mask_offset = masking_offset(*self._offset_key, device=moved.device)
            if moved.is_shared() and moved.device.type == "cpu":
                self.mask_offset.share_memory_()
        return self

    def active_masking(self) -> MaskingSpec | None:
        """The masking this forward pass applies, or None for the full (CLIP) path."""
        spec = self.masking_override
        if spec is None and self.training:
            spec = MaskingSpec(*(getattr(self.config, name) for name in MASKING_FIELDS))
        return spec if spec is not None and spec.mask_ratio > 0 else None

    def _offset(self, grid: tuple[int, int], spec: MaskingSpec) -> torch.Tensor:
        # A buffer cast behind `_apply`'s back (FSDP1's MixedPrecision(buffer_dtype=bf16) sets `.data`) is not used.
        if (grid, spec.mask_strategy, spec.mask_sigma) == self._offset_key and self.mask_offset.dtype == torch.float32:
            return self.mask_offset
        return masking_offset(grid, spec.mask_strategy, spec.mask_sigma, device=self.mask_offset.device)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        spec = self.active_masking()
        if spec is None:
            return super().forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        batch_size, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size})."
            )
        p = self.patch_size
        grid = (height // p, width // p)
        num_patches = grid[0] * grid[1]
        keep = keep_indices_from_offset(
            batch_size, self._offset(grid, spec), num_kept_patches(num_patches, spec.mask_ratio), spec.generator
        )  # (B, k)

        # The stride-p convolution equals a linear map on flattened p x p patches: project only the kept ones.
        weight = self.patch_embedding.weight  # (D, C, p, p)
        patches = gather_patches(pixel_values, keep, p).to(weight.dtype)  # (B, k, C*p*p)
        patch_embeds = patches @ weight.flatten(1).t()  # (B, k, D)

        positions = self._position_table(num_patches, height, width, interpolate_pos_encoding)  # (1, 1 + N, D)
        patch_positions = positions[:, 1:].expand(batch_size, -1, -1)
        patch_positions = patch_positions.gather(1, keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))  # (B, k, D)
        class_embeds = (self.class_embedding + positions[0, 0]).expand(batch_size, 1, -1)  # (B, 1, D)
        return torch.cat([class_embeds, patch_embeds + patch_positions], dim=1)  # (B, 1 + k, D)

    def _position_table(self, num_patches: int, height: int, width: int, interpolate: bool) -> torch.Tensor:
        """Position embeddings ``(1, 1 + N, D)`` for the grid of this input, interpolated if asked."""
        if not interpolate:
            return self.position_embedding.weight.unsqueeze(0)
        # `interpolate_pos_encoding` reads only the shape of its first argument.
        shape_only = torch.empty(1, 1 + num_patches, self.embed_dim, device="meta")
        return self.interpolate_pos_encoding(shape_only, height, width)


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether calling ``layer`` is exactly ``F.linear(x, layer.weight, layer.bias)``: an `nn.Linear` itself, not a
    subclass or wrapper (a LoRA layer, a quantised one), with no forward hooks. Code that reads the weights instead of
    calling the layer must check this, or it silently computes another function."""
    return type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)


class GLIPAttention(CLIPAttention):
    """CLIP's attention computing ``q``, ``k`` and ``v`` in one projection while training. Input ``(B, T, D)``.

    CLIP projects with three separate layers; under autocast each casts the float32 layer-norm output to bf16
    itself and keeps its own copy for backward (three ``(B, T, D)`` copies of the same values), and backward runs
    three matrix products for the input gradient. In training mode this layer projects once with the three weights
    stacked, as open_clip does: one copy kept, one product each way, and the input gradient summed inside the
    product (values equal to CLIP's up to rounding). It does so with or without autograd, so that the two passes of
    feature-cached accumulation (`glip_hf.step.train_step`) compute the same features. In eval mode it runs CLIP's
    code unchanged, so an eval-mode model gives CLIP's outputs bit for bit, gradients too; so does a wrapped or
    hooked projection (e.g. LoRA), which is called, not read. Same parameters and checkpoint as `CLIPAttention`;
    what it saves: ``benchmarks/activation_memory.py``. In float32 training without autocast the stacked weight is
    kept for backward (``3 D x D`` floats per layer; under autocast it replaces the three bf16 copies kept anyway).
    """

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if not self.training or not all(map(is_plain_linear, projections)):
            return super().forward(hidden_states, attention_mask, **kwargs)
        weight = torch.cat([layer.weight for layer in projections])  # (3 D, D)
        bias = torch.cat([layer.bias for layer in projections])  # (3 D,)
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        queries, keys, values = (
            part.view(heads).transpose(1, 2)  # (B, H, T, D / H)
            for part in F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        )
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self,
            queries,
            keys,
            values,
            attention_mask,
            scaling=self.scale,
            dropout=self.dropout,  # this path runs in training mode only
            **kwargs,
        )  # (B, T, H, D / H)
        return self.out_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _use_glip_attention(model: nn.Module) -> None:
    """Put a [`GLIPAttention`] in place of every `CLIPAttention` of ``model`` (before its weights are initialised)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is CLIPAttention:
                setattr(module, name, GLIPAttention(child.config))


class GLIPPreTrainedModel(CLIPPreTrainedModel):
    config: GLIPConfig
    config_class = GLIPConfig
    base_model_prefix = "clip"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "GLIPVisionEmbeddings"]

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers skips `_init_weights` for parameter-less modules (CLIPAttention, CLIPMLP) of "custom code",
        # which would leave their projections at the generic init. Our init goes through the flag-aware
        # `transformers.initialization` functions like in-library models, so the shortcut is not needed.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GLIPVisionEmbeddings):
            # Non-persistent buffers are not in checkpoints: refill them when weights are (re)initialised.
            grid, strategy, sigma = module._offset_key
            init.copy_(module.mask_offset, masking_offset(grid, strategy, sigma))


class GLIPVisionModel(CLIPVisionModel, GLIPPreTrainedModel):
    """[`transformers.CLIPVisionModel`] with [`GLIPVisionEmbeddings`]."""

    config: GLIPVisionConfig
    config_class = GLIPVisionConfig

    def __init__(self, config: GLIPVisionConfig):
        super().__init__(config)
        self.embeddings = GLIPVisionEmbeddings(config)
        _use_glip_attention(self)
        self.post_init()  # initialise the swapped module as CLIP does


class GLIPVisionModelWithProjection(CLIPVisionModelWithProjection, GLIPPreTrainedModel):
    """[`transformers.CLIPVisionModelWithProjection`] with [`GLIPVisionEmbeddings`]: ``image_embeds`` ``(B, P)``.

    Loads the vision tower and projection of a full GLIP (or CLIP) checkpoint, as CLIP's class does:

    ```python
    >>> from glip_hf import GLIPVisionModelWithProjection
    >>> model = GLIPVisionModelWithProjection.from_pretrained("outputs/default")
    >>> model(pixel_values=pixels).image_embeds  # (B, projection_dim), unnormalised
    ```"""

    config: GLIPVisionConfig
    config_class = GLIPVisionConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: GLIPVisionConfig):
        super().__init__(config)
        self.vision_model = GLIPVisionModel._from_config(config)  # its attention is GLIP's already
        self.post_init()


class GLIPModel(CLIPModel, GLIPPreTrainedModel):
    """[`transformers.CLIPModel`] whose vision tower is a [`GLIPVisionModel`].

    Example:

    ```python
    >>> from glip_hf import GLIPModel
    >>> model = GLIPModel.from_pretrained("openai/clip-vit-base-patch16", mask_ratio=0.5, mask_strategy="gaussian")
    >>> model.train()  # masking is active in training only
    ```"""

    config: GLIPConfig
    config_class = GLIPConfig

    def __init__(self, config: GLIPConfig):
        super().__init__(config)
        self.vision_model = GLIPVisionModel._from_config(config.vision_config)
        _use_glip_attention(self.text_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embedding. transformers' `CLIPModel` names none (it raises), and Accelerate's FSDP2
        asks every model for it when sharding."""
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value


def glip_embeddings(model: nn.Module) -> list[GLIPVisionEmbeddings]:
    """Every [`GLIPVisionEmbeddings`] inside ``model`` (works through DDP / compile / pipeline wrappers)."""
    return [module for module in model.modules() if isinstance(module, GLIPVisionEmbeddings)]


@contextlib.contextmanager
def masked_inference(
    model: nn.Module,
    mask_ratio: float,
    mask_strategy: str | None = None,
    mask_sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[nn.Module]:
    """Apply masking in every forward pass inside the block, in eval mode too (the paper's *masked inference*).

    ``mask_ratio=0`` turns masking off, in training mode too. Strategy and sigma default to the model's config
    (``None``; any other value, ``0`` included, is validated). Masks are drawn from ``generator`` (on the model's
    device) when given, so that a seeded evaluation is reproducible; else from the global RNG.

    ```python
    >>> with masked_inference(model, mask_ratio=0.5):
    ...     features = model.get_image_features(pixel_values=pixel_values)
    ```
    """
    modules = glip_embeddings(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no GLIP vision embeddings; load it with GLIPModel.from_pretrained."
        )
    previous = [module.masking_override for module in modules]
    try:
        for module in modules:
            # Validate through the config class so a bad value names its field.
            checked = GLIPVisionConfig(
                mask_ratio=mask_ratio,
                mask_strategy=module.config.mask_strategy if mask_strategy is None else mask_strategy,
                mask_sigma=module.config.mask_sigma if mask_sigma is None else mask_sigma,
            )
            module.masking_override = MaskingSpec(*(getattr(checked, name) for name in MASKING_FIELDS), generator)
        yield model
    finally:
        for module, spec in zip(modules, previous):
            module.masking_override = spec


__all__ = [
    "GLIPAttention",
    "GLIPModel",
    "GLIPPreTrainedModel",
    "GLIPVisionEmbeddings",
    "GLIPVisionModel",
    "MaskingSpec",
    "glip_embeddings",
    "masked_inference",
]
