import json

import pytest

from glip_hf import GLIPConfig, GLIPVisionConfig


def test_masking_fields_land_on_vision_config():
    config = GLIPConfig(mask_ratio=0.75, mask_strategy="random", mask_sigma=0.8)
    assert config.model_type == "glip"
    assert isinstance(config.vision_config, GLIPVisionConfig)
    assert (config.vision_config.mask_ratio, config.vision_config.mask_strategy) == (0.75, "random")
    assert config.vision_config.mask_sigma == 0.8
    top_level = config.to_dict()
    assert not {"mask_ratio", "mask_strategy", "mask_sigma"} & set(top_level), "fields must not be stored twice"


def test_defaults_are_the_papers():
    vision = GLIPVisionConfig()
    assert (vision.mask_ratio, vision.mask_strategy, vision.mask_sigma) == (0.5, "gaussian", 0.2)


def test_negative_zero_mask_ratio_is_stored_and_printed_as_zero(tmp_path):
    config = GLIPConfig(mask_ratio=-0.0)
    assert str(config.mask_ratio) == "0.0" and str(config.vision_config.mask_ratio) == "0.0"
    config.save_pretrained(tmp_path)
    assert '"mask_ratio": 0.0' in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize(
    "field, value",
    [
        ("mask_ratio", 1.0),
        ("mask_ratio", -0.1),
        ("mask_ratio", "half"),
        ("mask_ratio", True),
        ("mask_strategy", "uniform"),
        ("mask_sigma", 0.0),
        ("mask_sigma", -1.0),
        ("mask_sigma", float("inf")),
        ("mask_sigma", 1e-300),  # 0 in float32, where the prior is computed: NaN priors, one mask for every image
    ],
)
def test_bad_values_raise_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value!r}".replace("(", r"\(").replace(")", r"\)")):
        GLIPConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        GLIPVisionConfig(**{field: value})
    config = GLIPConfig()
    with pytest.raises(ValueError, match=field):
        setattr(config.vision_config, field, value)  # assignment is validated too


def test_save_load_round_trip(tmp_path):
    config = GLIPConfig(mask_ratio=0.918, mask_strategy="gaussian", mask_sigma=0.1, projection_dim=64)
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "glip" and on_disk["vision_config"]["mask_ratio"] == 0.918
    loaded = GLIPConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert GLIPConfig.from_pretrained(tmp_path, mask_ratio=0.25).vision_config.mask_ratio == 0.25


def test_auto_config_knows_glip(tmp_path):
    from transformers import AutoConfig

    GLIPConfig(mask_ratio=0.3).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GLIPConfig) and loaded.mask_ratio == 0.3


def test_a_clip_vision_config_object_becomes_a_glip_one():
    """Composing configs as transformers users do: CLIP's vision config object (from `CLIPConfig.from_pretrained`,
    say) with GLIP's masking on top. It stayed a CLIPVisionConfig, `mask_ratio` was set on it as a stray attribute,
    and `GLIPModel(config)` raised AttributeError: no `mask_strategy`."""
    from transformers import CLIPConfig, CLIPVisionConfig

    from glip_hf import GLIPModel

    vision = CLIPVisionConfig(
        image_size=12, patch_size=4, hidden_size=8, intermediate_size=5, num_hidden_layers=1, num_attention_heads=2
    )
    text = dict(hidden_size=8, intermediate_size=5, num_hidden_layers=1, num_attention_heads=2, vocab_size=9)
    config = GLIPConfig(text_config=text, vision_config=vision, mask_ratio=0.7)
    assert isinstance(config.vision_config, GLIPVisionConfig) and config.vision_config.image_size == 12
    assert (config.mask_ratio, config.mask_strategy, config.mask_sigma) == (0.7, "gaussian", 0.2)
    assert GLIPModel(config).vision_model.embeddings.num_patches == 9
    with pytest.raises(ValueError, match="GLIPConfig"):
        GLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict()))


@pytest.mark.parametrize("image_size, patch_size", [(8, 16), (30, 0)])
def test_an_image_smaller_than_a_patch_is_an_error_naming_both_sizes(image_size, patch_size):
    """It was a ZeroDivisionError, or `grid_size must be positive, got 0` from `GLIPModel(config)`."""
    with pytest.raises(ValueError, match=f"patch_size={patch_size} .*image_size={image_size}"):
        GLIPConfig(vision_config=dict(image_size=image_size, patch_size=patch_size))
