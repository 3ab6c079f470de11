"""The open_clip side of tests/test_convert.py, run with the open_clip environment's python (never glip_hf's).

    .venv-openclip/bin/python tests/open_clip_side.py JOB.json

open_clip imports torchvision, which does not import beside the project's CPU torch wheel, so it lives in a second
environment (see .ci/run) and this script talks to the tests through files only: tensors as .safetensors, the job and
model configs as JSON. The checkpoints it writes are what open_clip training writes (``torch.save`` of a state dict
or of ``{"epoch", "name", "state_dict", "optimizer"}`` with ``module.`` prefixes); it reads checkpoints only with
``weights_only=True``.

JOB.json: ``{"out": DIR, "build": [...], "load": [...]}``

- build ``{"name", "model_cfg", "seed", "inputs"?}``: a random ``open_clip.CLIP`` from the model config (every
  parameter perturbed, so that layer norms and biases are not at their identity values, then one AdamW step, so
  that the training checkpoint carries an optimizer state). Writes ``NAME.pt`` (state dict), ``NAME.train.pt``
  (training checkpoint), ``NAME.safetensors``, ``NAME.json`` (model config) and, with ``inputs``,
  ``NAME.embeddings.safetensors``.
- load ``{"name", "config", "checkpoint", "inputs", "texts"?}``: ``open_clip.create_model`` from the model config
  JSON, ``load_state_dict(strict=True)`` of the checkpoint, then ``NAME.embeddings.safetensors`` (with ``texts``,
  also ``tokenized_ids`` from ``open_clip.get_tokenizer`` and their ``tokenized`` text embeddings).

Embeddings are ``encode_image`` / ``encode_text`` in eval mode, fp32, not normalised; every embeddings file also
holds ``tokens_in_training``, the image tokens left after open_clip's patch dropout (FLIP's masking) in training.
"""

import json
import sys
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file


def embeddings(model: torch.nn.Module, inputs_path: str) -> dict[str, torch.Tensor]:
    inputs = load_file(inputs_path)
    model.eval()
    with torch.no_grad():
        return {
            "image_embeds": model.encode_image(inputs["pixel_values"]).contiguous(),
            "text_embeds": model.encode_text(inputs["input_ids"]).contiguous(),
        }


def tokens_in_training(model: torch.nn.Module) -> torch.Tensor:
    """``(1,)``: the image tokens (CLS included) after open_clip's patch dropout in training mode, i.e. what the
    image transformer sees: ``1 + max(1, int(N * (1 - patch_dropout)))``, or ``1 + N`` without patch dropout."""
    seen = []
    hook = model.visual.patch_dropout.register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
    model.visual.train()
    with torch.no_grad():
        model.visual(torch.zeros(1, 3, *model.visual.image_size))
    hook.remove()
    model.eval()
    return torch.tensor([seen[0]])


def build(job: dict, out: Path) -> None:
    torch.manual_seed(job["seed"])
    model_cfg = dict(job["model_cfg"])
    # A CLS token in the text tower (embed_cls) needs the CustomTextCLIP layout (keys under `text.`).
    model_class = open_clip.model.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip.model.CLIP
    model = model_class(**model_cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shape = model.visual.image_size
    pixels = torch.randn(2, 3, *shape)
    text = torch.randint(1, model.vocab_size, (2, model.context_length))
    image_features, text_features, logit_scale = model(pixels, text)[:3]
    (logit_scale * image_features @ text_features.t()).logsumexp(-1).mean().backward()
    optimizer.step()

    name = job["name"]
    state_dict = model.state_dict()
    torch.save(state_dict, out / f"{name}.pt")
    save_file({key: value.contiguous() for key, value in state_dict.items()}, out / f"{name}.safetensors")
    checkpoint = {
        "epoch": 1,
        "name": name,
        "state_dict": {f"module.{key}": value for key, value in state_dict.items()},
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, out / f"{name}.train.pt")
    (out / f"{name}.json").write_text(json.dumps(job["model_cfg"], indent=2))
    if job.get("inputs"):
        outputs = {**embeddings(model, job["inputs"]), "tokens_in_training": tokens_in_training(model)}
        save_file(outputs, out / f"{name}.embeddings.safetensors")


def load(job: dict, out: Path) -> None:
    config = Path(job["config"])
    open_clip.add_model_config(config)
    model = open_clip.create_model(config.stem)
    checkpoint = job["checkpoint"]
    if checkpoint.endswith(".safetensors"):
        state_dict = load_file(checkpoint)
    else:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    # The documented one-liner loads the same weights (open_clip's own loader, strict by default).
    documented = open_clip.create_model(config.stem, pretrained=checkpoint)
    for key, value in documented.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    outputs = {**embeddings(model, job["inputs"]), "tokens_in_training": tokens_in_training(model)}
    if job.get("texts"):  # tokenized as a user does: the tokenizer named by the model config
        outputs["tokenized_ids"] = open_clip.get_tokenizer(config.stem)(job["texts"])
        with torch.no_grad():
            outputs["tokenized"] = model.encode_text(outputs["tokenized_ids"]).contiguous()
    save_file(outputs, out / f"{job['name']}.embeddings.safetensors")


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    for item in job.get("build", []):
        build(item, out)
    for item in job.get("load", []):
        load(item, out)
    (out / "versions.json").write_text(json.dumps({"open_clip": open_clip.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1])
