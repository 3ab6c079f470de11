"""Checkpoint interop: export a GLIP model as a plain CLIP checkpoint."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPConfig, CLIPModel

from ..configuration_glip import MASKING_FIELDS


def to_clip_config(config) -> CLIPConfig:
    """A `CLIPConfig` with the same architecture as a `GLIPConfig`, without any masking field."""
    values = config.to_dict()
    vision = {k: v for k, v in values.pop("vision_config").items() if k not in MASKING_FIELDS and k != "model_type"}
    text = {k: v for k, v in values.pop("text_config").items() if k != "model_type"}
    values = {k: v for k, v in values.items() if k not in ("model_type", "architectures", "auto_map")}
    return CLIPConfig(text_config=text, vision_config=vision, **values)


def export_to_clip(model, save_directory: str | Path, processor=None) -> Path:
    """Write ``model`` (a GLIPModel) as a plain CLIP checkpoint that `transformers.CLIPModel` loads as is.

    Args:
        model: a `GLIPModel` (or any CLIP-architecture model with a `GLIPConfig`).
        save_directory: where to write ``config.json`` (``model_type: clip``) and the weights.
        processor: optional tokenizer / image processor / processor saved alongside, for pipelines.
    Returns:
        The directory written.
    """
    clip = CLIPModel(to_clip_config(model.config))
    clip.load_state_dict(model.state_dict(), strict=True)  # raises if the architectures differ
    clip.to(dtype=next(model.parameters()).dtype)
    save_directory = Path(save_directory)
    clip.save_pretrained(save_directory)
    if processor is not None:
        processor.save_pretrained(save_directory)
    return save_directory
