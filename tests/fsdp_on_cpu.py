"""Run ``run_pretraining.py`` under Accelerate's FSDP on CPU processes (gloo), for the tests.

    accelerate launch --config_file configs/accelerate/fsdp_full_shard.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py [run_pretraining flags ...] --cpu true

torch (2.13) shards CLIP on CPU processes with gloo, FSDP1 and FSDP2 alike, but Accelerate (1.15) turns FSDP on
only for GPU-like devices: with ``cpu=True`` its ``AcceleratorState`` keeps ``MULTI_CPU`` (plain data parallel) and
ignores the FSDP plugin it was given (``state.py``: the plugin is taken only for the ``MULTI_GPU``-like types).
`allow_fsdp_on_cpu` lifts that one gate; everything else (the plugin built from the config file, the wrapping in
``prepare``, clipping, ``save_state`` / ``load_state``, ``get_state_dict``) is Accelerate's own code. It also turns off
``sync_module_states`` and ``cpu_ram_efficient_loading``, whose setup asks for an accelerator device (every process
builds the same weights from the seed anyway).
"""

import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parent.parent


def allow_fsdp_on_cpu() -> None:
    os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: every later AcceleratorState() copies PartialState's over its own.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init_with_fsdp_on_cpu


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    sys.path.insert(0, str(ROOT))
    import run_pretraining

    run_pretraining.main(sys.argv[1:])
