"""A run directory's checkpoints: written atomically, kept K at a time, ``latest`` resolved, never overwritten by
mistake.

A checkpoint is ``checkpoints/checkpoint-<step>``: the accelerate state (model as safetensors, optimizer, schedule,
per-process RNG), the loss module's parameters as safetensors, ``progress.json`` and the tokenizer. It is written
under a temporary name, flushed to disk and renamed, so a run killed at any moment leaves either the whole checkpoint
or none: ``latest`` only ever sees complete ones. Old checkpoints are renamed away before they are deleted for the
same reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
LOSS_STATE = "loss.safetensors"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY = (".tmp-", ".trash-")
# What a started run leaves in its output directory; any of these marks the directory as holding a run.
RUN_MARKERS = ("run_config.yaml", "metrics.jsonl", "train_summary.json", "model.safetensors", CHECKPOINT_DIR)


@dataclass
class TrainingProgress:
    """Where a run is: saved beside the accelerate state so that a resume restarts at the same batch."""

    step: int = 0  # optimizer steps done (including skipped ones)
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples so far, by reason, all processes
    empty_steps: int = 0  # steps with no valid sample on any process (no update made)
    nonfinite_steps: int = 0  # steps whose loss or gradient was not finite (no update made)

    def save(self, directory: Path) -> None:
        (directory / "progress.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> TrainingProgress:
        return cls(**json.loads((directory / "progress.json").read_text()))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those holding ``progress.json``, written last), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "progress.json").is_file()]


def resolve_checkpoint(value: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from.

    ``latest``: the newest complete checkpoint of ``output_dir``, an error if there is none. ``auto``: the same, or
    None (start from scratch): one command for the first launch of a job and every requeue. Else a directory."""
    if value in ("latest", "auto"):
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            return checkpoints[-1]
        if value == "auto":
            return None
        raise FileNotFoundError(
            f"resume_from_checkpoint=latest: no complete checkpoint in {Path(output_dir) / CHECKPOINT_DIR}; "
            "drop the flag to start a new run, or pass auto to resume only when one exists."
        )
    path = Path(value)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={value} is not a complete checkpoint directory (no progress.json); "
            "pass latest, auto or a checkpoints/checkpoint-<step> directory."
        )
    return path


def prepare_output_dir(output_dir: str | Path, overwrite: bool, resuming: bool) -> list[str]:
    """Check that a run may write into ``output_dir``; returns the earlier run's files it will replace.

    Call it on every process before anything is written. An earlier run's directory is only written into when
    resuming it or with ``overwrite`` (then its checkpoints and metrics are cleared by ``clear_earlier_run``)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir={path} is a file; pass a directory path to --output_dir.")
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    if found and not resuming and not overwrite:
        raise FileExistsError(
            f"output_dir={path} holds an earlier run ({', '.join(found)}); pass --resume_from_checkpoint latest to "
            "continue it, --overwrite_output_dir true to replace it, or another --output_dir."
        )
    return found if overwrite and not resuming else []


def clear_earlier_run(output_dir: str | Path) -> None:
    """Remove the files of an earlier run that would mix with a new one (its checkpoints, metrics, summary)."""
    path = Path(output_dir)
    _discard(path / CHECKPOINT_DIR)
    for name in ("metrics.jsonl", "train_summary.json"):
        (path / name).unlink(missing_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from (they are logged again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    progress: TrainingProgress,
    keep: int,
    tokenizer=None,
    loss_fn: torch.nn.Module | None = None,
) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically and keep the last ``keep`` (all processes call this).

    The files go to a temporary directory that is flushed and renamed once complete; ``progress.json`` is written
    last. The checkpoint resumes on its own wherever it is copied."""
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if loss_fn is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()}, tmp / LOSS_STATE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        progress.save(tmp)
        _sync_tree(tmp)
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
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
