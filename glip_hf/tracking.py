"""Run feedback: which Accelerate trackers to use, metrics as JSONL, and the loss-curve picture."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

# Accelerate's project name for the run's trackers: TensorBoard logs go to <output_dir>/glip.
TRACKER_PROJECT = "glip"


def resolve_report_to(value: str) -> list[str]:
    """``auto`` -> tensorboard when installed, else nothing; ``none`` -> nothing; ``a,b`` -> those trackers."""
    if value == "none":
        return []
    if value == "auto":
        installed = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        return ["tensorboard"] if installed else []
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ValueError(f"report_to={value!r}: {name} is not installed; pip install {name} or drop it.")
    return names


class MetricsLog:
    """Appends one JSON object per logging step to ``metrics.jsonl`` (main process only). A value that is not a
    finite number (the loss of a window whose every step was skipped) is written as null: JSON has no NaN, and
    strict readers (jq, JSON.parse) reject Python's."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
                handle.write(json.dumps(finite, allow_nan=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss_curve(records: list[dict[str, Any]], out: str | Path, stage_boundary: int | None = None) -> Path | None:
    """Training loss against step from ``metrics.jsonl`` records; returns the PNG path (None if nothing logged)."""
    points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "step" in r]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5)
    if stage_boundary:
        ax.axvline(stage_boundary, color="grey", ls="--", lw=1, label="unmasked tuning starts")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
