"""A bad configuration stops before training: one line on stderr naming the field (or file) and the fix, exit status
2, no traceback, and nothing of a run written. ``--debug`` shows the traceback."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from accelerate.state import AcceleratorState
from conftest import TINY_RUN
from datasets_util import make_parquet
from transformers import BertConfig

from glip_hf.cli import RunStopped
from glip_hf.synthetic import build_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY = [*TINY_RUN, "--max_steps", "1", "--eval_at_end", "false"]
# Every message says what to do: the expected value, a flag to pass, or the change to make.
ADVICE = re.compile(r"expected|must be|pass |lower |fix |quote |drop |did you mean|see |it has \[")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_pretraining = load_script("run_pretraining")
run_eval = load_script("run_eval")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Path]:
    """Shared by every case: the generated-data cache, a parquet file, a BERT checkpoint, a file, an earlier run.

    Progress bars of dataset loading are off: stderr then holds only what the error prints."""
    root = tmp_path_factory.mktemp("config_errors")
    datasets.disable_progress_bars()
    build_synthetic_dataset(root / "cache" / "synthetic", num_train=40, num_test=36, image_size=16)
    make_parquet(root / "train.parquet")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        root / "bert"
    )
    (root / "a_file").write_text("not a directory\n")
    (root / "earlier_run").mkdir()
    (root / "earlier_run" / "run_config.yaml").write_text("seed: 0\n")
    (root / "earlier_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    yield root
    datasets.enable_progress_bars()


# (id, flags, YAML text written to run.yaml and passed as --config (None: configs/default.yaml), message regex).
# Flags may hold {ws} (the shared workspace) and {tmp} (this case's own directory).
PRETRAINING_CASES = [
    ("mask_ratio_negative", ["--mask_ratio", "-0.1"], None, r"mask_ratio .*-0\.1"),
    ("mask_ratio_one", ["--mask_ratio", "1.0"], None, r"mask_ratio .*0 <= mask_ratio < 1.*1\.0"),
    ("mask_strategy_unknown", ["--mask_strategy", "uniform"], None, r"mask_strategy .*'uniform'"),
    ("mask_sigma_zero", ["--mask_sigma", "0"], None, r"mask_sigma .*> 0.*0\.0"),
    ("mask_sigma_negative", ["--mask_sigma", "-0.2"], None, r"mask_sigma .*-0\.2"),
    ("image_size_not_multiple_of_patch", ["--image_size", "18"], None, r"image_size=18 .*patch_size=4"),
    ("patch_size_zero", ["--patch_size", "0"], None, r"patch_size=0 .*>= 1"),
    ("heads_do_not_divide_width", ["--vision_heads", "3"], None, r"vision_hidden_size=32 .*vision_heads=3"),
    ("batch_size_zero", ["--per_device_train_batch_size", "0"], None, r"per_device_train_batch_size=0 .*>= 1"),
    (
        "batch_larger_than_data",
        ["--per_device_train_batch_size", "64"],
        None,
        r"per_device_train_batch_size=64 .*40 training rows; lower",
    ),
    ("eval_batch_size_zero", ["--eval_batch_size", "0"], None, r"eval_batch_size=0 .*>= 1"),
    ("num_workers_negative", ["--num_workers", "-1"], None, r"num_workers=-1 .*>= 0"),
    ("warmup_ratio_one", ["--warmup_ratio", "1.0"], None, r"warmup_ratio=1\.0 .*\[0, 1\)"),
    ("warmup_steps_negative", ["--warmup_steps", "-5"], None, r"warmup_steps=-5 .*>= 0"),
    ("no_epochs_and_no_max_steps", ["--num_train_epochs", "0", "--max_steps", "-1"], None, r"num_train_epochs=0"),
    ("max_text_length_one", ["--max_text_length", "1"], None, r"max_text_length=1 .*>= 2"),
    ("max_grad_norm_negative", ["--max_grad_norm", "-1"], None, r"max_grad_norm=-1\.0 .*>= 0"),
    ("max_nonfinite_steps_zero", ["--max_nonfinite_steps", "0"], None, r"max_nonfinite_steps=0 .*>= 1"),
    ("save_steps_zero", ["--save_steps", "0"], None, r"save_steps=0 .*>= 1"),
    ("logging_steps_zero", ["--logging_steps", "0"], None, r"logging_steps=0 .*>= 1"),
    ("learning_rate_negative", ["--learning_rate", "-0.001"], None, r"learning_rate=-0\.001 .*> 0"),
    ("vocab_below_byte_level_base", ["--tokenizer_vocab_size", "100"], None, r"tokenizer_vocab_size=100 .*>= 515"),
    ("synthetic_placement_unknown", ["--synthetic_placement", "left"], None, r"synthetic_placement='left'.*center"),
    ("attn_implementation_unknown", ["--attn_implementation", "flash"], None, r"attn_implementation='flash'.*sdpa"),
    ("report_to_unknown_tracker", ["--report_to", "tensorbord"], None, r"report_to='tensorbord'.*tensorboard"),
    ("loss_unknown", ["--loss", "triplet"], None, r"loss='triplet'.*clip or siglip"),
    ("mixed_precision_unknown", ["--mixed_precision", "fp8"], None, r"mixed_precision='fp8'.*bf16"),
    ("fp16_on_the_cpu", ["--mixed_precision", "fp16"], None, r"mixed_precision='fp16' .*CPU.*float32.*bf16 or no"),
    ("crop_scale_inverted", ["--crop_scale_min", "0.9", "--crop_scale_max", "0.5"], None, r"crop_scale_min=0\.9"),
    ("streaming_without_max_steps", ["--streaming", "true", "--max_steps", "-1"], None, r"max_steps=-1 .*stream"),
    ("flag_value_not_a_number", ["--learning_rate", "abc"], None, r"--learning_rate.*invalid float value: 'abc'"),
    ("flag_value_not_a_bool", ["--cpu", "maybe"], None, r"--cpu.*maybe"),
    ("unknown_flag", ["--learnin_rate", "0.1"], None, r"--learnin_rate.*did you mean --learning_rate"),
    ("flag_value_missing", ["--learning_rate", "-1e-3"], None, r"--learning_rate.*expected one argument.*=-1e-3"),
    ("missing_dataset_path", ["--dataset_name", "{tmp}/no_such_dataset"], None, r"dataset_name=.*no_such_dataset"),
    ("missing_data_dir", ["--dataset_name", "imagefolder", "--data_dir", "{tmp}/no_dir"], None, r"data_dir=.*no_dir"),
    (
        "wrong_image_column",
        ["--dataset_name", "parquet", "--data_files", "{ws}/train.parquet", "--image_column", "jpg"],
        None,
        r"--image_column 'jpg' is not a column .*\['image', 'caption'\]",
    ),
    (
        "wrong_caption_column",
        ["--dataset_name", "parquet", "--data_files", "{ws}/train.parquet", "--caption_column", "text"],
        None,
        r"--caption_column 'text' is not a column",
    ),
    ("yaml_missing_file", ["--config", "{tmp}/missing.yaml"], None, r"config file .*missing\.yaml not found"),
    ("yaml_unknown_key", [], "training:\n  learnin_rate: 0.1\n", r"run\.yaml: unknown key.*'learnin_rate'.*learning"),
    ("yaml_not_a_mapping", [], "- mask_ratio\n- 0.5\n", r"run\.yaml: a run config must be a mapping"),
    ("yaml_syntax_error", [], "model: [image_size\n", r"run\.yaml: .*line \d+"),
    ("yaml_float_not_a_number", [], "learning_rate: fast\n", r"run\.yaml: learning_rate='fast' .*number"),
    ("yaml_int_not_integral", [], "per_device_train_batch_size: 8.5\n", r"run\.yaml: per_device_train_batch_size="),
    ("yaml_unquoted_no", [], "mixed_precision: no\n", r"run\.yaml: mixed_precision=False .*quote"),
    ("yaml_bad_value", [], "model:\n  mask_ratio: 1.5\n", r"mask_ratio .*1\.5"),
    # PyYAML keeps the later of two equal keys, and sections were merged the same way: both silently took one value
    (
        "yaml_key_twice",
        [],
        "training:\n  max_steps: 3\n  max_steps: 4\n",
        r"run\.yaml: key 'max_steps' .*twice.*line 3",
    ),
    ("yaml_key_in_two_places", [], "seed: 1\ntraining:\n  seed: 2\n", r"run\.yaml: 'seed' is set twice"),
    ("output_dir_is_a_file", ["--output_dir", "{ws}/a_file"], None, r"output_dir=.*a_file is a file"),
    (
        "output_dir_holds_earlier_run",
        ["--output_dir", "{ws}/earlier_run"],
        None,
        r"output_dir=.*earlier_run .*overwrite_output_dir",
    ),
    (
        "resume_latest_without_checkpoint",
        ["--resume_from_checkpoint", "latest"],
        None,
        r"resume_from_checkpoint=latest: no complete checkpoint",
    ),
    (
        "resume_from_missing_directory",
        ["--resume_from_checkpoint", "{tmp}/checkpoint-9"],
        None,
        r"resume_from_checkpoint=.*checkpoint-9 does not exist",
    ),
    ("init_from_not_clip", ["--init_from", "{ws}/bert"], None, r"init_from=.*bert.*not CLIP or GLIP"),
    # Found by an outside audit: NumPy's own message after the output folder was made, a traceback in AdamW, and
    # datasets searching the current directory for parquet files.
    ("seed_negative", ["--seed", "-1"], None, r"seed=-1 is invalid: expected an integer in \[0, 2\*\*32\)"),
    ("seed_too_large", ["--seed", "4294967296"], None, r"seed=4294967296 is invalid"),
    ("learning_rate_overflows", ["--learning_rate", "1e38"], None, r"learning_rate=1e\+38 .*at most 1e30"),
    ("builder_without_files", ["--dataset_name", "parquet"], None, r"--dataset_name parquet reads files: pass"),
    ("hidden_act_unknown", ["--hidden_act", "relu6"], None, r"hidden_act='relu6' .*quick_gelu or gelu"),
    # A walkthrough of the README: datasets blamed an empty metadata file for a glob that matched nothing.
    (
        "data_files_glob_matches_nothing",
        ["--dataset_name", "webdataset", "--data_files", "{tmp}/none/*.tar"],
        None,
        r"data_files .*none/\*\.tar matches no file; pass",
    ),
    # The error blamed --dataset_name ("dataset 'parquet' could not be loaded (Unable to find ...)").
    (
        "data_files_is_a_folder",
        ["--dataset_name", "parquet", "--data_files", "{tmp}"],
        None,
        r"data_files .* is a folder; pass a glob of its files \(such as .*/\*\.parquet\), or the folder as --data_dir",
    ),
]

EVAL_CASES = [
    ("task_unknown", ["--task", "captioning"], r"task='captioning' .*zeroshot_classification"),
    ("mask_ratio_one", ["--mask_ratio", "1.0"], r"mask_ratio .*1\.0"),
    ("mask_strategy_unknown", ["--mask_strategy", "center"], r"mask_strategy .*'center'"),
    ("mask_draws_zero", ["--mask_draws", "0"], r"mask_draws=0 .*>= 1"),
    ("batch_size_zero", ["--batch_size", "0"], r"batch_size=0 .*>= 1"),
    ("val_fraction_one", ["--linear_probe_val_fraction", "1.0"], r"linear_probe_val_fraction=1\.0 .*\(0, 1\)"),
    ("missing_model_dir", ["--model", "{tmp}/no_model"], r"model=.*no_model does not exist"),
    ("missing_class_names_file", ["--class_names", "{tmp}/names.txt"], r"class_names=.*names\.txt"),
    ("output_is_a_directory", ["--output", "{tmp}"], r"output=.* is a directory"),
    ("unknown_flag", ["--mask_ratios", "0.5"], r"--mask_ratios.*did you mean --mask_ratio"),
    ("builder_without_files", ["--dataset", "imagefolder"], r"--dataset imagefolder reads files: pass --data_files"),
    ("output_under_a_file", ["--output", "/etc/passwd/result.json"], r"/etc/passwd is a file, not a folder"),
    ("data_files_is_a_folder", ["--dataset", "parquet", "--data_files", "{tmp}"], r"data_files .* is a folder; pass"),
    # An outside pass: without --dataset, --data_files was ignored and the built-in set evaluated.
    ("data_files_without_dataset", ["--data_files", "{tmp}/x.parquet"], r"--data_files .*x.parquet needs --dataset"),
]


def case_ids(cases) -> list[str]:
    return [case[0] for case in cases]


def expand(flags: list[str], workspace: Path, tmp_path: Path) -> list[str]:
    return [flag.format(ws=workspace, tmp=tmp_path) for flag in flags]


def assert_one_line_error(capsys, script: str, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert ADVICE.search(lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("name, flags, yaml_text, pattern", PRETRAINING_CASES, ids=case_ids(PRETRAINING_CASES))
def test_bad_pretraining_config_stops_in_one_line(name, flags, yaml_text, pattern, workspace, tmp_path, capsys):
    config = CONFIGS / "default.yaml"
    if yaml_text is not None:
        config = tmp_path / "run.yaml"
        config.write_text(yaml_text)
    flags = expand(flags, workspace, tmp_path)
    argv = ["--config", str(config), *TINY, "--cache_dir", str(workspace / "cache")]
    argv += ["--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as stop:
        run_pretraining.main(argv)
    assert stop.value.code == 2
    assert_one_line_error(capsys, "run_pretraining.py", pattern)
    last = max(i for i, arg in enumerate(argv) if arg == "--output_dir")
    output_dir = Path(argv[last + 1])
    assert not (output_dir / "checkpoints").exists() and not (output_dir / "model.safetensors").exists()


@pytest.mark.parametrize("name, flags, pattern", EVAL_CASES, ids=case_ids(EVAL_CASES))
def test_bad_eval_setting_stops_in_one_line(name, flags, pattern, tmp_path, capsys):
    result = tmp_path / "result.json"
    with pytest.raises(SystemExit) as stop:
        run_eval.main(
            ["--output", str(result), "--cache_dir", str(tmp_path / "cache"), *expand(flags, tmp_path, tmp_path)]
        )
    assert stop.value.code == 2
    assert_one_line_error(capsys, "run_eval.py", pattern)
    assert not result.exists()


def run_script(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("GLIP_HF_DEBUG", None)
    command = [sys.executable, str(ROOT / "run_pretraining.py"), *TINY, "--cache_dir", str(tmp_path / "cache"), *flags]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_script_prints_one_line_and_exits_2(tmp_path):
    done = run_script(tmp_path, "--mask_ratio", "1.0")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.match(r"run_pretraining\.py: error: mask_ratio .*1\.0.*--debug", lines[0]), lines[0]
    assert not (tmp_path / "outputs").exists()


def test_script_with_debug_shows_the_traceback(tmp_path):
    done = run_script(tmp_path, "--mask_ratio", "1.0", "--debug")
    assert done.returncode != 0
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: mask_ratio" in done.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a configuration error")

    monkeypatch.setattr(run_pretraining, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_pretraining.main([*TINY])


def test_a_stopped_run_exits_with_its_code(monkeypatch, capsys):
    def stopped(*args, **kwargs):
        raise RunStopped(
            "stopped by SIGTERM at step 3; checkpoint-3 saved; resume with --resume_from_checkpoint latest", 143
        )

    monkeypatch.setattr(run_pretraining, "train", stopped)
    with pytest.raises(SystemExit) as stop:
        run_pretraining.main([*TINY])
    assert stop.value.code == 143
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "run_pretraining.py: stopped by SIGTERM at step 3; checkpoint-3 saved; resume with "
        "--resume_from_checkpoint latest"
    ]


def test_debug_env_reraises(monkeypatch):
    monkeypatch.setenv("GLIP_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="mask_ratio"):
        run_pretraining.main(["--mask_ratio", "1.0"])


def test_empty_imagefolder_metadata_is_one_line(tmp_path):
    # an empty metadata.jsonl made datasets' folder builder fail with a bare IndexError traceback
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "metadata.jsonl").write_text("")
    done = run_script(tmp_path, "--dataset_name", "imagefolder", "--data_dir", str(tmp_path / "data"))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and "examples/s" not in line]
    assert "Traceback" not in done.stderr and "metadata" in lines[-1], done.stderr


@pytest.mark.parametrize("flag", ["--data_files", "--data_dir"])
def test_data_files_or_dir_without_a_dataset_name_is_an_error_not_the_built_in_data(tmp_path, flag):
    """`--data_files x.parquet` alone trained on the built-in dataset, silently; now a one-line error."""
    from glip_hf.arguments import parse_run_args

    with pytest.raises(ValueError, match=f"{flag} .* needs --dataset_name"):
        parse_run_args([*TINY_RUN, flag, str(tmp_path)])


def test_data_files_of_a_dataset_folder_are_not_looked_up_here(tmp_path, monkeypatch):
    """A dataset folder (or Hub repo) reads --data_files inside itself: a folder of that name in the current
    directory was refused as 'data_files ... is a folder' (an outside pass)."""
    from glip_hf.arguments import parse_run_args

    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "a.jsonl").write_text("{}\n")
    (tmp_path / "a.jsonl").mkdir()
    monkeypatch.chdir(tmp_path)
    parse_run_args([*TINY_RUN, "--dataset_name", "mydata", "--data_files", "a.jsonl"])
    with pytest.raises(IsADirectoryError, match=r"data_files a.jsonl is a folder"):
        parse_run_args([*TINY_RUN, "--dataset_name", "json", "--data_files", "a.jsonl"])


def test_yaml_merge_keys_load_and_an_unhashable_key_is_one_line(tmp_path):
    from glip_hf.arguments import read_yaml

    path = tmp_path / "suite.yaml"
    # An anchor merged with `<<` and one key overridden after it is standard YAML (PyYAML's safe_load reads it), not a
    # key written twice; the duplicate-key check refused it as 'no constructor for the tag merge'.
    path.write_text("entries:\n  - &base {task: retrieval, split: train}\n  - <<: *base\n    split: test\n")
    assert read_yaml(path)["entries"][1] == {"task": "retrieval", "split": "test"}
    path.write_text("? [1, 2]\n: 3\n")  # PyYAML's one-line 'found unhashable key', not a TypeError traceback
    with pytest.raises(ValueError, match=r"suite\.yaml: found unhashable key at line 1"):
        read_yaml(path)


def test_metrics_jsonl_is_strict_json_when_a_window_has_no_loss(tmp_path):
    """A window whose every step was skipped logged "loss": NaN, which jq and JSON.parse reject: it is null now."""
    from glip_hf.tracking import MetricsLog, plot_loss_curve

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan"), "lr": 0.1})
    log.write({"step": 2, "loss": 0.5, "lr": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == '{"step": 1, "loss": null, "lr": 0.1}' and '"lr": null' in lines[1]
    assert [json.loads(line, parse_constant=lambda name: pytest.fail(name)) for line in lines][1]["loss"] == 0.5
    assert plot_loss_curve(log.read(), tmp_path / "curve.png") is not None  # the null point is left out


def test_a_hub_dataset_while_offline_is_one_line_not_a_connection_traceback(tmp_path, monkeypatch):
    from glip_hf.arguments import DataArguments
    from glip_hf.data import load_image_text_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"dataset 'someone/no-such-data' could not be reached .*check"):
        load_image_text_dataset(DataArguments(dataset_name="someone/no-such-data", cache_dir=str(tmp_path)), "train")


def test_a_saved_dataset_folder_named_like_a_builder_is_read_not_refused(tmp_path, monkeypatch):
    from glip_hf.arguments import _builder_without_files

    monkeypatch.chdir(tmp_path)
    assert _builder_without_files("json", None, None)
    (tmp_path / "json").mkdir()  # a save_to_disk folder called json, read as a dataset by its path
    assert not _builder_without_files("json", None, None)


def test_an_empty_init_from_folder_is_said_to_hold_no_model_and_a_failed_start_leaves_no_folder(tmp_path, capsys):
    """A start that failed left an empty output folder; --init_from that folder then said "a None checkpoint"."""
    (tmp_path / "empty").mkdir()
    argv = [*TINY, "--init_from", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        run_pretraining.main([*argv, "--cache_dir", str(tmp_path / "cache")])
    assert stop.value.code == 2
    assert "empty holds no model (no config.json); pass" in assert_one_line_error(capsys, "run_pretraining.py", "init")
    assert not (tmp_path / "out").exists()
