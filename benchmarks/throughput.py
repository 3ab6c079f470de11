"""Training-step throughput of GLIPModel against open_clip's FLIP (``patch_dropout``), side by side in one process.

Each timed step is a full training step as users run it: forward of both towers, contrastive loss over the batch,
backward, AdamW step, gradients cleared. GLIP runs the project's own training step (`glip_hf.step.train_step`
under an `accelerate.Accelerator`, the optimizer of `glip_hf.optimization`); open_clip runs its model, its
`ClipLoss` and AdamW under `torch.autocast`, as its trainer does. Both: ViT-B/16 at 224 px, a 12-layer 512-wide text
tower over 77 tokens, bf16 autocast on CUDA, SDPA attention, fused AdamW on CUDA, random data.

For every (batch, mode, ratio) the script warms up (compilation happens there and is timed separately),
synchronises the device around each step, and reports the median over the timed steps:

* ``img_s``: images per second; ``mfu``: model FLOPs / step time / ``--peak_tflops`` (FLOPs counted as in
  `model_flops`: 3 x forward, kept tokens, both towers, patch embedding included);
* ``peak_gib``: peak allocated device memory over the timed steps (CUDA only);
* ``vs_open_clip``: img/s over open_clip's at the same ratio, batch and mode;
* ``mask_share``: for GLIP, the time of drawing the masks and gathering the kept tokens (forward and backward,
  timed alone at the step's shapes) over the step time.
* ``host_ms``: the time to issue a step before waiting for the device (close to ``step_ms`` when the host is the
  bottleneck or the step waits on the device inside it); ``device_busy_ms``, with ``--profile DIR``: the time per
  step some kernel or copy runs on the device (CUDA), from a torch.profiler trace of 3 more steps whose operator
  table is written to ``DIR``.

``--overhead`` keeps ViT-B/16's depth, patch grid and text length at tiny widths (bf16 autocast also on a CPU), so
that a step's time is the host's: Python, autograd and operator dispatch.

``--levers`` adds GLIP rows at one configuration (``--lever_modes``: eager, compiled or both) with one setting changed
each (foreach instead of fused AdamW, the run's gradient-norm check and clipping, no text attention mask,
`glip_hf.activations.LeanMLP`); ``--max_batch`` searches the largest batch that fits per variant (doubling from the
largest of ``--batches``); ``--compile_mode`` picks torch.compile's mode for every compiled row.

Run (one H200; well over 15 minutes: each of the 16 compiled rows spends 36-92 s compiling, see
benchmarks/results/h200_compile.json)::

    python benchmarks/throughput.py --out throughput.json

the markdown table of earlier runs (docs/benchmarks.md)::

    python benchmarks/throughput.py --report benchmarks/results/h200_eager.json benchmarks/results/h200_compile.json

and on a CPU, for a smoke test of every code path (numbers meaningless)::

    python benchmarks/throughput.py --device cpu --tiny

open_clip imports torchvision, which must match the installed torch; where it does not import, ``--impls glip``
leaves the open_clip side out (the script says so when asked for it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RATIOS = (0.0, 0.5, 0.75, 0.918)
BF16_DENSE_TFLOPS_H200 = 790.0  # bf16 matmul rate measured on the reference card (../shared/bench)


@dataclass(frozen=True)
class Dims:
    """The two towers' sizes; ``vitb16`` is CLIP ViT-B/16, ``tiny`` a CPU-sized stand-in, ``overhead`` ViT-B/16's
    depth, patch grid and text length at widths so small that a step's time is the host's: Python, autograd and
    operator dispatch (each operator of a ViT-B/16 step runs, on almost no data)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    vocab_size: int
    embed_dim: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


VITB16 = Dims(224, 16, 768, 12, 12, 512, 12, 8, 77, 49408, 512)
TINY = Dims(32, 8, 32, 2, 2, 32, 2, 2, 16, 500, 16)
# The MLP activation of both towers. open_clip's ViT-B-16 (and the tiny CLIP built here) uses nn.GELU (erf), CLIP's
# configs default to quick_gelu: GLIP is built with GELU, so that the two run the same network. (Runs before commit
# 37a734f's successor built GLIP with quick_gelu, which keeps one more wide tensor per MLP for backward.)
OPEN_CLIP_ACT = "gelu"
OVERHEAD = Dims(224, 16, 16, 12, 2, 16, 12, 2, 77, 1000, 16)


def kept_patches(num_patches: int, ratio: float) -> int:
    """Patches kept at ``ratio``: ``max(1, int(N * (1 - ratio)))`` in both implementations."""
    return max(1, int(num_patches * (1 - ratio)))


def model_flops(dims: Dims, ratio: float, batch: int) -> float:
    """FLOPs of one training step (3 x forward) on ``batch`` images and captions.

    Per transformer layer on N tokens of width d: ``24 N d^2 + 4 N^2 d``. The patch embedding is counted over all
    N patches (``2 N (3 p^2) d``), as in the reference table of the speed issue: open_clip's convolution runs on
    every patch; GLIP projects only the kept ones, so its MFU is understated by up to 1%. The projections and the
    loss are left out (under 0.1%).
    """

    def tower(tokens: int, width: int, layers: int) -> float:
        return layers * (24 * tokens * width**2 + 4 * tokens**2 * width)

    k = kept_patches(dims.num_patches, ratio)
    vision = tower(1 + k, dims.vision_width, dims.vision_layers)
    vision += 2 * dims.num_patches * 3 * dims.patch_size**2 * dims.vision_width
    text = tower(dims.context_length, dims.text_width, dims.text_layers)
    return 3.0 * batch * (vision + text)


@dataclass
class Row:
    impl: str
    ratio: float
    batch: int
    mode: str
    lever: str = ""
    img_s: float = float("nan")
    step_ms: float = float("nan")
    host_ms: float = float("nan")  # time to issue the step, before waiting for the device: ~step_ms if host-bound
    device_busy_ms: float = float("nan")  # --profile, CUDA: kernels and copies per step (their intervals' union)
    spread: float = float("nan")  # (max - min) / median over the timed steps
    mfu: float = float("nan")
    peak_gib: float = float("nan")
    warmup_s: float = float("nan")  # includes compilation in compile mode
    mask_ms: float = float("nan")
    mask_share: float = float("nan")
    vs_open_clip: float = float("nan")
    error: str = ""
    extra: dict = field(default_factory=dict)


class Setup:
    """Device, precision and the accelerator shared by every GLIP variant of the run."""

    def __init__(self, device: str, bf16: bool):
        self.device = torch.device(device)
        self.bf16 = bf16
        self._accelerator = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=not self.cuda, mixed_precision="bf16" if self.bf16 else "no")
        return self._accelerator

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# --- the two implementations ------------------------------------------------------------------------------------


class Variant:
    """One model + optimizer + step function; ``set_ratio`` changes the mask ratio in place."""

    impl = ""

    def set_ratio(self, ratio: float) -> None:
        raise NotImplementedError

    def forward_loss(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, images: torch.Tensor, input_ids: torch.Tensor) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class GlipVariant(Variant):
    """GLIPModel (Gaussian masking, sigma 0.2) trained by the project's own step."""

    impl = "glip"

    def __init__(
        self, dims: Dims, setup: Setup, compile_model: bool, lever: str = "", compile_mode: str | None = None
    ):
        from glip_hf import GLIPConfig, GLIPModel
        from glip_hf.activations import use_lean_activations
        from glip_hf.arguments import TrainingArguments
        from glip_hf.losses import MAX_LOGIT_SCALE, ContrastiveLoss
        from glip_hf.optimization import build_optimizer

        vision = dict(
            hidden_size=dims.vision_width,
            intermediate_size=4 * dims.vision_width,
            num_hidden_layers=dims.vision_layers,
            num_attention_heads=dims.vision_heads,
            image_size=dims.image_size,
            patch_size=dims.patch_size,
            mask_ratio=0.0,
            mask_strategy="gaussian",
            mask_sigma=0.2,
            hidden_act=OPEN_CLIP_ACT,
        )
        text = dict(
            hidden_size=dims.text_width,
            intermediate_size=4 * dims.text_width,
            num_hidden_layers=dims.text_layers,
            num_attention_heads=dims.text_heads,
            max_position_embeddings=dims.context_length,
            vocab_size=dims.vocab_size,
            bos_token_id=dims.vocab_size - 2,
            eos_token_id=dims.vocab_size - 1,  # `_inputs` ends each caption with it: pooled there, as open_clip does
            hidden_act=OPEN_CLIP_ACT,
        )
        config = GLIPConfig(text_config=text, vision_config=vision, projection_dim=dims.embed_dim)
        config._attn_implementation = "sdpa"
        self.setup, self.lever, self.dims = setup, lever, dims
        self.accelerator = setup.accelerator()
        with setup.device:
            model = GLIPModel(config)
        model.train()
        if lever == "lean_activations":
            use_lean_activations(model)
        self.unwrapped = model
        self.loss_fn = ContrastiveLoss("clip").to(setup.device)
        args = TrainingArguments(output_dir="unused", learning_rate=1e-4)
        fused = setup.cuda and lever != "foreach_adamw"
        self.optimizer = build_optimizer([model, self.loss_fn], args, fused=fused)
        if compile_model:
            model = torch.compile(model, mode=compile_mode)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.max_logit_scale = MAX_LOGIT_SCALE
        self.ratio = 0.0
        self._masking = contextlib.ExitStack()

    def set_ratio(self, ratio: float) -> None:
        from glip_hf import masked_inference

        self._masking.close()
        self._masking = contextlib.ExitStack()
        self._masking.enter_context(masked_inference(self.unwrapped, mask_ratio=ratio))
        self.ratio = ratio

    def _batch(self, images: torch.Tensor, input_ids: torch.Tensor) -> dict:
        mask = None if self.lever == "no_text_mask" else torch.ones_like(input_ids)
        return {"pixel_values": images, "input_ids": input_ids, "attention_mask": mask}

    def forward_loss(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The forward half of `step`: both towers and the loss, as `glip_hf.step.train_step` runs them."""
        from glip_hf.step import _encode

        image_embeds, text_embeds = _encode(self.model, self._batch(images, input_ids))
        return self.loss_fn(image_embeds, text_embeds, self.unwrapped.logit_scale)

    def step(self, images: torch.Tensor, input_ids: torch.Tensor) -> None:
        from glip_hf.sharding import gradient_norm
        from glip_hf.step import train_step

        train_step(self.model, self.loss_fn, self.unwrapped, [self._batch(images, input_ids)], self.accelerator)
        if self.lever == "grad_norm_check":  # what `glip_hf.training._update` adds: total norm, clip, finiteness
            norm = gradient_norm(self.accelerator, self.model, list(self.loss_fn.parameters()), 1.0)
            bool(torch.isfinite(norm).item())
        self.optimizer.step()
        with torch.no_grad():
            self.unwrapped.logit_scale.clamp_(0, self.max_logit_scale)
        self.optimizer.zero_grad(set_to_none=True)

    def mask_time(self, batch: int, repeats: int) -> float:
        """Seconds of drawing one batch of masks and gathering the kept patches (from the images) and positions, as
        the model does (`glip_hf.masking.gather_patches`), with the positions' backward (pixels need none).

        Timed alone at the step's shapes, float32 (as under autocast: the gathers precede the matmul)."""
        from glip_hf.masking import gather_patches, keep_indices_from_offset

        embeddings = self.unwrapped.vision_model.embeddings
        offset = embeddings.mask_offset
        k = kept_patches(offset.numel(), self.ratio)
        p, d, device = self.dims.patch_size, self.dims.vision_width, self.setup.device
        images = torch.randn(batch, 3, self.dims.image_size, self.dims.image_size, device=device)
        positions = torch.randn(1, offset.numel(), d, device=device, requires_grad=True)
        grad_positions = torch.randn(batch, k, d, device=device)

        def once() -> None:
            keep = keep_indices_from_offset(batch, offset, k)  # (B, k)
            gather_patches(images, keep, p)  # (B, k, 3 p p)
            kept_positions = positions.expand(batch, -1, -1).gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
            torch.autograd.grad(kept_positions, positions, grad_positions)

        return _median_seconds(once, self.setup, repeats)

    def close(self) -> None:
        self._masking.close()
        self.accelerator.free_memory()


class OpenClipVariant(Variant):
    """open_clip's CLIP with ``patch_dropout`` (its FLIP), trained as open_clip's trainer does."""

    impl = "open_clip"

    def __init__(
        self, dims: Dims, setup: Setup, compile_model: bool, lever: str = "", compile_mode: str | None = None
    ):
        import open_clip
        from open_clip.loss import ClipLoss

        if dims == VITB16:
            model = open_clip.create_model("ViT-B-16", pretrained=None, device=setup.device)
        else:
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

            vision = CLIPVisionCfg(
                layers=dims.vision_layers,
                width=dims.vision_width,
                head_width=dims.vision_width // dims.vision_heads,
                patch_size=dims.patch_size,
                image_size=dims.image_size,
            )
            text = CLIPTextCfg(
                context_length=dims.context_length,
                vocab_size=dims.vocab_size,
                width=dims.text_width,
                heads=dims.text_heads,
                layers=dims.text_layers,
            )
            model = CLIP(dims.embed_dim, vision, text).to(setup.device)
        model.train()
        self.setup, self.unwrapped = setup, model
        self.loss_fn = ClipLoss()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            betas=(0.9, 0.98),
            eps=1e-6,
            fused=setup.cuda,
        )
        self.model = torch.compile(model, mode=compile_mode) if compile_model else model

    def set_ratio(self, ratio: float) -> None:
        from open_clip.transformer import PatchDropout

        self.unwrapped.visual.patch_dropout = PatchDropout(ratio) if ratio > 0 else torch.nn.Identity()

    def forward_loss(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The forward half of `step`: both towers and open_clip's loss under autocast."""
        with self.setup.autocast():
            image_features, text_features, logit_scale = self.model(images, input_ids)
            return self.loss_fn(image_features, text_features, logit_scale)

    def step(self, images: torch.Tensor, input_ids: torch.Tensor) -> None:
        self.forward_loss(images, input_ids).backward()
        self.optimizer.step()
        with torch.no_grad():  # open_clip's trainer clamps the temperature after each step
            self.unwrapped.logit_scale.clamp_(0, math.log(100))
        self.optimizer.zero_grad(set_to_none=True)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LEVERS = ("baseline", "foreach_adamw", "grad_norm_check", "no_text_mask", "lean_activations")
BUILDERS: dict[str, Callable[..., Variant]] = {"glip": GlipVariant, "open_clip": OpenClipVariant}


# --- timing -----------------------------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], None], setup: Setup, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        setup.sync()
        start = time.perf_counter()
        fn()
        setup.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(dims: Dims, batch: int, device: torch.device, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random batches: images (B, 3, S, S) and token ids (B, L), end-of-text (the largest id) last, which
    both implementations pool at."""
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, dims.image_size, dims.image_size, device=device)
        ids = torch.randint(1, dims.vocab_size - 1, (batch, dims.context_length), device=device)
        ids[:, -1] = dims.vocab_size - 1
        out.append((images, ids))
    return out


def time_steps(variant: Variant, row: Row, dims: Dims, setup: Setup, warmup: int, steps: int, peak: float) -> Row:
    """Fill ``row`` with the median step time of ``variant`` at its batch and ratio (``set_ratio`` done before)."""
    inputs = _inputs(dims, row.batch, setup.device)
    start = time.perf_counter()
    for i in range(warmup):
        variant.step(*inputs[i % len(inputs)])
    setup.sync()
    row.warmup_s = time.perf_counter() - start
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    times, issued = [], []
    for i in range(steps):
        setup.sync()
        t0 = time.perf_counter()
        variant.step(*inputs[i % len(inputs)])
        issued.append(time.perf_counter() - t0)
        setup.sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    row.step_ms = 1e3 * median
    row.host_ms = 1e3 * statistics.median(issued)
    row.img_s = row.batch / median
    row.spread = (max(times) - min(times)) / median
    row.mfu = model_flops(dims, row.ratio, row.batch) / median / (peak * 1e12)
    if setup.cuda:
        row.peak_gib = torch.cuda.max_memory_allocated(setup.device) / 2**30
    if isinstance(variant, GlipVariant) and row.ratio > 0:
        row.mask_ms = 1e3 * variant.mask_time(row.batch, repeats=max(5, steps))
        row.mask_share = row.mask_ms / row.step_ms
    return row


def profile_name(row: Row) -> str:
    """File stem of a row's profile: ``glip_eager_b256_r0.918`` (``_<lever>`` appended for lever rows)."""
    name = f"{row.impl}_{row.mode.replace('/', '-')}_b{row.batch}_r{row.ratio}"
    return f"{name}_{row.lever}" if row.lever else name


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one of them runs."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def device_intervals(events: list) -> list[tuple[float, float]]:
    """``(start, end)`` in microseconds of what ran on a CUDA device in a torch.profiler trace (``prof.events()``):
    kernels, copies and sets. Not the user annotations the profiler also places on the device's timeline (a
    ``record_function`` range such as ``Optimizer.step`` or a compiled graph's call, from its first kernel to its
    last, gaps included), which torch's own device-time totals leave out too."""
    from torch.autograd import DeviceType

    on_device = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return [(e.time_range.start, e.time_range.end) for e in on_device]


def profile_steps(variant: Variant, row: Row, dims: Dims, setup: Setup, folder: Path, steps: int = 3) -> None:
    """Trace ``steps`` more training steps with torch.profiler (after `time_steps`, so warmed up and compiled).

    Writes ``folder/<profile_name>.txt``: the operator table, sorted by self device time on CUDA (self CPU time on
    a CPU). On CUDA, sets ``row.device_busy_ms``: the time per step some kernel or copy ran on the device; the rest
    of ``step_ms`` the device waited (for the host, or a synchronisation).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.cuda else [])
    inputs = _inputs(dims, row.batch, setup.device)
    setup.sync()
    try:
        with profile(activities=activities) as prof:
            for i in range(steps):
                variant.step(*inputs[i % len(inputs)])
            setup.sync()
        if setup.cuda:
            row.device_busy_ms = busy_microseconds(device_intervals(prof.events())) / 1e3 / steps
        sort = "self_device_time_total" if setup.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=60)
    except Exception as error:  # the row's timings stand; only its profile is lost
        row.extra["profile_error"] = ("OOM" if _is_oom(error) else repr(error))[:400]
        variant.optimizer.zero_grad(set_to_none=True)
        _release(setup)
        return
    head = f"{profile_name(row)}: {steps} steps traced; untraced median step {row.step_ms:.2f} ms, issued in "
    head += f"{row.host_ms:.2f} ms" + (f"; device busy {row.device_busy_ms:.2f} ms per step" if setup.cuda else "")
    (folder / f"{profile_name(row)}.txt").write_text(f"{head}\n{table}")


def _release(setup: Setup) -> None:
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def resident_bytes(variant: Variant) -> int:
    """Bytes a built variant holds between steps: parameters and optimizer state (gradients are cleared)."""
    tensors = list(variant.unwrapped.parameters())
    tensors += [t for state in variant.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def mode_label(mode: str, compile_mode: str | None) -> str:
    """``eager``, ``compile``, or ``compile/<mode>`` for a torch.compile mode other than the default."""
    return mode if mode == "eager" or compile_mode in (None, "default") else f"{mode}/{compile_mode}"


def run_grid(args: argparse.Namespace, dims: Dims, setup: Setup, emit: Callable[[Row], None]) -> None:
    """Every mode x batch x ratio x impl, the implementations side by side at each point (so that a run cut short
    still holds pairs); one model per (impl, mode), built once, its ratio switched in place."""
    for mode in args.modes:
        variants: dict[str, Variant | str] = {}
        for impl in args.impls:
            try:
                compiled = mode == "compile"
                variants[impl] = BUILDERS[impl](dims, setup, compile_model=compiled, compile_mode=args.compile_mode)
            except Exception as error:  # one implementation failing must not lose the others' rows
                variants[impl] = f"build: {error!r}"[:400]
        for batch in args.batches:
            for ratio in args.ratios:
                for impl, variant in variants.items():
                    row = Row(impl, ratio, batch, mode_label(mode, args.compile_mode))
                    if isinstance(variant, str):
                        row.error = variant
                        emit(row)
                        continue
                    try:
                        variant.set_ratio(ratio)
                        time_steps(variant, row, dims, setup, args.warmup, args.steps, args.peak_tflops)
                        if args.profile is not None:
                            profile_steps(variant, row, dims, setup, args.profile)
                        # the peak holds the other implementations' weights and optimizer state: not this one's
                        others = sum(resident_bytes(v) for v in variants.values() if isinstance(v, Variant))
                        row.peak_gib -= (others - resident_bytes(variant)) / 2**30
                    except Exception as error:
                        row.error = ("OOM" if _is_oom(error) else repr(error))[:400]
                        variant.optimizer.zero_grad(set_to_none=True)
                        _release(setup)
                    emit(row)
        for variant in variants.values():
            if isinstance(variant, Variant):
                variant.close()
        variants.clear()
        _release(setup)


def run_levers(args: argparse.Namespace, dims: Dims, setup: Setup, emit: Callable[[Row], None]) -> None:
    """GLIP at ``--lever_batch`` / ``--lever_ratio``, in each of ``--lever_modes``, one setting changed per row (a
    baseline row first)."""
    for mode, lever in ((mode, lever) for mode in args.lever_modes for lever in args.levers):
        label = mode_label(mode, args.compile_mode)
        row, variant = Row("glip", args.lever_ratio, args.lever_batch, label, lever=lever), None
        try:
            variant = GlipVariant(
                dims,
                setup,
                compile_model=mode == "compile",
                lever="" if lever == "baseline" else lever,
                compile_mode=args.compile_mode,
            )
            variant.set_ratio(args.lever_ratio)
            time_steps(variant, row, dims, setup, args.warmup, args.steps, args.peak_tflops)
            if args.profile is not None:
                profile_steps(variant, row, dims, setup, args.profile)
        except Exception as error:
            row.error = ("OOM" if _is_oom(error) else repr(error))[:400]
        if variant is not None:  # also after a failure: the shared Accelerator holds the model until closed
            variant.close()
        del variant
        _release(setup)
        emit(row)


def run_max_batch(args: argparse.Namespace, dims: Dims, setup: Setup, emit: Callable[[Row], None]) -> None:
    """Largest batch that fits, per impl and ratio (eager): doubling from the largest of ``--batches`` until a batch
    runs out of memory, then halving the gap between the largest that fit and the smallest that did not, down to
    ``--max_batch_step``. Always one row per impl and ratio: the largest that fit, or, when none above ``--batches``
    did, an error row that says so (as does a search stopped by ``--max_batch_limit``)."""
    step = args.max_batch_step
    for impl in args.impls:
        for ratio in args.ratios:
            fits, fails, best, batch = max(args.batches), None, None, max(args.batches) * 2
            while batch <= args.max_batch_limit:
                row, outcome = _try_batch(impl, ratio, batch, args, dims, setup)
                if outcome == "error":  # not memory: said in its row, and the search stops
                    emit(row)
                    break
                if outcome == "fits":
                    fits, best = batch, row
                else:
                    fails = batch
                if fails is None:
                    batch *= 2
                elif fails - fits <= step:
                    break
                else:
                    batch = max(fits + step, (fits + fails) // 2 // step * step)
            else:
                if best is not None:
                    best.extra["max_batch"] = f"stopped at --max_batch_limit {args.max_batch_limit}"
            if best is not None:
                if fails is not None:
                    best.extra["max_batch"] = f"the next tried, {fails}, ran out of memory"
                emit(best)
            elif fails is not None:
                row = Row(impl, ratio, fails, "eager", lever="max_batch")
                row.error = f"out of memory at batch {fails}: none above {fits} (the largest of --batches) fits"
                emit(row)


def _try_batch(
    impl: str, ratio: float, batch: int, args: argparse.Namespace, dims: Dims, setup: Setup
) -> tuple[Row, str]:
    """One eager row at ``batch``: ``(row, "fits" | "oom" | "error")``; the model is released either way."""
    row, variant, outcome = Row(impl, ratio, batch, "eager", lever="max_batch"), None, "fits"
    try:
        variant = BUILDERS[impl](dims, setup, compile_model=False)
        variant.set_ratio(ratio)
        time_steps(variant, row, dims, setup, 1, max(3, args.steps // 3), args.peak_tflops)
    except Exception as error:
        outcome = "oom" if _is_oom(error) else "error"
        if outcome == "error":
            row.error = repr(error)[:400]
    if variant is not None:  # also after an OOM: GLIP's shared Accelerator would keep the model resident
        variant.close()
    del variant
    _release(setup)
    return row, outcome


def add_ratios(rows: list[Row]) -> None:
    """``vs_open_clip`` of every GLIP row: its img/s over open_clip's at the same ratio, batch and mode."""
    reference = {(r.ratio, r.batch, r.mode): r.img_s for r in rows if r.impl == "open_clip" and not r.lever}
    for r in rows:
        if r.impl == "glip" and (r.ratio, r.batch, r.mode) in reference and not r.error:
            r.vs_open_clip = r.img_s / reference[(r.ratio, r.batch, r.mode)]


def environment(setup: Setup) -> dict:
    """Card, driver and package versions written next to the figures."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}
    for name in ("transformers", "accelerate", "open_clip"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:
            info[name] = f"unavailable ({type(error).__name__})"
    if setup.cuda:
        info["device"] = torch.cuda.get_device_name(setup.device)
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except Exception:
            info["driver"] = "unknown"
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def _cell(value: float, pattern: str) -> str:
    return "-" if math.isnan(value) else pattern.format(value)


def format_table(rows: list[Row]) -> str:
    head = (
        "| impl | lever | mode | batch | ratio | img/s | MFU | peak GiB | vs open_clip | mask share | step ms "
        "| host ms | busy ms | warm-up s |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if r.error:
            lines.append(f"| {r.impl} | {r.lever} | {r.mode} | {r.batch} | {r.ratio} | {r.error[:60]} ||||||||||")
            continue
        cells = (
            _cell(r.img_s, "{:.0f}"),
            _cell(100 * r.mfu, "{:.1f}%"),
            _cell(r.peak_gib, "{:.1f}"),
            _cell(r.vs_open_clip, "{:.2f}"),
            _cell(100 * r.mask_share, "{:.2f}%"),
            _cell(r.step_ms, "{:.1f}"),
            _cell(r.host_ms, "{:.1f}"),
            _cell(r.device_busy_ms, "{:.1f}"),
            _cell(r.warmup_s, "{:.1f}"),
        )
        lines.append(f"| {r.impl} | {r.lever} | {r.mode} | {r.batch} | {r.ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_list(parser: argparse.ArgumentParser, flag: str, values: list) -> None:
    """One-line error (exit 2) for an empty list or one that repeats a value: one measured nothing, the other
    measured rows twice. Shared by every benchmark script."""
    if not values:
        parser.error(f"{flag}: empty; give at least one, comma-separated")
    if len(set(values)) < len(values):
        parser.error(f"{flag}: {','.join(map(str, values))!r} repeats a value; list each once")


def _csv(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse's message: "invalid comma-separated int value"
    return parse


def _a_path(value: str) -> Path:
    """An --out/--profile value as a path; "" (an unset shell variable) is refused, not read as the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; pass a file (--out) or a folder (--profile)")
    return Path(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from glip_hf.cli import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized towers (smoke test; figures meaningless)")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="ViT-B/16's depth and token counts at tiny widths, bf16 autocast also on a CPU: the step time is the "
        "host's (default batch 1)",
    )
    parser.add_argument("--impls", type=_csv(str), default=["glip", "open_clip"])
    parser.add_argument("--modes", type=_csv(str), default=["eager", "compile"])
    parser.add_argument("--batches", type=_csv(int), default=None, help="default 256,1024 (tiny: 8)")
    parser.add_argument("--ratios", type=_csv(float), default=list(RATIOS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation happens here)")
    parser.add_argument(
        "--levers",
        type=_csv(str),
        nargs="?",
        const=None,
        default=[],
        help="GLIP rows, one setting changed each: all of them, or a comma-separated subset of " + ",".join(LEVERS),
    )
    parser.add_argument("--lever_batch", type=int, default=None, help="default: the largest of --batches")
    parser.add_argument("--lever_ratio", type=float, default=0.75)
    parser.add_argument("--lever_modes", type=_csv(str), default=["eager"], help="eager and/or compile")
    parser.add_argument("--max_batch", action="store_true", help="search the largest batch that fits (eager)")
    parser.add_argument(
        "--skip_grid", action="store_true", help="no grid rows: only the --levers and --max_batch ones"
    )
    parser.add_argument("--max_batch_limit", type=int, default=16384)
    parser.add_argument(
        "--max_batch_step", type=int, default=256, help="--max_batch: resolution of the search (default 256)"
    )
    parser.add_argument("--dynamic", action="store_true", help="let torch.compile make shapes dynamic on change")
    parser.add_argument(
        "--compile_mode",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile mode of the compiled rows, both implementations (default: torch's default; "
        "reduce-overhead adds CUDA graphs)",
    )
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (the default on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=BF16_DENSE_TFLOPS_H200, help="for MFU")
    parser.add_argument("--out", type=_a_path, default=None, help="JSON file for the rows and the environment")
    parser.add_argument(
        "--profile",
        type=_a_path,
        default=None,
        help="folder for a torch.profiler operator table of each grid and lever row (3 more steps each); on CUDA "
        "also fills the rows' device-busy time",
    )
    args = parser.parse_args(argv)
    for impl in args.impls:
        if impl not in BUILDERS:
            parser.error(f"--impls: unknown implementation {impl!r}; choose from {', '.join(BUILDERS)}")
    for flag in ("modes", "lever_modes"):
        for mode in getattr(args, flag):
            if mode not in ("eager", "compile"):
                parser.error(f"--{flag}: unknown mode {mode!r}; choose eager and/or compile")
    for ratio in args.ratios:
        if not 0 <= ratio < 1:
            parser.error(f"--ratios: {ratio} is not in [0, 1)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu (with --tiny for a smoke test)")
    if args.levers is None:
        args.levers = list(LEVERS)
    for lever in args.levers:
        if lever not in LEVERS:
            parser.error(f"--levers: unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
    if args.tiny and args.overhead:
        parser.error("--tiny and --overhead: pick one set of tower sizes")
    if args.batches is None:
        args.batches = [8] if args.tiny else [1] if args.overhead else [256, 1024]
    for flag in ("impls", "modes", "ratios", "batches", "lever_modes"):
        check_list(parser, f"--{flag}", getattr(args, flag))
    if min(args.batches) < 1:
        parser.error(f"--batches: {min(args.batches)} is invalid; every batch must be >= 1")
    if args.lever_batch is None:
        args.lever_batch = max(args.batches)
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--lever_batch", args.lever_batch, 1),
        ("--max_batch_limit", args.max_batch_limit, 1),
        ("--max_batch_step", args.max_batch_step, 1),
    ):
        if value < low:
            parser.error(f"{flag}: {value} is invalid; expected >= {low}")
    if args.max_batch and args.max_batch_limit < 2 * max(args.batches):
        parser.error(
            f"--max_batch_limit: {args.max_batch_limit} leaves no batch to try; the search starts at twice the "
            f"largest of --batches ({2 * max(args.batches)}): raise the limit"
        )
    if not 0 <= args.lever_ratio < 1:
        parser.error(f"--lever_ratio: {args.lever_ratio} is not in [0, 1)")
    if not args.peak_tflops > 0:
        parser.error(f"--peak_tflops: {args.peak_tflops} is invalid; expected > 0")
    check_out(parser, args.out)
    if args.profile is not None:
        try:
            args.profile.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--profile {args.profile}: cannot create the folder ({error.strerror}); pick another")
    return args


def check_out(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """Stop before a benchmark whose ``--out`` JSON file could not be written after it (a missing folder, a folder)."""
    if out is not None and not out.parent.is_dir():
        parser.error(f"--out {out}: the folder {out.parent} does not exist")
    if out is not None and out.is_dir():
        parser.error(f"--out {out}: is a folder; pass the JSON file to write (e.g. {out / 'rows.json'})")


def report(paths: list[Path]) -> str:
    """The markdown table of earlier runs' JSON files (each file's ratios to open_clip are its own run's)."""
    rows, sources = [], []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        rows += [Row(**row) for row in payload["rows"]]
        env = payload["environment"]
        sources.append(
            f"{Path(path).name}: {env['device']}, driver {env.get('driver', '-')}, torch {env['torch']}, "
            f"transformers {env['transformers']}, accelerate {env['accelerate']}, open_clip {env['open_clip']}"
        )
    return format_table(rows) + "\n\n" + "\n".join(f"- {line}" for line in sources)


def main(argv: list[str] | None = None) -> list[Row]:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:  # python benchmarks/throughput.py --report RUN.json [RUN.json ...]
        print(report([Path(p) for p in argv[1:]]))
        return []
    args = parse_args(argv)
    dims = TINY if args.tiny else OVERHEAD if args.overhead else VITB16
    setup = Setup(args.device, bf16=not args.fp32 and (args.device.startswith("cuda") or args.overhead))
    if setup.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not args.dynamic:  # static shapes, as a training run at one mask ratio sees them
        torch._dynamo.config.automatic_dynamic_shapes = False
        for name in ("recompile_limit", "cache_size_limit"):  # one graph per (batch, ratio); the name varies
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if "open_clip" in args.impls:
        try:
            import open_clip  # noqa: F401
        except Exception as error:
            print(f"open_clip side left out: it does not import here ({error!r:.200}).", file=sys.stderr)
            args.impls = [impl for impl in args.impls if impl != "open_clip"]
    info = environment(setup)
    print(json.dumps(info), flush=True)
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
        if args.out is not None:  # written after every row: a run cut short keeps what it measured
            add_ratios(rows)
            payload = {"environment": info, "args": _jsonable(vars(args)), "rows": [asdict(r) for r in rows]}
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(payload, indent=1))
            os.replace(partial, args.out)  # whole: a run killed while writing keeps the previous rows

    if args.levers:  # first: a few rows at one configuration, kept if a long grid is cut short
        run_levers(args, dims, setup, emit)
    if not args.skip_grid:
        run_grid(args, dims, setup, emit)
    if args.max_batch:
        run_max_batch(args, dims, setup, emit)
    add_ratios(rows)
    print(format_table(rows))
    return rows


def _jsonable(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


if __name__ == "__main__":
    main()
