"""Run under `accelerate launch --multi_gpu --num_processes 2`: the real `train()`, recording what each rank draws.

    python mask_rank_check.py OUT_JSON_PREFIX [run_pretraining flags ...]

Each rank writes ``<prefix>-rank<r>.json`` with the keep indices of every masked forward pass (in order) and the
row indices of every micro-batch it collated.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from glip_hf import data, modeling_glip
from glip_hf.arguments import parse_run_args
from glip_hf.training import train

records = {"keep": [], "rows": []}
_draw = modeling_glip.keep_indices_from_offset
_collate = data.ImageTextCollator.__call__


def _recording_draw(*args, **kwargs):
    keep = _draw(*args, **kwargs)
    records["keep"].append(keep.tolist())
    return keep


def _recording_collate(self, rows):
    records["rows"].append([row["__index__"] for row in rows])
    return _collate(self, rows)


def main(prefix: str, argv: list[str]) -> None:
    modeling_glip.keep_indices_from_offset = _recording_draw
    data.ImageTextCollator.__call__ = _recording_collate
    train(*parse_run_args(argv, default_config=Path(__file__).resolve().parent.parent / "configs" / "default.yaml"))
    with open(f"{prefix}-rank{PartialState().process_index}.json", "w") as handle:
        json.dump(records, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
