"""The reproduction grid: arms x seeds from ``experiments/grid.yaml``, counted FLOPs, and one cell's run.

A cell trains through ``glip_hf.training.train`` with the same parsed argument dataclasses as ``run_pretraining.py``
(the masked stage, then the training's own unmasked-tuning stage), then evaluates with ``glip_hf.evaluation``:
zero-shot top-1 and retrieval R@1 on the held-out split, with masked inference and unmasked inference of the model
at the end of the masked stage (its checkpoint), and unmasked inference after tuning. It writes one small JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUN_KEYS = ("method", "group", "budget")  # arm keys that are not run-config fields
MASK_KEYS = ("mask_ratio", "mask_strategy", "mask_sigma")
SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parent.parent
# The sources whose behaviour makes a cell's numbers: the library and the cell runner. A cell records their hash, so
# that a report can say whether its figures are those of the code it sits beside.
CODE_SOURCES = ("glip_hf", "experiments/grid.py")


@dataclass
class EvalSettings:
    """How every cell is evaluated; the dataset flags come from the cell's own data arguments."""

    mask_draws: int = 3
    batch_size: int = 256
    class_names: str | None = None  # file of class names, for a dataset whose label column is no ClassLabel
    templates: str | None = None  # file of prompt templates with {}
    caption_column: str | None = None  # retrieval captions; default: "captions" (built-in) or --caption_column


@dataclass
class Cell:
    """One training run of the grid: an arm (a row of the table) at one seed."""

    arm: str
    seed: int
    method: str
    group: str
    overrides: dict[str, Any]  # run-config fields on top of the base config (masking, placement, steps)
    budget: str | None = None

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


@dataclass
class Grid:
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    reference: str
    reference_spec: dict[str, Any]  # kept when --quick or --arms leave the reference arm out
    eval: EvalSettings
    passthrough: list[str] = field(default_factory=list)  # training flags given to reproduce.py, for every cell

    def cells(self) -> list[Cell]:
        """Every arm at every seed, seeds outermost so that a partial grid has whole rows of first seeds."""
        return [make_cell(arm, spec, seed) for seed in self.seeds for arm, spec in self.arms.items()]

    def reference_cell(self) -> Cell:
        return make_cell(self.reference, self.reference_spec, self.seeds[0])


def make_cell(arm: str, spec: dict[str, Any], seed: int) -> Cell:
    overrides = {k: v for k, v in spec.items() if k not in RUN_KEYS}
    return Cell(arm, seed, spec["method"], spec["group"], overrides, spec.get("budget"))


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if key in ("model", "data", "training") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_grid(path: str | Path, quick: bool = False) -> Grid:
    """The grid of ``path``; ``quick``: the YAML's ``quick`` subset (its arms, seeds and tiny-model overrides)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} not found; pass --grid with an existing YAML file.")
    raw = yaml.safe_load(path.read_text())
    base, arms, seeds = _flat(raw["base"]), dict(raw["arms"]), list(raw["seeds"])
    for name, spec in arms.items():
        for key in ("method", "group"):
            if key not in spec:
                raise ValueError(f"{path}: arm {name!r} has no {key!r}; add `{key}: ...` to it.")
        if spec.get("budget") not in (None, "same_compute"):
            raise ValueError(f"{path}: arm {name!r} budget={spec['budget']!r} is invalid: expected same_compute.")
    if raw.get("reference") not in arms:
        raise ValueError(f"{path}: reference={raw.get('reference')!r} is not an arm; name one of {list(arms)}.")
    reference = raw["reference"]
    reference_spec = arms[reference]
    if quick:
        subset = raw["quick"]
        base = {**base, **subset.get("overrides", {})}
        arms = {name: arms[name] for name in subset["arms"]}
        seeds = list(subset["seeds"])
    return Grid(base, arms, seeds, reference, reference_spec, EvalSettings(**raw.get("eval", {})))


# ------------------------------------------------------------------------------------------------- run arguments


def _flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def cell_argv(grid: Grid, cell: Cell, run_dir: Path, steps: int | None = None) -> list[str]:
    """The ``run_pretraining.py`` flags of ``cell``: base config, arm overrides, pass-through flags, seed, paths."""
    values = {**grid.base, **cell.overrides}
    argv: list[str] = []
    for key, value in values.items():
        if value is not None:
            argv += [f"--{key}", _flag_value(value)]
    argv += grid.passthrough
    argv += ["--seed", str(cell.seed), "--output_dir", str(run_dir), "--overwrite_output_dir", "true"]
    if steps is not None:
        argv += ["--max_steps", str(steps)]
    return argv


def parse_cell(grid: Grid, cell: Cell, run_dir: Path, steps: int | None = None):
    """``(model_args, data_args, training_args)`` of ``cell``, parsed and validated as ``run_pretraining.py`` does."""
    from glip_hf.arguments import parse_run_args

    return parse_run_args(cell_argv(grid, cell, run_dir, steps))


# ------------------------------------------------------------------------------------------------- counted FLOPs


def train_step_flops(model_args, batch_size: int) -> int:
    """FLOPs of one training step (forward + backward, masking as configured) counted by ``FlopCounterMode``.

    The step runs on random inputs of the configured sizes: texts at ``max_text_length`` tokens (the same for every
    arm, so it cancels in the ratios), images with ``mask_ratio`` of their patches dropped. The count depends only
    on the shapes, not on the values or the machine."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from glip_hf.tokenization import load_or_train_tokenizer
    from glip_hf.training import build_model

    tokenizer = load_or_train_tokenizer(
        None, lambda: ["a photo of a small red circle."] * 8, model_args.tokenizer_vocab_size, 16
    )
    model = build_model(model_args, tokenizer).train()
    generator = torch.Generator().manual_seed(0)
    size = model_args.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    ids = torch.randint(3, len(tokenizer), (batch_size, model_args.max_text_length), generator=generator)
    ids[:, -1] = tokenizer.eos_token_id
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()
    return int(counter.get_total_flops())


def same_compute_steps(reference_steps: int, reference_flops: int, arm_flops: int) -> int:
    """Masked-stage steps that spend the reference arm's counted FLOPs (rounded to the nearest step)."""
    return max(1, round(reference_steps * reference_flops / arm_flops))


# ------------------------------------------------------------------------------------------------- code version


def code_version(root: Path = ROOT) -> dict[str, str | None]:
    """``{"sources": sha256 (12 hex) of the Python files of CODE_SOURCES, "commit": git HEAD (short, "+changes"
    when those files differ from it) or None outside a git checkout}``: which code computed a cell."""
    digest = hashlib.sha256()
    for name in CODE_SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return {"sources": digest.hexdigest()[:12], "commit": _git_commit(root)}


def _git_commit(root: Path) -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", *CODE_SOURCES)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def stale_cells(results: list[dict[str, Any]], current: dict[str, str | None]) -> list[str]:
    """Names of the cell ``results`` computed by other sources than ``current`` (`code_version`), or by code that
    did not record its version."""
    return [r["cell"] for r in results if (r.get("code") or {}).get("sources") != current["sources"]]


# ------------------------------------------------------------------------------------------------------ one cell


def _load_stage_one(run_dir: Path, main_steps: int, device):
    """The model at the end of the masked stage: the final model directory's config with the weights of its
    ``checkpoint-<main_steps>`` (the unmasked-tuning stage continues from there)."""
    from safetensors.torch import load_file

    from glip_hf.evaluation import load_model_for_eval

    model, tokenizer, processor = load_model_for_eval(str(run_dir), device)
    state = load_file(str(run_dir / "checkpoints" / f"checkpoint-{main_steps}" / "model.safetensors"))
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state)
    if missing - {k for k in missing if k.endswith("position_ids")}:
        raise RuntimeError(f"checkpoint-{main_steps} lacks {sorted(missing)[:3]}: not a checkpoint of this model.")
    return model.eval(), tokenizer, processor


def _eval_args(run_dir: Path, data_args, settings: EvalSettings, task: str, mask: dict[str, Any], seed: int):
    from glip_hf.arguments import EvalArguments

    builtin = data_args.dataset_name is None
    if not builtin and data_args.eval_split is None:
        raise ValueError("eval_split=None is invalid for the grid: pass --eval_split with the held-out split.")
    caption = settings.caption_column or ("captions" if builtin else data_args.caption_column)
    return EvalArguments(
        model=str(run_dir),
        task=task,
        dataset=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        data_dir=data_args.data_dir,
        data_files=data_args.data_files,
        split="test" if builtin else data_args.eval_split,
        image_column=data_args.image_column.split(",")[0],
        caption_column=caption,
        label_column=data_args.label_column,
        class_names=settings.class_names,
        templates=settings.templates,
        mask_draws=settings.mask_draws,
        batch_size=settings.batch_size,
        seed=seed,
        cache_dir=data_args.cache_dir,
        cpu=True,
        **mask,
    )


def check_eval_data(run_dir: Path, data_args, settings: EvalSettings) -> None:
    """Before any cell trains: own data's held-out split loads, has its columns and names its classes, so that a
    grid does not train every cell only to fail each at its evaluation."""
    if data_args.dataset_name is None:
        return
    from glip_hf.evaluation import check_columns, class_names_and_templates, load_eval_split

    args = _eval_args(run_dir, data_args, settings, "zeroshot_classification", {}, 0)
    dataset = load_eval_split(args, args.split, None)
    check_columns(dataset, {"caption_column": args.caption_column}, f"{args.dataset}[{args.split}]")
    class_names_and_templates(args, dataset)


def evaluate(loaded, run_dir: Path, data_args, settings: EvalSettings, mask: dict[str, Any], seed: int) -> dict:
    """``{"zeroshot_top1", "retrieval_r1"}`` of ``loaded`` on the held-out split (masked inference if ``mask``)."""
    import warnings

    from accelerate import Accelerator

    from glip_hf.evaluation import evaluate_model

    accelerator = Accelerator(cpu=True)
    mask = mask or {"mask_ratio": 0.0}
    out = {}
    for task, key, metric in (
        ("zeroshot_classification", "zeroshot_top1", "top1"),
        ("retrieval", "retrieval_r1", "text_retrieval_recall@1"),
    ):
        with warnings.catch_warnings():  # the built-in captions repeat across images: said in the report
            warnings.simplefilter("ignore")
            result = evaluate_model(_eval_args(run_dir, data_args, settings, task, mask, seed), accelerator, loaded)
        out[key] = result["metrics"][metric]
        if "metrics_std" in result:
            out[f"{key}_draw_std"] = result["metrics_std"][metric]
    return out


def _training_record(run_dir: Path, batch_size: int, main_steps: int) -> dict[str, Any]:
    """Loss curve, wall time and throughput of each stage from the run's ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = {"masked": 0.0, "unmasked_tuning": 0.0}
    previous = 0
    for record in records:  # each record covers the steps since the previous one
        images = (record["step"] - previous) * batch_size
        seconds[record["stage"]] += images / max(record["images_per_s"], 1e-9)
        previous = record["step"]
    return {
        # metrics.jsonl writes null for a window whose every step was skipped
        "loss_curve": [[r["step"], None if r["loss"] is None else round(r["loss"], 5)] for r in records],
        "train_seconds": round(seconds["masked"], 2),
        "tuning_seconds": round(seconds["unmasked_tuning"], 2),
        "images_per_s": round(main_steps * batch_size / max(seconds["masked"], 1e-9), 2),
    }


def run_cell(grid: Grid, cell: Cell, run_dir: Path, result_path: Path, steps: int | None, flops: dict) -> dict:
    """Train and evaluate ``cell`` (its run directory under ``run_dir``), write ``result_path``; returns the JSON.

    ``flops``: counted FLOPs per training step of this arm (``masked``) and of the unmasked tuning (``unmasked``)."""
    import torch

    from glip_hf.evaluation import load_model_for_eval
    from glip_hf.training import train

    start = time.perf_counter()
    model_args, data_args, training_args = parse_cell(grid, cell, run_dir, steps)
    main_steps, tuning = training_args.max_steps, training_args.unmasked_tuning_steps
    training_args.save_steps = main_steps  # the masked stage's end is a checkpoint: masked / unmasked inference
    training_args.save_total_limit = 2
    train(model_args, data_args, training_args)
    device = torch.device("cpu")
    mask = {k: getattr(model_args, k) for k in MASK_KEYS if getattr(model_args, k) is not None}
    masked = model_args.mask_ratio not in (None, 0.0)
    stage_one = _load_stage_one(run_dir, main_steps, device) if tuning else None
    final = load_model_for_eval(str(run_dir), device)
    before = stage_one or final
    evaluation = {
        "masked": evaluate(before, run_dir, data_args, grid.eval, mask, cell.seed) if masked else None,
        "unmasked": evaluate(before, run_dir, data_args, grid.eval, {}, cell.seed),
        "tuned": evaluate(final, run_dir, data_args, grid.eval, {}, cell.seed) if tuning else None,
    }
    batch = training_args.per_device_train_batch_size
    result = {
        "schema": SCHEMA_VERSION,
        "cell": cell.name,
        "arm": cell.arm,
        "seed": cell.seed,
        "method": cell.method,
        "group": cell.group,
        "budget": cell.budget or "same_steps",
        "mask_ratio": model_args.mask_ratio or 0.0,
        "mask_strategy": model_args.mask_strategy if masked else None,
        "mask_sigma": model_args.mask_sigma if masked and model_args.mask_strategy == "gaussian" else None,
        "placement": data_args.synthetic_placement if data_args.dataset_name is None else None,
        "dataset": data_args.dataset_name or "builtin",
        "steps": main_steps,
        "tuning_steps": tuning,
        "batch_size": batch,
        "images_seen": main_steps * batch,
        "flops_per_step": flops["masked"],
        "train_flops": main_steps * flops["masked"],
        "tuning_flops": tuning * flops["unmasked"],
        **_training_record(run_dir, batch, main_steps),
        "eval": evaluation,
        "cell_seconds": round(time.perf_counter() - start, 1),
        "spec": cell_spec(grid, cell, steps),
        "code": code_version(),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) per cell",
        "complete": True,
    }
    write_json(result_path, result)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights stay in run_dir, outside git
    return result


def cell_spec(grid: Grid, cell: Cell, steps: int | None) -> dict[str, Any]:
    """What determines a cell's result; a finished cell is rerun only when this changed."""
    return {
        "base": grid.base,
        "overrides": cell.overrides,
        "passthrough": grid.passthrough,
        "seed": cell.seed,
        "steps": steps,
        "eval": asdict(grid.eval),
    }


def is_finished(result_path: Path, spec: dict[str, Any]) -> bool:
    """Whether ``result_path`` holds a complete result of a cell with this ``spec`` (JSON round-trip compared)."""
    if not result_path.is_file():
        return False
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError:
        return False
    same = json.loads(json.dumps(spec)) == result.get("spec")
    return bool(result.get("complete")) and result.get("schema") == SCHEMA_VERSION and same


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def cell_worker(grid: Grid, cell: Cell, run_dir: Path, result_path: Path, steps, flops, threads: int) -> str:
    """Entry point of a worker process: one cell, its output in ``run_dir/cell.log``; returns the cell's name."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{cell.name}.log", "w") as log, contextlib.redirect_stdout(log):
        with contextlib.redirect_stderr(log):
            run_cell(grid, cell, run_dir, result_path, steps, flops)
    return cell.name


def finite(value: Any) -> bool:
    """Whether every number in ``value`` (nested dicts / lists) is finite."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)
