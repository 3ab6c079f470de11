"""open_clip <-> GLIP / CLIP conversion (glip_hf.convert).

The open_clip side runs in a second environment (open_clip needs torchvision, which does not import beside the
project's CPU torch): ``tests/open_clip_side.py`` under ``$GLIP_HF_OPENCLIP_PYTHON`` (default
``.venv-openclip/bin/python``; .ci/run creates it). It builds small random open_clip models and their embeddings,
and loads what ``to-open-clip`` wrote with ``strict=True``; tensors cross as .safetensors. Without that environment
these tests skip locally and fail under CI (``CI`` set). The other tests need no open_clip.
"""

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TEXT_LEN, open_clip_python, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPModel

from glip_hf import GLIPConfig, GLIPModel, export_to_clip
from glip_hf.cli import run_cli
from glip_hf.convert import (
    PROG,
    OpenCLIPSettings,
    UnexportedMaskingWarning,
    hf_to_open_clip_config,
    infer_open_clip_config,
    load_open_clip_state_dict,
    main,
    to_open_clip,
)

ROOT = Path(__file__).resolve().parent.parent
OWN_TEXTS = ["a red circle", "a large blue square in the top left corner", "Green TRIANGLE!"]
ATOL = 1e-5  # fp32, the same weights through two implementations of the same network

# Small open_clip models with odd sizes, so that a swapped or transposed tensor shows.
OPEN_CLIP_MODELS = {
    "gelu": {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 36,
            "patch_size": 6,
            "width": 48,
            "head_width": 12,
            "layers": 3,
            "mlp_ratio": 1.75,
        },
        "text_cfg": {"context_length": 18, "vocab_size": 101, "width": 40, "heads": 5, "layers": 2, "mlp_ratio": 1.5},
    },
    # OpenAI-style QuickGELU, another layer-norm eps and pooling at the first eos_id: none of it is in the weights.
    "quickgelu_eos": {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 36,
            "patch_size": 6,
            "width": 48,
            "head_width": 12,
            "layers": 3,
            "mlp_ratio": 1.75,
            "norm_kwargs": {"eps": 1e-6},
        },
        "text_cfg": {
            "context_length": 18,
            "vocab_size": 101,
            "width": 40,
            "heads": 5,
            "layers": 2,
            "mlp_ratio": 1.5,
            "pool_type": "eos",
            "eos_id": 1,
            "norm_kwargs": {"eps": 1e-6},
        },
    },
}
# A FLIP model: open_clip's patch dropout is the training masking, in the model config only (not in the weights).
FLIP_MODEL = {
    **OPEN_CLIP_MODELS["gelu"],
    "vision_cfg": {**OPEN_CLIP_MODELS["gelu"]["vision_cfg"], "patch_dropout": 0.4},
}
NOT_IN_THE_WEIGHTS = {  # the flags that say what OPEN_CLIP_MODELS' state dicts do not
    "gelu": ["--vision_heads", "4", "--text_heads", "5"],
    "quickgelu_eos": [
        *("--vision_heads", "4", "--text_heads", "5", "--quick_gelu"),
        *("--layer_norm_eps", "1e-6", "--eos_token_id", "1"),
    ],
}
# open_clip options that CLIP in transformers cannot express, and the word the one-line error must contain.
UNSUPPORTED = {
    "layer_scale": ({"vision_cfg": {"ls_init_value": 0.1}}, "ls_init_value"),
    "no_ln_pre": ({"vision_cfg": {"no_ln_pre": True}}, "no_ln_pre"),
    "attentional_pool": ({"vision_cfg": {"attentional_pool": True, "attn_pooler_queries": 4}}, "attentional_pool"),
    "text_proj_bias": ({"text_cfg": {"proj_bias": True}}, "proj_bias"),
    "text_cls_token": ({"custom_text": True, "text_cfg": {"embed_cls": True}}, "embed_cls"),
    "siglip_bias": ({"init_logit_bias": -10.0}, "logit_bias"),
}


def variant(base: dict, change: dict) -> dict:
    config = json.loads(json.dumps(base))
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def hf_config(**overrides) -> GLIPConfig:
    """A tiny GLIP config with odd sizes; ``overrides`` go to both towers."""
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text.update(max_position_embeddings=20, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=40, intermediate_size=52, num_hidden_layers=3, num_attention_heads=5)
    vision.update(image_size=30, patch_size=3)
    text.update(overrides.pop("text", {}))
    return GLIPConfig(
        text_config={**text, **overrides}, vision_config={**vision, **overrides}, projection_dim=16, mask_ratio=0.25
    )


def flip_config() -> GLIPConfig:
    """`hf_config` with FLIP's masking (uniform) at 0.9: open_clip's ``patch_dropout`` 0.9. Of 100 patches both keep
    ``int(100 * (1 - 0.9))``, which is ``int(9.999...)`` = 9 in floating point (``round`` would give 10)."""
    config = hf_config()
    config.mask_strategy, config.mask_ratio = "random", 0.9
    return config


def glip_tokens_in_training(model: GLIPModel) -> int:
    """The image tokens (CLS included) the vision encoder sees in training: ``1 + max(1, int(N * (1 - ratio)))``."""
    size = model.config.vision_config.image_size
    embeddings = model.vision_model.embeddings.train()
    with torch.no_grad():
        tokens = embeddings(torch.zeros(1, 3, size, size)).shape[1]
    embeddings.eval()
    return tokens


def random_glip(config: GLIPConfig, seed: int = 0) -> GLIPModel:
    torch.manual_seed(seed)
    model = GLIPModel(config).eval()
    with torch.no_grad():  # layer norms and biases away from 1 / 0, so a swapped one shows
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def token_ids(batch: int, length: int, vocab: int, bos: int, eos: int, pad: int, seed: int = 1) -> torch.Tensor:
    """``bos, words..., eos, pad...`` rows of different lengths; words avoid the special ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    for row in range(batch):
        n = 2 + (5 * row) % (length - 3)
        words = torch.randint(3, vocab - 2, (n,), generator=generator)
        ids[row, : n + 2] = torch.cat([torch.tensor([bos]), words, torch.tensor([eos])])
    return ids


def make_inputs(path: Path, image_size: int, length: int, vocab: int, bos: int, eos: int, pad: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, image_size, image_size, generator=generator)
    save_file({"pixel_values": pixel_values, "input_ids": token_ids(3, length, vocab, bos, eos, pad)}, path)
    return path


def hf_embeddings(model, inputs_path: Path) -> dict[str, torch.Tensor]:
    inputs = load_file(inputs_path)
    model.eval()
    with torch.no_grad():
        return {
            "image_embeds": model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
            "text_embeds": model.get_text_features(input_ids=inputs["input_ids"]).pooler_output,
        }


def assert_embeddings_close(actual: dict, expected: dict) -> None:
    for name in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(actual[name], expected[name], atol=ATOL, rtol=0, msg=name)


def convert(*argv: str) -> None:
    run_cli(main, list(argv), prog=PROG)


def one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # what came before (progress bars)
    with pytest.raises(SystemExit) as stop:
        convert(*argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------------------------
# Without open_clip: the mapping is a bijection, and bad input is one line.


@pytest.fixture(scope="module")
def glip_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("glip")
    random_glip(hf_config()).save_pretrained(path)
    return path


def test_round_trip_glip_open_clip_glip_is_exact(glip_dir, tmp_path):
    to_open_clip(glip_dir, tmp_path / "model.pt")
    convert("from-open-clip", str(tmp_path / "model.pt"), "--out", str(tmp_path / "back"))  # no config: defaults
    convert(
        "from-open-clip",
        str(tmp_path / "model.pt"),
        "--out",
        str(tmp_path / "back_with_config"),
        *("--open_clip_config", str(tmp_path / "model.json"), "--mask_ratio", "0.25"),
    )
    source = GLIPModel.from_pretrained(glip_dir)
    for name in ("back", "back_with_config"):
        back = GLIPModel.from_pretrained(tmp_path / name)
        assert source.state_dict().keys() == back.state_dict().keys()
        for key, value in source.state_dict().items():
            assert torch.equal(value, back.state_dict()[key]), key
    # With the open_clip config every setting comes back; only open_clip's <start_of_text> convention differs.
    configs = [source.config.to_dict(), GLIPModel.from_pretrained(tmp_path / "back_with_config").config.to_dict()]
    for config in configs:
        config.pop("_name_or_path", None), config["text_config"].pop("bos_token_id")
    assert configs[0] == configs[1]


def test_to_open_clip_writes_safetensors_and_the_model_config(glip_dir, tmp_path):
    checkpoint, config = to_open_clip(glip_dir, tmp_path / "model.safetensors", tmp_path / "cfg" / "tiny.json")
    written = json.loads(config.read_text())
    assert written == hf_to_open_clip_config(GLIPModel.from_pretrained(glip_dir).config)
    assert written["quick_gelu"] is True  # transformers' CLIP default activation
    assert written["text_cfg"]["pool_type"] == "eos" and written["text_cfg"]["eos_id"] == 1
    assert written["vision_cfg"]["head_width"] == 8 and int(40 * written["vision_cfg"]["mlp_ratio"]) == 52
    state_dict = load_open_clip_state_dict(checkpoint)
    assert state_dict["visual.transformer.resblocks.2.attn.in_proj_weight"].shape == (120, 40)
    assert state_dict["visual.proj"].shape == (40, 16) and state_dict["text_projection"].shape == (32, 16)


def test_training_checkpoint_with_module_prefixes_converts(glip_dir, tmp_path):
    to_open_clip(glip_dir, tmp_path / "model.pt")
    state_dict = torch.load(tmp_path / "model.pt", weights_only=True)
    checkpoint = {"epoch": 30, "name": "run", "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
    torch.save(checkpoint, tmp_path / "epoch_30.pt")
    convert("from-open-clip", str(tmp_path / "epoch_30.pt"), "--out", str(tmp_path / "clip"), "--flavour", "clip")
    clip = CLIPModel.from_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["model_type"] == "clip"
    for key, value in GLIPModel.from_pretrained(glip_dir).state_dict().items():
        assert torch.equal(value, clip.state_dict()[key]), key


def test_inferred_architecture_uses_the_flags_for_what_the_weights_do_not_say(glip_dir, tmp_path):
    to_open_clip(glip_dir, tmp_path / "model.pt")
    written = json.loads((tmp_path / "model.json").read_text())
    state_dict = load_open_clip_state_dict(tmp_path / "model.pt")
    settings = OpenCLIPSettings(quick_gelu=True, vision_heads=5, text_heads=4, eos_token_id=1)
    written["text_cfg"].pop("pad_id")  # tokenizer metadata, not in the weights either
    assert infer_open_clip_config(state_dict, settings) == written
    defaults = infer_open_clip_config(state_dict)  # heads width // 64 (at least 1), GELU, argmax pooling
    assert defaults["quick_gelu"] is False and defaults["text_cfg"]["pool_type"] == "argmax"
    assert defaults["vision_cfg"]["head_width"] == 40 and defaults["text_cfg"]["heads"] == 1


@pytest.fixture
def open_clip_file(glip_dir, tmp_path):
    """Write a tampered copy of a valid open_clip state dict (or config) and return its path."""
    to_open_clip(glip_dir, tmp_path / "model.pt")
    state_dict = torch.load(tmp_path / "model.pt", weights_only=True)
    config = json.loads((tmp_path / "model.json").read_text())

    def write(state_change=None, config_change=None) -> tuple[Path, Path]:
        changed = dict(state_dict)
        (state_change or (lambda sd: None))(changed)
        torch.save(changed, tmp_path / "bad.pt")
        (tmp_path / "bad.json").write_text(json.dumps(variant(config, config_change or {})))
        return tmp_path / "bad.pt", tmp_path / "bad.json"

    return write


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"vision_cfg": {"pool_type": "avg"}}, "pool_type='avg'"),
        ({"vision_cfg": {"final_ln_after_pool": True, "no_ln_pre": True}}, "no_ln_pre=True"),
        ({"text_cfg": {"no_causal_mask": True}}, "no_causal_mask=True"),
        ({"text_cfg": {"pool_type": "last"}}, "pool_type='last'"),
        ({"text_cfg": {"hf_model_name": "bert-base-uncased"}}, "hf_model_name"),
        ({"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}, "timm_model_name"),
        ({"vision_cfg": {"new_option": 3}}, "unknown open_clip option vision_cfg.new_option"),
        ({"text_cfg": {"width": 64}}, "text_cfg.width=32, the open_clip config says 64"),
        ({"vision_cfg": {"image_size": [16, 24]}}, "vision_cfg.image_size=[16, 24]: only a positive int"),
        ({"vision_cfg": {"patch_size": [4, 2]}}, "vision_cfg.patch_size=[4, 2]: only a positive int"),
        ({"vision_cfg": {"image_size": "16"}}, "vision_cfg.image_size='16': only a positive int"),
        ({"vision_cfg": {"patch_dropout": 1.0}}, "bad.json: vision_cfg.patch_dropout=1.0; expected a number"),
        ({"vision_cfg": {"patch_dropout": "0.5"}}, "bad.json: vision_cfg.patch_dropout='0.5'; expected a number"),
        ({"vision_cfg": {"normal_masking": "yes"}}, "bad.json: vision_cfg.normal_masking='yes'; expected true or"),
        ({"vision_cfg": {"normal_masking": 1}}, "bad.json: vision_cfg.normal_masking=1; expected true or false"),
        ({"vision_cfg": {"head_width": 0}}, "bad.json: vision_cfg.head_width=0; expected an int >= 1"),
        ({"vision_cfg": "oops"}, "bad.json: vision_cfg='oops'; expected a JSON object"),
        ({"text_cfg": {"pool_type": "eos", "eos_id": "x"}}, "bad.json: text_cfg.eos_id='x'; expected an int >= 0"),
        ({"text_cfg": {"pad_id": -1}}, "bad.json: text_cfg.pad_id=-1; expected an int >= 0"),
        ({"text_cfg": {"norm_kwargs": {"eps": -1}}}, "bad.json: text_cfg.norm_kwargs.eps=-1; expected a number > 0"),
    ],
    ids=[
        *("avg_pool", "no_ln_pre", "no_causal_mask", "last_pool", "hf_text", "timm_image", "unknown", "size_mismatch"),
        *("non_square_image", "non_square_patch", "string_image_size", "patch_dropout_one", "patch_dropout_string"),
        *("normal_masking_string", "normal_masking_int", "head_width_zero", "vision_cfg_string", "eos_id_string"),
        *("pad_id_negative", "eps_negative"),
    ],
)
def test_open_clip_config_options_without_a_clip_equivalent_are_refused(
    capsys, tmp_path, open_clip_file, change, expected
):
    checkpoint, config = open_clip_file(config_change=change)
    line = one_line_error(
        capsys, "from-open-clip", str(checkpoint), "--out", str(tmp_path / "o"), "--open_clip_config", str(config)
    )
    assert expected in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "vision_change, flags, expected",
    [
        ({"patch_dropout": 0.3}, [], (0.3, "random", 0.2)),  # FLIP's masking, at the ratio the model trained with
        ({"patch_dropout": 0.3}, ["--mask_ratio", "0.75"], (0.75, "random", 0.2)),  # each flag: its own field
        ({"patch_dropout": 0.3}, ["--mask_strategy", "gaussian"], (0.3, "gaussian", 0.2)),
        ({"patch_dropout": 0.3}, ["--mask_strategy", "gaussian", "--mask_sigma", "0.8"], (0.3, "gaussian", 0.8)),
        ({"patch_dropout": 0.4, "normal_masking": True}, [], (0.4, "gaussian", 0.2)),  # the paper's fork: GLIP
        ({"patch_dropout": 0.4, "normal_maksing": True}, [], (0.4, "gaussian", 0.2)),
        ({"patch_dropout": 0.4, "normal_masking": True}, ["--mask_sigma", "0.8"], (0.4, "gaussian", 0.8)),
        ({"patch_dropout": 0.4, "normal_masking": False}, [], (0.4, "random", 0.2)),
        ({"patch_dropout": 0.0, "normal_masking": True}, [], (0.5, "gaussian", 0.2)),  # no masking: the default
        ({"patch_dropout": None}, [], (0.5, "gaussian", 0.2)),
        ({"patch_dropout": False}, [], (0.5, "gaussian", 0.2)),
    ],
)
def test_the_open_clip_configs_own_masking_is_the_converted_models(
    tmp_path, open_clip_file, vision_change, flags, expected
):
    checkpoint, config = open_clip_file(config_change={"vision_cfg": vision_change})
    convert("from-open-clip", str(checkpoint), "--out", str(tmp_path / "o"), "--open_clip_config", str(config), *flags)
    converted = GLIPConfig.from_pretrained(tmp_path / "o")
    assert (converted.mask_ratio, converted.mask_strategy, converted.mask_sigma) == expected


def test_a_sigma_for_a_flip_model_without_a_strategy_is_one_line(capsys, tmp_path, open_clip_file):
    checkpoint, config = open_clip_file(config_change={"vision_cfg": {"patch_dropout": 0.3}})
    line = one_line_error(
        capsys,
        *("from-open-clip", str(checkpoint), "--out", str(tmp_path / "o")),
        *("--open_clip_config", str(config), "--mask_sigma", "0.8"),
    )
    assert "mask_sigma=0.8 is for Gaussian masking" in line and "--mask_strategy gaussian" in line


def test_mask_flags_are_one_line_errors_where_they_mean_nothing_or_name_no_strategy(capsys, tmp_path, open_clip_file):
    checkpoint, config = open_clip_file(config_change={"vision_cfg": {"patch_dropout": 0.3}})
    source = ("from-open-clip", str(checkpoint), "--out", str(tmp_path / "o"), "--open_clip_config", str(config))
    line = one_line_error(capsys, *source, "--flavour", "clip", "--mask_sigma", "0.5", "--mask_ratio", "0.3")
    assert "mask_ratio, mask_sigma: a CLIP model has no masking" in line
    line = one_line_error(capsys, *source, "--mask_strategy", "bogus")
    assert "--mask_strategy: invalid choice: 'bogus'" in line
    assert not (tmp_path / "o").exists()


def test_random_masking_goes_to_open_clip_as_patch_dropout_and_comes_back(tmp_path, capsys):
    random_glip(flip_config()).save_pretrained(tmp_path / "flip")
    convert("to-open-clip", str(tmp_path / "flip"), "--out", str(tmp_path / "flip.pt"))
    assert "open_clip equivalent" not in capsys.readouterr().out
    assert json.loads((tmp_path / "flip.json").read_text())["vision_cfg"]["patch_dropout"] == 0.9
    convert(
        "from-open-clip",
        str(tmp_path / "flip.pt"),
        *("--out", str(tmp_path / "back"), "--open_clip_config", str(tmp_path / "flip.json")),
    )
    back = GLIPConfig.from_pretrained(tmp_path / "back")
    assert (back.mask_ratio, back.mask_strategy) == (0.9, "random")


def test_gaussian_masking_is_not_written_for_open_clip_and_the_command_says_so(glip_dir, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert("to-open-clip", str(glip_dir), "--out", str(tmp_path / "m.pt"))
    out = capsys.readouterr().out
    assert out.count("(its Gaussian masking, ratio 0.25, has no stock open_clip equivalent") == 1
    assert not [w for w in caught if issubclass(w.category, UnexportedMaskingWarning)], "said once, in the line"
    assert "patch_dropout" not in json.loads((tmp_path / "m.json").read_text())["vision_cfg"]


def test_the_python_function_warns_of_gaussian_masking_it_cannot_write(glip_dir, tmp_path):
    with pytest.warns(UnexportedMaskingWarning, match=r"Gaussian masking, ratio 0.25, has no stock open_clip"):
        to_open_clip(glip_dir, tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnexportedMaskingWarning)
        export_to_clip(GLIPModel.from_pretrained(glip_dir), tmp_path / "clip")
        to_open_clip(tmp_path / "clip", tmp_path / "clip.pt")  # a CLIP directory has no masking to lose
        random_glip(flip_config()).save_pretrained(tmp_path / "flip")
        to_open_clip(tmp_path / "flip", tmp_path / "flip.pt")  # random masking is written as patch_dropout


def test_to_open_clip_converts_a_clip_directory_from_the_command_line(tmp_path, capsys):
    """A CLIP directory (transformers' own, or from-open-clip --flavour clip) has no masking fields at all."""
    export_to_clip(random_glip(hf_config()), tmp_path / "clip")
    convert("to-open-clip", str(tmp_path / "clip"), "--out", str(tmp_path / "clip.pt"))
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'clip.pt'}") and "masking" not in out
    assert "patch_dropout" not in json.loads((tmp_path / "clip.json").read_text())["vision_cfg"]


def _drop_ln_pre(sd):
    del sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]


@pytest.mark.parametrize(
    "state_change, expected",
    [
        (lambda sd: sd.update({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(40)}), "layer scale"),
        (lambda sd: sd.update({"logit_bias": torch.tensor(-10.0)}), "logit_bias"),
        (lambda sd: sd.update({"visual.extra.weight": torch.ones(3)}), "unknown keys ['visual.extra.weight']"),
        (lambda sd: sd.pop("transformer.resblocks.1.ln_2.bias"), "missing keys ['transformer.resblocks.1.ln_2.bias']"),
        (_drop_ln_pre, "no_ln_pre"),
        (lambda sd: sd.update({"visual.positional_embedding": torch.zeros(99, 40)}), "not 1 + a square grid"),
        (lambda sd: sd.update({"visual.proj": torch.zeros(40, 17)}), "text_projection.weight has shape (16, 32)"),
    ],
    ids=["layer_scale", "logit_bias", "unknown_key", "missing_key", "no_ln_pre", "non_square_grid", "embed_dims"],
)
def test_checkpoints_that_are_not_a_plain_vit_clip_are_refused(
    capsys, tmp_path, open_clip_file, state_change, expected
):
    checkpoint, _ = open_clip_file(state_change=state_change)
    line = one_line_error(
        capsys, "from-open-clip", str(checkpoint), "--out", str(tmp_path / "o"), "--vision_heads", "5"
    )
    assert expected in line and str(checkpoint) in line


class NotWeights:  # a pickled object that torch.load(weights_only=True) must refuse to build
    pass


@pytest.mark.parametrize(
    "content, expected",
    [
        ([torch.zeros(2)], "holds list, not a state dict"),
        ({"epoch": 3, "optimizer": {}}, "holds a dict with keys ['epoch', 'optimizer']"),
        (NotWeights(), "cannot be read with torch.load(weights_only=True)"),
    ],
)
def test_a_file_that_is_not_a_state_dict_is_one_line(capsys, tmp_path, content, expected):
    torch.save(content, tmp_path / "x.pt")
    line = one_line_error(capsys, "from-open-clip", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"))
    assert expected in line and str(tmp_path / "x.pt") in line


def test_missing_files_and_existing_outputs_are_one_line(capsys, glip_dir, tmp_path):
    assert "does not exist" in one_line_error(capsys, "from-open-clip", str(tmp_path / "none.pt"), "--out", "o")
    assert "config.json does not exist" in one_line_error(capsys, "to-open-clip", str(tmp_path), "--out", "x.pt")
    (tmp_path / "x.pt").write_bytes(b"")
    line = one_line_error(capsys, "to-open-clip", str(glip_dir), "--out", str(tmp_path / "x.pt"))
    assert "already exists" in line and "--overwrite" in line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--vision_heads", "-2"], "vision_heads=-2: expected an int >= 1"),
        (["--vision_heads", "0"], "vision_heads=0: expected an int >= 1"),
        (["--text_heads", "0"], "text_heads=0: expected an int >= 1"),
        (["--layer_norm_eps", "nan"], "layer_norm_eps=nan: expected a finite number > 0"),
        (["--layer_norm_eps", "-1"], "layer_norm_eps=-1.0: expected a finite number > 0"),
        (["--eos_token_id", "-5"], "eos_token_id=-5: expected an int >= 0"),
    ],
)
def test_settings_no_model_can_have_are_one_line(capsys, glip_dir, tmp_path, flags, expected):
    """They used to convert: 0 heads fell back to 1, -2 wrote a model that could not load, a NaN eps gave NaNs."""
    checkpoint, _ = to_open_clip(glip_dir, tmp_path / "model.pt")
    line = one_line_error(capsys, "from-open-clip", str(checkpoint), "--out", str(tmp_path / "o"), *flags)
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_a_processor_goes_beside_the_model_only_if_the_text_tower_pools_at_its_end_token(
    capsys, glip_dir, tmp_path, tokenizer
):
    """Argmax pooling with a tokenizer whose end-of-text is not its largest id embedded every text alike (a pipeline
    scored each label 1/n); with the pooling the model trained with, the processor is saved and serves."""
    checkpoint, config = to_open_clip(glip_dir, tmp_path / "model.pt")
    tokenizer.save_pretrained(tmp_path / "processor")
    assert tokenizer.eos_token_id == 1  # the model (hf_config) pools at the first id 1: open_clip's pool_type eos
    source = ("from-open-clip", str(checkpoint), "--processor", str(tmp_path / "processor"))
    line = one_line_error(capsys, *source, "--out", str(tmp_path / "argmax"))
    assert "its tokenizer ends texts with id 1, but the converted text tower pools at argmax(token ids)" in line
    assert "--eos_token_id 1" in line and not (tmp_path / "argmax").exists()
    convert(*source, "--out", str(tmp_path / "eos"), "--open_clip_config", str(config))
    assert AutoTokenizer.from_pretrained(tmp_path / "eos").eos_token_id == 1


def test_no_output_path_replaces_a_users_file_without_overwrite(capsys, glip_dir, tmp_path):
    """Every file a command writes is checked, not only --out: the config JSON beside the checkpoint too, and a file
    where from-open-clip wants a directory (transformers only warned, and the command said it wrote the model)."""
    checkpoint, _ = to_open_clip(glip_dir, tmp_path / "model.pt")
    (tmp_path / "mine.json").write_text('{"mine": 1}')
    (tmp_path / "afile").write_text("x")
    line = one_line_error(capsys, "from-open-clip", str(checkpoint), "--out", str(tmp_path / "afile"))
    assert f"--out {tmp_path / 'afile'} is a file" in line
    line = one_line_error(capsys, "to-open-clip", str(glip_dir), "--out", str(tmp_path / "mine.pt"))
    assert f"the config {tmp_path / 'mine.json'} already exists; pass --overwrite" in line
    line = one_line_error(
        capsys,
        "to-open-clip",
        str(glip_dir),
        "--out",
        str(tmp_path / "new.pt"),
        "--config_out",
        str(tmp_path / "mine.json"),
    )
    assert f"--config_out {tmp_path / 'mine.json'} already exists" in line
    line = one_line_error(
        capsys, "to-open-clip", str(glip_dir), "--out", str(tmp_path / "z.pt"), "--config_out", str(tmp_path / "z.pt")
    )
    assert "is --out itself" in line
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "mine.json").read_text() == '{"mine": 1}'
    assert not (tmp_path / "mine.pt").exists() and not (tmp_path / "new.pt").exists()
    assert not (tmp_path / "z.pt").exists()
    convert("to-open-clip", str(glip_dir), "--out", str(tmp_path / "mine.pt"), "--overwrite")
    assert "vision_cfg" in json.loads((tmp_path / "mine.json").read_text())


# ------------------------------------------------------------------------------------------------------------------
# Against open_clip itself.


@pytest.fixture(scope="module")
def open_clip_run(tmp_path_factory, tokenizer):
    """One run of tests/open_clip_side.py: build the open_clip models, load the converted GLIP/CLIP models (one of
    them saved with its own tokenizer, which open_clip's get_tokenizer must then use)."""
    python = open_clip_python()
    work = tmp_path_factory.mktemp("open_clip")
    build, load, expected = [], [], {}
    for name, model_cfg in OPEN_CLIP_MODELS.items():
        text = model_cfg["text_cfg"]
        eos = text.get("eos_id", text["vocab_size"] - 1)  # open_clip's tokenizer: <end_of_text> is the largest id
        inputs = make_inputs(work / f"{name}.inputs.safetensors", 36, 18, 101, bos=99, eos=eos, pad=0)
        build.append({"name": name, "model_cfg": model_cfg, "seed": 0, "inputs": str(inputs)})
    inputs = make_inputs(work / "flip.inputs.safetensors", 36, 18, 101, bos=99, eos=100, pad=0)
    build.append({"name": "flip", "model_cfg": FLIP_MODEL, "seed": 0, "inputs": str(inputs)})
    for name, (change, _) in UNSUPPORTED.items():
        build.append({"name": name, "model_cfg": variant(OPEN_CLIP_MODELS["gelu"], change), "seed": 0})
    hf_models = {
        "glip_quickgelu_eos": (hf_config(), "glip"),
        "clip_gelu_argmax": (hf_config(hidden_act="gelu", layer_norm_eps=1e-6, text={"eos_token_id": 2}), "clip"),
        "glip_random_masking": (flip_config(), "glip"),
    }
    for name, (config, flavour) in hf_models.items():
        model = random_glip(config)
        export_to_clip(model, work / name) if flavour == "clip" else model.save_pretrained(work / name)
        eos = config.text_config.eos_token_id
        ids = (0, 98, 1) if eos == 2 else (0, eos, 1)  # argmax pooling: the end token is the largest id
        inputs = make_inputs(work / f"{name}.inputs.safetensors", 30, 20, 99, bos=ids[0], eos=ids[1], pad=ids[2])
        expected[name] = {**hf_embeddings(model, inputs), "tokens_in_training": glip_tokens_in_training(model)}
        checkpoint, config_path = to_open_clip(work / name, work / f"{name}.pt")
        load.append({"name": name, "config": str(config_path), "checkpoint": str(checkpoint), "inputs": str(inputs)})
    name, model = "glip_own_tokenizer", random_glip(tiny_config(tokenizer))
    model.save_pretrained(work / name)
    tokenizer.save_pretrained(work / name)
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    inputs = make_inputs(work / f"{name}.inputs.safetensors", 30, TEXT_LEN, len(tokenizer), *special)
    tokens = tokenizer(OWN_TEXTS, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokenized = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output
    expected[name] = {**hf_embeddings(model, inputs), "tokenized_ids": tokens["input_ids"], "tokenized": tokenized}
    checkpoint, config_path = to_open_clip(work / name, work / f"{name}.pt")
    load.append({"name": name, "config": str(config_path), "checkpoint": str(checkpoint), "inputs": str(inputs)})
    load[-1]["texts"] = OWN_TEXTS
    job = work / "job.json"
    job.write_text(json.dumps({"out": str(work / "out"), "build": build, "load": load}))
    result = subprocess.run(
        [str(python), str(ROOT / "tests" / "open_clip_side.py"), str(job)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "out": work / "out", "expected": expected}


@pytest.mark.parametrize(
    "name, source, how",
    [
        ("gelu", "pt", "flags"),
        ("gelu", "train.pt", "config"),
        ("gelu", "safetensors", "flags"),
        ("quickgelu_eos", "pt", "flags"),
        ("quickgelu_eos", "train.pt", "config"),
    ],
)
def test_open_clip_to_glip_embeddings_match(open_clip_run, tmp_path, name, source, how):
    out = open_clip_run["out"]
    settings = NOT_IN_THE_WEIGHTS[name] if how == "flags" else ["--open_clip_config", str(out / f"{name}.json")]
    convert("from-open-clip", str(out / f"{name}.{source}"), "--out", str(tmp_path / "glip"), *settings)
    model = GLIPModel.from_pretrained(tmp_path / "glip")
    actual = hf_embeddings(model, open_clip_run["work"] / f"{name}.inputs.safetensors")
    assert_embeddings_close(actual, load_file(out / f"{name}.embeddings.safetensors"))
    logit_scale = load_open_clip_state_dict(out / f"{name}.pt")["logit_scale"]
    assert torch.equal(model.logit_scale.detach(), logit_scale)


def test_a_flip_model_from_open_clip_keeps_its_masking(open_clip_run, tmp_path):
    """open_clip's patch dropout 0.4 becomes random masking 0.4: the same embeddings in eval mode, and in training the
    encoder sees as many tokens as open_clip's does (1 + int(36 * (1 - 0.4)) = 22; ``round`` would give 23)."""
    out = open_clip_run["out"]
    convert(
        "from-open-clip",
        str(out / "flip.pt"),
        "--out",
        str(tmp_path / "glip"),
        "--open_clip_config",
        str(out / "flip.json"),
    )
    model = GLIPModel.from_pretrained(tmp_path / "glip")
    assert (model.config.mask_ratio, model.config.mask_strategy) == (0.4, "random")
    expected = load_file(out / "flip.embeddings.safetensors")
    assert_embeddings_close(hf_embeddings(model, open_clip_run["work"] / "flip.inputs.safetensors"), expected)
    assert glip_tokens_in_training(model) == expected["tokens_in_training"].item() == 22


def test_clip_flavour_from_open_clip_matches(open_clip_run, tmp_path):
    out = open_clip_run["out"]
    convert(
        "from-open-clip",
        str(out / "gelu.train.pt"),
        "--out",
        str(tmp_path / "clip"),
        "--flavour",
        "clip",
        *NOT_IN_THE_WEIGHTS["gelu"],
    )
    clip = CLIPModel.from_pretrained(tmp_path / "clip")
    actual = hf_embeddings(clip, open_clip_run["work"] / "gelu.inputs.safetensors")
    assert_embeddings_close(actual, load_file(out / "gelu.embeddings.safetensors"))


def test_settings_not_in_the_weights_change_the_outputs(open_clip_run, tmp_path):
    """Why QuickGELU, eps and pooling are flags: without them the same weights compute something else."""
    out = open_clip_run["out"]
    convert(
        "from-open-clip",
        str(out / "quickgelu_eos.pt"),
        "--out",
        str(tmp_path / "glip"),
        "--vision_heads",
        "4",
        "--text_heads",
        "5",
    )
    actual = hf_embeddings(
        GLIPModel.from_pretrained(tmp_path / "glip"), open_clip_run["work"] / "quickgelu_eos.inputs.safetensors"
    )
    expected = load_file(out / "quickgelu_eos.embeddings.safetensors")
    for name in ("image_embeds", "text_embeds"):
        assert (actual[name] - expected[name]).abs().max() > 1e-3, name


@pytest.mark.parametrize("name", list(OPEN_CLIP_MODELS))
def test_inferred_architecture_equals_the_open_clip_source(open_clip_run, name):
    source = OPEN_CLIP_MODELS[name]
    state_dict = load_open_clip_state_dict(open_clip_run["out"] / f"{name}.train.pt")
    text = source["text_cfg"]
    settings = OpenCLIPSettings(
        quick_gelu=source.get("quick_gelu", False),
        vision_heads=source["vision_cfg"]["width"] // source["vision_cfg"]["head_width"],
        text_heads=text["heads"],
        layer_norm_eps=text.get("norm_kwargs", {}).get("eps"),
        eos_token_id=text.get("eos_id"),
    )
    inferred = infer_open_clip_config(state_dict, settings)
    expected = variant(
        source,
        {"quick_gelu": source.get("quick_gelu", False), "text_cfg": {"pool_type": text.get("pool_type", "argmax")}},
    )
    assert inferred == expected


@pytest.mark.parametrize("name", ["glip_quickgelu_eos", "clip_gelu_argmax", "glip_random_masking"])
def test_glip_to_open_clip_embeddings_match(open_clip_run, name):
    """Loaded with strict=True. Random masking 0.9 trains in open_clip as patch dropout 0.9, with as many image tokens
    as here (1 + 9 of 100); Gaussian masking has no open_clip equivalent, so those models train unmasked there."""
    actual = load_file(open_clip_run["out"] / f"{name}.embeddings.safetensors")
    expected = open_clip_run["expected"][name]
    assert_embeddings_close(actual, expected)
    if name == "glip_random_masking":
        assert actual["tokens_in_training"].item() == expected["tokens_in_training"] == 1 + 9
    else:
        assert actual["tokens_in_training"].item() == 1 + 100


def test_to_open_clip_carries_the_models_own_tokenizer(open_clip_run):
    """open_clip.get_tokenizer(config) gives the ids the model was trained on, not OpenAI's BPE (whose ids were out
    of this 600-token vocabulary: an IndexError in open_clip)."""
    actual = load_file(open_clip_run["out"] / "glip_own_tokenizer.embeddings.safetensors")
    expected = open_clip_run["expected"]["glip_own_tokenizer"]
    assert torch.equal(actual["tokenized_ids"], expected["tokenized_ids"])
    torch.testing.assert_close(actual["tokenized"], expected["tokenized"], atol=ATOL, rtol=0)
    assert_embeddings_close(actual, expected)


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_open_clip_models_without_a_clip_equivalent_are_refused(open_clip_run, capsys, tmp_path, name):
    checkpoint = open_clip_run["out"] / f"{name}.pt"
    line = one_line_error(
        capsys, "from-open-clip", str(checkpoint), "--out", str(tmp_path / "o"), "--vision_heads", "4"
    )
    assert UNSUPPORTED[name][1] in line and str(checkpoint) in line
