"""benchmarks/throughput.py: its FLOP count, the masked path's compilability, and a CPU smoke run of every code
path on both implementations (figures are not checked: no timing asserts)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, open_clip_python

from glip_hf import GLIPConfig, GLIPModel, masked_inference

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402


@pytest.mark.parametrize(
    "ratio, batch, img_s, mfu",
    # Reference rows of the speed issue (one H200, 790 TFLOP/s): the same FLOP count gives the same MFU.
    [(0.0, 256, 1914, 0.299), (0.75, 1024, 4730, 0.265), (0.918, 1024, 6552, 0.226), (0.5, 256, 2835, 0.252)],
)
def test_model_flops_match_the_reference_mfu(ratio, batch, img_s, mfu):
    step_seconds = batch / img_s
    measured = throughput.model_flops(throughput.VITB16, ratio, batch) / step_seconds / 790e12
    assert measured == pytest.approx(mfu, abs=0.0015)


def test_kept_patches_match_open_clip_patch_dropout():
    # open_clip keeps max(1, int(N * (1 - p))) tokens: both sides must run on as many tokens for a fair comparison.
    from glip_hf.masking import num_kept_patches

    for ratio in (0.5, 0.75, 0.918, 0.99):
        assert throughput.kept_patches(196, ratio) == num_kept_patches(196, ratio)


def _small_model(mask_ratio: float) -> GLIPModel:
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    vision.update(patch_size=8, mask_ratio=mask_ratio)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
    text.update(max_position_embeddings=16, bos_token_id=0, eos_token_id=99, pad_token_id=99)
    config = GLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    config._attn_implementation = "sdpa"
    return GLIPModel(config).train()


def test_masked_forward_compiles_in_one_graph():
    """torch.compile sees the whole masked step (mask sampling, gather, both towers) as one graph: no break."""
    model = _small_model(0.75)
    ids = torch.randint(2, 98, (4, 16))
    ids[:, -1] = 99
    inputs = dict(input_ids=ids, pixel_values=torch.randn(4, 3, 32, 32), attention_mask=torch.ones_like(ids))
    explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with masked_inference(model, mask_ratio=0.5):  # the benchmark switches ratios this way
        explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _smoke(python, tmp_path, impls: str) -> list[dict]:
    out = tmp_path / f"{impls}.json"
    command = [str(python), str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--tiny"]
    command += ["--impls", impls, "--modes", "eager", "--ratios", "0,0.75", "--steps", "2", "--warmup", "1"]
    command += ["--levers", "--out", str(out), "--profile", str(tmp_path / "profiles")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["environment"]["device"].startswith("cpu")
    assert "| impl |" in result.stdout  # the table is printed last
    rows = payload["rows"]
    assert all(not row["error"] for row in rows), [row["error"] for row in rows]
    for row in rows:
        assert row["img_s"] > 0 and row["step_ms"] > 0 and 0 < row["mfu"] < 1
        assert 0 < row["host_ms"] <= row["step_ms"]  # each step is issued before it is waited for
        table = (tmp_path / "profiles" / f"{throughput.profile_name(throughput.Row(**row))}.txt").read_text()
        assert "aten::mm" in table and "Self CPU" in table, table[:500]
    masked = [row for row in rows if row["impl"] == "glip" and row["ratio"] > 0]
    assert masked and all(0 < row["mask_share"] < 1 for row in masked)
    levers = {row["lever"] for row in rows if row["lever"]}
    assert levers == set(throughput.LEVERS)
    return rows


def test_busy_time_is_the_union_of_the_intervals():
    """The device-busy time of a profile counts overlapping kernels once and the gaps between them not at all."""
    assert throughput.busy_microseconds([]) == 0
    assert throughput.busy_microseconds([(0, 10), (20, 25)]) == 15
    assert throughput.busy_microseconds([(20, 25), (0, 10), (5, 12), (6, 8)]) == 17  # unsorted, nested, overlapping
    assert throughput.busy_microseconds([(0, 10), (10, 20)]) == 20


def test_busy_time_counts_what_ran_on_the_device_not_the_annotated_ranges():
    """torch.profiler also puts each ``record_function`` range (``Optimizer.step``, a compiled graph's call) on the
    device's timeline, from its first kernel to its last: counted, it would fill the gaps between the kernels."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(start: float, end: float, device: DeviceType, annotation: bool = False) -> FunctionEvent:
        return FunctionEvent(0, "e", 0, start, end, device_type=device, is_user_annotation=annotation)

    kernels = [event(0, 10, DeviceType.CUDA), event(90, 100, DeviceType.CUDA)]
    others = [event(0, 100, DeviceType.CUDA, annotation=True), event(0, 100, DeviceType.CPU)]
    assert throughput.device_intervals(kernels + others) == [(0, 10), (90, 100)]


def test_cpu_smoke_run_of_both_implementations(tmp_path):
    """Both sides in one process, as on the GPU: open_clip imports torchvision, so this runs in the open_clip
    environment (torch 2.14.1 + torchvision 0.29.1, the project installed beside)."""
    rows = _smoke(open_clip_python(), tmp_path, "glip,open_clip")
    grid = [row for row in rows if not row["lever"]]
    assert {(row["impl"], row["ratio"]) for row in grid} == {
        (impl, ratio) for impl in ("glip", "open_clip") for ratio in (0.0, 0.75)
    }
    assert all(row["vs_open_clip"] > 0 for row in grid if row["impl"] == "glip")


def test_open_clip_missing_is_said_not_fatal(tmp_path):
    """Where open_clip does not import (the project's CPU torch), the GLIP side still runs and says so."""
    try:
        import open_clip  # noqa: F401

        pytest.skip("open_clip imports in this environment")
    except Exception:
        pass
    out = tmp_path / "glip.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--tiny", "--ratios"]
    command += ["0.5", "--modes", "eager", "--steps", "1", "--warmup", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "open_clip side left out" in result.stderr
    assert {row["impl"] for row in json.loads(out.read_text())["rows"]} == {"glip"}


def test_bad_flags_are_one_line_errors(capsys):
    for flags, field in ((["--impls", "timm"], "--impls"), (["--ratios", "1.0"], "--ratios")):
        with pytest.raises(SystemExit) as stopped:
            throughput.parse_args(["--device", "cpu", "--tiny", *flags])
        assert stopped.value.code == 2
        assert field in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--batches", "0"], "--batches"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "-1"], "--warmup"),
        (["--lever_ratio", "2"], "--lever_ratio"),
        (["--lever_batch", "0"], "--lever_batch"),
        (["--max_batch_limit", "0"], "--max_batch_limit"),
        (["--max_batch", "--batches", "8", "--max_batch_limit", "12"], "--max_batch_limit: 12 leaves no batch"),
        (["--max_batch_step", "0"], "--max_batch_step"),
        (["--peak_tflops", "-1"], "--peak_tflops"),
        (["--overhead"], "--overhead"),  # with --tiny: two sets of tower sizes
    ],
)
def test_out_of_range_numbers_are_one_line_errors(capsys, flags, field):
    # these ran to the end: rows of 0 img/s, StatisticsError cells, negative MFU, all with exit status 0
    with pytest.raises(SystemExit) as stopped:
        throughput.parse_args(["--device", "cpu", "--tiny", *flags])
    assert stopped.value.code == 2
    assert field in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_flag_is_one_line_without_the_usage_block(capsys):
    # argparse printed its multi-line usage block above the message
    for flags in (["--impls", "timm"], ["--steps", "x"]):  # the script's own check, and argparse's
        with pytest.raises(SystemExit) as stopped:
            throughput.parse_args(["--device", "cpu", "--tiny", *flags])
        assert stopped.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and ": error: " in lines[0] and flags[0] in lines[0], lines
    with pytest.raises(SystemExit) as stopped:
        throughput.parse_args(["--help"])
    assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_benchmark_command_lines_need_no_datasets():
    # throughput.py runs in the open_clip environment, which has torch, transformers and accelerate, not datasets
    code = (
        "import sys; sys.modules['datasets'] = None; sys.path.insert(0, 'benchmarks'); "
        "import throughput, data_pipeline; throughput.parse_args(['--device', 'cpu', '--tiny']); "
        "data_pipeline.parse_args(['--quick'])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_unwritable_out_stops_before_the_benchmark(capsys, tmp_path):
    # a missing --out folder used to surface as a FileNotFoundError traceback after the whole run
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stopped:
        throughput.parse_args(["--device", "cpu", "--tiny", "--out", str(blocker / "x.json")])
    assert stopped.value.code == 2
    assert "--out" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "script, flags",
    [(script, ["--out", out]) for script in ("throughput", "activation_memory", "op_count") for out in ("FOLDER", "")]
    + [("throughput", ["--profile", ""])],
)
def test_out_or_profile_that_names_no_path_stops_before_the_benchmark(capsys, tmp_path, flags, script):
    # --out naming a folder (or "", read as ".") was an IsADirectoryError traceback after the whole run, in each of the
    # three scripts; --profile "" (an unset shell variable) wrote throughput's tables into the current directory
    flags = [flag.replace("FOLDER", str(tmp_path)) for flag in flags]
    module = __import__(script)
    parse = module.parse_args if script != "op_count" else module.main  # op_count parses inside main, first
    with pytest.raises(SystemExit) as stopped:
        parse(["--device", "cpu", "--tiny", *flags] if script != "activation_memory" else ["--device", "cpu", *flags])
    assert stopped.value.code == 2
    assert flags[0] in capsys.readouterr().err.strip().splitlines()[-1]


def test_activation_memory_counts_both_implementations(tmp_path):
    """benchmarks/activation_memory.py on tiny towers, both sides in one process (the open_clip environment): every
    variant measured at every ratio, fewer bytes per image as the ratio rises, and the lean MLP below the plain."""
    out = tmp_path / "memory.json"
    command = [str(open_clip_python()), str(ROOT / "benchmarks" / "activation_memory.py"), "--tiny"]
    command += ["--ratios", "0,0.75", "--breakdown", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["impl"], row["ratio"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(v, r) for v in ("glip", "glip+lean", "open_clip") for r in (0.0, 0.75)}
    assert not any(row["error"] for row in rows.values()), [row["error"] for row in rows.values()]
    for variant in ("glip", "glip+lean", "open_clip"):
        assert 0 < rows[variant, 0.75]["per_image_mib"] < rows[variant, 0.0]["per_image_mib"]
    for ratio in (0.0, 0.75):
        assert rows["glip+lean", ratio]["per_image_mib"] < rows["glip", ratio]["per_image_mib"]
        assert rows["glip", ratio]["vs_open_clip"] > 0
    breakdown = rows["glip", 0.75]["breakdown"]  # attributed to layers, layer numbers folded
    assert any(".layers.*.mlp" in name for name in breakdown) and not rows["glip", 0.0]["breakdown"]


def test_activation_memory_bad_flags_are_one_line(capsys):
    import activation_memory

    with pytest.raises(SystemExit) as stopped:
        activation_memory.parse_args(["--batches", "4,2"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batches" in err[0]


def test_compile_mode_is_checked_and_labels_its_rows(capsys):
    args = throughput.parse_args(["--device", "cpu", "--tiny", "--compile_mode", "reduce-overhead"])
    assert args.compile_mode == "reduce-overhead"
    assert throughput.mode_label("compile", args.compile_mode) == "compile/reduce-overhead"
    assert throughput.mode_label("compile", "default") == throughput.mode_label("compile", None) == "compile"
    assert throughput.mode_label("eager", "reduce-overhead") == "eager"  # eager rows are eager whatever the mode
    with pytest.raises(SystemExit) as stopped:
        throughput.parse_args(["--device", "cpu", "--tiny", "--compile_mode", "fast"])
    assert stopped.value.code == 2 and "--compile_mode" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ratios", ""], "--ratios: empty"),
        (["--variants", ","], "--variants: empty"),
        (["--breakdown", "--breakdown_ratio", "0.3"], "--breakdown_ratio 0.3 is not one of --ratios"),
        (["--batches", "a,b"], "invalid comma-separated int value: 'a,b'"),
    ],
)
def test_activation_memory_nothing_to_measure_is_a_one_line_error(capsys, flags, message):
    """An empty list ran the whole script (building ViT-B/16) to print an empty table; a breakdown ratio not
    measured printed no breakdown; both say so now."""
    import activation_memory

    with pytest.raises(SystemExit) as stopped:
        activation_memory.parse_args(flags)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_activation_memory_breakdown_needs_eager_models(capsys):
    import activation_memory

    with pytest.raises(SystemExit) as stopped:
        activation_memory.parse_args(["--compile", "--breakdown"])
    assert stopped.value.code == 2
    assert "--breakdown" in capsys.readouterr().err.strip().splitlines()[-1]


def test_lever_modes_are_checked(capsys):
    assert throughput.parse_args(["--device", "cpu", "--tiny", "--lever_modes", "eager,compile"]).lever_modes == [
        "eager",
        "compile",
    ]
    for modes in ("jit", ",", "eager,eager"):  # unknown, none (no lever row would run), repeated
        with pytest.raises(SystemExit) as stopped:
            throughput.parse_args(["--device", "cpu", "--tiny", "--levers", "--lever_modes", modes])
        assert stopped.value.code == 2 and "--lever_modes" in capsys.readouterr().err


def test_patch_embedding_benchmark_runs_and_checks_its_flags(capsys):
    import patch_embedding

    patch_embedding.main(["--batch", "2", "--repeats", "1", "--ratios", "0.75,0.918", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["ratio"] for row in rows] == [0.75, 0.918] and all(row["ms"] > 0 for row in rows)
    for flags in (["--ratios", "0"], ["--ratios", "x"], ["--ratios", ","], ["--batch", "0"]):
        with pytest.raises(SystemExit) as stopped:
            patch_embedding.main(flags)
        assert stopped.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--impls", "--modes", "--ratios", "--batches"])
@pytest.mark.parametrize("value", [",", "REPEAT"])
def test_empty_or_repeated_lists_are_one_line_errors(capsys, flag, value):
    # `--modes ,` ran nothing and printed an empty table; `--ratios 0.5,0.5` timed every row twice
    repeated = {"--impls": "glip,glip", "--modes": "eager,eager", "--ratios": "0.5,0.5", "--batches": "8,8"}
    with pytest.raises(SystemExit) as stopped:
        throughput.parse_args(["--device", "cpu", "--tiny", flag, repeated[flag] if value == "REPEAT" else value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_op_count_without_open_clip_counts_glip_and_says_so(tmp_path, capsys):
    """Where open_clip does not import, op_count.py counts the GLIP side and says so (it ended in a traceback);
    asking for open_clip alone is a one-line error with exit 2."""
    try:
        import open_clip  # noqa: F401

        pytest.skip("open_clip imports in this environment")
    except Exception:
        pass
    import op_count
    from accelerate.state import AcceleratorState

    # op_count builds its own bf16 Accelerator in this process: not one an earlier test left (test order)
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = op_count.main(["--tiny", "--ratios", "0.5", "--out", str(tmp_path / "ops.json")])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert {r["impl"] for r in rows} == {"glip"}
    assert "open_clip side left out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        op_count.main(["--tiny", "--ratios", "0.5", "--impls", "open_clip"])
    assert stop.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2  # the 'left out' line and the error


@pytest.mark.parametrize(
    "script, flags",
    [
        ("op_count", ["--ratios", "0.5,0.5"]),
        ("op_count", ["--impls", "glip,glip"]),
        ("activation_memory", ["--ratios", "0.5,0.5"]),
        ("activation_memory", ["--variants", "glip,glip"]),
        ("patch_embedding", ["--ratios", "0.5,0.5"]),
    ],
)
def test_repeated_values_are_one_line_errors_in_every_benchmark(capsys, script, flags):
    """As throughput.py: a repeated ratio or implementation measured its rows twice; now exit 2, one line."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--tiny", *flags] if script != "patch_embedding" else flags)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0]


def test_op_count_counts_both_implementations(tmp_path):
    """benchmarks/op_count.py on tiny towers in the open_clip environment: both sides, forward and backward counted,
    views among them, and the same count at every masked ratio (k changes shapes, not the operators)."""
    out = tmp_path / "ops.json"
    command = [str(open_clip_python()), str(ROOT / "benchmarks" / "op_count.py"), "--tiny", "--ratios", "0.5,0.75"]
    result = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["ratio"]) for r in rows} == {(i, q) for i in ("glip", "open_clip") for q in (0.5, 0.75)}
    for r in rows:
        for half in ("forward", "backward"):
            assert 0 < r[half]["not_views"] < r[half]["all"]
    for impl in ("glip", "open_clip"):
        half, three_quarters = (r for r in rows if r["impl"] == impl)
        assert half["forward"] == three_quarters["forward"] and half["backward"] == three_quarters["backward"]


def _gpu_machine_env(tmp_path) -> dict[str, str]:
    """An environment where ``python3`` is this interpreter without its site hooks (``-S``: the editable install of
    glip_hf is not seen), its packages on PYTHONPATH, as on the GPU machine."""
    import site

    if (ROOT / ".whl").exists():
        pytest.skip(".whl/ exists in this checkout: the script would install it")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
        "H200_SITE": str(tmp_path / "site"),
    }


def test_h200_script_runs_where_glip_hf_is_not_installed(tmp_path):
    """benchmarks/h200.sh as on the GPU machine, where glip_hf is not installed and .whl/ may be absent: it used to
    leave PYTHONPATH unset without wheels, so throughput.py stopped at `import glip_hf`. Here `python3` is this
    interpreter without its site hooks (`-S`: the editable install of glip_hf is not seen), its packages on
    PYTHONPATH."""
    env = _gpu_machine_env(tmp_path)
    check = subprocess.run(["python3", "-c", "import glip_hf"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert check.returncode != 0, "glip_hf imports without the repository on the path: the test shows nothing"
    out = tmp_path / "run one"
    flags = ["--device", "cpu", "--tiny", "--impls", "glip", "--modes", "eager", "--ratios", "0.5", "--steps", "1"]
    command = ["bash", "benchmarks/h200.sh", str(out), *flags, "--warmup", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    assert [(row["impl"], row["ratio"], row["error"]) for row in rows] == [("glip", 0.5, "")]


def test_max_batch_narrows_down_between_what_fits_and_what_runs_out(monkeypatch):
    """--max_batch doubled only, so GLIP and open_clip both read "2048" between 2048 and 4096 fitting; a first
    doubling that ran out of memory gave no row at all. The card's memory is stood in for by a limit on the batch
    (this machine has no card to fill): a step above 40 images raises torch's out-of-memory error."""
    timed = []
    real = throughput.time_steps

    def time_steps(variant, row, *rest):
        timed.append(row.batch)
        if row.batch > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(variant, row, *rest)

    monkeypatch.setattr(throughput, "time_steps", time_steps)
    rows = []
    args = throughput.parse_args(["--device", "cpu", "--tiny", "--impls", "glip", "--ratios", "0.5", "--steps", "1"])
    args.max_batch_step = 4
    throughput.run_max_batch(args, throughput.TINY, throughput.Setup("cpu", bf16=False), rows.append)
    assert timed == [16, 32, 64, 48, 40, 44]
    (row,) = rows
    assert (row.batch, row.error, row.lever) == (40, "", "max_batch") and row.img_s > 0
    assert row.extra["max_batch"] == "the next tried, 44, ran out of memory"

    rows.clear()
    args.batches = [64]  # nothing above the start fits: said, not silent
    throughput.run_max_batch(args, throughput.TINY, throughput.Setup("cpu", bf16=False), rows.append)
    (row,) = rows
    assert row.batch == 68 and "out of memory at batch 68: none above 64" in row.error  # 128, 96, 80, 72, 68


def test_the_one_call_gpu_run_writes_each_stage_into_the_folder_that_comes_back(tmp_path):
    """benchmarks/h200_run.sh, every stage at tiny sizes on this CPU (eager only; H200_EXTRA's flags come last and
    win): each stage's JSON lands in OUT as its rows are measured, three stages are packed, nothing else is written
    there (eight files at most come back from a call)."""
    env = {**_gpu_machine_env(tmp_path), "H200_WORK": str(tmp_path / "work")}
    tiny = "--device cpu --tiny --impls glip --batches 8 --lever_batch 8 --modes eager --lever_modes eager"
    env["H200_EXTRA"] = f"{tiny} --steps 1 --warmup 0 --max_batch_limit 16 --max_batch_step 8"
    out = tmp_path / "out"
    command = ["bash", "benchmarks/h200_run.sh", str(out), "3000"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = ("diag", "main", "lean", "grid", "maxbatch")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.json" for s in stages] + ["diag.tgz", "grid.tgz", "main.tgz"]
    )
    rows = {s: json.loads((out / f"{s}.json").read_text())["rows"] for s in stages}
    assert all(not r["error"] for stage in rows.values() for r in stage), rows
    assert {(r["ratio"], r["lever"]) for r in rows["diag"]} == {(0.75, ""), (0.918, "")}
    assert [r["lever"] for r in rows["lean"]] == ["lean_activations"]
    assert {r["ratio"] for r in rows["grid"]} == {0.918, 0.5, 0.0}
    assert [(r["lever"], r["batch"]) for r in rows["maxbatch"]] == [("max_batch", 16)]
    assert (tmp_path / "work" / "diag" / "activation_memory.log").is_file()  # counted once: the first stage
    assert not (tmp_path / "work" / "main" / "activation_memory.log").exists()


def test_the_one_call_gpu_run_skips_what_its_deadline_leaves_no_time_for(tmp_path):
    env = {**_gpu_machine_env(tmp_path), "H200_WORK": str(tmp_path / "work")}
    result = subprocess.run(
        ["bash", "benchmarks/h200_run.sh", str(tmp_path / "out"), "30"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped") == 5 and not list((tmp_path / "out").iterdir())


SAME_ACTIVATION = """
import sys, torch
sys.path.insert(0, "benchmarks")
import throughput
setup = throughput.Setup("cpu", bf16=False)
for dims in (throughput.TINY, throughput.VITB16):
    glip = throughput.GlipVariant(dims, setup, compile_model=False).unwrapped
    oc = throughput.OpenClipVariant(dims, setup, compile_model=False).unwrapped
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for tower, block in ((glip.vision_model, oc.visual.transformer.resblocks[0]),
                         (glip.text_model, oc.transformer.resblocks[0])):
        ours, theirs = tower.encoder.layers[0].mlp.activation_fn, block.mlp.gelu
        assert torch.equal(ours(x), theirs(x)), (dims, type(ours), theirs)
print("same")
"""


def test_both_implementations_run_the_same_activation():
    """GLIP was built with CLIP's default quick_gelu against open_clip ViT-B-16's exact GELU: another network (one
    more wide tensor kept per MLP, more operators). Both towers, tiny and real sizes, values equal in float64."""
    command = [str(open_clip_python()), "-c", SAME_ACTIVATION]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("same"), result.stderr[-3000:]
