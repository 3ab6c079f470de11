"""Count the operators one training step dispatches, GLIP against open_clip's FLIP: a step's launch overhead.

Where a step is overhead-bound (small batches, high mask ratios) its time follows the number of operators it runs
rather than their FLOPs. This script counts the ATen operators the forward half of `throughput.py`'s step (both
towers and the loss, bf16 autocast, SDPA) and its backward dispatch, per implementation and mask ratio, with a
``TorchDispatchMode``: every operator once, views included (on a GPU most non-view operators launch a kernel). The
counts do not depend on the batch or on the device's speed; they do on the device type through its kernels
(the CPU's flash attention, for one). The optimizer is left out (fused on CUDA, one launch).

Run (ViT-B/16, seconds on a CPU)::

    python benchmarks/op_count.py --out op_count.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import throughput
import torch
from throughput import RATIOS, TINY, VITB16, Setup
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "select"})
VIEWS |= {"slice", "split", "chunk", "unflatten", "alias", "detach", "as_strided", "reshape", "unbind"}


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        views = sum(n for name, n in self.counts.items() if name in VIEWS)
        return {"all": sum(self.counts.values()), "not_views": sum(self.counts.values()) - views}


def count_step(built: throughput.Variant, dims: throughput.Dims, setup: Setup, batch: int = 2) -> dict:
    """Operators of one step's forward (both towers and the loss) and backward, after one step run uncounted."""
    images, input_ids = throughput._inputs(dims, batch, setup.device, count=1)[0]
    built.forward_loss(images, input_ids).backward()  # first calls build caches; not counted
    built.optimizer.zero_grad(set_to_none=True)
    with OperatorCount() as forward:
        loss = built.forward_loss(images, input_ids)
    with OperatorCount() as backward:
        loss.backward()
    built.optimizer.zero_grad(set_to_none=True)
    return {"forward": forward.summary(), "backward": backward.summary()}


def main(argv: list[str] | None = None) -> list[dict]:
    from glip_hf.cli import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny towers (smoke test)")
    parser.add_argument("--ratios", type=throughput._csv(float), default=list(RATIOS))
    parser.add_argument("--impls", type=throughput._csv(str), default=list(throughput.BUILDERS))
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows and the environment")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.ratios or not all(0 <= ratio < 1 for ratio in args.ratios):
        parser.error(f"--ratios {args.ratios} is invalid: pass ratios in [0, 1), comma-separated")
    if not args.impls or not set(args.impls) <= set(throughput.BUILDERS):
        parser.error(f"--impls {args.impls} is invalid: choose from {', '.join(throughput.BUILDERS)}")
    for flag in ("ratios", "impls"):
        throughput.check_list(parser, f"--{flag}", getattr(args, flag))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    throughput.check_out(parser, args.out)
    if "open_clip" in args.impls:
        try:
            import open_clip  # noqa: F401
        except Exception as error:
            print(f"open_clip side left out: it does not import here ({error!r:.200}).", file=sys.stderr)
            args.impls = [impl for impl in args.impls if impl != "open_clip"]
            if not args.impls:
                parser.error("--impls open_clip: open_clip does not import here; nothing to count")
    dims, setup = (TINY if args.tiny else VITB16), Setup(args.device, bf16=True)
    info = throughput.environment(setup)
    rows = []
    for impl in args.impls:
        built = throughput.BUILDERS[impl](dims, setup, compile_model=False)
        for ratio in args.ratios:
            built.set_ratio(ratio)
            rows.append({"impl": impl, "ratio": ratio, **count_step(built, dims, setup)})
            print(json.dumps(rows[-1]), flush=True)
        built.close()
    print("| impl | ratio | forward ops (not views) | backward ops (not views) |\n|---|---|---|---|")
    for r in rows:
        f, b = r["forward"], r["backward"]
        print(f"| {r['impl']} | {r['ratio']} | {f['all']} ({f['not_views']}) | {b['all']} ({b['not_views']}) |")
    if args.out is not None:
        args.out.write_text(json.dumps({"environment": info, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
