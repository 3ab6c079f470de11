"""GLIP pre-training on Hugging Face datasets with Accelerate.

    accelerate launch run_pretraining.py                                     # built-in offline run (CPU, minutes)
    accelerate launch run_pretraining.py --config configs/glip_vitb16_75.yaml --dataset_name NAME
    accelerate launch --multi_gpu --num_processes 4 run_pretraining.py --config configs/glip_vitb16_50.yaml ...
    accelerate launch run_pretraining.py --config CONFIG --resume_from_checkpoint latest

Every field of the YAML can be overridden by a flag of the same name; `--help` lists them.
"""

from pathlib import Path

from glip_hf.arguments import parse_run_args
from glip_hf.training import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main() -> None:
    model_args, data_args, training_args = parse_run_args(default_config=DEFAULT_CONFIG)
    train(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
