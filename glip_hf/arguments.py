"""Typed run configuration: dataclasses filled from a YAML file, then from command-line overrides.

``python run_pretraining.py --config configs/glip_vitb16_75.yaml --learning_rate 5e-4`` reads the YAML (flat, or
grouped under ``model:`` / ``data:`` / ``training:``) and lets every flag override it. Unknown keys are errors that
name the key and the file; so are values of the wrong type (each YAML value is converted to its field's type:
``learning_rate: 1e-3``, which YAML reads as a string, is the float 0.001).

Every value that can be checked without loading data or a model is checked here (``validate_run_args``,
``validate_eval_args``), so a bad configuration stops before a run starts, with one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import LoggerType
from transformers import HfArgumentParser

from .configuration_glip import MASKING_FIELDS, GLIPVisionConfig
from .synthetic import PLACEMENTS
from .tokenization import base_vocabulary
from .tracking import resolve_report_to


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
    hidden_act: str | None = field(
        default=None,
        metadata={
            "help": "MLP activation of both towers from scratch: quick_gelu (CLIP's, OpenAI's models; the default) or "
            "gelu (open_clip's ViT-B-16, the paper's; the ViT-B/16 recipes set it); init_from keeps its own"
        },
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "patches dropped in training; None: init_from's own, else GLIPConfig's (0.5)"}
    )
    mask_strategy: str | None = field(default=None, metadata={"help": "gaussian (GLIP) or random (FLIP)"})
    mask_sigma: float | None = field(default=None, metadata={"help": "GLIP sigma (covariance diagonal)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager"})
    lean_activations: bool = field(
        default=False,
        metadata={"help": "MLPs keep one wide tensor for backward, not three: less memory; recomputes the activation"},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow init_from / tokenizer_name to run code from their folder or repo"}
    )


@dataclass
class DataArguments:
    """Where image-caption pairs come from; no dataset_name means the built-in generated dataset."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "HF dataset name or local path; or imagefolder / parquet / webdataset with data_files"},
    )
    dataset_config_name: str | None = None
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for load_dataset (e.g. an imagefolder)"})
    data_files: str | None = field(
        default=None, metadata={"help": "file or glob (parquet, .tar, ...); relative to data_dir if given"}
    )
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
    uint8_batches: bool = field(
        default=False, metadata={"help": "collate uint8 pixels and normalise them on the device (less to copy)"}
    )
    jpeg_draft: bool = field(
        default=False, metadata={"help": "decode JPEGs at reduced size when the crop allows (faster; other pixels)"}
    )
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
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip gradients to this norm; 0 = off"})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, bf16 or fp16; None = accelerate's"})
    loss: str = field(default="clip", metadata={"help": "clip (InfoNCE) or siglip (sigmoid)"})
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    unmasked_tuning_steps: int = field(default=0, metadata={"help": "extra steps with masking off, appended"})
    unmasked_tuning_learning_rate: float = 1e-5
    save_steps: int = 500
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "latest (error if none), auto (latest if any, else start: for requeued jobs) or a directory"
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace an earlier run in output_dir (its checkpoints and metrics)"}
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={"help": "stop after this many consecutive steps with a non-finite loss or gradient (each skipped)"},
    )
    logging_steps: int = 10
    report_to: str = field(default="auto", metadata={"help": "auto (tensorboard if installed), none, or a,b list"})
    eval_at_end: bool = True
    eval_batch_size: int = 256
    cpu: bool = False
    push_to_hub: bool = field(default=False, metadata={"help": "upload the model to the Hub (needs --hub_model_id)"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. NAME/glip-b16"})
    hub_flavour: str = field(default="glip", metadata={"help": "glip (with its code) or clip (plain CLIP)"})
    hub_strategy: str = field(default="end", metadata={"help": "end, or every_save (also at each checkpoint)"})
    hub_private: bool = False


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
    image_column: str = field(default="image", metadata={"help": "image column; a,b tries each in turn"})
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
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's folder or repo to run code"})
    output: str | None = field(default=None, metadata={"help": "JSON result file (suite: base of .md/.csv)"})
    suite: str | None = field(default=None, metadata={"help": "YAML list of (task, dataset, ...) entries"})


# Choices of string fields that no loaded object is needed to check.
LOSSES = ("clip", "siglip")
MIXED_PRECISIONS = (None, "no", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
HIDDEN_ACTS = ("quick_gelu", "gelu")  # CLIP's and open_clip's (exact, erf); both run under LeanMLP
DEFAULT_HIDDEN_ACT = "quick_gelu"  # a model trained from scratch (CLIPConfig's too)
RESUME_KEYWORDS = ("latest", "auto")
TRACKERS = tuple(tracker.value for tracker in LoggerType)
# The fields that shape a fresh model's parameters (a checkpoint resumes only under the same values).
ARCHITECTURE_FIELDS = (
    "image_size",
    "patch_size",
    "vision_hidden_size",
    "vision_layers",
    "vision_heads",
    "vision_intermediate_size",
    "text_hidden_size",
    "text_layers",
    "text_heads",
    "text_intermediate_size",
    "max_text_length",
    "projection_dim",
)
# Numeric bounds of a run, as (fields, test, what is expected); a field left None (optional) passes.
_RUN_BOUNDS = (
    (
        (
            *ARCHITECTURE_FIELDS,
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "eval_batch_size",
            "save_steps",
            "save_total_limit",
            "logging_steps",
            "max_nonfinite_steps",
            "shuffle_buffer_size",
            "max_train_samples",
            "synthetic_num_train",
            "synthetic_num_test",
        ),
        lambda v: v >= 1,
        "an integer >= 1",
    ),
    (("num_workers", "warmup_steps", "unmasked_tuning_steps"), lambda v: v >= 0, "an integer >= 0"),
    (("max_text_length",), lambda v: v >= 2, "an integer >= 2 (a text needs its start and end-of-text tokens)"),
    (
        ("learning_rate", "unmasked_tuning_learning_rate"),
        lambda v: 0 < v <= 1e30,  # AdamW's float32 state overflows near 3.4e38 (a traceback); 1e30 already diverges
        "a number > 0 and at most 1e30",
    ),
    (("adam_epsilon",), lambda v: 0 < v < math.inf, "a finite number > 0"),
    (("seed", "synthetic_seed"), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32) (what NumPy's seed takes)"),
    (("weight_decay",), lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    (("max_grad_norm",), lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: no clipping)"),
    (("warmup_ratio", "adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "a number in [0, 1)"),
)
# datasets' builders that read the user's files (they search the current directory when given none).
_FILE_BUILDERS = ("parquet", "json", "csv", "text", "arrow", "imagefolder", "webdataset")
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_EXPECTED_TYPE = {bool: "true or false", int: "an integer", float: "a number (such as 0.001 or 1e-3)", str: "a string"}
_HUB_ID = re.compile(r"^[\w-][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name": may be a Hub repository


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose command-line mistakes (a bad value for a flag's type, a missing value) are one-line
    ValueErrors, which the scripts print as one line, instead of argparse's usage block listing every flag. ``--help``
    lists ``--debug``, which the scripts take off the command line before parsing (``glip_hf.cli.run_cli``)."""

    def __init__(self, dataclass_types: Any = None, **kwargs: Any):
        super().__init__(dataclass_types, **kwargs)
        if self.add_help:
            self.add_argument(
                "--debug", action="store_true", help="on an error, show the traceback (or GLIP_HF_DEBUG=1)"
            )

    def error(self, message: str) -> typing.NoReturn:
        if message.endswith("expected one argument"):  # argparse takes -1e-3 for a flag
            message += " (give a value that starts with '-' as --flag=-1e-3)"
        raise ValueError(f"{message.rstrip('.')}; see --help for the flags and their types.")


def _one_of(choices: tuple[str | None, ...]) -> str:
    names = [str(choice) for choice in choices if choice is not None]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _did_you_mean(names: list[str], known: set[str], prefix: str = "") -> str:
    close = [difflib.get_close_matches(name.lstrip("-"), known, n=1) for name in names]
    guesses = [prefix + guess[0] for guess in close if guess]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def _flatten_yaml(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        section = key in ("model", "data", "training") and (isinstance(value, dict) or value is None)
        for name, setting in (value or {}).items() if section else [(key, value)]:
            if name in values:  # e.g. top level and under training: the run would silently take the later one
                raise ValueError(f"{path}: {name!r} is set twice (top level or two sections); drop one of them.")
            values[name] = setting
    known = {f.name for cls in RUN_SECTIONS for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(values) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown}{_did_you_mean(unknown, known)}; "
            "see `run_pretraining.py --help` for the valid ones."
        )
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys written after it override, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # PyYAML's own one-line 'found unhashable key' follows
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} written twice (the later would win silently)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML file at ``path``; a syntax error or a key written twice is a one-line ValueError naming the line."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "unreadable YAML"
        fix = "drop one of them" if isinstance(error, yaml.constructor.ConstructorError) else "fix the YAML syntax"
        raise ValueError(f"{path}: {problem}{where}; {fix}.") from None


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (bool, int, float or str); ValueError if it is not one. A YAML boolean is never taken
    as a number or a string (``mixed_precision: no`` is ``False`` to YAML)."""
    if isinstance(value, bool) or kind is bool:
        if isinstance(value, bool) and kind is bool:
            return value
        if kind is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ValueError(value)
    if kind is str and isinstance(value, (str, int, float)):
        return str(value)
    if kind is float and isinstance(value, (int, float, str)):
        return float(value)  # YAML reads 1e-3 (no dot) as a string
    if kind is int and isinstance(value, int):
        return value
    if kind is int and isinstance(value, (float, str)) and float(value).is_integer():
        return int(float(value))
    raise ValueError(value)


def _coerce_yaml_value(key: str, value: Any, hint: Any, path: Path) -> Any:
    """A YAML value as its field's type ``hint`` (``T`` or ``T | None``); a one-line ValueError if it is not one."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    try:
        return _convert(value, kinds[0])
    except (TypeError, ValueError):
        expected = _EXPECTED_TYPE[kinds[0]] + (" or null" if optional else "")
        if kinds[0] is str and isinstance(value, bool):
            expected += " (quote it: YAML reads yes, no, on, off unquoted as true or false)"
        raise ValueError(f"{path}: {key}={value!r} is invalid: expected {expected}.") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Flat ``{field: value}`` from a run-config YAML (sections ``model`` / ``data`` / ``training`` optional), each
    value converted to its field's type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; pass --config with an existing YAML file.")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: a run config must be a mapping of field: value, not a {type(raw).__name__}; "
            "write one `field: value` per line."
        )
    types = {name: hint for cls in RUN_SECTIONS for name, hint in typing.get_type_hints(cls).items()}
    return {key: _coerce_yaml_value(key, value, types[key], path) for key, value in _flatten_yaml(raw, path).items()}


def parse_run_args(
    argv: list[str] | None = None, default_config: str | Path | None = None
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``[--config FILE] [--field value ...]``: dataclass defaults, then the YAML, then the flags; validated."""
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, rest = pre.parse_known_args(argv)
    parser = _Parser(RUN_SECTIONS)
    parser.add_argument("--config", default=default_config, help="run-config YAML (default: the built-in run)")
    if known.config is not None:
        parser.set_defaults(**load_yaml(known.config))
    *sections, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        flags = {f.name for cls in RUN_SECTIONS for f in dataclasses.fields(cls)}
        raise ValueError(
            f"unknown argument(s) {remaining}{_did_you_mean(remaining[:1], flags, '--')}; "
            "see `run_pretraining.py --help` for the valid flags."
        )
    model_args, data_args, training_args = sections[:3]
    validate_run_args(model_args, data_args, training_args)
    return model_args, data_args, training_args


def validate_run_args(model: ModelArguments, data: DataArguments, training: TrainingArguments) -> None:
    """One-line errors for values no run can use, found before any data or model is loaded."""
    data.image_column = _column_list(data.image_column)
    values = to_flat_dict(model, data, training)
    for names, test, expected in _RUN_BOUNDS:
        for name in names:
            _require(values[name] is None or test(values[name]), name, values[name], expected)
    _check_builder_files("--dataset_name", data.dataset_name, data.data_files, data.data_dir)
    for name in ("data_files", "data_dir"):  # without a dataset_name they were ignored: the built-in data trained
        if data.dataset_name is None and getattr(data, name) is not None:
            raise ValueError(
                f"--{name} {getattr(data, name)} needs --dataset_name (parquet, imagefolder, webdataset, ...): "
                "without it the run would train on the built-in dataset."
            )
    _require(training.loss in LOSSES, "loss", training.loss, _one_of(LOSSES))
    _require(training.hub_flavour in ("glip", "clip"), "hub_flavour", training.hub_flavour, "glip or clip")
    _require(
        training.hub_strategy in ("end", "every_save"), "hub_strategy", training.hub_strategy, "end or every_save"
    )
    _require(
        not training.push_to_hub or bool(training.hub_model_id),
        "hub_model_id",
        training.hub_model_id,
        "a repository name such as NAME/glip-b16 with --push_to_hub",
    )
    if training.hub_model_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(training.hub_model_id)
        except HFValidationError:
            _require(False, "hub_model_id", training.hub_model_id, "a Hub repository name such as NAME/glip-b16")
    _require(
        training.mixed_precision in MIXED_PRECISIONS,
        "mixed_precision",
        training.mixed_precision,
        _one_of(MIXED_PRECISIONS),
    )
    _require(
        model.attn_implementation in ATTN_IMPLEMENTATIONS,
        "attn_implementation",
        model.attn_implementation,
        _one_of(ATTN_IMPLEMENTATIONS),
    )
    _require(model.hidden_act in (None, *HIDDEN_ACTS), "hidden_act", model.hidden_act, _one_of(HIDDEN_ACTS))
    placement = data.synthetic_placement
    _require(placement in PLACEMENTS, "synthetic_placement", placement, _one_of(PLACEMENTS))
    _check_masking(model)
    _check_report_to(training.report_to)
    _check_model_shape(model)
    _check_schedule(data, training)
    _check_run_paths(model, data, training)


def _check_masking(args: ModelArguments | EvalArguments) -> None:
    """mask_ratio / mask_strategy / mask_sigma by the rules of ``GLIPVisionConfig`` (None: the model's own)."""
    GLIPVisionConfig(**{name: getattr(args, name) for name in MASKING_FIELDS if getattr(args, name) is not None})


def _comma_names(value: str) -> list[str]:
    """The names of a comma-separated flag (``a, b`` -> ``["a", "b"]``), without the spaces around them."""
    return [name.strip() for name in str(value).split(",") if name.strip()]


def _column_list(value: str) -> str:
    """``--image_column "jpg, png"`` as ``jpg,png`` (" png" named no column, and its rows were skipped as missing
    images)."""
    return ",".join(_comma_names(value)) or value


def _check_report_to(value: str) -> None:
    names = _comma_names(value)
    _require(
        value in ("auto", "none") or (names and all(name in TRACKERS for name in names)),
        "report_to",
        value,
        f"auto, none, or a comma-separated list of Accelerate trackers {list(TRACKERS)}",
    )
    resolve_report_to(value)  # a named tracker that is not installed


def _check_model_shape(model: ModelArguments) -> None:
    _require(
        model.image_size % model.patch_size == 0,
        "image_size",
        model.image_size,
        f"a multiple of patch_size={model.patch_size}",
    )
    for tower in ("vision", "text"):
        hidden, heads = getattr(model, f"{tower}_hidden_size"), getattr(model, f"{tower}_heads")
        _require(hidden % heads == 0, f"{tower}_hidden_size", hidden, f"a multiple of {tower}_heads={heads}")
    if model.tokenizer_name is None and model.init_from is None:  # the byte-level BPE is trained
        base = len(base_vocabulary())
        _require(
            model.tokenizer_vocab_size >= base,
            "tokenizer_vocab_size",
            model.tokenizer_vocab_size,
            f">= {base}, the byte-level BPE's base tokens (3 special, 512 byte symbols), plus merges: e.g. 1024",
        )


def _check_schedule(data: DataArguments, training: TrainingArguments) -> None:
    epochs = training.num_train_epochs
    _require(
        training.max_steps > 0 or 0 < epochs < math.inf,
        "num_train_epochs",
        epochs,
        "a finite number > 0 (or set --max_steps)",
    )
    _require(
        not data.streaming or training.max_steps > 0,
        "max_steps",
        training.max_steps,
        "> 0 with --streaming (a stream has no length)",
    )
    _require(
        0 < data.crop_scale_min <= data.crop_scale_max <= 1,
        "crop_scale_min",
        data.crop_scale_min,
        "0 < crop_scale_min <= crop_scale_max <= 1",
    )


def _check_run_paths(model: ModelArguments, data: DataArguments, training: TrainingArguments) -> None:
    # A resume trains the checkpoint's model: its init_from may be gone (training checks it when there is none).
    init_from = None if training.resume_from_checkpoint else model.init_from
    for name, value in (
        ("init_from", init_from),
        ("tokenizer_name", model.tokenizer_name),
        ("dataset_name", data.dataset_name),
        ("data_dir", data.data_dir),
        ("data_files", data.data_files),
    ):
        _require_local_path(name, value, hub=name != "data_dir")
    resume = training.resume_from_checkpoint
    if resume and resume not in RESUME_KEYWORDS and not Path(resume).is_dir():
        raise FileNotFoundError(
            f"resume_from_checkpoint={resume} does not exist; pass latest, auto or a checkpoints/checkpoint-<step> "
            "directory."
        )


def _plain_path(value: str) -> bool:
    """Neither a URL nor a glob: a path that must name something as it is written."""
    return "://" not in value and not any(char in value for char in "*?[")


def _require_local_path(name: str, value: str | None, hub: bool) -> None:
    """A value that can only be a local path (absolute, ``./``, ``~``, or several ``/``) must exist; ``name`` or
    ``org/name`` may be a Hub id or a builder, globs and URLs are for the loader to resolve. ``hub``: the field also
    takes a Hub id (said in the message)."""
    if value is None or not _plain_path(value):
        return
    local = value.startswith((".", "/", "~")) or not _HUB_ID.match(value)
    if local and not Path(value).expanduser().exists():
        alternative = " (or a Hub id)" if hub else ""
        raise FileNotFoundError(f"{name}={value} does not exist; pass an existing path{alternative}.")


def parse_eval_args(argv: list[str] | None = None) -> EvalArguments:
    """``run_eval.py``'s flags as ``EvalArguments``, validated."""
    parser = _Parser(EvalArguments)
    args, _, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)  # _: --debug
    if remaining:
        flags = {f.name for f in dataclasses.fields(EvalArguments)}
        raise ValueError(
            f"unknown argument(s) {remaining}{_did_you_mean(remaining[:1], flags, '--')}; "
            "see `run_eval.py --help` for the valid flags."
        )
    validate_eval_args(args)
    return args


def validate_eval_args(args: EvalArguments) -> None:
    """One-line errors for evaluation settings no run can use, found before the model or data is loaded."""
    from .evaluation import TASKS  # evaluation imports this module

    _require(args.task in TASKS, "task", args.task, _one_of(TASKS))
    args.image_column = _column_list(args.image_column)
    for name in ("data_files", "data_dir"):  # without a dataset they were ignored: the built-in set was evaluated
        if args.dataset is None and getattr(args, name) is not None:
            raise ValueError(
                f"--{name} {getattr(args, name)} needs --dataset: pass the builder (parquet, imagefolder, webdataset, "
                "...) with it; without it the built-in held-out set would be evaluated."
            )
    _check_masking(args)
    for name in ("mask_draws", "batch_size", "max_samples"):
        value = getattr(args, name)
        _require(value is None or value >= 1, name, value, "an integer >= 1")
    _require(
        0 < args.linear_probe_val_fraction < 1,
        "linear_probe_val_fraction",
        args.linear_probe_val_fraction,
        "a number in (0, 1)",
    )
    for name in ("class_names", "templates", "suite"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{name}={value} is not a file; pass an existing file.")
    for name in ("model", "dataset", "data_dir", "data_files"):
        _require_local_path(name, getattr(args, name), hub=name in ("model", "dataset"))
    _check_builder_files("--dataset", args.dataset, args.data_files, args.data_dir)
    if args.output is not None and args.suite is None and Path(args.output).is_dir():
        raise IsADirectoryError(f"output={args.output} is a directory; pass a file path such as results.json.")
    blocking = [p for p in Path(args.output or ".").parents if p.exists() and not p.is_dir()]
    if args.output is not None and blocking:
        raise NotADirectoryError(f"output={args.output}: {blocking[0]} is a file, not a folder; pass another path.")


def suite_entries(path: Path, spec: dict[str, Any], base: EvalArguments) -> list[EvalArguments]:
    """The validated ``EvalArguments`` of each entry of a suite file: ``base`` (the command line), then the file's
    top-level fields, then the entry's; every value converted to its field's type as in a run config, and every
    entry checked as run_eval.py's flags are, before any of them runs. One-line errors name the file and entry."""
    hints = typing.get_type_hints(EvalArguments)
    fields = {f.name for f in dataclasses.fields(EvalArguments)}

    def converted(mapping: dict[str, Any], where: str) -> dict[str, Any]:
        unknown = sorted(set(mapping) - fields)
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {unknown}{_did_you_mean(unknown, fields)} {where}; "
                "see `run_eval.py --help` for the fields."
            )
        return {key: _coerce_yaml_value(key, value, hints[key], path) for key, value in mapping.items()}

    fields -= {"suite", "output"}  # the command line's: a suite writes one table at --output
    shared = converted({k: v for k, v in spec.items() if k != "entries"}, "at the top level")
    defaults = {**dataclasses.asdict(base), **shared, "suite": None}
    if base.model is not None:
        defaults["model"] = base.model  # the command line wins over the suite file
    entries = []
    for number, entry in enumerate(spec["entries"], start=1):
        if not isinstance(entry, dict):
            raise ValueError(
                f"{path}: entry {number} is {entry!r}, not a mapping; write each entry as `- task: NAME` with its "
                "fields indented under it."
            )
        args = EvalArguments(**{**defaults, **converted(entry, f"in entry {number}")})
        try:
            validate_eval_args(dataclasses.replace(args, suite=str(path)))  # as a suite's entry: --output is its base
        except (ValueError, FileNotFoundError, IsADirectoryError) as error:
            raise type(error)(f"{path}, entry {number}: {error}") from None
        entries.append(args)
    return entries


def _builder_without_files(name: str | None, data_files: str | None, data_dir: str | None) -> bool:
    """``name`` is one of datasets' file builders (not a folder of that name here) and no files were given."""
    return name in _FILE_BUILDERS and data_files is None and data_dir is None and not Path(name).exists()


_FILE_EXTENSIONS = {"parquet": "parquet", "webdataset": "tar", "json": "jsonl", "csv": "csv"}  # a glob's example


def _check_builder_files(flag: str, name: str | None, data_files: str | None, data_dir: str | None) -> None:
    """One-line error for a file builder given no files: datasets would search the current directory."""
    if _builder_without_files(name, data_files, data_dir):
        raise ValueError(
            f"{flag} {name} reads files: pass --data_files (a path or glob) or --data_dir; without them datasets "
            "searches the current directory."
        )
    # datasets reads data_files relative to data_dir when it is given; a folder there it looked for as a file, and the
    # error blamed the dataset name
    # (for a builder only: a dataset folder or Hub repo reads data_files inside itself)
    if name in _FILE_BUILDERS and data_files and _plain_path(data_files):
        if (Path(data_dir or ".").expanduser() / Path(data_files).expanduser()).is_dir():
            pattern = Path(data_files) / f"*.{_FILE_EXTENSIONS.get(name, '*')}"
            raise IsADirectoryError(
                f"data_files {data_files} is a folder; pass a glob of its files (such as {pattern}), or the folder "
                "as --data_dir."
            )


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}.")


def to_flat_dict(*sections: Any) -> dict[str, Any]:
    """All fields of the given dataclasses in one dict (for printing, saving and trackers)."""
    return {k: v for section in sections for k, v in dataclasses.asdict(section).items()}
