"""Checkpoints of a run: atomic ``accelerator.save_state`` directories, the last K kept, ``latest`` resolved."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingProgress:
    """Where a run is: saved beside the accelerate state so that a resume restarts at the same batch."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples so far, by reason, all processes
    empty_steps: int = 0  # steps with no valid sample on any process (no update made)

    def save(self, directory: Path) -> None:
        (directory / "progress.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> TrainingProgress:
        return cls(**json.loads((directory / "progress.json").read_text()))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(value: str, output_dir: str | Path) -> Path | None:
    """``latest`` -> the newest checkpoint of ``output_dir`` (None if there is none); else the given directory."""
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint {value} is not a checkpoint directory (no progress.json).")
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, progress: TrainingProgress, keep: int, tokenizer=None
) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically (temporary name, then rename) and keep the last ``keep``.

    The checkpoint holds the accelerate state (model, optimizer, scheduler, RNG), ``progress.json`` and the
    tokenizer, so that it resumes on its own wherever it is copied."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"checkpoint-{progress.step}"
    tmp = root / f".tmp-checkpoint-{progress.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
