"""Typed run configuration: dataclasses filled from a YAML file, then from command-line overrides.

``python run_pretraining.py --config configs/glip_vitb16_75.yaml --learning_rate 5e-4`` reads the YAML (flat, or
grouped under ``model:`` / ``data:`` / ``training:``) and lets every flag override it. Unknown keys are errors that
name the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


@dataclass
class ModelArguments:
    """The model to train: a fresh GLIP of the given size, or one started from a checkpoint."""

    init_from: str | None = field(default=None, metadata={"help": "CLIP or GLIP checkpoint (directory or Hub id)"})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "AutoTokenizer name or path; default: init_from's, else a BPE trained offline"}
    )
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "vocabulary of the offline BPE tokenizer"})
    image_size: int = 224
    patch_size: int = 16
    vision_hidden_size: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_intermediate_size: int = 3072
    text_hidden_size: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_intermediate_size: int = 2048
    max_text_length: int = 77
    projection_dim: int = 512
    mask_ratio: float | None = field(default=None, metadata={"help": "patches dropped in training; None = config's"})
    mask_strategy: str | None = field(default=None, metadata={"help": "gaussian (GLIP) or random (FLIP)"})
    mask_sigma: float | None = field(default=None, metadata={"help": "GLIP sigma (covariance diagonal)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager"})


@dataclass
class DataArguments:
    """Where image-caption pairs come from; no dataset_name means the built-in generated dataset."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "HF dataset name or local path; or imagefolder / parquet / webdataset with data_files"},
    )
    dataset_config_name: str | None = None
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for load_dataset (e.g. an imagefolder)"})
    data_files: str | None = field(default=None, metadata={"help": "file or glob (parquet, webdataset .tar, ...)"})
    train_split: str = "train"
    eval_split: str | None = field(default=None, metadata={"help": "held-out split for the end-of-run zero-shot"})
    image_column: str = field(default="image", metadata={"help": "image column; a,b tries each in turn"})
    caption_column: str = field(default="caption", metadata={"help": "caption column (a string or list of strings)"})
    label_column: str = field(default="label", metadata={"help": "ClassLabel column used for zero-shot evaluation"})
    streaming: bool = field(default=False, metadata={"help": "stream an IterableDataset, split across processes"})
    shuffle_buffer_size: int = 10_000
    max_train_samples: int | None = None
    cache_dir: str = field(default=".cache/glip-hf", metadata={"help": "where generated data and HF caches go"})
    num_workers: int = 0
    crop_scale_min: float = field(default=0.5, metadata={"help": "RandomResizedCrop scale lower bound (paper: 0.5)"})
    crop_scale_max: float = 1.0
    synthetic_num_train: int = 6000
    synthetic_num_test: int = 600
    synthetic_placement: str = field(default="center", metadata={"help": "center, or uniform (centre-agnostic)"})
    synthetic_seed: int = 0


@dataclass
class TrainingArguments:
    """Optimisation, schedule, checkpoints and logging."""

    output_dir: str = "outputs/default"
    seed: int = 0
    per_device_train_batch_size: int = 128
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "contrastive-correct accumulation by feature caching (open_clip's accum_freq)"}
    )
    num_train_epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps of the masked stage; -1 = from epochs"})
    learning_rate: float = 1e-3
    weight_decay: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = field(default=None, metadata={"help": "no, bf16 or fp16; None = accelerate's"})
    loss: str = field(default="clip", metadata={"help": "clip (InfoNCE) or siglip (sigmoid)"})
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    unmasked_tuning_steps: int = field(default=0, metadata={"help": "extra steps with masking off, appended"})
    unmasked_tuning_learning_rate: float = 1e-5
    save_steps: int = 500
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest, or a checkpoint directory"})
    logging_steps: int = 10
    report_to: str = field(default="auto", metadata={"help": "auto (tensorboard if installed), none, or a,b list"})
    eval_at_end: bool = True
    eval_batch_size: int = 256
    cpu: bool = False


RUN_SECTIONS = (ModelArguments, DataArguments, TrainingArguments)


@dataclass
class EvalArguments:
    """What ``run_eval.py`` measures; also the keys of a ``--suite`` YAML entry."""

    model: str | None = field(default=None, metadata={"help": "model dir or Hub id; default outputs/default"})
    task: str = field(
        default="zeroshot_classification", metadata={"help": "zeroshot_classification, retrieval or linear_probe"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "HF name, saved dataset or builder; default: the built-in held-out set"}
    )
    dataset_config_name: str | None = None
    data_dir: str | None = None
    data_files: str | None = None
    split: str = field(default="test", metadata={"help": "split evaluated"})
    train_split: str = field(default="train", metadata={"help": "linear probe: split the classifier is fit on"})
    val_split: str | None = field(
        default=None,
        metadata={"help": "linear probe: split choosing the regularisation; default: 20%% of train_split"},
    )
    image_column: str = "image"
    caption_column: str = field(default="captions", metadata={"help": "retrieval: caption or list of captions"})
    label_column: str = "label"
    class_names: str | None = field(default=None, metadata={"help": "file of class names (.txt lines or .json)"})
    templates: str | None = field(default=None, metadata={"help": "file of prompt templates with {}"})
    mask_ratio: float = field(default=0.0, metadata={"help": "> 0: masked inference at this ratio"})
    mask_strategy: str | None = field(default=None, metadata={"help": "default: the model's"})
    mask_sigma: float | None = field(default=None, metadata={"help": "default: the model's"})
    mask_draws: int = field(
        default=3, metadata={"help": "masked inference: repeat with this many mask draws; mean and std reported"}
    )
    batch_size: int = 256
    max_samples: int | None = None
    linear_probe_val_fraction: float = 0.2
    seed: int = field(default=0, metadata={"help": "seeds the masks of masked inference and the probe's split"})
    cache_dir: str = ".cache/glip-hf"
    cpu: bool = field(default=False, metadata={"help": "run on the CPU (several processes on a GPU-less machine)"})
    output: str | None = field(default=None, metadata={"help": "JSON result file (suite: base of .md/.csv)"})
    suite: str | None = field(default=None, metadata={"help": "YAML list of (task, dataset, ...) entries"})


def _flatten_yaml(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("model", "data", "training") and isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    known = {f.name for cls in RUN_SECTIONS for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; see `run_pretraining.py --help` for the valid ones.")
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Flat ``{field: value}`` from a run-config YAML (sections ``model`` / ``data`` / ``training`` optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; pass --config with an existing YAML file.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run config must be a mapping of field: value.")
    return _flatten_yaml(raw, path)


def parse_run_args(
    argv: list[str] | None = None, default_config: str | Path | None = None
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``[--config FILE] [--field value ...]``: dataclass defaults, then the YAML, then the flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(RUN_SECTIONS)
    parser.add_argument("--config", default=default_config, help="run-config YAML (default: the built-in run)")
    if known.config is not None:
        parser.set_defaults(**load_yaml(known.config))
    *sections, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unknown argument(s) {remaining}; see `run_pretraining.py --help`.")
    model_args, data_args, training_args = sections[:3]
    validate_run_args(model_args, data_args, training_args)
    return model_args, data_args, training_args


def validate_run_args(model: ModelArguments, data: DataArguments, training: TrainingArguments) -> None:
    """One-line ValueErrors for values no run can use."""
    _require(training.loss in ("clip", "siglip"), "loss", training.loss, "clip or siglip")
    _require(
        training.per_device_train_batch_size >= 1,
        "per_device_train_batch_size",
        training.per_device_train_batch_size,
        ">= 1",
    )
    _require(
        training.gradient_accumulation_steps >= 1,
        "gradient_accumulation_steps",
        training.gradient_accumulation_steps,
        ">= 1",
    )
    _require(training.learning_rate > 0, "learning_rate", training.learning_rate, "> 0")
    _require(training.unmasked_tuning_steps >= 0, "unmasked_tuning_steps", training.unmasked_tuning_steps, ">= 0")
    _require(training.save_total_limit >= 1, "save_total_limit", training.save_total_limit, ">= 1")
    _require(
        training.mixed_precision in (None, "no", "bf16", "fp16"),
        "mixed_precision",
        training.mixed_precision,
        "no, bf16 or fp16",
    )
    _require(
        model.image_size % model.patch_size == 0,
        "image_size",
        model.image_size,
        f"a multiple of patch_size={model.patch_size}",
    )
    _require(
        0 < data.crop_scale_min <= data.crop_scale_max <= 1,
        "crop_scale_min",
        data.crop_scale_min,
        "0 < crop_scale_min <= crop_scale_max <= 1",
    )
    _require(
        not data.streaming or training.max_steps > 0,
        "max_steps",
        training.max_steps,
        "> 0 with --streaming (a stream has no length)",
    )


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}.")


def to_flat_dict(*sections: Any) -> dict[str, Any]:
    """All fields of the given dataclasses in one dict (for printing, saving and trackers)."""
    return {k: v for section in sections for k, v in dataclasses.asdict(section).items()}
