"""Checkpoint conversion between open_clip and GLIP / CLIP (transformers).

The GLIP reference code is an open_clip fork, so its checkpoints (and any open_clip ViT CLIP) are open_clip state
dicts or training checkpoints (``{"epoch", "state_dict", ...}`` with ``module.`` prefixes)::

    python -m glip_hf.convert from-open-clip epoch_30.pt --out glip-vit-b-16 --mask_ratio 0.5
    python -m glip_hf.convert from-open-clip model.safetensors --out clip-dir --flavour clip --quick_gelu
    python -m glip_hf.convert from-open-clip epoch_30.pt --out DIR --open_clip_config ViT-B-16.json
    python -m glip_hf.convert to-open-clip glip-vit-b-16 --out glip-vit-b-16.pt   # + glip-vit-b-16.json

``from-open-clip`` infers the architecture from the tensor shapes. A state dict does not record the activation
(``--quick_gelu`` for OpenAI-style ``*-quickgelu`` models), the attention head counts (default ``width // 64``, as
in every standard open_clip config), the layer-norm epsilon (default 1e-5, open_clip's) or the text pooling
(default: at the argmax of the token ids, open_clip's ``pool_type="argmax"``, stored as transformers' legacy
``eos_token_id=2``). Give them as flags, or give the model's open_clip config JSON with ``--open_clip_config``.
Options with no CLIP equivalent (attentional pooling, layer scale, no ``ln_pre``, average pooling, a text CLS
token, a biased text projection, a SigLIP ``logit_bias``, timm/HF/ResNet towers, ...) are refused with one line.

``to-open-clip`` writes a state dict that ``open_clip.CLIP`` built from the written model config loads with
``strict=True``::

    open_clip.add_model_config("glip-vit-b-16.json")
    model = open_clip.create_model("glip-vit-b-16", pretrained="glip-vit-b-16.pt")

open_clip feeds the text tower exactly ``context_length`` tokens (its tokenizer pads to it); transformers accepts
shorter sequences.

Masking: open_clip's ``patch_dropout`` is FLIP's random masking. A model config with ``patch_dropout: p`` converts
to ``mask_ratio=p, mask_strategy="random"`` (with the paper's fork flag ``normal_masking: true``, Gaussian at its
sigma 0.2); each of ``--mask_ratio`` / ``--mask_strategy`` / ``--mask_sigma`` overrides its own field. Without a
model config, or with ``patch_dropout`` 0, the masking is GLIPConfig's default, Gaussian 50%. Models trained with
open_clip's ``--force-patch-dropout p`` (stock configs have no ``patch_dropout``, and training saves no model config)
need the flags: ``--mask_strategy random --mask_ratio p`` for FLIP, ``--mask_ratio p`` for the fork's GLIP
(``--force-patch-dropout p --normal-masking``; Gaussian, sigma 0.2, is the default).
``to-open-clip`` writes random masking as ``patch_dropout``; Gaussian masking has no stock open_clip counterpart and
is not written (the command says so).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .cli import OneLineErrorParser, run_cli
from .configuration_glip import MASK_STRATEGIES, MASKING_FIELDS, GLIPConfig
from .hub import export_to_clip

OPEN_CLIP_HEAD_WIDTH = 64  # open_clip's CLIPVisionCfg.head_width default; its standard text towers match it
OPEN_CLIP_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which open_clip uses unless norm_kwargs say otherwise
ARGMAX_EOS_TOKEN_ID = 2  # transformers' CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2 (legacy)
ACTIVATIONS = {False: "gelu", True: "quick_gelu"}  # open_clip's nn.GELU / QuickGELU -> transformers' hidden_act
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
PROG = "python -m glip_hf.convert"


@dataclass(frozen=True)
class OpenCLIPSettings:
    """What an open_clip state dict does not record (its model config JSON does); ``None``: not given."""

    quick_gelu: bool | None = None  # OpenAI-style QuickGELU (open_clip's `*-quickgelu` models); default False
    vision_heads: int | None = None  # default vision width // 64
    text_heads: int | None = None  # default text width // 64
    layer_norm_eps: float | None = None  # default 1e-5
    eos_token_id: int | None = None  # pool text at the first such token; default argmax(token ids)

    def __post_init__(self) -> None:
        for name, minimum in (("vision_heads", 1), ("text_heads", 1), ("eos_token_id", 0)):
            value = getattr(self, name)
            if value is not None and not _is_int(value, minimum):
                raise ValueError(f"{name}={value!r}: expected an int >= {minimum}.")
        if self.layer_norm_eps is not None and not _is_positive_number(self.layer_norm_eps):
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r}: expected a finite number > 0.")

    def over(self, base: OpenCLIPSettings | None) -> OpenCLIPSettings:
        """These settings, with the ones not given taken from ``base``."""
        given = {key: value for key, value in asdict(self).items() if value is not None}
        return replace(base or OpenCLIPSettings(), **given)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------------------------------------------------------
# Key mapping, one table for both directions.

_BLOCK_KEYS = {  # open_clip resblock suffix -> transformers encoder-layer suffix
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# nn.MultiheadAttention packs q, k, v along dim 0 of in_proj_weight (3D, D) / in_proj_bias (3D,).
_QKV_KEYS = {"attn.in_proj_weight": "self_attn.{}_proj.weight", "attn.in_proj_bias": "self_attn.{}_proj.bias"}
_TOP_KEYS = {  # open_clip key -> (transformers key, how the tensor changes)
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", "same"),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", "same"),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", "same"),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", "same"),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", "same"),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", "same"),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", "same"),
    "visual.proj": ("visual_projection.weight", "transpose"),  # x @ proj (W, E) == Linear with weight (E, W)
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", "same"),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", "same"),
    "ln_final.weight": ("text_model.final_layer_norm.weight", "same"),
    "ln_final.bias": ("text_model.final_layer_norm.bias", "same"),
    "text_projection": ("text_projection.weight", "transpose"),
    "logit_scale": ("logit_scale", "scalar"),
}
_TOWERS = (
    ("visual.transformer.resblocks", "vision_model.encoder.layers"),
    ("transformer.resblocks", "text_model.encoder.layers"),
)


def _key_table(vision_layers: int, text_layers: int) -> Iterator[tuple[str, str | tuple[str, ...], str]]:
    """``(open_clip key, transformers key(s), kind)`` for every weight of a ViT CLIP of this depth."""
    for open_clip_key, (hf_key, kind) in _TOP_KEYS.items():
        yield open_clip_key, hf_key, kind
    for (open_clip_prefix, hf_prefix), layers in zip(_TOWERS, (vision_layers, text_layers)):
        for i in range(layers):
            for suffix, hf_suffix in _BLOCK_KEYS.items():
                yield f"{open_clip_prefix}.{i}.{suffix}", f"{hf_prefix}.{i}.{hf_suffix}", "same"
            for suffix, hf_pattern in _QKV_KEYS.items():
                hf_keys = tuple(f"{hf_prefix}.{i}.{hf_pattern.format(part)}" for part in "qkv")
                yield f"{open_clip_prefix}.{i}.{suffix}", hf_keys, "qkv"


def open_clip_to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], vision_layers: int, text_layers: int
) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (prefixes stripped, ``attn_mask`` dropped) as transformers CLIPModel keys."""
    converted = {}
    for open_clip_key, hf_key, kind in _key_table(vision_layers, text_layers):
        tensor = state_dict[open_clip_key]
        if kind == "qkv":
            converted.update(zip(hf_key, (part.contiguous() for part in tensor.chunk(3, dim=0))))
        elif kind == "transpose":
            converted[hf_key] = tensor.t().contiguous()
        elif kind == "scalar":
            converted[hf_key] = tensor.reshape(())
        else:
            converted[hf_key] = tensor
    return converted


def hf_to_open_clip_state_dict(
    state_dict: dict[str, torch.Tensor], vision_layers: int, text_layers: int
) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel / GLIPModel state dict as the keys of an ``open_clip.CLIP``."""
    converted = {}
    for open_clip_key, hf_key, kind in _key_table(vision_layers, text_layers):
        if kind == "qkv":
            converted[open_clip_key] = torch.cat([state_dict[key] for key in hf_key], dim=0)
        elif kind == "transpose":
            converted[open_clip_key] = state_dict[hf_key].t().contiguous()
        else:
            converted[open_clip_key] = state_dict[hf_key].contiguous()
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Reading an open_clip checkpoint.

# Keys of open_clip models this conversion refuses, with the option that put them there.
_UNSUPPORTED_KEYS = (
    (r"\.ls_[12]\.gamma$", "layer scale (ls_init_value)"),
    (r"^visual\.attn_pool", "attentional pooling (attentional_pool)"),
    (r"^logit_bias$", "a SigLIP logit_bias"),
    (r"^text_projection\.(weight|bias)$", "a text projection with bias (proj_bias)"),
    (r"^cls_emb$", "a text CLS token (embed_cls)"),
    (r"^visual\.patchnorm_pre_ln", "input patch norm (input_patchnorm)"),
    (r"\.(ln_attn|mlp\.ln|attn\.ln_inner|attn\.ln_q|attn\.ln_k)\.", "custom blocks (qk_norm / scale_attn / scale_fc)"),
    (r"\.attn\.(head_scale|logit_scale)$", "custom attention (scaled_cosine_attn / scale_heads)"),
    (r"^visual\.trunk\.", "a timm image tower (timm_model_name)"),
    (r"^visual\.(layer1|stem|attnpool)", "a ResNet image tower"),
    (r"^text\.transformer\.(embeddings|encoder)", "a Hugging Face text tower (hf_model_name)"),
    (r"^(text_decoder|visual\.attn_pool_contrastive)", "a CoCa model"),
)
_MISSING_HINTS = {  # why a key of the table is missing, where the reason is known
    **{key: "not an open_clip CLIP state dict" for key in _TOP_KEYS},
    "visual.ln_pre.weight": "the model has no layer norm before the image transformer: no_ln_pre",
    "visual.proj": "the model has no image projection",
    "text_projection": "the model has no text projection: proj_type='none'",
    "visual.conv1.weight": "not a ViT image tower",
}


def _check_keys(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    for pattern, option in _UNSUPPORTED_KEYS:
        hits = [key for key in state_dict if re.search(pattern, key)]
        if hits:
            raise ValueError(
                f"{path}: the checkpoint uses {option} ({hits[0]}), which CLIP in transformers cannot express; "
                "only plain open_clip ViT CLIP models convert."
            )
    for key, why in _MISSING_HINTS.items():
        if key not in state_dict:
            raise ValueError(f"{path}: missing {key!r} ({why}); only plain open_clip ViT CLIP models convert.")


def _read_checkpoint_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist or is not a file; give an open_clip .pt/.safetensors."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable .safetensors file ({error}).") from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure: a full pickled model, a TorchScript archive, a damaged file
        first = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) ({first}); load it where it was made and save "
            "model.state_dict() (or a .safetensors file) instead."
        ) from error


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    if "positional_embedding" not in stripped and "text.positional_embedding" in stripped:
        # open_clip's CustomTextCLIP keeps the same text tower under `text.`.
        stripped = {key.removeprefix("text."): value for key, value in stripped.items()}
    return stripped


def load_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an open_clip ViT CLIP checkpoint, in ``open_clip.CLIP`` keys.

    ``path`` is a ``.safetensors`` file, a saved ``state_dict()``, or an open_clip training checkpoint
    (``{"epoch", "state_dict", ...}``; ``module.`` and ``_orig_mod.`` prefixes are removed). It is read with
    ``torch.load(weights_only=True)``: no code in the file runs. The causal ``attn_mask`` buffer (not a weight) is
    dropped. Raises ``ValueError`` naming the file when it is not such a checkpoint.
    """
    path = Path(path)
    checkpoint = _read_checkpoint_file(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if (
        not isinstance(checkpoint, dict)
        or not checkpoint
        or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items())
    ):
        found = (
            f"a dict with keys {sorted(map(str, checkpoint))[:5]}"
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise ValueError(
            f"{path} holds {found}, not a state dict of tensors nor an open_clip training checkpoint "
            '({"epoch", "state_dict", ...}); save model.state_dict() from open_clip.'
        )
    state_dict = _strip_prefixes(checkpoint)
    state_dict.pop("attn_mask", None)
    _check_keys(state_dict, path)
    return state_dict


# ---------------------------------------------------------------------------------------------------------------
# Architecture: open_clip model config <-> transformers config.

# open_clip options that change the model, with the values under which the model is a plain CLIP ViT.
_NEUTRAL_VISION = {
    "ls_init_value": (None,),
    "attentional_pool": (False, None),
    "no_ln_pre": (False,),
    "pool_type": ("tok",),
    "global_average_pool": (False,),
    "input_patchnorm": (False,),
    "timm_model_name": (None, ""),
    "act_kwargs": (None, {}),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_NEUTRAL_TEXT = {
    **{key: _NEUTRAL_VISION[key] for key in ("ls_init_value", "act_kwargs", "block_type", "qk_norm")},
    **{key: (False,) for key in ("scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")},
    "hf_model_name": (None, ""),
    "embed_cls": (False,),
    "no_causal_mask": (False,),
    "pool_type": ("argmax", "eos"),
    "proj_bias": (False,),
    "proj_type": ("linear",),
    "use_pad_mask": (False,),
}
_NEUTRAL_TOP = {"init_logit_bias": (None,), "multimodal_cfg": (None, {})}
# The paper's open_clip fork turns Gaussian masking on with one of these (the second is its constructor argument's
# spelling), at a fixed sigma of 0.2; stock open_clip has neither.
GLIP_FORK_FLAGS = ("normal_masking", "normal_maksing")
GLIP_FORK_SIGMA = 0.2


# Options that do not change the converted weights' meaning (training-time, tokenizer or timm-only settings).
_FREE_VISION = {
    "layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout", "pos_embed_type",
    "final_ln_after_pool",  # with CLS pooling, LayerNorm-then-pool equals pool-then-LayerNorm
    "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "norm_kwargs", *GLIP_FORK_FLAGS,
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
}  # fmt: skip
_FREE_TEXT = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id", "output_tokens",
    "final_ln_after_pool",  # argmax/eos pooling picks a token: LayerNorm per token commutes with it
    "norm_kwargs", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "correct_cls_mask",
    "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
}  # fmt: skip
_FREE_TOP = {
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "nonscalar_logit_scale", "init_logit_scale",
}  # fmt: skip


def _check_section(values: dict[str, Any], neutral: dict, free: set, where: str, path: Path) -> None:
    for key, value in values.items():
        if key in neutral and value not in neutral[key]:
            raise ValueError(
                f"{path}: {where}{key}={value!r} has no equivalent in CLIP (supported: {neutral[key]}); "
                "this model cannot be converted."
            )
        if key not in neutral and key not in free:
            raise ValueError(f"{path}: unknown open_clip option {where}{key}={value!r}; its effect is not known here.")
    norm = values.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        raise ValueError(f"{path}: {where}norm_kwargs={norm!r}: only 'eps' is supported.")


def read_open_clip_config(path: str | Path) -> dict[str, Any]:
    """An open_clip model config (``ViT-B-16.json`` style, or a hub ``open_clip_config.json``), checked to be a plain
    ViT CLIP. Raises ``ValueError`` naming the option that CLIP in transformers cannot express."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--open_clip_config {path} does not exist; give an open_clip model config JSON.")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--open_clip_config {path} is not JSON ({error}).") from error
    config = config.get("model_cfg", config) if isinstance(config, dict) else config
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ValueError(f"--open_clip_config {path} is not an open_clip model config (embed_dim, vision_cfg, ...).")
    for section in ("vision_cfg", "text_cfg"):
        if not isinstance(config[section], dict):
            raise ValueError(f"{path}: {section}={config[section]!r}; expected a JSON object of options.")
    _check_section(config, _NEUTRAL_TOP, _FREE_TOP, "", path)
    _check_section(config["vision_cfg"], _NEUTRAL_VISION, _FREE_VISION, "vision_cfg.", path)
    _check_section(config["text_cfg"], _NEUTRAL_TEXT, _FREE_TEXT, "text_cfg.", path)
    if not isinstance(config["vision_cfg"].get("layers", 12), int):
        raise ValueError(f"{path}: vision_cfg.layers is a list (a ResNet image tower); only ViT towers convert.")
    for name in ("image_size", "patch_size"):
        if name in config["vision_cfg"]:
            config["vision_cfg"][name] = _square_size(config["vision_cfg"][name], f"vision_cfg.{name}", path)
    _check_numbers(config, path)
    return config


_COUNTS = {  # options that must be ints >= the minimum
    "vision_cfg": {"width": 1, "head_width": 1, "layers": 1},
    "text_cfg": {"width": 1, "heads": 1, "layers": 1, "context_length": 1, "vocab_size": 1, "eos_id": 0, "pad_id": 0},
}


def _check_numbers(config: dict[str, Any], path: Path) -> None:
    """Refuse sizes, head counts, token ids and layer-norm eps that no model can have, naming the option."""
    checks = [("embed_dim", config["embed_dim"], _is_int(config["embed_dim"], 1), "an int >= 1")]
    for section, minimums in _COUNTS.items():
        for name, minimum in minimums.items():
            if name in config[section]:
                value = config[section][name]
                checks.append((f"{section}.{name}", value, _is_int(value, minimum), f"an int >= {minimum}"))
        norm = config[section].get("norm_kwargs")
        if norm is not None and not isinstance(norm, dict):
            checks.append((f"{section}.norm_kwargs", norm, False, "a JSON object"))
        elif norm and "eps" in norm:
            checks.append(
                (f"{section}.norm_kwargs.eps", norm["eps"], _is_positive_number(norm["eps"]), "a number > 0")
            )
    for name, value, valid, expected in checks:
        if not valid:
            raise ValueError(f"{path}: {name}={value!r}; expected {expected}.")


def _square_size(value: Any, name: str, path: Path) -> int:
    """An open_clip size (an int, or a ``[height, width]`` pair) as the one int CLIP takes; refuse the rest."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not _is_int(value, 1):
        raise ValueError(f"{path}: {name}={value!r}: only a positive int (a square size) converts to CLIP.")
    return value


def settings_from_open_clip_config(config: dict[str, Any]) -> OpenCLIPSettings:
    """The settings a state dict does not record, as an open_clip model config gives them."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    eps = {(cfg.get("norm_kwargs") or {}).get("eps", OPEN_CLIP_LN_EPS) for cfg in (vision, text)}
    if len(eps) > 1:
        raise ValueError(f"the towers' layer-norm eps differ ({sorted(eps)}); transformers' CLIP needs one per tower.")
    vision_width = vision.get("width", 768)
    return OpenCLIPSettings(
        quick_gelu=bool(config.get("quick_gelu", False)),
        vision_heads=vision_width // vision.get("head_width", OPEN_CLIP_HEAD_WIDTH),
        text_heads=text.get("heads", 8),
        layer_norm_eps=eps.pop(),
        eos_token_id=text.get("eos_id", 2) if text.get("pool_type", "argmax") == "eos" else None,
    )


def _layer_count(state_dict: dict[str, torch.Tensor], prefix: str, path: Path) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"{path}: the {prefix}.N blocks are missing or not numbered 0..N-1 ({sorted(indices)[:8]}).")
    return len(indices)


def _heads(width: int, heads: int | None, flag: str, path: Path) -> int:
    heads = heads or max(1, width // OPEN_CLIP_HEAD_WIDTH)
    if width % heads:
        raise ValueError(f"{path}: width {width} is not divisible by {heads} heads; give the head count with {flag}.")
    return heads


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio for which open_clip's ``int(width * mlp_ratio)`` gives back ``hidden``."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def infer_open_clip_config(
    state_dict: dict[str, torch.Tensor], settings: OpenCLIPSettings | None = None, path: str | Path = "checkpoint"
) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``) of a ViT CLIP state
    dict: sizes from the tensor shapes, the rest from ``settings``."""
    path, settings = Path(path), settings or OpenCLIPSettings()
    conv = state_dict["visual.conv1.weight"]  # (width, 3, p, p)
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise ValueError(f"{path}: visual.conv1.weight {tuple(conv.shape)} is not a square RGB patch embedding.")
    width, patch = conv.shape[0], conv.shape[-1]
    num_positions = state_dict["visual.positional_embedding"].shape[0]
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise ValueError(
            f"{path}: visual.positional_embedding has {num_positions} rows, not 1 + a square grid; "
            "transformers' CLIP supports square images only."
        )
    text_width = state_dict["token_embedding.weight"].shape[1]
    embed_dim = state_dict["visual.proj"].shape[1]
    vision_layers = _layer_count(state_dict, "visual.transformer.resblocks", path)
    text_layers = _layer_count(state_dict, "transformer.resblocks", path)
    vision_cfg = {
        "image_size": grid * patch,
        "patch_size": patch,
        "width": width,
        "layers": vision_layers,
        "head_width": width // _heads(width, settings.vision_heads, "--vision_heads", path),
        "mlp_ratio": _mlp_ratio(width, state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    }
    text_cfg = {
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "width": text_width,
        "heads": _heads(text_width, settings.text_heads, "--text_heads", path),
        "layers": text_layers,
        "mlp_ratio": _mlp_ratio(text_width, state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        **_text_pooling(settings.eos_token_id),
    }
    if settings.layer_norm_eps not in (None, OPEN_CLIP_LN_EPS):
        vision_cfg["norm_kwargs"] = text_cfg["norm_kwargs"] = {"eps": settings.layer_norm_eps}
    quick_gelu = bool(settings.quick_gelu)
    return {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


_TEXT_SIZES = ("context_length", "vocab_size", "width", "layers")


def _check_against_config(inferred: dict[str, Any], given: dict[str, Any], path: Path) -> None:
    """Raise if the sizes in an open_clip model config differ from the ones the weights have."""
    checks = [("embed_dim", inferred["embed_dim"], given["embed_dim"])]
    for section, names in (("vision_cfg", ("patch_size", "width", "layers")), ("text_cfg", _TEXT_SIZES)):
        checks += [(f"{section}.{name}", inferred[section][name], given[section].get(name)) for name in names]
    vision = given["vision_cfg"]
    if "image_size" in vision and "patch_size" in vision:
        grid = inferred["vision_cfg"]["image_size"] // inferred["vision_cfg"]["patch_size"]
        checks.append(("vision_cfg grid", grid, vision["image_size"] // vision["patch_size"]))
    for name, found, stated in checks:
        if stated is not None and found != stated:
            raise ValueError(f"{path}: the weights have {name}={found}, the open_clip config says {stated}.")


def _text_pooling(eos_token_id: int | None) -> dict[str, Any]:
    if eos_token_id is None or eos_token_id == ARGMAX_EOS_TOKEN_ID:
        return {"pool_type": "argmax"}
    return {"pool_type": "eos", "eos_id": eos_token_id}


def patch_dropout(vision_cfg: dict[str, Any], where: str = "open_clip config") -> float:
    """``vision_cfg.patch_dropout`` (0.0 when absent, null or false), checked: a number in [0, 1), as open_clip
    requires."""
    dropout = vision_cfg.get("patch_dropout")
    dropout = 0.0 if dropout is None or dropout is False else dropout
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"{where}: vision_cfg.patch_dropout={dropout!r}; expected a number with 0 <= patch_dropout < 1 "
            "(the fraction of patches open_clip drops in training)."
        )
    return float(dropout)


def training_masking(vision_cfg: dict[str, Any], where: str = "open_clip config") -> dict[str, Any]:
    """The masking an open_clip model config trains with, as GLIPConfig fields (``{}``: none).

    ``patch_dropout`` p > 0 is FLIP's, ``mask_ratio=p, mask_strategy="random"``: open_clip's PatchDropout keeps
    ``max(1, int(N * (1 - p)))`` uniformly drawn patches, as random masking here does. With the paper's fork flag
    (`GLIP_FORK_FLAGS`) set it is GLIP's, ``mask_strategy="gaussian"`` at the fork's sigma 0.2.
    """
    dropout = patch_dropout(vision_cfg, where)
    gaussian = False
    for name in GLIP_FORK_FLAGS:
        flag = vision_cfg.get(name)
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{where}: vision_cfg.{name}={flag!r}; expected true or false (the GLIP fork's flag).")
        gaussian = gaussian or bool(flag)
    if dropout == 0:
        return {}
    if gaussian:
        return {"mask_ratio": dropout, "mask_strategy": "gaussian", "mask_sigma": GLIP_FORK_SIGMA}
    return {"mask_ratio": dropout, "mask_strategy": "random"}


def source_masking(vision_cfg: dict[str, Any], **masking: Any) -> dict[str, Any]:
    """The masking fields given in ``masking`` (``None``: not given), each over the model's own training masking
    (`training_masking`); fields neither gives are left out (GLIPConfig's defaults)."""
    given = {key: value for key, value in masking.items() if value is not None}
    trained = training_masking(vision_cfg)
    if "mask_sigma" in given and "mask_strategy" not in given and trained.get("mask_strategy") == "random":
        raise ValueError(
            f"mask_sigma={given['mask_sigma']} is for Gaussian masking, but the open_clip config's patch_dropout is "
            "FLIP's random masking; also give mask_strategy='gaussian' (--mask_strategy gaussian) for GLIP's."
        )
    return {**trained, **given}


def open_clip_to_hf_config(config: dict[str, Any], **masking: Any) -> GLIPConfig:
    """The `GLIPConfig` of an open_clip ViT CLIP model config; ``masking`` sets mask_ratio / mask_strategy /
    mask_sigma (default: the config's own training masking, see `training_masking`, then GLIPConfig's)."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    act = ACTIVATIONS[bool(config.get("quick_gelu", False))]
    eps = (vision.get("norm_kwargs") or {}).get("eps", OPEN_CLIP_LN_EPS)
    eos_token_id = text["eos_id"] if text.get("pool_type", "argmax") == "eos" else ARGMAX_EOS_TOKEN_ID
    if text.get("pool_type", "argmax") == "eos" and eos_token_id == ARGMAX_EOS_TOKEN_ID:
        raise ValueError(
            "text_cfg pool_type='eos' with eos_id=2: transformers reads eos_token_id=2 as argmax pooling; "
            "the pooling cannot be expressed."
        )
    vision_width, text_width = vision["width"], text["width"]
    vision_config = dict(
        hidden_size=vision_width,
        intermediate_size=int(vision_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=vision_width // vision.get("head_width", OPEN_CLIP_HEAD_WIDTH),
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_act=act,
        layer_norm_eps=eps,
        **source_masking(vision, **masking),
    )
    text_config = dict(
        vocab_size=text["vocab_size"],
        hidden_size=text_width,
        intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=text["layers"],
        num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"],
        hidden_act=act,
        layer_norm_eps=(text.get("norm_kwargs") or {}).get("eps", OPEN_CLIP_LN_EPS),
        eos_token_id=eos_token_id,
        # open_clip's tokenizers put <start_of_text> second to last and pad with `pad_id` (0); neither id changes
        # the model's outputs.
        bos_token_id=text["vocab_size"] - 2,
        pad_token_id=text.get("pad_id", 0),
    )
    return GLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=config["embed_dim"])


def hf_to_open_clip_config(config) -> dict[str, Any]:
    """The open_clip model config of a GLIP / CLIP config (a `GLIPConfig` or `CLIPConfig`). Random (FLIP) masking
    becomes ``vision_cfg.patch_dropout``; Gaussian masking has no open_clip equivalent and is not written."""
    vision, text = config.vision_config, config.text_config
    if vision.hidden_act != text.hidden_act or vision.hidden_act not in ACTIVATIONS.values():
        raise ValueError(
            f"hidden_act vision={vision.hidden_act!r}, text={text.hidden_act!r}: open_clip has one activation for "
            "both towers, 'gelu' or 'quick_gelu'."
        )
    if vision.layer_norm_eps != text.layer_norm_eps:
        raise ValueError(f"layer_norm_eps differs between the towers: {vision.layer_norm_eps}, {text.layer_norm_eps}.")
    if vision.num_channels != 3 or vision.image_size % vision.patch_size:
        raise ValueError(
            f"num_channels={vision.num_channels}, image_size={vision.image_size}, patch_size={vision.patch_size}: "
            "open_clip needs 3 channels and an image size that is a multiple of the patch size."
        )
    vision_cfg = {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "head_width": vision.hidden_size // vision.num_attention_heads,
        "mlp_ratio": _mlp_ratio(vision.hidden_size, vision.intermediate_size),
    }
    text_cfg = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(text.hidden_size, text.intermediate_size),
        **_text_pooling(text.eos_token_id),
        "pad_id": text.pad_token_id if text.pad_token_id is not None else 0,  # tokenizer metadata in open_clip's CLIP
    }
    if vision.layer_norm_eps != OPEN_CLIP_LN_EPS:
        vision_cfg["norm_kwargs"] = text_cfg["norm_kwargs"] = {"eps": vision.layer_norm_eps}
    if getattr(vision, "mask_strategy", None) == "random" and vision.mask_ratio > 0:
        vision_cfg["patch_dropout"] = vision.mask_ratio  # FLIP's masking is open_clip's PatchDropout
    quick_gelu = vision.hidden_act == "quick_gelu"
    embed_dim = config.projection_dim
    return {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


# ---------------------------------------------------------------------------------------------------------------
# The two conversions.


def _check_shapes(converted: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    for key, tensor in expected.items():
        if key in converted and converted[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(converted[key].shape)}, the inferred architecture needs "
                f"{tuple(tensor.shape)}; check --open_clip_config / the head and size flags."
            )
    unknown = sorted(set(converted) - set(expected))
    if unknown:
        raise ValueError(f"{path}: weights with no place in CLIP: {unknown[:5]}.")


def _check_key_set(state_dict: dict[str, torch.Tensor], open_clip_config: dict[str, Any], path: Path) -> None:
    table = _key_table(open_clip_config["vision_cfg"]["layers"], open_clip_config["text_cfg"]["layers"])
    expected = {open_clip_key for open_clip_key, _, _ in table}
    for what, keys in (("missing", expected - set(state_dict)), ("unknown", set(state_dict) - expected)):
        if keys:
            raise ValueError(
                f"{path}: {what} keys {sorted(keys)[:5]} (of {len(keys)}); not a plain open_clip ViT CLIP checkpoint."
            )


def resolve_open_clip_config(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    open_clip_config: str | Path | None = None,
    settings: OpenCLIPSettings | None = None,
) -> dict[str, Any]:
    """The open_clip model config of ``state_dict``: shapes from the weights, the rest from ``settings``, then from
    the ``open_clip_config`` JSON (whose sizes must agree with the weights), then open_clip's defaults."""
    given = read_open_clip_config(open_clip_config) if open_clip_config else None
    from_config = settings_from_open_clip_config(given) if given else None
    resolved = infer_open_clip_config(state_dict, (settings or OpenCLIPSettings()).over(from_config), path)
    if given:
        _check_against_config(resolved, given, path)
        resolved["text_cfg"]["pad_id"] = given["text_cfg"].get("pad_id", 0)
        training_masking(given["vision_cfg"], str(open_clip_config))  # checked here, to name the file
        for name in ("patch_dropout", *GLIP_FORK_FLAGS):  # the model's training masking: not in the weights
            if name in given["vision_cfg"]:
                resolved["vision_cfg"][name] = given["vision_cfg"][name]
    _check_key_set(state_dict, resolved, path)
    return resolved


def open_clip_to_glip(
    state_dict: dict[str, torch.Tensor], open_clip_config: dict[str, Any], path: Path, **masking: Any
):
    """A `GLIPModel` (eval mode, the weights' dtype) holding an open_clip state dict of the given model config."""
    from .modeling_glip import GLIPModel

    layers = open_clip_config["vision_cfg"]["layers"], open_clip_config["text_cfg"]["layers"]
    converted = open_clip_to_hf_state_dict(state_dict, *layers)
    model = GLIPModel(open_clip_to_hf_config(open_clip_config, **masking)).eval()
    _check_shapes(converted, model.state_dict(), path)
    model.load_state_dict(converted, strict=True)
    return model.to(dtype=state_dict["visual.conv1.weight"].dtype)


def from_open_clip(
    checkpoint: str | Path,
    out: str | Path,
    flavour: str = "glip",
    open_clip_config: str | Path | None = None,
    settings: OpenCLIPSettings | None = None,
    processor: str | Path | None = None,
    **masking: Any,
):
    """Convert an open_clip ViT CLIP checkpoint to a GLIP (or, ``flavour="clip"``, a plain CLIP) directory.

    Args:
        checkpoint: see `load_open_clip_state_dict`.
        out: the directory to write (``config.json`` + ``model.safetensors``).
        flavour: ``"glip"`` (`GLIPModel`, masking fields from ``masking``) or ``"clip"`` (``model_type: clip``).
        open_clip_config: the model's open_clip config JSON, for the settings that ``settings`` leaves ``None``.
        settings: what the weights do not record (see `OpenCLIPSettings`).
        processor: a transformers processor (path or name) saved alongside, for pipelines.
        masking: ``mask_ratio`` / ``mask_strategy`` / ``mask_sigma`` (``None``: the model's own training masking
            from ``open_clip_config``, see `training_masking`, else GLIPConfig's default).
    Returns:
        The converted `GLIPModel`, in eval mode, with the source's dtype.
    """
    if flavour not in ("glip", "clip"):
        raise ValueError(f"flavour must be 'glip' or 'clip', got {flavour!r}.")
    given = sorted(name for name, value in masking.items() if value is not None)
    if flavour == "clip" and given:
        raise ValueError(f"{', '.join(given)}: a CLIP model has no masking; drop them or convert to --flavour glip.")
    loaded_processor = _load_processor(processor)  # before the work: a wrong name fails fast
    path = Path(checkpoint)
    state_dict = load_open_clip_state_dict(path)
    resolved = resolve_open_clip_config(state_dict, path, open_clip_config, settings)
    model = open_clip_to_glip(state_dict, resolved, path, **masking)
    _check_processor_pooling(loaded_processor, model.config.text_config, processor)
    if flavour == "clip":
        export_to_clip(model, out, processor=loaded_processor)
    else:
        model.save_pretrained(out)
        if loaded_processor is not None:
            loaded_processor.save_pretrained(out)
    return model


def _check_processor_pooling(processor, text_config, name: str | Path | None) -> None:
    """Refuse a processor whose tokenizer ends texts with a token the converted text tower does not pool at (every
    text would embed alike: a pipeline scores each label 1 / n)."""
    from .tokenization import pooling_matches

    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is None or not hasattr(tokenizer, "eos_token_id") or pooling_matches(text_config, tokenizer):
        return
    pools = (
        "argmax(token ids)"
        if text_config.eos_token_id == ARGMAX_EOS_TOKEN_ID
        else f"the first token {text_config.eos_token_id}"
    )
    raise ValueError(
        f"--processor {name}: its tokenizer ends texts with id {tokenizer.eos_token_id}, but the converted text tower "
        f"pools at {pools}; pass --eos_token_id {tokenizer.eos_token_id} (open_clip's pool_type eos) if the model was "
        "trained with this tokenizer, else the processor it was trained with."
    )


def _load_processor(name: str | Path | None):
    if name is None:
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(name))
    except OSError as error:
        raise ValueError(f"--processor {name}: no transformers processor there ({error}).") from error


class UnexportedMaskingWarning(UserWarning):
    """`to_open_clip` wrote a GLIP model with Gaussian masking, which no stock open_clip config can hold."""

    def __init__(self, model_dir: Path, notice: str):
        super().__init__(f"to_open_clip({str(model_dir)!r}): {notice}.")
        self.notice = notice


def _unwritten_masking(model_type: str, config: GLIPConfig) -> str:
    """What to say of a GLIP model's Gaussian masking, which no open_clip config can hold ("" if nothing to say)."""
    if model_type != "glip" or config.mask_strategy != "gaussian" or config.mask_ratio == 0:
        return ""  # a CLIP directory has no masking (loaded as GLIP it shows GLIPConfig's defaults)
    return (
        f"its Gaussian masking, ratio {config.mask_ratio}, has no stock open_clip equivalent and is not in the "
        "config: open_clip trains it unmasked unless you set vision_cfg.patch_dropout, which is uniform masking"
    )


def to_open_clip(model_dir: str | Path, out: str | Path, config_out: str | Path | None = None) -> tuple[Path, Path]:
    """Write a GLIP / CLIP directory as an open_clip state dict (``.pt``, or ``.safetensors``) and model config JSON.

    A tokenizer in ``model_dir`` (one trained with the model: open_clip's default tokenizer, OpenAI's BPE, gives other
    ids) is saved beside the checkpoint as ``<checkpoint stem>-tokenizer/`` and named in the config's
    ``text_cfg.hf_tokenizer_name`` (its absolute path), so that ``open_clip.get_tokenizer(config.stem)`` feeds the
    model the ids it was trained on.

    A GLIP model's random masking is written as ``vision_cfg.patch_dropout``; its Gaussian masking has no stock
    open_clip equivalent, so it is left out and an `UnexportedMaskingWarning` says so.

    Returns:
        ``(checkpoint, config)``: ``open_clip.add_model_config(config)`` then
        ``open_clip.create_model(config.stem, pretrained=str(checkpoint))`` loads it with ``strict=True``.
    """
    from .modeling_glip import GLIPModel
    from .tokenization import load_pretrained_tokenizer

    model_dir, out = Path(model_dir), Path(out)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist; give a GLIP or CLIP model directory.")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in ("glip", "clip"):
        raise ValueError(f"{config_path}: model_type {model_type!r}; only 'glip' and 'clip' directories convert.")
    try:
        model = GLIPModel.from_pretrained(model_dir)
    except OSError as error:  # transformers' "no weights file" and the like
        raise ValueError(f"{model_dir}: cannot load the model ({error}).") from error
    open_clip_config = hf_to_open_clip_config(model.config)
    layers = model.config.vision_config.num_hidden_layers, model.config.text_config.num_hidden_layers
    state_dict = hf_to_open_clip_state_dict(model.state_dict(), *layers)
    config_out = _config_path(out, config_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, out)
    else:
        torch.save(state_dict, out)
    tokenizer = load_pretrained_tokenizer(str(model_dir))
    if tokenizer is not None:
        tokenizer_dir = out.with_name(f"{out.stem}-tokenizer")
        tokenizer.save_pretrained(tokenizer_dir)
        open_clip_config["text_cfg"]["hf_tokenizer_name"] = str(tokenizer_dir.resolve())
    config_out.write_text(json.dumps(open_clip_config, indent=2) + "\n")
    notice = _unwritten_masking(model_type, model.config)
    if notice:
        warnings.warn(UnexportedMaskingWarning(model_dir, notice), stacklevel=2)
    return out, config_out


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    source = commands.add_parser("from-open-clip", help="open_clip checkpoint -> GLIP / CLIP directory")
    source.add_argument("checkpoint", help="open_clip .pt/.bin/.safetensors: a state dict or training checkpoint")
    source.add_argument("--out", required=True, help="the directory to write")
    source.add_argument("--flavour", choices=("glip", "clip"), default="glip")
    source.add_argument("--open_clip_config", help="the model's open_clip config JSON (e.g. ViT-B-16.json)")
    source.add_argument("--quick_gelu", action="store_true", default=None, help="QuickGELU (`*-quickgelu` models)")
    source.add_argument("--vision_heads", type=int, help="image attention heads (default: width // 64)")
    source.add_argument("--text_heads", type=int, help="text attention heads (default: width // 64)")
    source.add_argument("--layer_norm_eps", type=float, help=f"default {OPEN_CLIP_LN_EPS}")
    source.add_argument("--eos_token_id", type=int, help="pool text at the first such token (default: argmax)")
    source.add_argument("--processor", help="a transformers processor (path or name) to save alongside")
    source.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    trained = (
        "the --open_clip_config's own masking (patch_dropout: random at that ratio; with the GLIP fork's "
        "normal_masking: Gaussian), else GLIPConfig's"
    )
    source.add_argument("--mask_ratio", type=float, help=f"GLIP masking ratio (default: {trained})")
    source.add_argument("--mask_strategy", choices=MASK_STRATEGIES, help=f"GLIP masking (default: {trained})")
    source.add_argument("--mask_sigma", type=float, help="the Gaussian prior's sigma (default 0.2)")
    target = commands.add_parser("to-open-clip", help="GLIP / CLIP directory -> open_clip state dict + config JSON")
    target.add_argument("model_dir")
    target.add_argument("--out", required=True, help="CKPT.pt (or .safetensors)")
    target.add_argument("--config_out", help="the open_clip model config JSON (default: --out with .json)")
    target.add_argument("--overwrite", action="store_true", help="replace existing files")
    return parser


def _config_path(out: Path, config_out: str | Path | None) -> Path:
    """Where to-open-clip writes the open_clip model config: ``config_out``, else ``out`` with ``.json``."""
    return Path(config_out) if config_out else out.with_suffix(".json")


def _refuse_overwrite(path: Path, overwrite: bool, is_dir: bool, flag: str = "--out") -> None:
    if is_dir and path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file; give a directory to write the model into.")
    exists = path.is_dir() and any(path.iterdir()) if is_dir else path.exists()
    if exists and not overwrite:
        raise FileExistsError(
            f"{flag} {path} already exists{' and is not empty' if is_dir else ''}; pass --overwrite."
        )


def main(argv: list[str]) -> None:
    """The command line: ``from-open-clip`` or ``to-open-clip`` (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.command == "from-open-clip":
        _refuse_overwrite(Path(args.out), args.overwrite, is_dir=True)
        settings = OpenCLIPSettings(
            args.quick_gelu, args.vision_heads, args.text_heads, args.layer_norm_eps, args.eos_token_id
        )
        masking = {name: getattr(args, name) for name in MASKING_FIELDS}
        model = from_open_clip(
            args.checkpoint, args.out, args.flavour, args.open_clip_config, settings, args.processor, **masking
        )
        print(_summary(model.config, args.flavour, args.out))
    else:
        out = Path(args.out)
        config_out = _config_path(out, args.config_out)
        if config_out.resolve() == out.resolve():
            raise ValueError(f"--config_out {config_out} is --out itself; give the model config JSON another path.")
        _refuse_overwrite(out, args.overwrite, is_dir=False)
        _refuse_overwrite(
            config_out, args.overwrite, is_dir=False, flag="--config_out" if args.config_out else "the config"
        )
        with warnings.catch_warnings(record=True) as caught:  # said once, in the summary line
            warnings.simplefilter("always", UnexportedMaskingWarning)
            checkpoint, config = to_open_clip(args.model_dir, out, args.config_out)
        for warning in caught:
            if not issubclass(warning.category, UnexportedMaskingWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        notices = [w.message.notice for w in caught if issubclass(w.category, UnexportedMaskingWarning)]
        tokenizer = json.loads(config.read_text())["text_cfg"].get("hf_tokenizer_name")
        print(
            f"wrote {checkpoint} and {config}"
            + (f" and the model's tokenizer to {tokenizer}" if tokenizer else "")
            + "".join(f" ({notice})" for notice in notices)
            + f"; in open_clip: add_model_config({str(config)!r}); create_model({config.stem!r}, "
            f"pretrained={str(checkpoint)!r})" + (f"; get_tokenizer({config.stem!r})" if tokenizer else "")
        )


def _summary(config, flavour: str, out: str) -> str:
    vision, text = config.vision_config, config.text_config
    pooling = "argmax(token ids)" if text.eos_token_id == ARGMAX_EOS_TOKEN_ID else f"first token {text.eos_token_id}"
    masking = f", {config.mask_strategy} masking {config.mask_ratio}" * (flavour == "glip")
    masking += f" sigma {config.mask_sigma}" * (flavour == "glip" and config.mask_strategy == "gaussian")
    return (
        f"wrote {flavour} model to {out}: ViT {vision.num_hidden_layers}x{vision.hidden_size} "
        f"patch {vision.patch_size} image {vision.image_size}, text {text.num_hidden_layers}x{text.hidden_size} "
        f"context {text.max_position_embeddings}, embed {config.projection_dim}{masking}. Not in the weights, taken "
        f"as given (flags or --open_clip_config): hidden_act={vision.hidden_act}, heads vision="
        f"{vision.num_attention_heads} text={text.num_attention_heads}, layer_norm_eps={vision.layer_norm_eps}, "
        f"text pooling at {pooling}."
    )


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], prog=PROG)
