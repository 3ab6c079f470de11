"""Evaluate a CLIP or GLIP checkpoint: zero-shot classification, image-text retrieval, linear probe.

    python run_eval.py                                        # zero-shot on the built-in held-out set, outputs/default
    python run_eval.py --model DIR --task retrieval --output retrieval.json
    python run_eval.py --model DIR --task zeroshot_classification --mask_ratio 0.5     # masked inference
    python run_eval.py --model DIR --task linear_probe --dataset NAME --split test --train_split train
    python run_eval.py --suite configs/eval_suite.yaml --output eval_results/suite       # markdown + CSV table
    accelerate launch --multi_gpu --num_processes 4 run_eval.py --model DIR ...         # sharded across GPUs
    accelerate launch --multi_gpu --num_processes 2 run_eval.py --cpu true ...         # two CPU processes

`--help` lists every flag. A bad setting stops with one line naming it (exit status 2); `--debug` shows the traceback.
"""

import json
from pathlib import Path

from accelerate import PartialState

from glip_hf.arguments import parse_eval_args
from glip_hf.cli import run_cli
from glip_hf.evaluation import evaluate_model, run_suite, summary_line
from glip_hf.launch import end_processes


def evaluate(argv: list[str]) -> None:
    args = parse_eval_args(argv)
    if args.suite:
        run_suite(args)
    else:
        write_result(args, evaluate_model(args))
    end_processes()


def write_result(args, result: dict) -> None:
    """Print the summary line and write ``--output``, on the main process only (every process holds the same
    gathered result: one line, one writer)."""
    if not PartialState().is_main_process:
        return
    print(summary_line(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Run with ``argv`` (default: the command line); user errors exit with one line on stderr."""
    run_cli(evaluate, argv, prog=Path(__file__).name)


if __name__ == "__main__":
    main()
