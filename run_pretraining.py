"""GLIP pre-training on Hugging Face datasets with Accelerate.

    accelerate launch run_pretraining.py                                     # built-in offline run (CPU, minutes)
    accelerate launch run_pretraining.py --config configs/glip_vitb16_75.yaml --dataset_name NAME
    accelerate launch --multi_gpu --num_processes 4 run_pretraining.py --config configs/glip_vitb16_50.yaml ...
    accelerate launch --config_file configs/accelerate/fsdp_full_shard.yaml run_pretraining.py --config ...  # FSDP
    accelerate launch run_pretraining.py --config CONFIG --resume_from_checkpoint latest

Every field of the YAML can be overridden by a flag of the same name; `--help` lists them. A bad configuration stops
before training with one line naming the field and the fix (exit status 2); `--debug` shows the traceback.
"""

from pathlib import Path

from glip_hf.arguments import parse_run_args
from glip_hf.cli import run_cli
from glip_hf.training import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def pretrain(argv: list[str]) -> None:
    model_args, data_args, training_args = parse_run_args(argv, default_config=DEFAULT_CONFIG)
    train(model_args, data_args, training_args)


def main(argv: list[str] | None = None) -> None:
    """Run with ``argv`` (default: the command line); user errors exit with one line on stderr."""
    run_cli(pretrain, argv, prog=Path(__file__).name)


if __name__ == "__main__":
    main()
