"""Auto classes, pipelines, loading CLIP checkpoints and exporting to plain CLIP, all offline."""

import json
import subprocess
import sys

import torch
from conftest import tiny_config
from transformers import AutoModel, AutoModelForZeroShotImageClassification, CLIPModel, pipeline

import glip_hf
from glip_hf import GLIPModel
from glip_hf.hub import to_clip_config
from glip_hf.synthetic import render_example_scene


def test_auto_classes_resolve_to_glip(saved_model_dir):
    assert type(AutoModel.from_pretrained(saved_model_dir)) is GLIPModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(saved_model_dir)) is GLIPModel


def test_zero_shot_pipeline_loads_a_glip_directory(saved_model_dir):
    classifier = pipeline("zero-shot-image-classification", model=str(saved_model_dir))
    assert isinstance(classifier.model, GLIPModel) and not classifier.model.training
    labels = ["red circle", "green triangle", "blue star"]
    result = classifier(render_example_scene(64), candidate_labels=labels)
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert abs(sum(r["score"] for r in result) - 1.0) < 1e-5


def test_from_pretrained_on_a_clip_checkpoint_with_masking_kwargs(tmp_path, inputs):
    torch.manual_seed(0)
    clip = CLIPModel(to_clip_config(tiny_config())).eval()
    clip.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
    glip, info = GLIPModel.from_pretrained(
        tmp_path, mask_ratio=0.5, mask_strategy="gaussian", mask_sigma=0.8, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (glip.config.vision_config.mask_ratio, glip.config.vision_config.mask_sigma) == (0.5, 0.8)
    torch.testing.assert_close(glip(**inputs).logits_per_image, clip(**inputs).logits_per_image, atol=0, rtol=0)
    glip.train()
    assert glip.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1] == 1 + 112


def test_export_to_clip_loads_without_glip_hf(model, inputs, tmp_path):
    model.eval()
    export_dir = glip_hf.export_to_clip(model, tmp_path / "clip")
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "clip"
    assert not [key for key in json.dumps(config).split('"') if key.startswith("mask_")]
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = model(**inputs).logits_per_image
    script = (
        "import sys, torch\n"
        "from transformers import CLIPModel\n"
        f"model = CLIPModel.from_pretrained({str(export_dir)!r}).eval()\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "assert 'glip_hf' not in sys.modules\n"
        f"torch.save(model(**inputs).logits_per_image, {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=0, rtol=0)
