"""Publish a training run on the Hugging Face Hub.

    python -m glip_hf.hub prepare RUN_DIR --out DIR [--flavour glip|clip] [--eval FILE.json ...] [--repo_id NAME]
    python -m glip_hf.hub push RUN_DIR --repo_id NAME [--flavour glip|clip] [--eval FILE.json ...] [--private]

``prepare`` builds, with no network, exactly the folder ``push`` uploads. ``--flavour glip`` (default) publishes the
GLIP model with its code (``trust_remote_code=True``), ``--flavour clip`` a plain CLIP checkpoint. A bad setting
stops with one line naming it (exit status 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse

from ..cli import run_cli
from .card import FLAVOURS
from .publish import DEFAULT_LICENSE, prepare_folder, push_run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="output directory of a finished run_pretraining.py run")
    parser.add_argument("--flavour", choices=FLAVOURS, default="glip", help="glip: model + code; clip: plain CLIP")
    parser.add_argument(
        "--eval", nargs="+", action="extend", default=[], metavar="FILE.json", help="run_eval.py --output results"
    )
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="license id for the card (default %(default)s)")
    parser.add_argument("--template", default=None, help="card template (default: glip_hf/hub/model_card.md)")
    parser.add_argument(
        "--trust_remote_code",
        nargs="?",
        const=True,
        default=False,
        type=_true_or_false,
        help="load a run's tokenizer that brings code of its own (auto_map), to check it; only if you trust it",
    )


def _true_or_false(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glip_hf.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build the folder an upload would send, offline")
    _common(prepare)
    prepare.add_argument("--out", required=True, help="folder to write")
    prepare.add_argument("--repo_id", default=None, help="Hub name the card's usage snippet loads")
    prepare.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    push = commands.add_parser("push", help="prepare the folder and upload it to a Hub model repository")
    _common(push)
    push.add_argument("--repo_id", required=True, help="Hub repository, e.g. your-name/glip-vit-b16")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--commit_message", default=None)
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    common = dict(
        flavour=args.flavour,
        eval_files=args.eval,
        license=args.license,
        template=args.template,
        trust_remote_code=args.trust_remote_code,
    )
    if args.command == "prepare":
        out = prepare_folder(args.run_dir, args.out, repo_id=args.repo_id, overwrite=args.overwrite, **common)
        print(f"Prepared {out} ({args.flavour} flavour); `python -m glip_hf.hub push {args.run_dir} ...` uploads it")
    else:
        url = push_run(args.run_dir, args.repo_id, private=args.private, commit_message=args.commit_message, **common)
        print(f"Pushed {args.run_dir} ({args.flavour} flavour) to {url}")


if __name__ == "__main__":
    run_cli(main, prog="python -m glip_hf.hub")
