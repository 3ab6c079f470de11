"""Checks on how a script was launched, shared by pre-training and evaluation, and the CPU threads a launch gives."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from .sharding import uses_fsdp

# Variables a launcher sets for the processes it starts: `accelerate launch` (every mode) and torchrun.
LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")


def check_launch(accelerator: Accelerator) -> None:
    """Stop when the launcher started more processes than Accelerate joined, or asked for FSDP that Accelerate did
    not turn on.

    On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` without ``--cpu true`` gives N
    independent single-process runs that would each do all the work and write the same files. With an FSDP config
    and ``--cpu true``, Accelerate (1.15) runs plain data parallel: it turns FSDP on only for GPU-like devices.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched but Accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on a machine without GPUs pass --cpu true."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not uses_fsdp(accelerator):
        raise ValueError(
            f"the accelerate config asks for FSDP but Accelerate runs {accelerator.distributed_type.value}: it shards "
            "models only on GPUs (or other accelerators); on CPUs launch plain data parallel "
            "(accelerate launch --multi_gpu --num_processes N ... --cpu true)."
        )


def end_processes() -> None:
    """Every process together: destroy the process group before the interpreter exits (what
    ``Accelerator.end_training`` does for training). A gloo group left to the interpreter's teardown aborted a process
    of ``accelerate launch --num_processes 2 run_eval.py --cpu true`` now and then ("terminate called without an
    active exception", exit status 1, after the results were written)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state = PartialState()
        state.wait_for_everyone()
        state.destroy_process_group()


def check_mixed_precision(accelerator: Accelerator) -> None:
    """Stop a run asked for fp16 on the CPU (by ``--mixed_precision`` or the accelerate config): Accelerate (1.15)
    then trains in float32 without a word (it autocasts to fp16 only on GPU-like devices), and the run would record
    fp16 in its summary and model card. bf16 autocasts on the CPU."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "mixed_precision='fp16' is invalid on the CPU: Accelerate autocasts to fp16 only on GPUs and would train "
            "in float32; pass --mixed_precision bf16 or no (or accelerate launch --mixed_precision bf16 or no)."
        )


def launcher_chose_threads() -> bool:
    """Whether ``OMP_NUM_THREADS`` in this process was set by the launcher that started it, not by the user.

    ``accelerate launch`` without an accelerate config and without its ``--cpu`` flag exports ``OMP_NUM_THREADS=1``
    to the script (its ``--num_cpu_threads_per_process`` defaults to the launcher's own ``OMP_NUM_THREADS``, else 1;
    the per-core default applies only under ``--cpu``), and torchrun exports 1 to each of several processes. True
    when the parent process is such a launcher (it set a marker variable this process has and it lacks) and had
    neither ``OMP_NUM_THREADS`` in its environment nor ``--num_cpu_threads_per_process`` on its command line. False
    wherever that cannot be read (not Linux): the setting is then left as it is.
    """
    if "OMP_NUM_THREADS" not in os.environ or not any(name in os.environ for name in LAUNCHER_MARKERS):
        return False
    parent = Path("/proc") / str(os.getppid())
    try:
        environment = (parent / "environ").read_bytes().split(b"\0")
        command = (parent / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = {entry.split(b"=", 1)[0].decode(errors="replace") for entry in environment}
    launched_by_parent = any(name in os.environ and name not in names for name in LAUNCHER_MARKERS)
    # accelerate's parser takes each flag with dashes too (--num-cpu-threads-per-process).
    chosen_by_user = "OMP_NUM_THREADS" in names or any(
        arg.replace(b"-", b"_").startswith(b"__num_cpu_threads_per_process") for arg in command
    )
    return launched_by_parent and not chosen_by_user


def cpu_threads_per_process() -> int:
    """This machine's physical cores available to this process, shared by the processes on the node (at least 1)."""
    import psutil

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(psutil.cpu_count(logical=False) or available, available)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def use_available_cores() -> int:
    """Give torch every core this process may use when the launcher, not the user, limited its threads (see
    `launcher_chose_threads`); an ``OMP_NUM_THREADS`` the user set, or torch's own default, is kept. Returns the
    thread count in effect."""
    if launcher_chose_threads():
        torch.set_num_threads(cpu_threads_per_process())
    return torch.get_num_threads()


def use_cores_on_cpu(accelerator: Accelerator) -> int:
    """`use_available_cores` for a process that computes on the CPU (on a GPU the cores belong to the DataLoader
    workers); what training and evaluation call right after `check_launch`. Returns the thread count in effect."""
    if accelerator.device.type == "cpu":
        return use_available_cores()
    return torch.get_num_threads()
