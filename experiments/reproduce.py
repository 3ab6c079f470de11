"""Reproduce the GLIP paper in miniature: CLIP vs FLIP vs GLIP, same steps and same compute, then the report.

    python experiments/reproduce.py                   # the whole grid (about an hour on 2 CPU cores), then the report
    python experiments/reproduce.py --quick           # 2 tiny cells and their report, under experiments/runs/quick
    python experiments/reproduce.py --report_only     # rewrite docs/reproduction.md from the cells' JSON
    python experiments/reproduce.py --arms glip-75,flip-75 --jobs 1
    python experiments/reproduce.py --dataset_name DIR --eval_split test --class_names names.txt --templates t.txt

The grid is `experiments/grid.yaml`. Every flag this script does not know is a training flag (`run_pretraining.py
--help`) given to every cell, so the comparison reruns on any dataset the training CLI reads; zero-shot then needs
the held-out split (`--eval_split`) with a ClassLabel column or `--class_names`. Each finished cell leaves a JSON
under `docs/reproduction/cells/` and is skipped on a rerun while its settings are unchanged, so the grid can be built
up over several invocations. Model directories go to `--runs_dir` (git-ignored), never into docs/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `experiments` and `glip_hf` importable from the checkout
    sys.path.insert(0, str(ROOT))

from experiments.grid import (  # noqa: E402
    Cell,
    Grid,
    cell_spec,
    cell_worker,
    check_eval_data,
    code_version,
    is_finished,
    load_grid,
    parse_cell,
    same_compute_steps,
    stale_cells,
    train_step_flops,
)

DEFAULT_GRID = ROOT / "experiments" / "grid.yaml"
DEFAULT_REPORT = ROOT / "docs" / "reproduction.md"
QUICK_OUT = ROOT / "experiments" / "runs" / "quick"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    from glip_hf.cli import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--grid", default=str(DEFAULT_GRID), help="grid YAML")
    parser.add_argument("--quick", action="store_true", help="the grid's 2-cell tiny subset (CI)")
    parser.add_argument("--report", default=None, help="report path; its figures and cells/ go beside it in a folder")
    parser.add_argument("--runs_dir", default=None, help="model directories (default experiments/runs)")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to run (default: the grid's)")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    parser.add_argument("--report_only", action="store_true", help="write the report from the JSON already there")
    parser.add_argument("--class_names", default=None, help="zero-shot class names file (.txt lines or .json)")
    parser.add_argument("--templates", default=None, help="zero-shot prompt templates file, each with {}")
    parser.add_argument("--eval_caption_column", default=None, help="retrieval captions (default: the caption column)")
    return parser.parse_known_args(argv)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated integers; an empty value is an error, not the grid's seeds."""
    if not text.replace(",", "").strip():
        raise ValueError(f"--seeds {text!r} is empty: pass comma-separated integers (--seeds 0,1), or leave it out.")
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is invalid: expected comma-separated integers.") from None


def resolve_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """``(report, figures-and-cells folder, runs folder)``."""
    if args.report:
        report = Path(args.report)
    elif args.quick:
        report = QUICK_OUT / "reproduction.md"
    elif args.own_data:  # never over the committed built-in evidence
        report = ROOT / "experiments" / "runs" / "own-data" / "reproduction.md"
    else:
        report = DEFAULT_REPORT
    runs = Path(args.runs_dir) if args.runs_dir else (QUICK_OUT / "runs" if args.quick else ROOT / "experiments/runs")
    return report, report.with_suffix(""), runs


def check_cells_to_report(cells_dir: Path) -> None:
    """``--report_only`` needs finished cells: without any it would write an empty report over the existing one."""
    from experiments.report import load_results

    if not load_results(cells_dir):
        raise FileNotFoundError(
            f"--report_only: no finished cell JSON in {cells_dir}; run the grid first (the same command without "
            "--report_only), or point --report at the report whose cells/ folder holds them."
        )


def plan_steps(grid: Grid, cells: list[Cell], runs: Path) -> tuple[dict[str, int | None], dict[str, dict]]:
    """Masked-stage steps of each arm (None: the configured ones) and the counted FLOPs per step of each arm.

    Same-compute arms get the steps that spend the reference arm's counted FLOPs; FLOPs are counted once per
    distinct model (they depend on the shapes and the mask ratio only)."""
    counted: dict[tuple, int] = {}

    def flops(model_args, batch: int) -> int:
        key = (repr(sorted(vars(model_args).items())), batch)
        if key not in counted:
            counted[key] = train_step_flops(model_args, batch)
        return counted[key]

    def step_flops(cell: Cell, steps: int | None = None) -> dict[str, int]:
        model_args, _, training_args = parse_cell(grid, cell, runs / cell.name, steps)
        batch = training_args.per_device_train_batch_size
        unmasked = type(model_args)(**{**vars(model_args), "mask_ratio": 0.0})
        return {"masked": flops(model_args, batch), "unmasked": flops(unmasked, batch)}

    steps, per_arm = {}, {}
    for cell in cells:
        if cell.arm in per_arm:
            continue
        per_arm[cell.arm] = step_flops(cell)
        steps[cell.arm] = None
        if cell.budget == "same_compute":
            reference = grid.reference_cell()
            reference_steps = parse_cell(grid, reference, runs / reference.name)[2].max_steps
            reference_flops = step_flops(reference)["masked"]
            steps[cell.arm] = same_compute_steps(reference_steps, reference_flops, per_arm[cell.arm]["masked"])
    return steps, per_arm


def prepare_data(grid: Grid, cells: list[Cell], runs: Path) -> None:
    """Load (or generate) every distinct dataset once, here, so that cells running at once only read the cache."""
    from glip_hf.training import load_training_data

    seen = set()
    for cell in cells:
        model_args, data_args, _ = parse_cell(grid, cell, runs / cell.name)
        key = (repr(sorted(vars(data_args).items())), model_args.image_size)
        if key not in seen:
            seen.add(key)
            load_training_data(data_args, model_args)


def run_grid(grid: Grid, cells: list[Cell], cells_dir: Path, runs: Path, jobs: int, threads: int) -> list[str]:
    """Train the unfinished ``cells`` (``jobs`` at a time); returns the names of the cells that failed."""
    steps, flops = plan_steps(grid, cells, runs)
    todo = [c for c in cells if not is_finished(cells_dir / f"{c.name}.json", cell_spec(grid, c, steps[c.arm]))]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already finished; running {len(todo)}.", flush=True)
    _warn_stale(cells_dir, [c for c in cells if c not in todo])
    for arm, count in steps.items():
        if count is not None:
            print(f"  {arm}: {count} masked-stage steps for the counted FLOPs of {grid.reference}", flush=True)
    prepare_data(grid, todo, runs)
    failed = []
    arguments = [
        (grid, c, runs / c.name, cells_dir / f"{c.name}.json", steps[c.arm], flops[c.arm], threads) for c in todo
    ]
    if jobs <= 1:
        for args in arguments:
            _run_one(args, failed)
        return failed
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(cell_worker, *args): args[1].name for args in arguments}
        for future in concurrent.futures.as_completed(futures):
            _report_done(futures[future], future.exception(), failed)
    return failed


def _warn_stale(cells_dir: Path, finished: list[Cell]) -> None:
    """Say which finished cells were computed by other code: they are kept (their settings are unchanged), but their
    figures are that code's."""
    results = [json.loads((cells_dir / f"{c.name}.json").read_text()) for c in finished]
    stale = stale_cells(results, code_version())
    if stale:
        print(
            f"Warning: {len(stale)} finished cell(s) were computed by other code than this checkout's "
            f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}): kept, but their figures are that code's; "
            f"delete their JSON in {cells_dir} to recompute them.",
            flush=True,
        )


def _run_one(args: tuple, failed: list[str]) -> None:
    try:
        cell_worker(*args)
        _report_done(args[1].name, None, failed)
    except Exception as error:  # one failed cell does not stop the grid; its log says why
        _report_done(args[1].name, error, failed)


def _report_done(name: str, error: BaseException | None, failed: list[str]) -> None:
    stamp = time.strftime("%H:%M:%S")
    if error is None:
        print(f"[{stamp}] done {name}", flush=True)
    else:
        failed.append(name)
        print(f"[{stamp}] FAILED {name}: {type(error).__name__}: {error}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    args.own_data = any(flag.split("=")[0] == "--dataset_name" for flag in passthrough)
    grid = load_grid(args.grid, quick=args.quick)
    grid.passthrough = passthrough
    for name in ("class_names", "templates"):
        if getattr(args, name):
            setattr(grid.eval, name, str(Path(getattr(args, name)).resolve()))
    grid.eval.caption_column = args.eval_caption_column or grid.eval.caption_column
    if args.seeds is not None:
        grid.seeds = parse_seeds(args.seeds)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} is invalid: expected >= 1.")
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads} is invalid: expected >= 1.")
    report, folder, runs = resolve_paths(args)
    if args.report_only:
        check_cells_to_report(folder / "cells")
    cells = grid.cells()
    if args.arms:
        wanted = set(args.arms.split(","))
        unknown = wanted - set(grid.arms)
        if unknown:
            raise ValueError(f"--arms: unknown arm(s) {sorted(unknown)}; the grid has {list(grid.arms)}.")
        cells = [c for c in cells if c.arm in wanted]
    failed = []
    if not args.report_only:
        data_args = parse_cell(grid, cells[0], runs / cells[0].name)[1]  # a bad flag stops here, before any run
        if data_args.dataset_name is not None:  # synthetic_* settings (the centre-agnostic arms) mean nothing there
            synthetic = sorted({c.arm for c in cells if any(k.startswith("synthetic_") for k in c.overrides)})
            if synthetic:
                print(f"--dataset_name given: skipping the built-in-data arms {synthetic}.", flush=True)
            cells = [c for c in cells if c.arm not in synthetic]
            if not cells:
                raise ValueError("--arms: these arms need the built-in data; drop --dataset_name or pick others.")
            check_eval_data(runs / cells[0].name, data_args, grid.eval)  # before any cell trains
        failed = run_grid(grid, cells, folder / "cells", runs, args.jobs, args.threads)
    from experiments.report import load_results, write_report

    failures = f"; failed cells: {', '.join(failed)} (see {runs}/<cell>.log)" if failed else ""
    if not load_results(folder / "cells"):  # every cell failed: an earlier report is worth more than a placeholder
        print(f"No finished cell in {folder / 'cells'}: {report} left as it was{failures}")
        return 1 if failed else 0
    write_report(folder / "cells", report, grid, quick=args.quick)
    print(f"Wrote {report}{failures}")
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` as a script: a user error (bad flag, missing file) is one line on stderr and exit status 2."""
    from glip_hf.cli import run_cli

    status: list[int] = []
    run_cli(lambda args: status.append(main(args)), argv, prog="reproduce.py")
    return status[0] if status else 0


if __name__ == "__main__":
    sys.exit(cli())
