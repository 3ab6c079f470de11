"""A run directory's checkpoints: written atomically, kept K at a time, ``latest`` resolved, never overwritten by
mistake.

A checkpoint is ``checkpoints/checkpoint-<step>``: the accelerate state (model as safetensors, optimizer, schedule,
per-process RNG; under FSDP, model and optimizer as every process's shards), the loss module's parameters as
safetensors, ``progress.json`` and the tokenizer. It is written under a temporary name, flushed to disk and renamed,
so a run killed at any moment leaves either the whole checkpoint or none: ``latest`` only ever sees complete ones. Old
checkpoints are renamed away before they are deleted for the same reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .arguments import ARCHITECTURE_FIELDS
from .optimization import Schedule
from .tracking import TRACKER_PROJECT

CHECKPOINT_DIR = "checkpoints"
LOSS_STATE = "loss.safetensors"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY = (".tmp-", ".trash-")
# What a run that trained leaves in its output directory; any of these marks the directory as holding a run. A
# `run_config.yaml` (and tokenizer) alone is a start that failed before its first logged step: it is overwritten.
RUN_MARKERS = ("metrics.jsonl", "train_summary.json", "model.safetensors", CHECKPOINT_DIR)
FINISHED_MARKERS = ("model.safetensors", "train_summary.json")  # a run that reached its end
# The files of a run's own that a replacing run removes first (the model directory is rewritten at its end).
RUN_OUTPUTS = ("metrics.jsonl", "train_summary.json", "model.safetensors", "config.json", "loss_curve.png")
RUN_OUTPUT_DIRS = (TRACKER_PROJECT,)  # its TensorBoard logs: a new run's would be drawn as one curve with them
# Settings a checkpoint cannot be resumed under if they changed: the shapes of its parameters and its loss.
# torch_compile: a compiled model's checkpoint names its weights "_orig_mod.*", which the other mode cannot load.
RESUME_FIXED = (*ARCHITECTURE_FIELDS, "hidden_act", "loss", "torch_compile")
# Settings that place a batch in its epoch (with the number of processes): the row order and the rows per batch.
_DATA_POSITION = ("seed", "per_device_train_batch_size")
# Settings whose checkpointed value wins on resume (the optimizer state and the schedule's base rates are restored).
RESUME_RESTORED = (
    "learning_rate",
    "unmasked_tuning_learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)


@dataclass
class TrainingProgress:
    """Where a run is: saved beside the accelerate state so that a resume restarts at the same batch."""

    step: int = 0  # optimizer steps done (including skipped ones)
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples so far, by reason, all processes
    empty_steps: int = 0  # steps with no valid sample on any process (no update made)
    nonfinite_steps: int = 0  # steps whose loss or gradient was not finite (no update made)
    main_steps: int | None = None  # the masked stage of the schedule it ran under (None: a checkpoint older than this)
    init_masking: dict[str, Any] | None = None  # what --init_from was masked with (training.initial_masking)

    def save(self, directory: Path) -> None:
        (directory / "progress.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> TrainingProgress:
        saved = json.loads((directory / "progress.json").read_text())
        known = {f.name for f in fields(cls)}  # a later version's extra fields are left out, not an error
        return cls(**{key: value for key, value in saved.items() if key in known})


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those holding ``progress.json``, written last), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _PATTERN.match(p.name) and (p / "progress.json").is_file()]
    return sorted(found, key=_step)


@dataclass
class StartPlan:
    """How a run starts in its output directory (see `plan_start`)."""

    checkpoint: Path | None  # resume from here; None: start from scratch
    replaced: list[str]  # the earlier run's marker files that are replaced (the run's own files are cleared)
    abandoned: list[Path]  # checkpoints newer than the one resumed: moved aside, never deleted


def plan_start(output_dir: str | Path, resume: str | None, overwrite: bool) -> StartPlan:
    """Check that a run may start in ``output_dir`` and from where; nothing is written (call it on every process).

    ``resume``: None (a new run: refused over an earlier run unless ``overwrite``); ``latest`` (the newest complete
    checkpoint, an error if none); ``auto`` (the same, or a new run when the directory holds none, unless it holds a
    finished run); or a checkpoint directory. Resuming an older checkpoint of this run sets the newer ones aside
    (the run branches there), so that ``latest`` and the keep-limit never mix the two branches."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir={path} is a file; pass a directory path to --output_dir.")
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    checkpoints = list_checkpoints(path)
    checkpoint = None
    if resume in ("latest", "auto"):
        checkpoint = checkpoints[-1] if checkpoints else None
        if checkpoint is None and resume == "latest":
            raise FileNotFoundError(
                f"resume_from_checkpoint=latest: no complete checkpoint in {path / CHECKPOINT_DIR}; drop the flag to "
                "start a new run, or pass auto to resume only when one exists."
            )
        finished = [name for name in FINISHED_MARKERS if (path / name).exists()]
        if checkpoint is None and finished and not overwrite:
            raise FileExistsError(
                f"resume_from_checkpoint=auto: output_dir={path} holds a finished run ({', '.join(finished)}) but no "
                "checkpoint; pass --overwrite_output_dir true to replace it, or another --output_dir."
            )
    elif resume is not None:
        checkpoint = Path(resume).resolve()  # a symlink (checkpoints/best) names the checkpoint it points to
        if not (checkpoint / "progress.json").is_file():
            raise FileNotFoundError(
                f"resume_from_checkpoint={resume} is not a complete checkpoint directory (no progress.json); "
                "pass latest, auto or a checkpoints/checkpoint-<step> directory."
            )
    ours = checkpoint is not None and checkpoint.resolve().parent == (path / CHECKPOINT_DIR).resolve()
    if found and not overwrite and not ours and not (resume == "auto" and checkpoint is None):
        where = f"resuming {checkpoint} (another run's checkpoint) into it" if checkpoint else "a new run"
        resume = "--resume_from_checkpoint latest to continue it, " if checkpoints else ""
        nothing = "" if checkpoints else " (it holds no checkpoint to continue from)"
        raise FileExistsError(
            f"output_dir={path} holds an earlier run ({', '.join(found)}){nothing} and this is {where}; pass "
            f"{resume}--overwrite_output_dir true to replace it, or another --output_dir."
        )
    replaced = found if checkpoint is None or not ours else []
    step = _step(checkpoint) if ours else None
    abandoned = [c for c in checkpoints if step is not None and _step(c) > step]
    return StartPlan(checkpoint, replaced, abandoned)


def resolve_checkpoint(value: str, output_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint value`` names (None: ``auto`` with none yet); see `plan_start`."""
    return plan_start(output_dir, value, overwrite=True).checkpoint


def clear_run_outputs(output_dir: str | Path) -> None:
    """Remove a run's own files from ``output_dir`` (checkpoints, metrics, model, summary, TensorBoard logs), and its
    ``checkpoints/`` folder when nothing else is left in it; a user's other files, and checkpoints set aside by an
    earlier resume, stay."""
    root = Path(output_dir) / CHECKPOINT_DIR
    for entry in root.iterdir() if root.is_dir() else []:
        if _PATTERN.match(entry.name) or entry.name.startswith(_TEMPORARY):
            _discard(entry)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    for name in RUN_OUTPUTS:
        (Path(output_dir) / name).unlink(missing_ok=True)
    for name in RUN_OUTPUT_DIRS:
        _discard(Path(output_dir) / name)


def apply_start(plan: StartPlan, output_dir: str | Path) -> None:
    """Main process: clear what ``plan`` replaces (an earlier run's checkpoints and metrics, nothing else) and set
    abandoned checkpoints aside in ``checkpoints/abandoned-<time>/``."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if plan.replaced:
        clear_run_outputs(output_dir)
    if plan.abandoned:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = root / f"abandoned-{stamp}"
        for n in range(1, 1000):
            if not aside.exists():
                break
            aside = root / f"abandoned-{stamp}-{n}"
        aside.mkdir()
        for checkpoint in plan.abandoned:
            checkpoint.rename(aside / checkpoint.name)
        print(f"Resuming from {plan.checkpoint}: its newer checkpoints were moved to {aside}.")


def check_resume(checkpoint: Path, config: dict[str, Any], num_processes: int, fsdp: bool = False) -> None:
    """One-line error if ``config`` changes what the checkpoint cannot take (parameter shapes, loss) or if it was
    written under FSDP and is resumed without it (``fsdp``), or the other way round; warnings for settings the
    checkpoint's own values override, and for a different number of processes."""
    written_by_fsdp = any(checkpoint.glob("pytorch_model_fsdp*"))  # Accelerate's names for FSDP model states
    if written_by_fsdp != fsdp:
        raise ValueError(
            f"resume_from_checkpoint={checkpoint} was written {'with' if written_by_fsdp else 'without'} FSDP and "
            f"this run is launched {'with' if fsdp else 'without'} it; resume with the accelerate config it was "
            "written with."
        )
    before = _saved_run_config(checkpoint)
    if before is not None:
        # A checkpoint with its model's config.json is rebuilt from it: its activation is that file's (which the run
        # config now records), whatever an older run config said (runs from an --init_from recorded the flag's
        # default there).
        fixed = [k for k in RESUME_FIXED if k != "hidden_act" or not (checkpoint / "config.json").is_file()]
        changed = [  # a setting newer than the checkpoint (absent from its run config) is not compared
            f"{k}={before[k]!r} (now {config.get(k)!r})" for k in fixed if k in before and before[k] != config.get(k)
        ]
        if changed:
            raise ValueError(
                f"resume_from_checkpoint={checkpoint} was written with {', '.join(changed)}; resume with the "
                "checkpoint's settings, or start a new run."
            )
        _check_init_from(checkpoint, before, config)
        kept = [f"{k}={before[k]!r}" for k in RESUME_RESTORED if k in before and before[k] != config.get(k)]
        if kept:
            warnings.warn(
                f"resuming {checkpoint} keeps its optimizer state and base learning rates: {', '.join(kept)} "
                "(the command line's values for these have no effect).",
                stacklevel=2,
            )
    _warn_data_position(checkpoint, before or {}, config, num_processes)


def _warn_data_position(checkpoint: Path, before: dict[str, Any], config: dict[str, Any], num_processes: int) -> None:
    """Warn when what places a batch in its epoch changed: a checkpoint records its position as micro-batches of each
    process into the epoch's permutation (drawn from ``seed``), so a resume with another batch size, seed or number
    of processes starts at other rows, and the rest of that epoch repeats some rows and misses others."""
    changed = [
        f"{k}={before[k]!r} (now {config.get(k)!r})"
        for k in _DATA_POSITION
        if k in before and before[k] != config.get(k)
    ]
    ranks = len(list(checkpoint.glob("random_states_*.pkl")))
    if ranks and ranks != num_processes:
        changed.append(f"{ranks} process(es) (now {num_processes}; the patch masks differ too)")
    if changed:
        progress = TrainingProgress.load(checkpoint)
        warnings.warn(
            f"{checkpoint} was written with {', '.join(changed)}: its position, {progress.batch_in_epoch} batch(es) "
            f"into epoch {progress.epoch}, is counted in the new batches, so the rest of that epoch repeats some rows "
            "and misses others, and the run differs from an uninterrupted one from here on.",
            stacklevel=3,
        )


def _saved_run_config(checkpoint: Path) -> dict[str, Any] | None:
    """The run settings a checkpoint was written with (its ``run_config.yaml``); None for a checkpoint older than
    the file."""
    saved = checkpoint / "run_config.yaml"
    return (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else None


def restored_settings(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's values of the settings a resume restores (`RESUME_RESTORED`, and ``init_from`` where the
    checkpoint holds its model's config): the run records these, not the command line's, so that a later resume
    from its checkpoints reads the values it trained with, and its model card names the model it started from."""
    before = _saved_run_config(checkpoint) or {}
    restored = {key: before[key] for key in RESUME_RESTORED if key in before}
    if (checkpoint / "config.json").is_file() and "init_from" in before:
        restored["init_from"] = before["init_from"]
    return restored


def _check_init_from(checkpoint: Path, before: dict[str, Any], config: dict[str, Any]) -> None:
    """A resume trains the model the checkpoint saved: a changed (or dropped) ``--init_from`` has no effect, said
    in a warning; a checkpoint without its model's config (written before they were saved) is rebuilt from
    ``--init_from``, so there a change is a one-line error (it used to switch the masking silently)."""
    was, now = before.get("init_from"), config.get("init_from")
    if was == now:
        return
    if (checkpoint / "config.json").is_file():
        warnings.warn(
            f"resuming {checkpoint}: it goes on training the model it saved (initialised from init_from={was!r}); "
            f"init_from={now!r} on this command line has no effect.",
            stacklevel=3,
        )
        return
    again = f"with --init_from {was}" if was else "without --init_from"
    raise ValueError(
        f"resume_from_checkpoint={checkpoint} was written with init_from={was!r} (now {now!r}) and holds no model "
        f"config of its own; resume {again}, as it was written."
    )


def resume_schedule(checkpoint: Path, config: dict[str, Any], schedule: Schedule) -> Schedule:
    """The schedule a run resumed from ``checkpoint`` follows: ``schedule`` (this command's) with the checkpoint's
    tuning ratio (its base learning rates are restored). A change the checkpoint's steps allow (while no unmasked
    tuning step was taken: the masked stage's length and warmup; tuning's length, if it does not end before the
    checkpoint's step) is a warning that states the jump in learning rate; any other is a one-line error."""
    before = _saved_run_config(checkpoint)
    if before is None:
        return schedule  # written before run configs were saved: nothing to compare with
    step, main_steps = _checkpoint_steps(checkpoint, before, schedule)
    old = Schedule.of({**config, **before}, main_steps)  # a key the checkpoint lacks: taken as unchanged
    new = Schedule(schedule.main_steps, schedule.warmup_steps, schedule.tuning_steps, old.tuning_ratio)
    if new == old:
        return new
    where = f"resume_from_checkpoint={checkpoint} is at step {step}, {old.stage(step)}"
    stage_flags = _MASKED_FLAGS if before.get("max_steps", -1) <= 0 else ("max_steps",)
    masked, undo = _changed(before, config, stage_flags)
    if step > old.main_steps and (new.main_steps, new.warmup_steps) != (old.main_steps, old.warmup_steps):
        if new.main_steps == old.main_steps:
            masked, undo = _changed(before, config, ("warmup_steps", "warmup_ratio"))
        raise ValueError(
            f"{where}; {masked} would change its masked stage ({old.main_steps} steps, {old.warmup_steps} warmup), "
            f"which ended at step {old.main_steps}: resume with {undo}, or train on in a new run with "
            f"--init_from {config.get('output_dir')} (the model this run saves at its end"
            + ("" if step >= old.main_steps + old.tuning_steps else f", once resumed with {undo} to its end")
            + ")."
        )
    if new.main_steps < step and new.main_steps != old.main_steps:
        raise ValueError(
            f"{where}; {masked} would end the masked stage at step {new.main_steps}, before it: resume with {undo}, "
            f"or with a masked stage of at least {step} steps (--max_steps {step} or more)."
        )
    if new.main_steps + new.tuning_steps < step:
        raise ValueError(
            f"{where}; {_changed(before, config, ('unmasked_tuning_steps',))[0]} would end unmasked tuning at step "
            f"{new.main_steps + new.tuning_steps}, before it: resume with --unmasked_tuning_steps "
            f"{step - new.main_steps} or more."
        )
    base = before["learning_rate"]  # restored with the optimizer
    was = f"{base * old.multiplier(step):.4g}" if step < old.main_steps + old.tuning_steps else "none (it had ended)"
    now = f"{base * new.multiplier(step):.4g}"
    jump = f"stays {now}" if was == now else f"goes from {was} to {now}"
    changed = _changed(before, config, (*stage_flags, "warmup_steps", "warmup_ratio", "unmasked_tuning_steps"))[0]
    if step >= new.main_steps + new.tuning_steps:  # nothing left to train: no next step, no learning rate
        effect = f"the run ends at step {step}, with no step to take."
    else:
        effect = f"the learning rate of step {step + 1} {jump}, and the run follows the new schedule from there."
    warnings.warn(
        f"{where}, and this run changes its schedule with {changed} to {new.main_steps} masked steps "
        f"({new.warmup_steps} warmup) + {new.tuning_steps} unmasked tuning steps: {effect}",
        stacklevel=2,
    )
    return new


# What sets the masked stage's length when --max_steps is unset (with the data and the number of processes).
_MASKED_FLAGS = ("max_steps", "num_train_epochs", "gradient_accumulation_steps", "per_device_train_batch_size")


def _checkpoint_steps(checkpoint: Path, before: dict[str, Any], schedule: Schedule) -> tuple[int, int]:
    """The checkpoint's step and masked-stage length; a checkpoint that does not record the latter (older than
    ``TrainingProgress.main_steps``) is taken at its ``max_steps``, or, if it ran by epochs, at this run's."""
    progress = TrainingProgress.load(checkpoint)
    if progress.main_steps is not None:
        return progress.step, progress.main_steps
    return progress.step, before["max_steps"] if before.get("max_steps", -1) > 0 else schedule.main_steps


def _changed(before: dict[str, Any], config: dict[str, Any], names: tuple[str, ...]) -> tuple[str, str]:
    """What the command line changed among ``names`` (``"max_steps=5 (was 3)"``), and the flags that undo it."""
    changed = [name for name in names if before.get(name) != config.get(name)]
    if not changed:
        return "the data or the number of processes (the epochs' length in steps)", "its data and number of processes"
    return (
        ", ".join(f"{name}={config.get(name)!r} (was {before.get(name)!r})" for name in changed),
        " ".join(f"--{name} {before.get(name)}" for name in changed),
    )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from (they are logged again), and any
    line a kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)  # a kill now leaves the old file or the new one, whole


def _step(checkpoint: Path) -> int:
    match = _PATTERN.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    progress: TrainingProgress,
    keep: int,
    tokenizer=None,
    loss_fn: torch.nn.Module | None = None,
    run_config: dict[str, Any] | None = None,
    model_config=None,
    image_processor=None,
) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically and keep the last ``keep`` (all processes call this).

    The files go to a temporary directory that is flushed and renamed once complete; ``progress.json`` is written
    last. The checkpoint resumes on its own wherever it is copied: with the model's config (``config.json``) and
    image processor, a resume rebuilds the model it trained, whatever ``--init_from`` says then."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"checkpoint-{progress.step}"
    tmp = root / f".tmp-checkpoint-{progress.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.iterdir():  # left by a run killed while writing or deleting
            if stale.name.startswith(_TEMPORARY):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Each process flushes what it wrote (its random state; its shards under FSDP) from its own node's cache: on a
    # shared file system the main process's fsync reaches only pages its own node holds. Clean files cost nothing.
    _sync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if loss_fn is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()}, tmp / LOSS_STATE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_config is not None:
            model_config.to_json_file(tmp / "config.json")
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        if run_config is not None:
            (tmp / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        progress.save(tmp)
        _sync_tree(tmp)  # the files written just above
        if final.exists():
            _discard(final)
        tmp.rename(final)
        _sync_directory(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def load_loss_state(loss_fn: torch.nn.Module, checkpoint: Path) -> None:
    """Restore the loss module's parameters (SigLIP's bias) from a checkpoint, if it saved any."""
    path = checkpoint / LOSS_STATE
    if path.is_file():
        loss_fn.load_state_dict(load_file(path, device="cpu"))


def _discard(path: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a hidden leftover, not a half checkpoint."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _sync_tree(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself (a checkpoint survives a node crash too)."""
    for path in directory.rglob("*"):
        try:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        except (IsADirectoryError, FileNotFoundError):  # a folder, or a file another process renamed meanwhile
            continue
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
