"""Prepare the folder a run is published as, and push it to the Hugging Face Hub.

Two flavours of the same weights:

* ``glip``: the GLIP model with its code (``auto_map`` + flat modules, see [`write_remote_code`]): with
  ``trust_remote_code=True`` it loads as a ``GLIPModel`` that masks in training mode, where glip_hf is not installed.
* ``clip``: a plain ``CLIPModel`` checkpoint (``model_type: clip``) that loads everywhere; the GLIP settings are
  recorded in its card.

Both hold the tokenizer and image processor (so the zero-shot pipeline works from the folder alone), the README.md
rendered from ``model_card.md``, the mask picture, and the run's records under ``training_run/`` and
``eval_results/`` so that every number in the card can be traced.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..configuration_glip import GLIPConfig
from ..data import write_processor_config
from ..masking import render_mask_figure
from ..modeling_glip import GLIPModel
from ..tokenization import check_tokenizer_serves, load_pretrained_tokenizer
from .card import FLAVOURS, RunRecord, dataset_label, read_run, redact_paths, render_model_card
from .export import export_to_clip
from .remote_code import AUTO_MAP, write_remote_code

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"  # package data: in a wheel too
DEFAULT_LICENSE = "apache-2.0"
PROCESSOR_FILES = (  # copied byte for byte: loading and re-saving would add local-only keys to them
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
)
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
REQUIRED_PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json")
RUN_RECORDS = {"run_config.yaml": "run_config", "train_summary.json": "train_summary", "loss_curve.png": "loss_curve"}
MASK_PICTURE = "masks.png"
MASK_PICTURE_DRAWS = 4096
TOKEN_HELP = "run `hf auth login` with a token that can write, or set HF_TOKEN"


def default_repo_id(run_dir: str | Path) -> str:
    """``your-username/<name>``: the run folder's name as a valid Hub repository name (letters, digits, ``-``,
    ``_``, ``.``, no ``--`` or ``..``; at most 96 characters),
    for the card's snippet when no ``--repo_id`` is given."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(run_dir).resolve().name)
    name = re.sub(r"([-.])\1+", r"\1", name).strip("-.")[:96].strip("-.")
    return f"your-username/{name or 'glip-model'}"


def _check_run_dir(run_dir: Path) -> None:
    if not any((run_dir / name).is_file() for name in WEIGHTS_FILES):
        raise FileNotFoundError(f"{run_dir} has no {' or '.join(WEIGHTS_FILES)}; pass the output of a finished run.")
    missing = [name for name in REQUIRED_PROCESSOR_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} has no {' / '.join(missing)}: the published folder needs the tokenizer and image processor "
            "the model was trained with; save them beside it (tokenizer.save_pretrained(RUN_DIR), likewise the "
            "image processor)."
        )


def _check_tokenizer(run_dir: Path, trust_remote_code: bool) -> None:
    """The folder's tokenizer must serve its text tower: the published pipeline would fail or score other tokens."""
    tokenizer = load_pretrained_tokenizer(str(run_dir), trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise FileNotFoundError(f"{run_dir} has no usable tokenizer; save the one it was trained with beside it.")
    check_tokenizer_serves(GLIPConfig.from_pretrained(run_dir).text_config, tokenizer, str(run_dir))


def _output_dir(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty ``out`` unless asked, and never the run itself or a folder holding it."""
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise ValueError(f"--out {out} would replace the run directory {run_dir}; pass another folder.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it.")


def _scene_tensor(image_size: int) -> torch.Tensor:
    """The example scene as ``(3, S, S)`` floats in [0, 1]."""
    from ..synthetic import render_example_scene

    pixels = np.asarray(render_example_scene(image_size).convert("RGB"), dtype=np.float32) / 255.0  # (S, S, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _write_weights(model: GLIPModel, folder: Path, flavour: str) -> None:
    if flavour == "clip":
        export_to_clip(model, folder)
        return
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder)
    write_remote_code(folder)


def _write_processor(run_dir: Path, folder: Path) -> None:
    for name in PROCESSOR_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder / name)
    write_processor_config(folder)  # a run older than the file: lets AutoProcessor build the CLIPProcessor


def _published_eval(result: Any, repo_id: str) -> Any:
    """A run_eval result as published: the model is ``repo_id``, a local dataset its name, no other local path."""
    if not isinstance(result, dict):
        return result
    result = {**result, "model": repo_id} if "model" in result else dict(result)
    if isinstance(result.get("dataset"), str):
        result["dataset"] = dataset_label(result["dataset"])
    return redact_paths(result)


def _write_records(record: RunRecord, folder: Path, repo_id: str) -> dict[str, str | None]:
    """Copy the run's records and evaluation results, local paths replaced (see [`redact_paths`]); returns the
    card's ``files`` (paths inside the folder)."""
    files: dict[str, str | None] = {"mask_picture": None, **dict.fromkeys(RUN_RECORDS.values())}
    records = folder / "training_run"
    records.mkdir()
    (records / "run_config.yaml").write_text(yaml.safe_dump(record.run_config, sort_keys=False))
    if record.summary is not None:
        (records / "train_summary.json").write_text(json.dumps(record.summary, indent=1))
    if (record.run_dir / "loss_curve.png").is_file():
        shutil.copy2(record.run_dir / "loss_curve.png", records / "loss_curve.png")
    for name, key in RUN_RECORDS.items():
        files[key] = f"training_run/{name}" if (records / name).is_file() else None
    for target, source in record.eval_files.items():
        (folder / target).parent.mkdir(exist_ok=True)
        content = json.loads(source.read_text())
        results = [_published_eval(r, repo_id) for r in (content if isinstance(content, list) else [content])]
        (folder / target).write_text(json.dumps(results if isinstance(content, list) else results[0], indent=2))
    ratio, _, sigma = record.pretraining_masking
    if ratio > 0:
        vision = record.model_config["vision_config"]
        render_mask_figure(
            _scene_tensor(vision["image_size"]),
            folder / MASK_PICTURE,
            patch_size=vision["patch_size"],
            mask_ratio=ratio,
            sigmas=(sigma,),
            num_samples=MASK_PICTURE_DRAWS,
        )
        files["mask_picture"] = MASK_PICTURE
    return files


def prepare_folder(
    run_dir: str | Path,
    out: str | Path,
    flavour: str = "glip",
    eval_files: Sequence[str | Path] = (),
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    template: str | Path | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Build, with no network, exactly the folder that [`push_run`] uploads (see the module docstring).

    Args:
        run_dir: the output directory of a finished ``run_pretraining.py`` run.
        out: the folder to write; built beside it and renamed into place when complete.
        flavour: ``"glip"`` (GLIP model + code, ``trust_remote_code=True``) or ``"clip"`` (plain CLIP).
        eval_files: ``run_eval.py --output`` JSON files evaluating ``run_dir`` (a suite's list too).
        repo_id: the Hub name the card's usage snippet loads; default ``your-username/<run_dir name>``.
        license: the card's license id (the weights' license is yours to choose, given your data's).
        template: the card template; default the package's ``glip_hf/hub/model_card.md``.
        overwrite: replace a non-empty ``out``.
        trust_remote_code: load a tokenizer that brings its own code (``auto_map``) to check it against the model.
    Returns:
        ``out``.
    """
    run_dir, out = Path(run_dir), Path(out)
    if flavour not in FLAVOURS:
        raise ValueError(f"--flavour {flavour!r} is not one of {FLAVOURS}.")
    template = Path(template) if template is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; pass --template PATH.")
    record = read_run(run_dir, list(eval_files))
    _check_run_dir(run_dir)
    _check_tokenizer(run_dir, trust_remote_code)
    _output_dir(out, run_dir, overwrite)
    repo_id = repo_id or default_repo_id(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model = GLIPModel.from_pretrained(run_dir).eval()
        _write_weights(model, folder, flavour)
        _write_processor(run_dir, folder)
        files = _write_records(record, folder, repo_id)
        card = render_model_card(record, template, flavour, repo_id, license, model.num_parameters(), files)
        card.save(folder / "README.md")
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # only left when something failed
    return out


def check_hub_token(validate: bool = False) -> None:
    """Fail now, in one line, if nothing could push to the Hub: call it before a long run that pushes at the end.

    Args:
        validate: also ask the Hub whether the token is accepted (a network call); by default only check that the
            Hub is not switched off (``HF_HUB_OFFLINE``) and that a token is configured (``HF_TOKEN`` or a login).
    Raises:
        ValueError: naming the fix.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set, so nothing can reach the Hub: unset it to push (or do not push).")
    token = get_token()
    if token is None:
        raise ValueError(f"pushing to the Hugging Face Hub needs a token and none is configured: {TOKEN_HELP}.")
    if validate:
        try:
            HfApi().whoami(token=token)
        except HfHubHTTPError as error:
            raise ValueError(f"the Hugging Face Hub refused the configured token ({error}): {TOKEN_HELP}.") from None


def push_run(
    run_dir: str | Path,
    repo_id: str,
    flavour: str = "glip",
    private: bool = False,
    eval_files: Sequence[str | Path] = (),
    commit_message: str | None = None,
    license: str = DEFAULT_LICENSE,
    template: str | Path | None = None,
    trust_remote_code: bool = False,
) -> str:
    """Prepare ``run_dir``'s folder (see [`prepare_folder`]) and upload it as the content of Hub repo ``repo_id``.

    The repository is created if needed; files in it that the folder does not have are deleted in the same commit,
    so that a repository pushed again (a later checkpoint, the other flavour) holds exactly the new folder.

    Returns:
        The repository's URL.
    """
    from huggingface_hub import HfApi

    check_hub_token()
    with tempfile.TemporaryDirectory(prefix="glip-hub-") as tmp:
        folder = prepare_folder(
            run_dir,
            Path(tmp) / "upload",
            flavour,
            eval_files,
            repo_id,
            license,
            template,
            trust_remote_code=trust_remote_code,
        )
        api = HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message or f"Upload the {flavour} flavour of {Path(run_dir).resolve().name}",
            delete_patterns=["*"],
        )
    return str(url)
