"""Activation memory of a training step: the bytes autograd keeps for backward, GLIP against open_clip's FLIP.

Beyond weights, gradients and optimizer state, a training step's peak memory is mostly the tensors its forward pass
saves for backward. Which tensors are saved is decided by the model's code, not by the card, so they can be counted
exactly on any device: this script runs the forward half of `throughput.py`'s step (both towers and the
contrastive loss, bf16 autocast, SDPA attention, masking at each ratio) under ``torch.autograd.graph``'s
saved-tensor hooks and adds up the storages saved, each storage once (views share one) and parameters not at all
(they are resident anyway). Two batch sizes give the bytes per image (the slope) and the fixed part (what does not
grow with the batch: bf16 copies of the weights under autocast).

Variants: ``glip`` (`GLIPModel` as a run trains it), ``glip+lean`` (with ``--lean_activations``,
`glip_hf.activations.LeanMLP`) and ``open_clip`` (its ViT-B-16 with ``patch_dropout``, as in `throughput.py`).
``--breakdown`` adds, per variant at one ratio, the bytes per image of each kind of layer (layer numbers folded).

What this does not see: the attention kernel's own choice (CPU and CUDA flash attention both keep q, k, v, the
output and the log-sum-exp; other CUDA kernels may differ), the allocator's caching and workspaces, gradients and
optimizer state, and compiled graphs (the compiler decides what to keep). It explains eager peak memory; it does
not replace measuring it on the GPU (`throughput.py` reports ``peak_gib``).

Run (ViT-B/16; about a minute on a 2-core CPU)::

    python benchmarks/activation_memory.py --breakdown --out activation_memory.json

and a smoke test on tiny towers::

    python benchmarks/activation_memory.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import throughput
import torch
from throughput import RATIOS, TINY, VITB16, Dims, Setup

VARIANTS = ("glip", "glip+lean", "open_clip")
MIB = 2**20


@dataclass
class MemoryRow:
    impl: str
    ratio: float
    per_image_mib: float = float("nan")  # saved for backward, per image (slope between the two batches)
    fixed_mib: float = float("nan")  # saved for backward whatever the batch
    vs_open_clip: float = float("nan")  # per_image_mib over open_clip's at the same ratio
    error: str = ""
    breakdown: dict = field(default_factory=dict)  # layer kind -> MiB per image (with --breakdown)


class SavedTensors:
    """Counts the storages autograd saves inside the block, once each, skipping ``exclude`` (parameters), and
    attributes them to the innermost module running (its name with layer numbers folded to ``*``)."""

    def __init__(self, model: torch.nn.Module):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.by_module: Counter = Counter()
        self._model, self._stack, self._handles = model, ["(outside the model)"], []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.exclude and pointer not in self.storages:
            self.storages[pointer] = storage.nbytes()
            self.by_module[self._stack[-1]] += storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def recording(self, attribute: bool = True) -> Iterator[SavedTensors]:
        """Count inside the block; ``attribute=False`` adds no module hooks (a compiled model would recompile)."""

        # Global module hooks, not hooks on each module: a hooked linear layer is called, not read, by GLIPAttention
        # and LeanMLP (`glip_hf.modeling_glip.is_plain_linear`), so per-module hooks would change what is counted.
        labels = {
            id(module): re.sub(r"\.\d+\.", ".*.", f".{name}.").strip(".") or type(module).__name__
            for name, module in (self._model.named_modules() if attribute else ())
        }

        def enter(module, *_) -> None:  # returns None: the input is kept
            if id(module) in labels:
                self._stack.append(labels[id(module)])

        def leave(module, *_) -> None:
            if id(module) in labels:
                self._stack.pop()

        if labels:
            self._handles.append(torch.nn.modules.module.register_module_forward_pre_hook(enter))
            self._handles.append(torch.nn.modules.module.register_module_forward_hook(leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def build(variant: str, dims: Dims, setup: Setup, compile_model: bool = False) -> throughput.Variant:
    impl = "open_clip" if variant == "open_clip" else "glip"
    lever = "lean_activations" if variant == "glip+lean" else ""
    return throughput.BUILDERS[impl](dims, setup, compile_model=compile_model, lever=lever)


def saved_bytes(built: throughput.Variant, dims: Dims, setup: Setup, batch: int) -> SavedTensors:
    """What one forward pass (both towers and the loss) of ``built`` at ``batch`` saves for backward. A compiled
    model runs one step at this shape first, so that compiling happens outside the count."""
    images, input_ids = throughput._inputs(dims, batch, setup.device, count=1)[0]
    compiled = hasattr(built.model, "_orig_mod")
    if compiled:
        built.forward_loss(images, input_ids).backward()
        built.optimizer.zero_grad(set_to_none=True)
    counter = SavedTensors(built.unwrapped)
    with counter.recording(attribute=not compiled):
        loss = built.forward_loss(images, input_ids)
    loss.backward()  # frees what was saved
    built.optimizer.zero_grad(set_to_none=True)
    return counter


def measure(
    built: throughput.Variant, row: MemoryRow, dims: Dims, setup: Setup, batches: tuple[int, int], breakdown: bool
) -> None:
    small, large = (saved_bytes(built, dims, setup, batch) for batch in batches)
    per_image = (large.total - small.total) / (batches[1] - batches[0])
    row.per_image_mib = per_image / MIB
    row.fixed_mib = (small.total - per_image * batches[0]) / MIB
    if breakdown:
        names = set(small.by_module) | set(large.by_module)
        slope = {n: (large.by_module[n] - small.by_module[n]) / (batches[1] - batches[0]) / MIB for n in names}
        row.breakdown = {n: round(v, 4) for n, v in sorted(slope.items(), key=lambda kv: -kv[1]) if v > 0}


def run(args: argparse.Namespace) -> list[MemoryRow]:
    dims = TINY if args.tiny else VITB16
    setup = Setup(args.device, bf16=not args.fp32)
    rows = []
    for variant in args.variants:
        try:
            built = build(variant, dims, setup, compile_model=args.compile)
        except Exception as error:  # one implementation failing must not lose the others' rows
            rows += [MemoryRow(variant, ratio, error=f"build: {error!r}"[:400]) for ratio in args.ratios]
            continue
        for ratio in args.ratios:
            row = MemoryRow(variant, ratio)
            try:
                built.set_ratio(ratio)
                breakdown = args.breakdown and ratio == args.breakdown_ratio
                measure(built, row, dims, setup, tuple(args.batches), breakdown)
            except Exception as error:
                row.error = repr(error)[:400]
            rows.append(row)
            print(json.dumps(asdict(row)), flush=True)
        built.close()
    reference = {r.ratio: r.per_image_mib for r in rows if r.impl == "open_clip" and not r.error}
    for r in rows:
        if r.ratio in reference and not r.error:
            r.vs_open_clip = r.per_image_mib / reference[r.ratio]
    return rows


def format_table(rows: list[MemoryRow]) -> str:
    lines = ["| variant | ratio | MiB per image | fixed MiB | vs open_clip |", "|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.impl} | {r.ratio} | {r.error[:80]} | | |")
            continue
        ratio = "-" if math.isnan(r.vs_open_clip) else f"{r.vs_open_clip:.2f}"
        lines.append(f"| {r.impl} | {r.ratio} | {r.per_image_mib:.2f} | {r.fixed_mib:.1f} | {ratio} |")
    for r in rows:
        if r.breakdown:
            lines += ["", f"{r.impl} at ratio {r.ratio}, MiB per image by layer kind:", ""]
            shown = {name: mib for name, mib in r.breakdown.items() if mib >= 0.005 * r.per_image_mib}
            lines += [f"- `{name}`: {mib:.3f}" for name, mib in shown.items()]
            lines.append(f"- the rest: {r.per_image_mib - sum(shown.values()):.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from glip_hf.cli import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="any device: the count does not depend on it")
    parser.add_argument("--tiny", action="store_true", help="tiny towers (smoke test)")
    parser.add_argument("--variants", type=throughput._csv(str), default=list(VARIANTS))
    parser.add_argument("--ratios", type=throughput._csv(float), default=list(RATIOS))
    parser.add_argument("--batches", type=throughput._csv(int), default=[2, 4], help="two batch sizes")
    parser.add_argument("--breakdown", action="store_true", help="bytes per image by layer kind, at one ratio")
    parser.add_argument("--breakdown_ratio", type=float, default=0.75)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="count what torch.compile'd models keep (static shapes; compiles once per batch size: minutes)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows and the environment")
    args = parser.parse_args(argv)
    for flag in ("variants", "ratios"):
        throughput.check_list(parser, f"--{flag}", getattr(args, flag))
    if args.breakdown and args.breakdown_ratio not in args.ratios:
        ratios = ",".join(map(str, args.ratios))
        parser.error(f"--breakdown_ratio {args.breakdown_ratio} is not one of --ratios {ratios}: nothing to show")
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"--variants: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    for ratio in args.ratios:
        if not 0 <= ratio < 1:
            parser.error(f"--ratios: {ratio} is not in [0, 1)")
    if len(args.batches) != 2 or not 1 <= args.batches[0] < args.batches[1]:
        parser.error(f"--batches: {args.batches} is invalid; give two sizes, smaller first, e.g. 2,4")
    if args.compile and args.breakdown:
        parser.error("--breakdown needs eager models: module hooks do not run inside a compiled graph; drop one")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu (the count is the same)")
    throughput.check_out(parser, args.out)
    return args


def main(argv: list[str] | None = None) -> list[MemoryRow]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "open_clip" in args.variants:
        try:
            import open_clip  # noqa: F401
        except Exception as error:
            print(f"open_clip side left out: it does not import here ({error!r:.200}).", file=sys.stderr)
            args.variants = [v for v in args.variants if v != "open_clip"]
    if args.compile:  # static shapes, as a training run at one mask ratio sees them (throughput.py does the same)
        torch._dynamo.config.automatic_dynamic_shapes = False
    info = throughput.environment(Setup(args.device, bf16=not args.fp32))
    print(json.dumps(info), flush=True)
    rows = run(args)
    table = format_table(rows)
    print(table)
    if args.out is not None:
        payload = {
            "environment": info,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": [asdict(r) for r in rows],
        }
        args.out.write_text(json.dumps(payload, indent=1))
    return rows


if __name__ == "__main__":
    main()
