"""The model card of a published run: every number comes from the run's own files, none is typed by hand.

A run directory (written by ``run_pretraining.py``) records its settings in ``run_config.yaml``, what happened in
``train_summary.json`` (steps, skipped samples, the end-of-run held-out zero-shot result) and the architecture in
``config.json``; ``run_eval.py --output`` writes one JSON result per evaluation (a suite writes a list). These are
read into a [`RunRecord`], turned into the card's metadata (``model-index`` included) and the values of the
``model_card.md`` template, and rendered with huggingface_hub's ``ModelCard``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..masking import num_kept_patches

PAPER_URL = "https://arxiv.org/abs/2403.15837"
FLAVOURS = ("glip", "clip")
SUMMARY_SOURCE = "training_run/train_summary.json"
TASKS = {  # run_eval task -> (model-index task type, readable name)
    "zeroshot_classification": ("zero-shot-image-classification", "Zero-shot image classification"),
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
    "linear_probe": ("image-classification", "Linear probe"),
}
LOSSES = {"clip": "CLIP InfoNCE", "siglip": "SigLIP sigmoid"}
METRIC_TYPES = {"top1": "accuracy"}  # other metrics keep their run_eval name as their model-index type
BUILTIN_DATASET = "builtin"  # run_eval's name for the built-in generated dataset (`glip_hf.synthetic`)
BUILTIN_DESCRIPTION = "built-in generated scenes (glip_hf.synthetic)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATASET_BUILDERS = ("imagefolder", "parquet", "webdataset", "json", "csv", "arrow", "text")
LOCAL = "<local>"  # what a local path becomes in the published folder: `<local>/<basename>`
# run_config.yaml fields whose plain relative name (no separator) is still a local path when it exists here.
PATH_KEYS = ("cache_dir", "output_dir", "data_dir", "data_files", "init_from", "tokenizer_name", "dataset_name")


def is_local_path(value: str, bare_if_exists: bool = False) -> bool:
    """Whether ``value`` names a file or folder on this machine rather than a Hub id (``org/name``).

    Absolute, ``~`` and ``./`` / ``../`` paths always do; a value with a separator does when it exists here or cannot
    be a Hub id; a bare name only with ``bare_if_exists`` and when it exists here.
    """
    if os.path.isabs(value) or value.startswith(("~", "./", "../")):
        return True
    if "/" in value or os.sep in value:
        return Path(value).exists() or not _HUB_ID.match(value)
    return bare_if_exists and Path(value).exists()


def local_name(value: str) -> str:
    """``/home/me/data/train.parquet`` -> ``<local>/train.parquet``: the basename only, never the machine's path."""
    return f"{LOCAL}/{Path(value.rstrip('/' + os.sep)).name}"


def redact_paths(value: Any, key: str | None = None) -> Any:
    """``value`` (a record's dict, list or string) with every local path replaced by [`local_name`]."""
    if isinstance(value, dict):
        return {k: redact_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_paths(v, key) for v in value]
    if isinstance(value, str) and is_local_path(value, bare_if_exists=key in PATH_KEYS):
        return local_name(value)
    return value


def _base_name(path: str) -> str:
    return Path(path.rstrip("/" + os.sep)).name


def dataset_label(dataset: str, data_dir: str | None = None, data_files: str | list[str] | None = None) -> str:
    """A dataset as the card and model-index name it: a local dataset by its folder or file name only; a builder
    (``imagefolder``, ``parquet``, ...) reading local ``data_dir`` / ``data_files`` also by the name of the folder
    (else the files) it read, ``pets (imagefolder)``: two such datasets are two rows, not one."""
    if is_local_path(dataset):
        return _base_name(dataset)
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    source = _base_name(data_dir) if data_dir else ", ".join(map(_base_name, files))
    return f"{source} ({dataset})" if source else dataset


def percent(ratio: float) -> str:
    """``0.5`` -> ``"50%"``, ``0.918`` -> ``"91.8%"``, ``0.9184`` -> ``"91.84%"``: as many decimals as the ratio has
    (up to 6), so that two ratios the card shows apart never read alike."""
    return f"{ratio * 100:.6f}".rstrip("0").removesuffix(".") + "%"


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the published weights, as ``run_eval.py`` (or the end of training) recorded it."""

    source: str  # the file in the published folder that holds it
    task: str
    dataset: str
    split: str
    mask_ratio: float
    mask_strategy: str | None
    mask_draws: int
    num_samples: int | None
    metrics: dict[str, float]
    metrics_std: dict[str, float] = field(default_factory=dict)
    mask_sigma: float | None = None  # Gaussian masked inference's sigma, when the result records it

    @property
    def masking(self) -> str:
        """The masked inference's settings, ``gaussian`` or ``gaussian sigma 0.8`` when the sigma is recorded."""
        return f"{self.mask_strategy}" + (f" sigma {self.mask_sigma}" if self.mask_sigma is not None else "")

    @property
    def column(self) -> tuple[float, str, int]:
        """The card table's column: the exact mask ratio, masking and draws (one column for every unmasked result)."""
        return (self.mask_ratio, self.masking, self.mask_draws) if self.mask_ratio else (0.0, "", 0)

    @property
    def inference(self) -> str:
        """The paper's name for how the model was run: unmasked, or masked at a ratio (mean over mask draws)."""
        if self.mask_ratio == 0:
            return "unmasked inference"
        return f"masked inference: {percent(self.mask_ratio)} {self.masking}, {self.mask_draws} draws"


@dataclass
class RunRecord:
    """What a run directory and its evaluation files say about the model to publish."""

    run_dir: Path
    run_config: dict[str, Any]
    summary: dict[str, Any] | None  # None when train_summary.json is absent (a snapshot taken during training)
    model_config: dict[str, Any]
    evaluations: list[Evaluation]
    eval_files: dict[str, Path]  # path in the published folder -> source file

    @property
    def masking(self) -> tuple[float, str, float]:
        """``(mask_ratio, mask_strategy, mask_sigma)`` the model was pre-trained with, as its config.json saved them
        (run_config.yaml says None where the run kept the initial checkpoint's values)."""
        vision = self.model_config["vision_config"]
        return float(vision["mask_ratio"]), vision["mask_strategy"], float(vision["mask_sigma"])

    @property
    def tuned_from(self) -> dict[str, Any] | None:
        """When this run trained the weights unmasked from a masked checkpoint (the paper's unmasked tuning as a run
        of its own, ``configs/unmasked_tuning_vitb16.yaml``): that checkpoint's masking as train_summary.json
        recorded it (``init_masking``: ``init_from``, ``mask_ratio``, ``mask_strategy``, ``mask_sigma``), else None."""
        init = (self.summary or {}).get("init_masking")
        if self.masking[0] > 0 or not isinstance(init, dict) or not float(init.get("mask_ratio") or 0) > 0:
            return None
        return init

    @property
    def pretraining_masking(self) -> tuple[float, str, float]:
        """``(mask_ratio, mask_strategy, mask_sigma)`` of the masked pre-training: this run's, or, for an unmasked
        tuning run, its initial checkpoint's ([`tuned_from`])."""
        init = self.tuned_from
        if init is None:
            return self.masking
        return float(init["mask_ratio"]), str(init["mask_strategy"]), float(init["mask_sigma"])


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}.") from None


def _evaluation(result: Any, source: str, path: Path) -> Evaluation:
    if not isinstance(result, dict) or not {"task", "metrics", "mask_ratio"} <= set(result):
        raise ValueError(f"{path} is not a run_eval.py result (no task / metrics / mask_ratio); pass --output files.")
    if result["task"] not in TASKS:
        raise ValueError(f"{path}: task {result['task']!r} is not one of {tuple(TASKS)}.")
    return Evaluation(
        source=source,
        task=result["task"],
        dataset=dataset_label(
            str(result.get("dataset", BUILTIN_DATASET)), result.get("data_dir"), result.get("data_files")
        ),
        split=str(result.get("split", "test")),
        mask_ratio=float(result["mask_ratio"]),
        mask_strategy=result.get("mask_strategy"),
        mask_draws=int(result.get("mask_draws", 1)),
        num_samples=result.get("num_samples"),
        metrics=dict(result["metrics"]),
        metrics_std=dict(result.get("metrics_std", {})),
        mask_sigma=result.get("mask_sigma"),
    )


def _check_evaluated_model(result: dict[str, Any], path: Path, run_dir: Path) -> None:
    """Refuse a result whose model is another directory on this machine (one evaluated elsewhere is trusted)."""
    model = Path(str(result.get("model", "")))
    if (model / "config.json").is_file() and model.resolve() != run_dir.resolve():
        raise ValueError(
            f"{path} evaluated {model}, not {run_dir}; evaluate the run itself: "
            f"python run_eval.py --model {run_dir} --output {path}."
        )


def read_evaluations(eval_files: list[str | Path], run_dir: Path) -> tuple[list[Evaluation], dict[str, Path]]:
    """Every result in ``eval_files`` (each a run_eval JSON object, or a suite's list), and where each file goes."""
    evaluations, placed = [], {}
    for path in map(Path, eval_files):
        if not path.is_file():
            raise FileNotFoundError(f"--eval {path} not found; pass a JSON file written by run_eval.py --output.")
        target = f"eval_results/{path.name}"
        if target in placed:
            target = f"eval_results/{len(placed)}-{path.name}"
        placed[target] = path
        content = _read_json(path, "pass a file written by run_eval.py --output")
        for result in content if isinstance(content, list) else [content]:
            _check_evaluated_model(result if isinstance(result, dict) else {}, path, run_dir)
            evaluations.append(_evaluation(result, target, path))
    _check_distinct(evaluations)
    return evaluations, placed


def _check_distinct(evaluations: list[Evaluation]) -> None:
    """Two results for the same table cell would make the card show one and hide the other."""
    seen: dict[tuple, str] = {}
    for e in evaluations:
        key = (e.task, e.dataset, e.split, *e.column)
        if key in seen:
            raise ValueError(
                f"{seen[key]} and {e.source} both hold {e.task} on {e.dataset}[{e.split}] with {e.inference}; "
                "pass one of them."
            )
        seen[key] = e.source


def _summary_evaluation(run_config: dict[str, Any], summary: dict[str, Any] | None) -> Evaluation | None:
    """The end-of-training held-out zero-shot result of ``train_summary.json``, if the run made one."""
    held_out = (summary or {}).get("held_out_zero_shot")
    if not held_out:
        return None
    dataset = dataset_label(
        run_config.get("dataset_name") or BUILTIN_DATASET, run_config.get("data_dir"), run_config.get("data_files")
    )
    split = run_config.get("eval_split") or "test"
    metrics = {k: v for k, v in held_out.items() if k in ("top1", "top5", "mean_per_class_recall")}
    samples = held_out.get("num_samples")
    return Evaluation(SUMMARY_SOURCE, "zeroshot_classification", dataset, split, 0.0, None, 1, samples, metrics)


def read_run(run_dir: str | Path, eval_files: list[str | Path] = ()) -> RunRecord:
    """Read a run directory's records and the given run_eval results (see the module docstring)."""
    run_dir = Path(run_dir)
    for name in ("config.json", "run_config.yaml"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} not found; pass the output directory of a finished run_pretraining.py run."
            )
    # Local paths (cache, output, data, initial checkpoint) are the publisher's, not the model's: kept out of the card
    # and of the published copies of the records.
    run_config = redact_paths(yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {})
    summary_path = run_dir / "train_summary.json"
    summary = _read_json(summary_path, "re-run training or remove the file") if summary_path.is_file() else None
    summary = redact_paths(summary)
    evaluations, placed = read_evaluations(list(eval_files), run_dir)
    from_summary = _summary_evaluation(run_config, summary)
    covered = {(e.task, e.dataset, e.split) for e in evaluations if e.mask_ratio == 0}
    if from_summary is not None and (from_summary.task, from_summary.dataset, from_summary.split) not in covered:
        evaluations.insert(0, from_summary)
    model_config = _read_json(run_dir / "config.json", "save the model again with save_pretrained")
    return RunRecord(run_dir, run_config, summary, model_config, evaluations, placed)


# ----------------------------------------------------------------------------------------------- what the card says


def hub_repo_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repository id (not a local folder, a file or a generic builder), else None."""
    if not name or name in _DATASET_BUILDERS or Path(name).exists() or not _HUB_ID.match(name):
        return None
    return name


def dataset_description(dataset: str) -> str:
    return BUILTIN_DESCRIPTION if dataset == BUILTIN_DATASET else dataset


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.4g}"


def training_data(run_config: dict[str, Any]) -> str:
    name = run_config.get("dataset_name")
    if name is None:
        return (
            f"{BUILTIN_DESCRIPTION}: {run_config.get('synthetic_num_train')} training images, "
            f"placement {run_config.get('synthetic_placement')}, seed {run_config.get('synthetic_seed')}"
        )
    parts = [f"`{name}`"]
    if run_config.get("dataset_config_name"):
        parts.append(f"config `{run_config['dataset_config_name']}`")
    parts.append(f"split `{run_config.get('train_split', 'train')}`")
    if run_config.get("max_train_samples"):
        parts.append(f"first {run_config['max_train_samples']} samples")
    if run_config.get("streaming"):
        parts.append("streamed")
    return ", ".join(parts)


def masking_description(record: RunRecord) -> str:
    """The pre-training masking in words, with the kept patch count of this model's grid."""
    ratio, strategy, sigma = record.masking
    init = record.tuned_from
    if init is not None:
        masked = _masking_words(record, *record.pretraining_masking)
        checkpoint = f"`{init['init_from']}`"
        return f"none in this run (mask_ratio 0); its initial checkpoint {checkpoint} was pre-trained with {masked}"
    if ratio == 0 and record.run_config.get("init_from"):
        recorded = "init_masking" in (record.summary or {})
        return "none in this run (mask_ratio 0)" + (
            "; its initial checkpoint's config has no masking either"
            if recorded
            else "; what its initial checkpoint was pre-trained with was not recorded"
        )
    if ratio == 0:
        return "none (mask_ratio 0: plain CLIP pre-training)"
    return _masking_words(record, ratio, strategy, sigma)


def _masking_words(record: RunRecord, ratio: float, strategy: str, sigma: float) -> str:
    vision = record.model_config["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    kept = f"the encoder sees {num_kept_patches(patches, ratio)} of {patches} patches + CLS"
    if strategy == "random":
        return f"random (FLIP), mask_ratio {ratio}: {kept}"
    return f"Gaussian (GLIP), mask_ratio {ratio}, sigma {sigma}: {kept}"


def global_batch(run_config: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """Images per optimizer step: per process x accumulation x processes, when the run recorded its process count."""
    per_process = int(run_config["per_device_train_batch_size"]) * int(run_config["gradient_accumulation_steps"])
    detail = f"{run_config['per_device_train_batch_size']} x {run_config['gradient_accumulation_steps']} accumulation"
    world_size = (summary or {}).get("world_size") or run_config.get("world_size")
    if world_size is None:
        return f"{per_process} per process ({detail}; the number of processes was not recorded)"
    return f"{per_process * int(world_size)} ({detail} x {world_size} processes)"


def stage_steps(run_config: dict[str, Any], summary: dict[str, Any]) -> tuple[int, int]:
    """``(pre-training, unmasked tuning)`` steps the recorded weights went through, never negative.

    ``main_steps`` (the masked stage's length) says where tuning began; a summary without it is a finished run's,
    whose last ``unmasked_tuning_steps`` steps were the tuning.
    """
    steps = int(summary["steps"])
    if "main_steps" in summary:
        main = int(summary["main_steps"])
    else:
        main = steps - int(run_config.get("unmasked_tuning_steps") or 0)
    main = min(max(main, 0), steps)
    return main, steps - main


def steps_description(run_config: dict[str, Any], summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "not recorded (no train_summary.json: a snapshot taken during training)"
    steps = int(summary["steps"])
    pre, tuned = stage_steps(run_config, summary)
    text = (
        f"{steps}"
        if not (tuned or run_config.get("unmasked_tuning_steps"))
        else (f"{steps} ({pre} pre-training + {tuned} unmasked tuning)")
    )
    return f"snapshot at step {text}" if summary.get("snapshot") else text


def weights_stage(record: RunRecord) -> str | None:
    """Which weights the evaluations are of, when the run had (or will have) an unmasked tuning stage, or was one."""
    config, summary = record.run_config, record.summary
    tuning = int(config.get("unmasked_tuning_steps") or 0)
    if summary is not None and summary.get("snapshot"):
        _, tuned = stage_steps(config, summary)
        during = f", {_count(tuned, 'step')} into unmasked tuning" if tuned else ", before unmasked tuning"
        if record.tuned_from is not None:
            during = f", {_count(int(summary['steps']), 'step')} into unmasked tuning"
        return f"a snapshot at step {summary['steps']}" + (during if tuning or record.tuned_from else "")
    if record.tuned_from is not None:
        return f"that is after unmasked tuning ({_count(int(summary['steps']), 'step')} with masking off)"
    if summary is None or not tuning:
        return None
    return f"that is after unmasked tuning ({_count(tuning, 'step')} with masking off)"


def tuning_description(record: RunRecord) -> str:
    """The unmasked tuning the weights went through: this run's stage, or the whole run when it tuned a masked
    checkpoint ([`RunRecord.tuned_from`])."""
    config = record.run_config
    tuning = int(config.get("unmasked_tuning_steps") or 0)
    if record.tuned_from is not None:
        main, tuned = stage_steps(config, record.summary)
        rates = f"learning rate {config.get('learning_rate')}"
        if tuned:  # its own --unmasked_tuning_steps stage ran at the tuning rate
            rates = (
                f"{_count(main, 'step')} at learning rate {config.get('learning_rate')}, then {_count(tuned, 'step')}"
                f" at {config.get('unmasked_tuning_learning_rate')}"
            )
        steps = _count(main + tuned, "step")
        return f"this whole run: {steps} with masking off ({rates}), from `{record.tuned_from['init_from']}`"
    if tuning:
        return (
            f"{_count(tuning, 'step')} with masking off, learning rate {config.get('unmasked_tuning_learning_rate')}"
        )
    return "none"


def precision(run_config: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """What the Accelerator used (train_summary.json), else what was asked; None asked means Accelerate's config."""
    used = (summary or {}).get("mixed_precision", run_config.get("mixed_precision"))
    if used is None:
        return "not recorded (Accelerate's configured default)"
    return "fp32 (no mixed precision)" if used == "no" else str(used)


SUMMARY_ROWS = {  # train_summary.json key -> row; shown only when the run recorded the key
    "num_skipped": "samples skipped (unreadable)",
    "empty_steps": "steps skipped (no usable sample)",
    "nonfinite_steps": "steps skipped (non-finite loss)",
}


def _warmup(run_config: dict[str, Any]) -> str:
    """As the scheduler reads it: ``warmup_steps`` if set, else ``warmup_ratio`` of the masked stage."""
    if run_config.get("warmup_steps"):
        return f"warmup {_count(int(run_config['warmup_steps']), 'step')}"
    if run_config.get("warmup_ratio"):
        return f"warmup over {run_config['warmup_ratio']:.0%} of the masked stage"
    return "no warmup"


def training_rows(record: RunRecord) -> list[tuple[str, str]]:
    """The training settings actually used, as (setting, value) rows."""
    config, summary = record.run_config, record.summary
    rows = [
        ("patch masking", masking_description(record)),
        ("optimizer steps", steps_description(config, summary)),
        ("global batch", global_batch(config, summary)),
        ("training data", training_data(config)),
        ("initialisation", f"`{config['init_from']}`" if config.get("init_from") else "random"),
        ("loss", LOSSES.get(config.get("loss"), str(config.get("loss")))),
        (
            "optimizer",
            f"AdamW, learning rate {config.get('learning_rate')}, weight decay {config.get('weight_decay')}, "
            f"betas ({config.get('adam_beta1')}, {config.get('adam_beta2')}), "
            f"{_warmup(config)}, cosine schedule",
        ),
        ("unmasked tuning", tuning_description(record)),
        ("precision", precision(config, summary)),
        ("seed", str(config.get("seed"))),
    ]
    rows += [(name, str(summary[key])) for key, name in SUMMARY_ROWS.items() if key in (summary or {})]
    return rows


def model_rows(model_config: dict[str, Any], num_parameters: int) -> list[tuple[str, str]]:
    vision, text = model_config["vision_config"], model_config["text_config"]
    return [
        (
            "image encoder",
            f"ViT, {vision['image_size']} px images in {vision['patch_size']} px patches, width "
            f"{vision['hidden_size']}, {vision['num_hidden_layers']} layers, {vision['num_attention_heads']} heads, "
            f"{vision.get('hidden_act', 'quick_gelu')} MLPs",
        ),
        (
            "text encoder",
            f"transformer, width {text['hidden_size']}, {text['num_hidden_layers']} layers, "
            f"{text['num_attention_heads']} heads, {text.get('hidden_act', 'quick_gelu')} MLPs, "
            f"{text['max_position_embeddings']} tokens, "
            f"vocabulary {text['vocab_size']}",
        ),
        ("embedding dimension", str(model_config["projection_dim"])),
        ("parameters", f"{num_parameters / 1e6:.2f} M"),
    ]


def evaluation_table(evaluations: list[Evaluation]) -> tuple[list[str], list[list[str]]]:
    """One row per (task, dataset, split, metric), one column per inference mode; masked cells show mean +/- std.

    Returns:
        ``(header, rows)``, each row ``[task, dataset, split, samples, metric, value per mode...]``.
    """
    # One label per column; one result per cell (_check_distinct).
    labels = {e.column: e.inference for e in evaluations}
    modes = sorted(labels)
    columns = [labels[m] for m in modes]
    cells: dict[tuple[str, str, str, str], dict[str, str]] = {}
    samples: dict[tuple[str, str, str], set[str]] = {}
    for e in evaluations:
        where = (TASKS[e.task][1], dataset_description(e.dataset), e.split)
        samples.setdefault(where, set()).add("-" if e.num_samples is None else str(e.num_samples))
        for metric, value in e.metrics.items():
            text = _number(value) + (f" +/- {_number(e.metrics_std[metric])}" if metric in e.metrics_std else "")
            cells.setdefault((*where, metric), {})[e.column] = text
    rows = [
        [*key[:3], " / ".join(sorted(samples[key[:3]])), key[3], *(values.get(m, "-") for m in modes)]
        for key, values in cells.items()
    ]
    return ["task", "dataset", "split", "samples", "metric", *columns], rows


def eval_results(evaluations: list[Evaluation]) -> list[EvalResult]:
    """The card's ``model-index``: one result per metric of each evaluation, its value exactly the JSON's.

    (No ``source``: the Hub groups results by task and dataset and keeps one source per group, which would credit
    masked and unmasked results to one file; the card's table names each file.)"""
    results = []
    for e in evaluations:
        task_type, task_name = TASKS[e.task]
        for metric, value in e.metrics.items():
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=e.dataset,  # a local dataset's name only (see dataset_label)
                    dataset_name=dataset_description(e.dataset),
                    dataset_split=e.split,
                    metric_type=METRIC_TYPES.get(metric, metric),
                    metric_name=f"{metric} ({e.inference})",
                    metric_config="unmasked"
                    if e.mask_ratio == 0
                    else f"masked-{e.mask_ratio}-{e.masking}".replace(" ", "-"),
                    metric_value=value,
                )
            )
    return results


def card_metadata(record: RunRecord, flavour: str, repo_id: str, license: str) -> ModelCardData:
    """The card's YAML front matter."""
    config = record.run_config
    datasets = hub_repo_id(config.get("dataset_name"))
    base_model = hub_repo_id(config.get("init_from"))
    ratio, strategy, _ = record.pretraining_masking
    masking = [f"{strategy}-masking"] if ratio > 0 else []
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=license,
        tags=["clip", "glip", "glip-hf", *masking, "vision", "zero-shot-image-classification"]
        + (["custom_code"] if flavour == "glip" else []),
        datasets=[datasets] if datasets else None,
        base_model=base_model,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(record.evaluations) or None,
    )


def _versions() -> str:
    import torch
    import transformers

    return f"transformers {transformers.__version__} and torch {torch.__version__.split('+')[0]}"


def _transformers_requirement() -> str | None:
    """glip-hf's own transformers requirement (what the GLIP flavour's code is written for), e.g. ``>=5.20,<6``."""
    try:
        requirements = metadata.requires("glip-hf") or []
    except metadata.PackageNotFoundError:
        return None
    found = [r for r in requirements if re.match(r"transformers\b", r) and ";" not in r]
    return found[0].removeprefix("transformers").strip() if found else None


def render_model_card(
    record: RunRecord,
    template: str | Path,
    flavour: str,
    repo_id: str,
    license: str,
    num_parameters: int,
    files: dict[str, str | None],
) -> ModelCard:
    """The README.md of the published folder, rendered from ``template`` (``model_card.md``).

    Args:
        files: what the folder holds for the card to show: ``mask_picture``, ``loss_curve``, ``run_config``,
            ``train_summary`` (paths inside the folder, None when absent).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"--flavour {flavour!r} is not one of {FLAVOURS}.")
    model_name = repo_id.split("/")[-1]
    header, rows = evaluation_table(record.evaluations)
    config = record.run_config
    ratio, strategy, sigma = record.pretraining_masking
    return ModelCard.from_template(
        card_metadata(record, flavour, repo_id, license),
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id,
        flavour=flavour,
        paper_url=PAPER_URL,
        strategy=strategy,
        mask_ratio=ratio,
        mask_percent=percent(ratio),
        versions=_versions(),
        transformers_requirement=_transformers_requirement(),
        mask_sigma=sigma,
        weights_stage=weights_stage(record),
        tuned=record.tuned_from is not None,
        config_mask_ratio=record.masking[0],
        builtin_data=config.get("dataset_name") is None,
        model_rows=model_rows(record.model_config, num_parameters),
        training_rows=training_rows(record),
        eval_header=header,
        eval_rows=rows,
        eval_sources=sorted({e.source for e in record.evaluations}),
        **files,
    )
