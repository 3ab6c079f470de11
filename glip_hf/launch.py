"""Checks on how a script was launched, shared by pre-training and evaluation."""

from __future__ import annotations

import os

from accelerate import Accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Stop when the launcher started more processes than Accelerate joined.

    On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` without ``--cpu true`` gives N
    independent single-process runs that would each do all the work and write the same files.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched but Accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on a machine without GPUs pass --cpu true."
        )
