"""GLIP configuration: CLIP's configs plus the patch-masking fields of GLIP (arXiv 2403.15837).

The masking fields live on the vision config. ``GLIPConfig`` accepts them at the top level too
(``GLIPConfig(mask_ratio=0.5)``, ``GLIPModel.from_pretrained(path, mask_ratio=0.5)``) and forwards them to
``config.vision_config``: they are properties of ``GLIPConfig``, never stored twice.
"""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig

MASK_STRATEGIES = ("gaussian", "random")
MASKING_FIELDS = ("mask_ratio", "mask_strategy", "mask_sigma")


def _check_mask_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"mask_ratio must be a float with 0 <= mask_ratio < 1, got {value!r}.")
    return float(value) + 0.0  # -0.0 is 0.0 (it passes the check, and would be saved and printed as "-0.0")


def _check_mask_strategy(value: Any) -> str:
    if value not in MASK_STRATEGIES:
        raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {value!r}.")
    return value


# The prior is computed in float32: a smaller sigma rounds to 0 or a subnormal there, and the prior to NaN (0 / 0).
MIN_MASK_SIGMA = 1.2e-38  # float32's smallest normal number is 1.18e-38


def _check_mask_sigma(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"mask_sigma must be a finite float > 0 (the paper uses 0.1, 0.2, 0.8), got {value!r}.")
    if value < MIN_MASK_SIGMA:
        raise ValueError(
            f"mask_sigma must be at least {MIN_MASK_SIGMA} (the prior is computed in float32), got {value!r}; "
            "the paper uses 0.1, 0.2, 0.8."
        )
    return float(value)


_MASKING_CHECKS = {
    "mask_ratio": _check_mask_ratio,
    "mask_strategy": _check_mask_strategy,
    "mask_sigma": _check_mask_sigma,
}


@strict
class GLIPVisionConfig(CLIPVisionConfig):
    r"""
    CLIP vision config with GLIP's patch masking.

    mask_ratio (`float`, defaults to 0.5):
        Fraction of patch tokens dropped in training; the encoder sees `max(1, int(N * (1 - mask_ratio)))` patches
        plus the CLS token. 0 disables masking (plain CLIP).
    mask_strategy (`str`, defaults to `"gaussian"`):
        `"gaussian"` (GLIP: centre-biased keep probability) or `"random"` (FLIP: uniform).
    mask_sigma (`float`, defaults to 0.2):
        The paper's sigma. As in the reference code it is the *covariance diagonal* of the 2-D normal placed on the
        `[-1, 1]^2` patch grid, so the standard deviation is `sqrt(mask_sigma)`. Paper values: 0.1, 0.2, 0.8.
    """

    model_type = "glip_vision_model"
    base_config_key = "vision_config"

    mask_ratio: float | int = 0.5
    mask_strategy: str = "gaussian"
    mask_sigma: float | int = 0.2

    @classmethod
    def get_config_dict(
        cls, pretrained_model_name_or_path: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """As CLIPVisionConfig's, except that a full GLIP / CLIP config's top-level ``projection_dim`` (the one the
        weights were built with) replaces its vision config's: older GLIP saves and CLIP configs let them differ,
        and ``from_pretrained`` extracts the vision config without ``GLIPConfig.__post_init__``'s sync."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        vision = config_dict.get(cls.base_config_key)
        if config_dict.get("model_type") in ("glip", "clip") and isinstance(vision, dict):
            if config_dict.get("projection_dim") is not None:
                vision = {**vision, "projection_dim": config_dict["projection_dim"]}
                config_dict = {**config_dict, cls.base_config_key: vision}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not 1 <= self.patch_size <= self.image_size:  # CLIP would fail later, dividing by zero or on an empty grid
            raise ValueError(
                f"patch_size={self.patch_size} must be between 1 and image_size={self.image_size} (the image must "
                "hold at least one patch to mask)."
            )

    def __setattr__(self, key: str, value: Any) -> None:
        # Validate on every assignment (construction, from_dict, user code) and raise a plain ValueError naming
        # the field; strict's own validators wrap errors in a non-ValueError type.
        if key in _MASKING_CHECKS:
            value = _MASKING_CHECKS[key](value)
        super().__setattr__(key, value)


def _masking_property(name: str) -> property:
    def fget(self: GLIPConfig) -> Any:
        return getattr(self.vision_config, name)

    def fset(self: GLIPConfig, value: Any) -> None:
        setattr(self.vision_config, name, value)

    return property(fget, fset, doc=f"Alias of `vision_config.{name}`.")


@strict
class GLIPConfig(CLIPConfig):
    r"""
    CLIP config whose vision tower is a [`GLIPVisionConfig`]. `mask_ratio`, `mask_strategy` and `mask_sigma` given
    here are forwarded to `vision_config` (and read back from it).

    Example:

    ```python
    >>> from glip_hf import GLIPConfig, GLIPModel
    >>> config = GLIPConfig(mask_ratio=0.75, mask_strategy="gaussian", mask_sigma=0.2)
    >>> config.vision_config.mask_ratio
    0.75
    >>> model = GLIPModel(config)
    ```"""

    model_type = "glip"
    sub_configs_defaults = {"vision_config": GLIPVisionConfig, "text_config": CLIPTextConfig}

    mask_ratio = _masking_property("mask_ratio")
    mask_strategy = _masking_property("mask_strategy")
    mask_sigma = _masking_property("mask_sigma")

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, PreTrainedConfig) and not isinstance(self.vision_config, GLIPVisionConfig):
            # A CLIPVisionConfig object (e.g. a CLIP checkpoint's): built again as a GLIPVisionConfig, as its dict is.
            self.vision_config = self.vision_config.to_dict()
        super().__post_init__(**kwargs)
        # The towers' own `projection_dim` (what GLIPVisionModelWithProjection builds from) follows the model's.
        if self.projection_dim is not None:
            self.vision_config.projection_dim = self.text_config.projection_dim = self.projection_dim


__all__ = ["GLIPConfig", "GLIPVisionConfig", "MASKING_FIELDS", "MASK_STRATEGIES"]
