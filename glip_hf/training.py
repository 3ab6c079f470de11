"""The GLIP pre-training loop on Accelerate (used by ``run_pretraining.py``).

Reads top to bottom: Accelerator, seed, data (under ``main_process_first``), tokenizer and model, optimizer and
schedule, ``prepare``, resume, the loop (masked stage, then optional unmasked tuning), final save and evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .activations import use_lean_activations
from .arguments import DEFAULT_HIDDEN_ACT, DataArguments, ModelArguments, TrainingArguments, to_flat_dict
from .checkpointing import (
    TrainingProgress,
    apply_start,
    check_resume,
    clear_run_outputs,
    list_checkpoints,
    load_loss_state,
    plan_start,
    restored_settings,
    resume_schedule,
    save_checkpoint,
    truncate_metrics,
)
from .cli import CONFIG_ERROR_EXIT, RunStopped
from .configuration_glip import MASKING_FIELDS, GLIPConfig
from .data import (
    SKIP_REASONS,
    caption_sample,
    check_columns,
    image_folders,
    load_training_data,
    make_image_processor,
    prepare_for_decoding,
    save_processor,
    text_context,
    training_batches,
)
from .launch import check_launch, check_mixed_precision, use_cores_on_cpu
from .losses import MAX_LOGIT_SCALE, ContrastiveLoss
from .masking import num_kept_patches
from .modeling_glip import GLIPModel, masked_inference
from .optimization import Schedule, build_optimizer, build_scheduler, restart_schedule
from .preemption import StopSignals
from .seeding import seed_mask_stream
from .sharding import full_state_dict, gradient_norm, make_shardable, parameter_value, uses_fsdp
from .step import train_step
from .synthetic import PROMPT_TEMPLATES
from .tokenization import align_pooling_token, id_count, load_or_train_tokenizer, text_config_overrides
from .tracking import TRACKER_PROJECT, MetricsLog, plot_loss_curve, resolve_report_to

DIVERGED_EXIT = 3  # the exit status of a run stopped by --max_nonfinite_steps (a crash exits 1, a signal 128 + n)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    skipped: dict[str, int]
    eval_metrics: dict[str, Any] | None


def check_init_from(name_or_path: str) -> None:
    """One-line errors for an ``init_from`` that cannot be read or is not a CLIP / GLIP checkpoint (transformers
    would otherwise build a default CLIP from, say, a BERT config and initialise it at random)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"init_from={name_or_path} could not be read ({reason}); "
            "pass a CLIP or GLIP checkpoint directory or Hub id."
        ) from None
    if (Path(name_or_path) / "progress.json").is_file():  # a training checkpoint: its weights may be sharded or
        raise ValueError(  # named after the compiled model, which from_pretrained would silently leave unloaded
            f"init_from={name_or_path} is a training checkpoint; pass --resume_from_checkpoint {name_or_path} to "
            "continue that run, or init_from the run's output directory (the model it saved at its end)."
        )
    if not config:  # an empty folder (an earlier run that stopped before saving), or one of other files
        raise FileNotFoundError(
            f"init_from={name_or_path} holds no model (no config.json); pass the output directory of a finished run "
            "or a CLIP / GLIP checkpoint."
        )
    if config.get("model_type") not in ("clip", "glip"):
        raise ValueError(
            f"init_from={name_or_path} is a {config.get('model_type')!r} checkpoint, not CLIP or GLIP; "
            "pass a CLIP or GLIP checkpoint (or drop --init_from to train from scratch)."
        )


def model_activation(name_or_path: str) -> str | None:
    """The MLP activation of the CLIP / GLIP checkpoint ``name_or_path`` (its vision tower's, which training keeps
    equal to the text tower's), or None when its config cannot be read."""
    try:
        return GLIPConfig.from_pretrained(name_or_path).vision_config.hidden_act
    except (OSError, ValueError, TypeError, KeyError):
        return None


def resolve_activation(model_args: ModelArguments, run_config: dict[str, Any], model_source: str | None) -> None:
    """Record in ``run_config`` the activation the run trains with: that of ``model_source`` (the checkpoint resumed,
    else ``init_from``), warning when ``--hidden_act`` asked for another (a checkpoint keeps its own: its weights were
    trained with it); with no source, ``--hidden_act`` or the default."""
    actual = model_activation(model_source) if model_source is not None else None
    if actual is None:
        run_config["hidden_act"] = model_args.hidden_act or DEFAULT_HIDDEN_ACT
        return
    if model_args.hidden_act is not None and model_args.hidden_act != actual:
        warnings.warn(
            f"hidden_act={model_args.hidden_act} is not applied: {model_source} was trained with {actual}, which "
            "the run keeps (hidden_act chooses the activation of a model trained from scratch).",
            stacklevel=2,
        )
    run_config["hidden_act"] = actual


def initial_masking(init_from: str | None) -> dict[str, Any] | None:
    """The patch masking ``init_from``'s weights were pre-trained with, recorded in ``train_summary.json`` so that a
    run tuning them unmasked (``configs/unmasked_tuning_vitb16.yaml``) is not published as plain CLIP pre-training.

    A GLIP checkpoint's config holds the masking its run trained with; one whose config has ``mask_ratio`` 0 (itself
    an unmasked run) passes on what its own ``train_summary.json`` recorded. None: no ``init_from``, a CLIP
    checkpoint, or nothing recorded.

    Returns:
        ``{"init_from", "mask_ratio", "mask_strategy", "mask_sigma"}`` (``init_from``: the checkpoint masked with it).
    """
    from transformers import PretrainedConfig

    if not init_from or PretrainedConfig.get_config_dict(init_from)[0].get("model_type") != "glip":
        return None
    config = GLIPConfig.from_pretrained(init_from)
    if config.mask_ratio > 0:
        fields = {name: getattr(config, name) for name in MASKING_FIELDS}
        return {"init_from": init_from, **fields}
    summary = Path(init_from) / "train_summary.json"
    try:
        recorded = json.loads(summary.read_text()).get("init_masking") if summary.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable record: nothing known
    return recorded if isinstance(recorded, dict) else None


def describe_masking(vision_config) -> str:
    """The masking a run trains with, for its log (the run config says None where it is the model's own)."""
    if vision_config.mask_ratio == 0:
        return "none (mask_ratio 0)"
    sigma = f", sigma {vision_config.mask_sigma}" * (vision_config.mask_strategy == "gaussian")
    return f"{vision_config.mask_strategy}, mask_ratio {vision_config.mask_ratio}{sigma}"


def build_model(model_args: ModelArguments, tokenizer, checkpoint: Path | None = None) -> GLIPModel:
    """A fresh GLIP of the requested size, or ``init_from`` (any CLIP or GLIP checkpoint) with masking overrides, or,
    resuming, the model of ``checkpoint`` (its ``config.json``, with the same overrides; weights not loaded).

    The text tower must pool at the tokenizer's end-of-text token: a checkpoint configured for another id is
    remapped to the tokenizer's (with a warning); a tokenizer whose end-of-text id is 2 is rejected.
    """
    masking = {name: getattr(model_args, name) for name in MASKING_FIELDS if getattr(model_args, name) is not None}
    if checkpoint is not None:  # a resume: the model the checkpoint trained (its weights come with its state)
        config = GLIPConfig.from_pretrained(checkpoint, **masking)
        # In the dtype from_pretrained gave the run (an --init_from saved in bf16 trains in bf16): the state loaded
        # next is copied into these parameters, and a float32 one beside bf16 ones would fail at the first step.
        dtype = getattr(config, "dtype", None) or torch.float32
        return GLIPModel._from_config(config, attn_implementation=model_args.attn_implementation, dtype=dtype)
    if model_args.init_from:
        config = GLIPConfig.from_pretrained(model_args.init_from, **masking)
        if id_count(tokenizer) > config.text_config.vocab_size:  # its ids must all have embedding rows
            raise ValueError(
                f"tokenizer has {id_count(tokenizer)} token ids but {model_args.init_from} embeds only "
                f"{config.text_config.vocab_size}; pass the checkpoint's own tokenizer (--tokenizer_name)."
            )
        configured = config.text_config.eos_token_id
        if align_pooling_token(config.text_config, tokenizer, f"init_from {model_args.init_from}"):
            warnings.warn(
                f"{model_args.init_from} pools text at token id {configured} but the tokenizer ends text with "
                f"{tokenizer.eos_token_id}; the text tower now pools at {tokenizer.eos_token_id}.",
                stacklevel=2,
            )
        # float32 whatever dtype it was saved in: mixed precision is autocast's, and bf16 parameters would lose the
        # small updates of a tuning run (transformers would load a bf16-saved checkpoint in bf16).
        return GLIPModel.from_pretrained(
            model_args.init_from,
            config=config,
            attn_implementation=model_args.attn_implementation,
            dtype=torch.float32,
        )
    config = GLIPConfig(
        text_config=dict(
            hidden_size=model_args.text_hidden_size,
            num_hidden_layers=model_args.text_layers,
            num_attention_heads=model_args.text_heads,
            intermediate_size=model_args.text_intermediate_size,
            max_position_embeddings=model_args.max_text_length,
            hidden_act=model_args.hidden_act or DEFAULT_HIDDEN_ACT,
            **text_config_overrides(tokenizer),
        ),
        vision_config=dict(
            hidden_size=model_args.vision_hidden_size,
            num_hidden_layers=model_args.vision_layers,
            num_attention_heads=model_args.vision_heads,
            intermediate_size=model_args.vision_intermediate_size,
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            hidden_act=model_args.hidden_act or DEFAULT_HIDDEN_ACT,
        ),
        projection_dim=model_args.projection_dim,
        **masking,
    )
    align_pooling_token(config.text_config, tokenizer, f"--tokenizer_name {model_args.tokenizer_name}")
    config._attn_implementation = model_args.attn_implementation
    return GLIPModel(config)


def _tokenizer_staging(training_args: TrainingArguments) -> Path:
    """Where the main process leaves the run's tokenizer for the others: a hidden folder of the output directory
    (which every node sees), not the directory itself, so that a start failing a later check leaves an earlier
    run's tokenizer in place; removed once every process has read it."""
    return Path(training_args.output_dir) / ".tokenizer-staging"


def _resolve_tokenizer(accelerator, model_args, data_args, training_args, train_data, checkpoint: Path | None):
    """The run's tokenizer, resolved once by the main process and saved to `_tokenizer_staging`; the other
    processes load that copy, and a resumed run the checkpoint's (an offline-trained BPE is not bit-reproducible)."""
    from transformers import AutoTokenizer

    staging = _tokenizer_staging(training_args)
    if checkpoint is not None and (checkpoint / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=model_args.trust_remote_code)
    with accelerator.main_process_first():
        if not accelerator.is_main_process:
            return AutoTokenizer.from_pretrained(staging, trust_remote_code=model_args.trust_remote_code)
        tokenizer = load_or_train_tokenizer(
            model_args.tokenizer_name or model_args.init_from,
            lambda: caption_sample(train_data, data_args.caption_column),
            model_args.tokenizer_vocab_size,
            model_args.max_text_length,
            must_load=model_args.tokenizer_name is not None,
            trust_remote_code=model_args.trust_remote_code,
        )
        shutil.rmtree(staging, ignore_errors=True)  # a failed start's copy: none of its files may be read
        tokenizer.save_pretrained(staging)
        return tokenizer


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> TrainResult:
    """Run pre-training as configured; returns where the model went and what it measured."""
    output_dir = Path(training_args.output_dir)
    created = not output_dir.exists()
    try:
        return _train(model_args, data_args, training_args)
    except BaseException:
        shutil.rmtree(_tokenizer_staging(training_args), ignore_errors=True)  # a failed start leaves nothing behind
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # made by this start and left empty: it read as a run, --init_from took it
        raise


def _train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> TrainResult:
    output_dir = Path(training_args.output_dir)
    trackers = resolve_report_to(training_args.report_to)
    accelerator = Accelerator(
        cpu=training_args.cpu,
        mixed_precision=training_args.mixed_precision,
        log_with=trackers or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=training_args.seed),
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator)
    check_mixed_precision(accelerator)
    use_cores_on_cpu(accelerator)  # accelerate launch leaves a CPU process one thread unless the user said otherwise
    # Everything a user can get wrong about the run directory or the starting point fails here, before any write.
    run_config = to_flat_dict(model_args, data_args, training_args)
    plan = plan_start(output_dir, training_args.resume_from_checkpoint, training_args.overwrite_output_dir)
    checkpoint = plan.checkpoint
    resumed_model = checkpoint if checkpoint is not None and (checkpoint / "config.json").is_file() else None
    if model_args.init_from and resumed_model is None:  # a resume rebuilds the checkpoint's model instead
        check_init_from(model_args.init_from)
    model_source = resumed_model or model_args.init_from
    with _warnings_once(accelerator):  # before the resume check, which compares what it records
        resolve_activation(model_args, run_config, str(model_source) if model_source else None)
    if checkpoint is not None:
        with _warnings_once(accelerator):
            check_resume(checkpoint, run_config, accelerator.num_processes, fsdp=uses_fsdp(accelerator))
        run_config.update(restored_settings(checkpoint))  # what this run trains with, recorded for its next resume
    if uses_fsdp(accelerator) and training_args.loss == "siglip":
        raise ValueError(  # Accelerate's FSDP2 maps every optimizer parameter to a sharded model one: a KeyError
            "loss='siglip' under FSDP is not supported: SigLIP's bias is a parameter of the loss, outside the model, "
            "and Accelerate cannot shard an optimizer holding it; train with DDP, or pass --loss clip."
        )
    if training_args.push_to_hub:
        from .hub import check_hub_token

        check_hub_token()  # now, not after days of training
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(f"Resolved run config:\n{yaml.safe_dump(run_config, sort_keys=False)}")
    set_seed(training_args.seed)

    with accelerator.main_process_first():
        train_data, held_out = load_training_data(data_args, model_args)
    source = data_args.dataset_name or "the built-in dataset"
    check_columns(
        train_data, {"image_column": data_args.image_column, "caption_column": data_args.caption_column}, source
    )
    if training_args.resume_from_checkpoint and checkpoint is None:
        accelerator.print(f"resume_from_checkpoint=auto: no checkpoint in {output_dir} yet; starting from scratch.")
    tokenizer = _resolve_tokenizer(accelerator, model_args, data_args, training_args, train_data, checkpoint)
    model = build_model(model_args, tokenizer, resumed_model)
    accelerator.print(f"Training masking: {describe_masking(model.config.vision_config)}")
    # Saved with the model, the tokenizer cuts texts where training does (its own stated limit may be another).
    tokenizer.model_max_length = text_context(model_args, model.config)
    processor_source = model_args.init_from
    if resumed_model is not None and (resumed_model / "preprocessor_config.json").is_file():
        processor_source = str(resumed_model)
    image_processor = make_image_processor(
        model.config.vision_config.image_size, processor_source, model_args.trust_remote_code
    )
    if model_args.lean_activations:
        replaced = use_lean_activations(model)  # same function, same checkpoint; docs/benchmarks.md: what it buys
        accelerator.print(f"--lean_activations: {replaced} MLPs keep only their first layer's output for backward.")
    if training_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if uses_fsdp(accelerator):
        make_shardable(model)  # FSDP takes no 0-dim parameter (the temperature); saved models keep CLIP's shapes
    loss_fn = ContrastiveLoss(training_args.loss)

    data = training_batches(
        train_data, tokenizer, model.config, image_processor, model_args, data_args, training_args, accelerator
    )

    fused = accelerator.device.type == "cuda" and not uses_fsdp(accelerator)  # fused AdamW: measured on one H200
    optimizer = build_optimizer([model, loss_fn], training_args, fused=fused)
    if training_args.torch_compile:
        model = torch.compile(model)
    # The loss module stays out of DDP (CLIP's has no parameters); SigLIP's bias gradient is averaged by hand.
    loss_fn.to(accelerator.device)  # its parameters are checkpointed as safetensors by save_checkpoint
    model, optimizer = accelerator.prepare(model, optimizer)
    main_steps = _main_steps(data.per_epoch, training_args, accelerator)
    schedule = Schedule.of(run_config, main_steps)
    if checkpoint is not None:  # a schedule the checkpoint's steps rule out fails here, before any write
        with _warnings_once(accelerator):
            schedule = resume_schedule(checkpoint, run_config, schedule)
    scheduler = accelerator.prepare(build_scheduler(optimizer, schedule))
    seed_mask_stream(training_args.seed, accelerator.process_index)  # a resume restores the per-process state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # once every check has passed: a failed start changes no earlier run
        apply_start(plan, output_dir)
        if plan.replaced and training_args.overwrite_output_dir:
            print(f"--overwrite_output_dir: replacing the earlier run in {output_dir} ({', '.join(plan.replaced)}).")
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        tokenizer.save_pretrained(output_dir)
        shutil.rmtree(_tokenizer_staging(training_args), ignore_errors=True)  # every process has read it
    accelerator.wait_for_everyone()

    progress = TrainingProgress(main_steps=main_steps)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        restart_schedule(scheduler.scheduler)  # the restored lr is the checkpoint's schedule's; this run's from here
        load_loss_state(loss_fn, checkpoint)
        progress = TrainingProgress.load(checkpoint)
        progress.main_steps = main_steps  # its later checkpoints record the schedule this run follows
        if accelerator.is_main_process:
            truncate_metrics(output_dir / "metrics.jsonl", progress.step)
        accelerator.print(f"Resumed from {checkpoint} at step {progress.step}, epoch {progress.epoch}.")
    if checkpoint is None or resumed_model is None:  # a checkpoint with the model's config also holds this record
        progress.init_masking = initial_masking(model_args.init_from)
    if trackers:
        accelerator.init_trackers(
            TRACKER_PROJECT, config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))}
        )
    run = _Run(
        accelerator,
        model,
        accelerator.unwrap_model(model),
        loss_fn,
        optimizer,
        scheduler,
        tokenizer,
        training_args,
        main_steps,
        progress,
        run_config,
        image_processor,
        HubPusher(training_args) if training_args.push_to_hub and accelerator.is_main_process else None,
        checkpoint is not None,
        data.per_epoch,
    )
    del model, optimizer, scheduler  # `run` is their one owner, so that `_end` can release the wrapped model
    metrics = _train_loop(run, data.batches(progress))
    return _finish(run, held_out, data_args, metrics)


@contextlib.contextmanager
def _warnings_once(accelerator: Accelerator) -> Iterator[None]:
    """Warnings raised inside the block are shown by the main process only (every process runs the same checks)."""
    with warnings.catch_warnings():
        if not accelerator.is_main_process:
            warnings.simplefilter("ignore")
        yield


def _main_steps(per_epoch: int | None, training_args: TrainingArguments, accelerator: Accelerator) -> int:
    """Optimizer steps of the masked stage: ``max_steps``, or enough steps to consume the epochs' worth of
    micro-batches (``per_epoch`` on each process), rounded up (an epoch of 10 micro-batches at accumulation 4 is
    2.5 steps)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    accumulation = training_args.gradient_accumulation_steps
    if per_epoch < accumulation:
        raise ValueError(
            f"gradient_accumulation_steps={accumulation} exceeds the {per_epoch}"
            f" batches per epoch of each of the {accelerator.num_processes} process(es); lower it or the batch size."
        )
    return math.ceil(training_args.num_train_epochs * per_epoch / accumulation)


@dataclass
class _Run:
    """What the loop needs of a prepared run."""

    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (DDP / compiled)
    unwrapped: GLIPModel
    loss_fn: ContrastiveLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Any
    args: TrainingArguments
    main_steps: int
    progress: TrainingProgress
    config: dict[str, Any] = field(default_factory=dict)  # the flat run config, saved into every checkpoint
    image_processor: Any = None  # saved with the model when a checkpoint is pushed to the Hub
    pusher: HubPusher | None = None  # --push_to_hub, on the main process
    resumed: bool = False  # started from a checkpoint (its earlier files are not this invocation's alone)
    batches_per_epoch: int | None = None  # micro-batches per epoch on each process; None for a stream

    @property
    def total_steps(self) -> int:
        return self.main_steps + self.args.unmasked_tuning_steps


def _gradient_norm(run: _Run) -> torch.Tensor:
    """Average the loss module's gradients over processes, clip all gradients; returns their total norm (0-dim)."""
    accelerator, params = run.accelerator, list(run.loss_fn.parameters())
    for param in params:
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, "mean")
    # max_norm=inf measures without clipping; the norm is that of the whole model, however it is sharded.
    return gradient_norm(accelerator, run.model, params, run.args.max_grad_norm or math.inf)


def _any_process(accelerator: Accelerator, *flags: torch.Tensor | bool) -> list[bool]:
    """Each flag OR-ed over all processes (one small all-reduce, and the step's only host sync for it)."""
    values = torch.stack([torch.as_tensor(f, device=accelerator.device).reshape(()).float() for f in flags])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "sum")
    return [bool(v > 0) for v in values.tolist()]


def _optimizer_step(run: _Run) -> float:
    """Step, advance the schedule, clamp the temperature; returns the lr used."""
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    if not run.optimizer.step_was_skipped:  # fp16: the gradient scaler skipped a non-finite step
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        run.unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return lr


def _update(run: _Run, loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool, bool]:
    """After the backward pass: measure the gradient, agree over processes whether the step is finite and whether a
    stop was requested, then update, or skip a non-finite step. Returns ``(lr, nonfinite, stop)``."""
    norm = _gradient_norm(run)
    nonfinite, stop = _any_process(run.accelerator, ~torch.isfinite(loss + norm), stop_requested)
    if run.accelerator.scaler is not None:
        # fp16: the gradient scaler must see every step: it skips one with non-finite gradients and lowers its
        # scale (and resets its unscale bookkeeping); its skips count as non-finite steps too. A non-finite loss
        # with finite gradients is skipped here, and the scaler's bookkeeping reset by hand.
        if nonfinite:
            lr = _skip_step(run)
            run.accelerator.scaler.update()
            return lr, True, stop
        lr = _optimizer_step(run)
        return lr, run.optimizer.step_was_skipped, stop
    return (_skip_step(run) if nonfinite else _optimizer_step(run)), nonfinite, stop


def _skip_step(run: _Run) -> float:
    """A step that makes no update (no valid sample, or a non-finite loss or gradient): gradients dropped, the
    schedule moves on with the step count. Returns the lr the step would have used."""
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return lr


def _kept_tokens(vision, unmasked: bool) -> int:
    patches = (vision.image_size // vision.patch_size) ** 2
    return 1 + (patches if unmasked or vision.mask_ratio == 0 else num_kept_patches(patches, vision.mask_ratio))


def _train_loop(run: _Run, batches: Iterator[dict]) -> MetricsLog:
    """Steps until ``total_steps``: masked stage, then unmasked tuning; logs and checkpoints on the way.

    Raises ``RunStopped`` after a stop signal (once the step is done and a checkpoint written) or after
    ``max_nonfinite_steps`` consecutive non-finite steps (no checkpoint written: the last one is intact)."""
    accelerator, progress, args = run.accelerator, run.progress, run.args
    metrics = MetricsLog(Path(args.output_dir) / "metrics.jsonl", enabled=accelerator.is_main_process)
    bar = tqdm(
        total=run.total_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train"
    )
    skipped_local: Counter = Counter()
    window_loss, window_images, window_start = [], 0, time.perf_counter()
    nonfinite_streak = 0
    run.model.train()
    with StopSignals() as signals:
        while progress.step < run.total_steps:
            unmasked = progress.step >= run.main_steps
            micro_batches = []
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batches)
                skipped_local.update(batch.pop("skipped"))
                micro_batches.append(batch)
            global_rows = _global_rows(accelerator, micro_batches)
            if global_rows == 0:
                # Every sample of this step, on every process, was skipped: no update, the schedule moves on.
                # Read through once every process has: streamed shares differ in length, and a process still
                # reading its share may come to valid rows.
                # (A stream's length is known only once a read past its end turns to the next epoch.)
                first_epoch_left = progress.epoch == 0 and (
                    run.batches_per_epoch is None or progress.batch_in_epoch < run.batches_per_epoch
                )
                stop, still_reading = _any_process(accelerator, signals.requested(), first_epoch_left)
                lr = _skip_step(run)
                progress.empty_steps += 1
                nothing_yet = progress.empty_steps == progress.step + 1  # neither this step nor any before it
                if nothing_yet and (not still_reading or progress.step + 1 == run.total_steps):
                    bar.close()
                    message = _no_sample_message(run, skipped_local)
                    _end(run)  # trackers closed first: their folder may go next
                    if not run.resumed and accelerator.is_main_process:  # its checkpoints hold an untrained model
                        clear_run_outputs(args.output_dir)
                    raise RunStopped(message, CONFIG_ERROR_EXIT, show=accelerator.is_main_process)
            else:
                with masked_inference(run.unwrapped, 0.0) if unmasked else contextlib.nullcontext():
                    loss = train_step(run.model, run.loss_fn, run.unwrapped, micro_batches, accelerator)
                lr, nonfinite, stop = _update(run, loss, signals.requested())
                if nonfinite:
                    progress.nonfinite_steps += 1
                    nonfinite_streak += 1
                else:
                    window_loss.append(loss)
                    nonfinite_streak = 0
            progress.step += 1
            bar.update(1)
            window_images += global_rows
            last = progress.step == run.total_steps
            log, save = progress.step % args.logging_steps == 0 or last, progress.step % args.save_steps == 0 or last
            if log or save or stop:  # one all-reduce of the skip counts for what is logged and saved
                progress.skipped = _total_skipped(accelerator, progress.skipped, skipped_local)
                skipped_local = Counter()
            if log:
                _log(run, metrics, bar, window_loss, window_images, time.perf_counter() - window_start, lr, unmasked)
                window_loss, window_images, window_start = [], 0, time.perf_counter()
            if nonfinite_streak >= args.max_nonfinite_steps:
                bar.close()
                _stop(run, _diverged_message(run, nonfinite_streak), exit_code=DIVERGED_EXIT)
            if save or stop:
                path = save_checkpoint(
                    accelerator,
                    args.output_dir,
                    progress,
                    args.save_total_limit,
                    run.tokenizer,
                    run.loss_fn,
                    run.config,
                    run.unwrapped.config,
                    run.image_processor,
                )
                # The last step is pushed by _finish, with the end-of-run evaluation.
                if args.push_to_hub and args.hub_strategy == "every_save" and not (last or stop):
                    state = full_state_dict(accelerator, run.model)  # every process: FSDP gathers the shards
                    if run.pusher is not None:
                        run.pusher.push_snapshot(run, state)
            if stop:
                bar.close()
                message = (
                    f"stopped by {signals.name or 'a stop signal'} after step {progress.step}: saved {path}; "
                    f"continue with --resume_from_checkpoint latest --output_dir {args.output_dir}"
                )
                _stop(run, message, exit_code=128 + (signals.received or 15))
    bar.close()
    return metrics


def _log(run: _Run, metrics: MetricsLog, bar, losses, images: int, seconds: float, lr: float, unmasked: bool) -> None:
    accelerator, progress = run.accelerator, run.progress
    record = {
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": _window_mean(accelerator, losses),
        "lr": lr,
        "logit_scale": math.exp(parameter_value(accelerator, run.unwrapped.logit_scale)),
        "images_per_s": images / max(seconds, 1e-9),
        "kept_tokens": _kept_tokens(run.unwrapped.config.vision_config, unmasked),
        "skipped_samples": sum(progress.skipped.values()),
        "nonfinite_steps": progress.nonfinite_steps,
        "stage": "unmasked_tuning" if unmasked else "masked",
    }
    metrics.write(record)
    accelerator.log({k: v for k, v in record.items() if k != "stage"}, step=progress.step)
    bar.set_postfix(
        loss=f"{record['loss']:.3f}",
        lr=f"{lr:.2e}",
        scale=f"{record['logit_scale']:.1f}",
        img_s=f"{record['images_per_s']:.0f}",
        tokens=record["kept_tokens"],
        skipped=record["skipped_samples"],
    )


def run_summary(progress: TrainingProgress, accelerator: Accelerator, main_steps: int) -> dict[str, Any]:
    """What ``train_summary.json`` records of a run (also each Hub snapshot's): steps, what was skipped, and the
    masking the initial checkpoint was pre-trained with ([`initial_masking`])."""
    return {
        "steps": progress.step,
        "main_steps": main_steps,  # the masked stage; unmasked tuning, if any, follows
        "skipped": progress.skipped,
        "num_skipped": sum(progress.skipped.values()),
        "empty_steps": progress.empty_steps,
        "nonfinite_steps": progress.nonfinite_steps,
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "init_masking": progress.init_masking,
    }


class HubPusher:
    """``--push_to_hub``: uploads from the main process in a background thread, one at a time, so that training (and
    the other processes, waiting at the next collective) go on during an upload; a failed upload is a warning."""

    def __init__(self, args: TrainingArguments):
        self.args = args
        self._thread = None

    def push(self, folder: Path, message: str, cleanup=None) -> None:
        """Upload ``folder`` (a run directory or a snapshot of one) in the background; ``cleanup()`` runs after."""
        from .hub import push_run

        self.wait()  # the previous upload first: pushes stay in order

        def upload() -> None:
            try:
                args = self.args
                url = push_run(folder, args.hub_model_id, args.hub_flavour, args.hub_private, commit_message=message)
                print(f"Pushed {message.lower()} to {url}", flush=True)
            except Exception as error:  # the network, the Hub: training goes on, the run stays on disk
                warnings.warn(
                    f"pushing {message.lower()} to {self.args.hub_model_id} failed ({error}); it is saved locally: "
                    f"python -m glip_hf.hub push {self.args.output_dir} --repo_id {self.args.hub_model_id}",
                    stacklevel=1,
                )
            finally:
                if cleanup is not None:
                    cleanup()

        self._thread = threading.Thread(target=upload, name="glip-hub-push")
        self._thread.start()

    def push_snapshot(self, run: _Run, state: dict[str, torch.Tensor]) -> None:
        """The model as it is at this checkpoint (``state``: its full state dict), with its own summary
        (``--hub_strategy every_save``)."""
        tmp = tempfile.TemporaryDirectory(prefix="glip-snapshot-")
        snapshot = Path(tmp.name)
        run.unwrapped.save_pretrained(snapshot, state_dict=state)  # now, in this thread: the weights of this step
        save_processor(snapshot, run.tokenizer, run.image_processor)
        (snapshot / "run_config.yaml").write_text(yaml.safe_dump(run.config, sort_keys=False))
        summary = {**run_summary(run.progress, run.accelerator, run.main_steps), "snapshot": True}
        (snapshot / "train_summary.json").write_text(json.dumps(summary, indent=1))
        self.push(snapshot, f"Checkpoint at step {run.progress.step}", cleanup=tmp.cleanup)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _diverged_message(run: _Run, streak: int) -> str:
    checkpoints = list_checkpoints(run.args.output_dir)
    last = f"the last checkpoint, {checkpoints[-1]}, is intact" if checkpoints else "no checkpoint was written yet"
    return (
        f"stopped at step {run.progress.step}: {streak} consecutive steps had a non-finite loss or gradient "
        f"(--max_nonfinite_steps {run.args.max_nonfinite_steps}); none of them updated the model and {last}. "
        f"Check the data near epoch {run.progress.epoch}, batch {run.progress.batch_in_epoch}; resuming restores "
        "the checkpoint's optimizer and learning rate, so a lower --learning_rate needs a new run."
    )


def _no_sample_message(run: _Run, skipped_local: Counter) -> str:
    """Why a run whose every step so far had no valid sample stops, once the data has been read through (or at its
    last step): the same rows would be skipped again, and the model saved would have learned nothing."""
    skipped = _total_skipped(run.accelerator, run.progress.skipped, skipped_local)
    reasons = ", ".join(f"{reason} {count}" for reason, count in skipped.items() if count)
    return (
        f"no sample could be used in {run.progress.step + 1} step(s): every row read was skipped ({reasons}); check "
        f"--image_column {run.config.get('image_column')!r} and --caption_column {run.config.get('caption_column')!r}"
        " (images and caption text), and the data files. The model was not updated"
        + ("." if run.resumed else "; nothing of the run was kept, so the same command can run again.")
    )


def _end(run: _Run) -> None:
    """Finish the trackers and destroy the process group, every process together, after releasing the wrapped
    model: a DDP reducer that outlives its (destroyed) gloo group tears the group down again when it is freed, and
    that teardown was seen to hang a process at exit."""
    run.accelerator.wait_for_everyone()
    run.model = None
    run.accelerator.free_memory()
    run.accelerator.end_training()


def _stop(run: _Run, message: str, exit_code: int) -> None:
    show = run.accelerator.is_main_process  # every process stops together (the decision is all-reduced)
    _end(run)
    raise RunStopped(message, exit_code, show=show)


def _global_rows(accelerator: Accelerator, micro_batches: list[dict]) -> int:
    """Samples in this step over all processes (a process may hold none after skipping bad samples)."""
    rows = sum(batch["pixel_values"].shape[0] for batch in micro_batches)
    if accelerator.num_processes == 1:
        return rows
    return int(accelerator.reduce(torch.tensor(rows, device=accelerator.device), "sum").item())


def _window_mean(accelerator: Accelerator, losses: list[torch.Tensor]) -> float:
    """Mean loss of the logging window over processes; NaN when every step in it was empty (same on all ranks)."""
    if not losses:
        return math.nan
    return accelerator.reduce(torch.stack(losses).mean(), "mean").item()


def _total_skipped(accelerator: Accelerator, so_far: dict[str, int], local: Counter) -> dict[str, int]:
    counts = torch.tensor([local.get(reason, 0) for reason in SKIP_REASONS], device=accelerator.device)
    counts = accelerator.reduce(counts, "sum").tolist()
    return {reason: so_far.get(reason, 0) + int(n) for reason, n in zip(SKIP_REASONS, counts)}


def _finish(run: _Run, held_out, data_args: DataArguments, metrics: MetricsLog) -> TrainResult:
    """Save the model directory, evaluate on the held-out split, write the summary and the loss curve; push it."""
    accelerator, model, tokenizer, image_processor = run.accelerator, run.unwrapped, run.tokenizer, run.image_processor
    training_args, progress, main_steps, pusher = run.args, run.progress, run.main_steps, run.pusher
    output_dir = Path(training_args.output_dir)
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, run.model)  # every process: FSDP gathers the shards on the main one
    if accelerator.is_main_process:
        model.save_pretrained(output_dir, state_dict=state)
        save_processor(output_dir, tokenizer, image_processor)
        plot_loss_curve(
            metrics.read(), output_dir / "loss_curve.png", main_steps if training_args.unmasked_tuning_steps else None
        )
    eval_metrics = None
    if training_args.eval_at_end and held_out is not None:
        if uses_fsdp(accelerator):  # a sharded model runs only inside FSDP's forward: evaluate the saved one
            accelerator.wait_for_everyone()
            model = GLIPModel.from_pretrained(output_dir).to(accelerator.device)
        eval_metrics = _evaluate_held_out(
            model, tokenizer, image_processor, held_out, data_args, training_args, accelerator
        )
    if accelerator.is_main_process:
        summary = {**run_summary(progress, accelerator, main_steps), "held_out_zero_shot": eval_metrics}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        print(
            f"Saved the model to {output_dir}. Skipped samples: {summary['num_skipped']} {progress.skipped}; "
            f"steps with no valid sample: {progress.empty_steps}; "
            f"steps skipped as non-finite: {progress.nonfinite_steps}"
        )
        if pusher is not None:
            pusher.push(output_dir, f"End of training, step {progress.step}")
            pusher.wait()
    _end(run)
    return TrainResult(output_dir, progress.step, progress.skipped, eval_metrics)


def _evaluate_held_out(model, tokenizer, image_processor, held_out, data_args, training_args, accelerator):
    """Zero-shot top-1 on the held-out split when it has a ClassLabel column or a column of class names; prints it
    against chance."""
    from .evaluation import is_name_column, label_names, names_to_ids, zero_shot_on_dataset

    label = data_args.label_column
    feature = (held_out.features or {}).get(label)
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(held_out, datasets.Dataset) and is_name_column(held_out, label):
        names = label_names([held_out], label)  # the names the split holds, sorted, as run_eval.py takes them
        held_out = names_to_ids(held_out, label, names)
    else:
        accelerator.print(
            f"No zero-shot evaluation: the held-out split has no column {label!r} of class labels or class names."
        )
        return None
    image_column = data_args.image_column.split(",")[0]
    held_out = prepare_for_decoding(held_out, [image_column])
    model.eval()
    try:
        result = zero_shot_on_dataset(
            model,
            tokenizer,
            image_processor,
            held_out,
            names,
            PROMPT_TEMPLATES,
            image_column,
            label,
            training_args.eval_batch_size,
            accelerator,
            image_folders=image_folders(data_args.data_files, data_args.data_dir),
        )[0]
    except ValueError as error:  # the held-out data's own fault (no labelled row, no decodable image): the trained
        # run still writes its summary and pushes; every process raises it alike, before or after the same gathers
        accelerator.print(f"No zero-shot evaluation: {error}")
        return None
    chance = 1.0 / len(names)
    top1 = result["metrics"]["top1"]
    accelerator.print(
        f"Held-out zero-shot top-1: {top1:.3f} on {result['num_samples']} images "
        f"({len(names)} classes, chance {chance:.3f}, {top1 / chance:.1f}x chance)"
    )
    return {**result["metrics"], "chance": chance, "num_samples": result["num_samples"]}
