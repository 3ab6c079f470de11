"""Checks on how a script was launched, shared by pre-training and evaluation."""

from __future__ import annotations

import os

from accelerate import Accelerator


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
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != "FSDP":
        raise ValueError(
            f"the accelerate config asks for FSDP but Accelerate runs {accelerator.distributed_type.value}: it shards "
            "models only on GPUs (or other accelerators); on CPUs launch plain data parallel "
            "(accelerate launch --multi_gpu --num_processes N ... --cpu true)."
        )
