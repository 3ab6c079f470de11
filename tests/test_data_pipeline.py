"""The training data path's fast options (uint8 batches normalised on the device, JPEG draft decoding), the one call
the loop makes for its batches, the CPU threads a launch gives, and the data pipeline benchmark's smoke run."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import TEXT_LEN, tiny_config
from datasets_util import encode_image, exif_rotated_jpeg, make_parquet
from PIL import Image

from glip_hf.arguments import DataArguments, ModelArguments, TrainingArguments
from glip_hf.checkpointing import TrainingProgress
from glip_hf.data import (
    ImageTextCollator,
    draft_for_crop,
    load_image_text_dataset,
    make_image_processor,
    normalize_pixels,
    training_batches,
)
from glip_hf.launch import cpu_threads_per_process
from glip_hf.synthetic import render_example_scene

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def jpeg_row(image, index: int, **params) -> dict:
    return {"__index__": index, "image": {"bytes": encode_image(image, "JPEG", quality=95, **params)}, "caption": "a"}


def collator(tokenizer, size: int, **kwargs) -> ImageTextCollator:
    return ImageTextCollator(tokenizer, size, MEAN, STD, max_length=TEXT_LEN, crop_scale=(0.5, 1.0), **kwargs)


def test_uint8_batches_normalised_later_match_the_float_batches(tokenizer):
    rows = [jpeg_row(render_example_scene(40, seed=i), i) for i in range(6)]
    floats = collator(tokenizer, 24)(rows)["pixel_values"]  # (6, 3, 24, 24)
    raw = collator(tokenizer, 24, uint8=True)(rows)["pixel_values"]
    assert raw.dtype == torch.uint8 and raw.shape == floats.shape
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    # The same float32 operations in the same order: equal up to rounding, scaled by the largest value 1 / std.
    torch.testing.assert_close(normalize_pixels(raw, mean, std), floats, rtol=0, atol=1e-6 / min(STD))


def test_the_loop_gets_normalised_batches_either_way_from_one_call(tmp_path, tokenizer):
    path = make_parquet(tmp_path / "pairs.parquet", n=8)
    args = DataArguments(dataset_name="parquet", data_files=str(path), cache_dir=str(tmp_path / "cache"))
    rows = load_image_text_dataset(args, "train")
    config, model_args = tiny_config(tokenizer), ModelArguments(max_text_length=TEXT_LEN)
    processor = make_image_processor(config.vision_config.image_size)
    training_args = TrainingArguments(per_device_train_batch_size=4, max_steps=1)
    first = {}
    for uint8 in (False, True):
        data_args = DataArguments(**{**vars(args), "uint8_batches": uint8})
        data = training_batches(
            rows, tokenizer, config, processor, model_args, data_args, training_args, Accelerator()
        )
        assert data.per_epoch == 2
        first[uint8] = next(data.batches(TrainingProgress()))
    assert first[True]["pixel_values"].dtype == torch.float32 and sum(first[True]["skipped"].values()) == 0
    torch.testing.assert_close(first[True]["pixel_values"], first[False]["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(first[True]["input_ids"], first[False]["input_ids"])


def test_skip_counts_survive_a_pinning_dataloader(tokenizer):
    """On a CUDA device the loader pins each batch: torch copies a mapping and updates the copy with its own items,
    which would double a Counter's counts. The tensors cannot be pinned without CUDA; the counts are what changed."""
    from torch.utils.data._utils.pin_memory import pin_memory

    rows = [jpeg_row(render_example_scene(40, seed=0), 0), {"__index__": 1, "image": None, "caption": "a"}]
    skipped = collator(tokenizer, 24)(rows)["skipped"]
    assert pin_memory({"skipped": skipped})["skipped"] == {"missing_image": 1}


def test_jpeg_draft_decodes_less_and_changes_no_png_and_no_small_crop(tokenizer):
    big = render_example_scene(160, seed=3)
    png = {"__index__": 0, "image": {"bytes": encode_image(big, "PNG")}, "caption": "a"}
    plain, drafted = collator(tokenizer, 16), collator(tokenizer, 16, jpeg_draft=True)
    assert torch.equal(plain([png])["pixel_values"], drafted([png])["pixel_values"])  # not a JPEG: the same path
    large = collator(tokenizer, 160)
    row = jpeg_row(big, 0)
    assert torch.equal(large([row])["pixel_values"], collator(tokenizer, 160, jpeg_draft=True)([row])["pixel_values"])

    opened = Image.open(io.BytesIO(row["image"]["bytes"]))
    draft_for_crop(opened, (0, 0, 160, 160), 16)  # a 160 px crop to 16 px: decoded at 1/8
    opened.load()
    assert opened.size == (20, 20)

    odd = Image.open(io.BytesIO(encode_image(big.resize((161, 121)), "JPEG")))  # sizes no reduction divides
    draft_for_crop(odd, (0, 0, 121, 121), 16)  # 121 px: at least 4 x 16 but not 8 x 16, decoded at 1/4
    odd.load()
    assert odd.size == (41, 31)


@pytest.mark.parametrize("orientation", [None, 6])
def test_jpeg_draft_takes_the_same_crop(tokenizer, orientation):
    """Same crop box, reduced decode: the pixels differ only by the decoder's downscaling (a few grey levels on
    these smooth scenes), far less than a different crop would."""
    rows = []
    for i in range(8):
        image = render_example_scene(200, seed=i).resize((240, 200))
        rows.append(
            {"__index__": i, "image": {"bytes": exif_rotated_jpeg(image, orientation)}, "caption": "a"}
            if orientation
            else jpeg_row(image, i)
        )
    plain = collator(tokenizer, 24)(rows)["pixel_values"]
    drafted = collator(tokenizer, 24, jpeg_draft=True)(rows)["pixel_values"]
    other_crops = collator(tokenizer, 24, seed=1)(rows)["pixel_values"]
    assert drafted.shape == plain.shape
    assert not torch.equal(drafted, plain)  # the draft really decoded smaller
    difference = (drafted - plain).abs().mean().item()
    assert difference < 0.25 * (other_crops - plain).abs().mean().item()


def launched_threads(tmp_path, env: dict, flags: tuple[str, ...] = ()) -> int:
    """The thread count torch has in a script started by ``accelerate launch`` after `use_available_cores`."""
    probe = tmp_path / "probe.py"
    probe.write_text("from glip_hf.launch import use_available_cores\nprint('threads', use_available_cores())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT), **env}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", *flags, str(probe)]
    out = subprocess.run(launch, env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    return int(out.split("threads")[-1].split()[0])


def test_accelerate_launch_gets_every_core_unless_the_user_set_the_threads(tmp_path):
    # accelerate launch alone exports OMP_NUM_THREADS=1 (see glip_hf.launch.launcher_chose_threads).
    assert launched_threads(tmp_path, {}) == cpu_threads_per_process()
    assert launched_threads(tmp_path, {"OMP_NUM_THREADS": "1"}) == 1  # the user's own setting is kept
    # The launcher's flag, in either spelling accelerate accepts, is the user's setting too.
    assert launched_threads(tmp_path, {}, ("--num-cpu-threads-per-process", "1")) == 1


def test_evaluation_under_accelerate_launch_gets_every_core_too(tmp_path):
    """run_eval.py's path (`evaluate_model`) claims the cores as training does, before it loads the model."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch\n"
        "from glip_hf.arguments import EvalArguments\n"
        "from glip_hf.evaluation import evaluate_model\n"
        "try:\n"
        "    evaluate_model(EvalArguments(model='no-such-model-dir', cpu=True))\n"
        "except (OSError, ValueError):\n"
        "    pass  # the model does not exist: the threads were set before loading it\n"
        "print('threads', torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", str(probe)]
    out = subprocess.run(launch, env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert int(out.split("threads")[-1].split()[0]) == cpu_threads_per_process()


def test_the_benchmark_smoke_run_writes_its_table(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "benchmarks/data_pipeline.py",
        "--quick",
        "--cache_dir",
        str(tmp_path),
        "--out",
        str(out),
    ]
    printed = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out.read_text())
    names = {row["pipeline"] for row in report["results"]}
    assert {"glip", "glip jpeg_draft", "glip uint8", "glip jpeg_draft+uint8"} <= names
    assert all(math.isfinite(row["images_per_s"]) for row in report["results"])
    assert all(run["images"] > 0 for run in report["runs"])
    if report["machine"]["torchvision"] is None:
        assert "open_clip side skipped" in printed
    else:
        assert "open_clip (torchvision)" in names
    assert "| pipeline | workers | images/s (median) |" in printed
    assert np.isfinite([row["per_worker"] for row in report["results"]]).all()


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--shards", "0"], "--shards"),
        (["--crop_scale", "0.9", "0.1"], "--crop_scale"),
        (["--crop_scale", "0", "1"], "--crop_scale"),
    ],
)
def test_benchmark_bad_numbers_are_one_line_errors(capsys, flags, field):
    # --batch_size 0 / --shards 0 were tracebacks; a reversed --crop_scale ran
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import data_pipeline

    with pytest.raises(SystemExit) as stopped:
        data_pipeline.parse_args(flags)
    assert stopped.value.code == 2
    assert field in capsys.readouterr().err.strip().splitlines()[-1]


def test_benchmark_bad_flag_is_one_line_without_the_usage_block(capsys):
    # argparse printed its multi-line usage block above the message
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import data_pipeline

    for flags, field in ((["--workers", "0"], "--workers"), (["--shards", "x"], "--shards")):
        with pytest.raises(SystemExit) as stopped:
            data_pipeline.parse_args(flags)
        assert stopped.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and ": error: " in lines[0] and field in lines[0], lines
    with pytest.raises(SystemExit) as stopped:
        data_pipeline.parse_args(["--help"])
    assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_benchmark_unknown_only_name_is_an_error(tmp_path):
    # --only with a name no pipeline has timed nothing and exited 0 with an empty table
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "data_pipeline.py"
    command = [sys.executable, str(script), "--quick", "--only", "nope", "--cache_dir", str(tmp_path / "c")]
    result = subprocess.run(command + ["--out", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--only" in result.stderr.strip().splitlines()[-1]
