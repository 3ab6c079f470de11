"""Evaluate a CLIP or GLIP checkpoint: zero-shot classification, image-text retrieval, linear probe.

    python run_eval.py                                        # zero-shot on the built-in held-out set, outputs/default
    python run_eval.py --model DIR --task retrieval --output retrieval.json
    python run_eval.py --model DIR --task zeroshot_classification --mask_ratio 0.5     # masked inference
    python run_eval.py --model DIR --task linear_probe --dataset NAME --split test --train_split train
    python run_eval.py --suite configs/eval_suite.yaml --output eval_results/suite       # markdown + CSV table
    accelerate launch --multi_gpu --num_processes 4 run_eval.py --model DIR ...         # sharded across GPUs
    accelerate launch --multi_gpu --num_processes 2 run_eval.py --cpu true ...         # two CPU processes

`--help` lists every flag.
"""

import json
from pathlib import Path

from transformers import HfArgumentParser

from glip_hf.arguments import EvalArguments
from glip_hf.evaluation import evaluate_model, run_suite, summary_line


def main() -> None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    if args.suite:
        run_suite(args)
        return
    result = evaluate_model(args)
    print(summary_line(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
