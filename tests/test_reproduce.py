"""The reproduction runner (`experiments/reproduce.py --quick`): real training and evaluation of two tiny cells, the
report written from their JSON, finished cells skipped on a rerun, counted FLOPs and the same-compute budget."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "experiments" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts the checkout on sys.path, so `experiments.*` import
    return module


reproduce = _load_reproduce()
from experiments.grid import (  # noqa: E402
    cell_spec,
    code_version,
    is_finished,
    load_grid,
    same_compute_steps,
    train_step_flops,
)


def _quick(tmp_path, *extra: str) -> list[str]:
    return [
        "--quick",
        "--jobs",
        "1",
        "--report",
        str(tmp_path / "reproduction.md"),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--cache_dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def test_quick_grid_writes_cells_and_report_and_skips_finished_cells(tmp_path, capsys):
    assert reproduce.main(_quick(tmp_path)) == 0
    cells = tmp_path / "reproduction" / "cells"
    results = {p.stem: json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))}
    assert sorted(results) == ["flip-75-seed0", "glip-75-seed0"]
    for result in results.values():
        assert result["complete"] and result["steps"] == 6 and result["tuning_steps"] == 2
        assert result["images_seen"] == 6 * 32
        assert result["train_flops"] == 6 * result["flops_per_step"] > 0
        for column in ("masked", "unmasked", "tuned"):
            for metric in ("zeroshot_top1", "retrieval_r1"):
                value = result["eval"][column][metric]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (column, metric, value)
        steps = [step for step, _ in result["loss_curve"]]
        assert steps == [2, 4, 6, 8]  # logged every 2 steps: 6 masked, then 2 unmasked-tuning steps
        assert all(math.isfinite(loss) for _, loss in result["loss_curve"])
        assert result["train_seconds"] > 0 and result["images_per_s"] > 0
        # masked inference really masked (its mask draws have a spread); the unmasked columns had no draws
        assert "zeroshot_top1_draw_std" in result["eval"]["masked"]
        assert "zeroshot_top1_draw_std" not in result["eval"]["unmasked"] | result["eval"]["tuned"]
    flip, glip = results["flip-75-seed0"], results["glip-75-seed0"]
    assert (flip["mask_strategy"], glip["mask_strategy"], glip["mask_sigma"]) == ("random", "gaussian", 0.2)
    assert flip["flops_per_step"] == glip["flops_per_step"]  # same kept-token count, same counted FLOPs
    report = (tmp_path / "reproduction.md").read_text()
    assert "| FLIP | 75% | – | 1 |" in report and "| GLIP | 75% | 0.2 | 1 |" in report
    for figure in ("accuracy_vs_ratio", "accuracy_vs_cost", "loss_curves", "masks"):
        assert (tmp_path / "reproduction" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"reproduction/{figure}.png" in report

    # Each cell records the code that computed it, and the report says whether that is the code beside it.
    assert {result["code"]["sources"] for result in results.values()} == {code_version()["sources"]}
    assert "Code that computed the cells: commit " in report and "were not computed by" not in report

    # A cell computed by other code (here: one that recorded none) is kept, and said to be stale, by the run and in
    # the report: its figures need not be this code's.
    stale = cells / "flip-75-seed0.json"
    stale.write_text(json.dumps({**results["flip-75-seed0"], "code": {"sources": "0" * 12, "commit": "abc1234"}}))
    before = {path.name: path.read_bytes() for path in cells.glob("*.json")}
    capsys.readouterr()
    assert reproduce.main(_quick(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 cells already finished; running 0." in printed
    assert "Warning: 1 finished cell(s) were computed by other code than this checkout's (flip-75-seed0)" in printed
    assert {path.name: path.read_bytes() for path in cells.glob("*.json")} == before
    report = (tmp_path / "reproduction.md").read_text()
    assert "commit abc1234 (1 cells)" in report and "1 of 2 cells were not computed by the sources beside" in report

    # A cell whose settings changed is not finished any more.
    grid = load_grid(reproduce.DEFAULT_GRID, quick=True)
    grid.passthrough = ["--cache_dir", str(tmp_path / "cache")]
    cell = grid.cells()[0]
    assert is_finished(cells / f"{cell.name}.json", cell_spec(grid, cell, None))
    grid.passthrough += ["--learning_rate", "0.001"]
    assert not is_finished(cells / f"{cell.name}.json", cell_spec(grid, cell, None))


def test_counted_flops_and_same_compute_steps(tmp_path):
    grid = load_grid(reproduce.DEFAULT_GRID, quick=True)
    cell = grid.cells()[0]
    from experiments.grid import parse_cell

    model_args = parse_cell(grid, cell, tmp_path / "run")[0]
    masked = train_step_flops(model_args, 4)
    assert masked == train_step_flops(model_args, 4)  # counted, not timed: the same every time
    model_args.mask_ratio = 0.0
    unmasked = train_step_flops(model_args, 4)
    assert 0 < masked < unmasked
    assert train_step_flops(model_args, 8) == pytest.approx(2 * unmasked, rel=0.01)  # linear in the batch
    assert same_compute_steps(100, unmasked, masked) == round(100 * unmasked / masked) > 100
    assert same_compute_steps(100, 10, 10) == 100


def test_bad_training_flag_stops_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown argument"):
        reproduce.main(_quick(tmp_path, "--not_a_flag", "1"))
    assert not (tmp_path / "runs").exists()


def test_own_dataset_needs_its_held_out_split(tmp_path):
    from experiments.grid import EvalSettings, _eval_args
    from glip_hf.arguments import DataArguments

    data = DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path), caption_column="text")
    with pytest.raises(ValueError, match="eval_split=None is invalid.*--eval_split"):
        _eval_args(tmp_path, data, EvalSettings(), "zeroshot_classification", {}, 0)
    data.eval_split = "validation"
    args = _eval_args(tmp_path, data, EvalSettings(templates="t.txt"), "retrieval", {"mask_ratio": 0.5}, 1)
    assert (args.dataset, args.split, args.caption_column, args.templates) == (
        "imagefolder",
        "validation",
        "text",
        "t.txt",
    )
    assert (args.mask_ratio, args.seed, args.data_dir) == (0.5, 1, str(tmp_path))


def test_half_finished_cell_is_not_finished(tmp_path):
    grid = load_grid(reproduce.DEFAULT_GRID, quick=True)
    cell = grid.cells()[0]
    spec = json.loads(json.dumps(cell_spec(grid, cell, None)))
    path = tmp_path / "cell.json"
    whole = json.dumps({"schema": 1, "spec": spec, "complete": True})
    path.write_text(whole)
    assert is_finished(path, cell_spec(grid, cell, None))
    path.write_text(whole[: len(whole) // 2])  # cut short
    assert not is_finished(path, cell_spec(grid, cell, None))
    path.write_text(json.dumps({"schema": 1, "spec": spec, "complete": False}))
    assert not is_finished(path, cell_spec(grid, cell, None))


def test_own_dataset_skips_the_built_in_data_arms(tmp_path):
    argv = ["--arms", "flip-75-uniform,glip-75-uniform", "--runs_dir", str(tmp_path / "runs")]
    argv += ["--report", str(tmp_path / "r.md"), "--dataset_name", "imagefolder", "--data_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="need the built-in data"):
        reproduce.main([*argv, "--eval_split", "test"])
    assert not (tmp_path / "runs").exists()


def test_unknown_arm_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # it exited 1 with a bare message
        reproduce.cli(_quick(tmp_path, "--arms", "nope"))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reproduce.py: error: --arms: unknown arm(s) ['nope']"), lines


def test_a_grid_whose_cells_all_fail_keeps_the_earlier_report(tmp_path, monkeypatch, capsys):
    """Every cell failing wrote the "No finished cell yet" placeholder over the report. (The cells' failure is
    simulated: what is tested is what the runner writes afterwards.)"""
    report = tmp_path / "reproduction.md"
    report.write_text("# Reproduction\n\nthe earlier grid's report\n")
    monkeypatch.setattr(reproduce, "run_grid", lambda grid, cells, *rest: [c.name for c in cells])
    assert reproduce.main(_quick(tmp_path)) == 1
    assert report.read_text() == "# Reproduction\n\nthe earlier grid's report\n"
    assert "left as it was; failed cells:" in capsys.readouterr().out


def _own_imagefolder(root: Path) -> Path:
    """A tiny imagefolder (train + test) whose label column is a plain integer, not a ClassLabel."""
    from PIL import Image

    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as f:
            for i in range(4):
                Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / split / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "caption": f"shade {i}", "label": i}) + "\n")
    return root


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "eval_split=None is invalid"),
        (("--eval_split", "test"), "not a ClassLabel.*--class_names"),
        (("--eval_split", "nope"), "nope"),
    ],
)
def test_own_dataset_eval_problems_stop_before_any_training(tmp_path, extra, message):
    # a grid of own data used to train every cell and fail each at its evaluation (45 cells: about an hour wasted)
    data = _own_imagefolder(tmp_path / "data")
    argv = _quick(tmp_path, "--dataset_name", "imagefolder", "--data_dir", str(data), *extra)
    with pytest.raises(Exception, match=message):
        reproduce.main(argv)
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_below_one_is_an_error(tmp_path, jobs):
    # --jobs 0 / -1 were taken silently (one cell at a time)
    with pytest.raises(ValueError, match="--jobs"):
        reproduce.main(_quick(tmp_path, "--jobs", jobs))
    assert not (tmp_path / "runs").exists()


def test_own_data_report_says_nothing_about_the_built_in_captions(tmp_path):
    # the own-data report said "The built-in captions repeat ... about 8 such images per description in 600"
    data = _own_imagefolder(tmp_path / "data")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"shade {i}\n" for i in range(4)))
    argv = _quick(tmp_path, "--dataset_name", "imagefolder", "--data_dir", str(data), "--eval_split", "test")
    assert reproduce.main([*argv, "--class_names", str(names), "--per_device_train_batch_size", "2"]) == 0
    report = (tmp_path / "reproduction.md").read_text()
    assert "imagefolder" in report and "built-in captions" not in report


def test_bad_flag_is_one_line_without_the_usage_block(capsys):
    # argparse printed its multi-line usage block above the message
    with pytest.raises(SystemExit) as stopped:
        reproduce.parse_args(["--jobs", "x"])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "--jobs" in lines[0], lines
    with pytest.raises(SystemExit) as stopped:
        reproduce.parse_args(["--help"])
    assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("seeds", ["", " ", ",", " , "])
def test_empty_seeds_is_a_one_line_error(tmp_path, capsys, seeds):
    # --seeds '' fell back to the grid's seeds silently
    report = tmp_path / "reproduction.md"
    with pytest.raises(SystemExit) as stopped:
        reproduce.cli(["--seeds", seeds, "--report_only", "--report", str(report)])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--seeds" in lines[0] and "comma-separated integers (--seeds 0,1)" in lines[0], lines
    assert not report.exists()


@pytest.mark.parametrize("flag", ["--report", None])
def test_report_only_without_cells_is_an_error_and_keeps_the_report(tmp_path, monkeypatch, capsys, flag):
    # --report_only with no cell JSON overwrote the report (docs/reproduction.md by default) with an empty one
    report = tmp_path / "docs" / "reproduction.md"
    report.parent.mkdir()
    report.write_text("# Reproduction\n\nthe finished grid's report\n")
    cells = tmp_path / "docs" / "reproduction" / "cells"
    cells.mkdir(parents=True)
    (cells / "glip-75-seed0.json").write_text(json.dumps({"schema": 1, "complete": False}))  # still training
    monkeypatch.setattr(reproduce, "DEFAULT_REPORT", report)
    with pytest.raises(SystemExit) as stopped:
        reproduce.cli(["--report_only", *([flag, str(report)] if flag else [])])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--report_only" in lines[0] and str(cells) in lines[0], lines
    assert "without --report_only" in lines[0]
    assert report.read_text() == "# Reproduction\n\nthe finished grid's report\n"


def test_a_logging_window_without_a_loss_is_kept_in_the_cell(tmp_path):
    """metrics.jsonl writes null for a window whose every step was skipped: the cell's record crashed on it."""
    from experiments.grid import _training_record
    from glip_hf.tracking import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 2.0, "stage": "masked", "images_per_s": 10.0})
    log.write({"step": 2, "loss": float("nan"), "stage": "masked", "images_per_s": 10.0})
    assert _training_record(tmp_path, 8, 2)["loss_curve"] == [[1, 2.0], [2, None]]
