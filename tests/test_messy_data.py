"""Corrupt and odd data: odd-but-valid images are converted right, bad samples are skipped and counted, and training
and every evaluation task complete on a messy dataset and on damaged webdataset shards."""

import io
import json
import warnings

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT, TEXT_LEN, TINY_MODEL, launch_two_processes
from datasets_util import (
    BAD_KINDS,
    ODD_KINDS,
    encode_image,
    exif_rotated_jpeg,
    grey_16bit,
    make_messy_dataset,
    make_messy_webdataset,
    make_parquet,
    make_relative_path_table,
    png_bytes,
    transparent_palette,
    transparent_rgba,
)
from PIL import Image, ImageFile

from glip_hf.arguments import DataArguments, EvalArguments, parse_run_args
from glip_hf.data import (
    AmbiguousImagePath,
    ImageTextCollator,
    check_tar_shard,
    decode_image,
    image_folders,
    load_image,
    load_image_text_dataset,
    locate_image,
    prepare_for_decoding,
)
from glip_hf.evaluation import evaluate_model, summary_line
from glip_hf.synthetic import render_example_scene
from glip_hf.training import train

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
QUADRANTS = ((220, 30, 30), (30, 180, 40), (40, 60, 220), (240, 210, 20))  # top-left, top-right, bottom-...
JPEG_TOLERANCE = 12  # mean absolute error (0-255) allowed after a quality-95 JPEG round trip


def quadrant_image(width: int = 40, height: int = 24) -> Image.Image:
    """Four flat colours, one per quadrant, on a non-square canvas: any rotation or flip shows."""
    image = Image.new("RGB", (width, height))
    for i, colour in enumerate(QUADRANTS):
        left, top = (i % 2) * width // 2, (i // 2) * height // 2
        image.paste(colour, (left, top, left + width // 2, top + height // 2))
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def mean_error(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


# ------------------------------------------------------------------------------------- (a) the decoder


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photos_come_out_upright(orientation):
    upright = quadrant_image()
    decoded = decode_image(exif_rotated_jpeg(upright, orientation))
    assert decoded.mode == "RGB" and decoded.size == upright.size  # not the stored (sideways) 24 x 40
    assert mean_error(decoded, upright) < JPEG_TOLERANCE


def test_16_bit_32_bit_and_float_images_are_scaled_not_clipped():
    grey = render_example_scene(24, seed=5).convert("L")
    decoded = decode_image(encode_image(grey_16bit(grey)))  # a PNG that opens as mode I;16
    assert Image.open(io.BytesIO(encode_image(grey_16bit(grey)))).mode == "I;16"
    np.testing.assert_array_equal(pixels(decoded), pixels(grey.convert("RGB")))  # v * 257 / 65535 * 255 = v
    mid = {
        "I;16": Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)),
        "I": Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)),
        "F": Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)),
    }
    for mode, image in mid.items():
        assert image.mode == mode
        assert decode_image(image).getpixel((0, 0)) == (128, 128, 128), mode  # mid-grey, not white (or black)
    ramp = Image.fromarray(np.linspace(-5.0, 5.0, 16, dtype=np.float32).reshape(4, 4))  # out of [0, 1]: min-max
    assert decode_image(ramp).getpixel((0, 0)) == (0, 0, 0) and decode_image(ramp).getpixel((3, 3)) == (255,) * 3


def test_transparent_pixels_become_white():
    scene = quadrant_image()
    rgba = decode_image(encode_image(transparent_rgba(scene)))
    assert rgba.getpixel((0, 0)) == (255, 255, 255) and rgba.getpixel((5, 20)) == (255, 255, 255)
    assert rgba.getpixel((35, 2)) == QUADRANTS[1] and rgba.getpixel((35, 20)) == QUADRANTS[3]
    half = Image.new("RGBA", (2, 2), (255, 0, 0, 128))  # half-transparent red over white: pink
    assert decode_image(half).getpixel((0, 0)) == (255, 127, 127)
    la = Image.new("LA", (2, 2), (0, 0))  # transparent black
    assert decode_image(la).getpixel((0, 0)) == (255, 255, 255)
    paletted = transparent_palette(scene)
    decoded = decode_image(encode_image(paletted, transparency=15))
    assert decoded.getpixel((3, 3)) == (255, 255, 255)  # the transparent index, not its black palette colour
    expected = paletted.convert("RGB").getpixel((3, 20))
    assert decoded.getpixel((3, 20)) == expected and max(abs(a - b) for a, b in zip(expected, QUADRANTS[2])) < 16


def test_cmyk_grayscale_and_extreme_sizes_are_converted():
    scene = quadrant_image()
    assert mean_error(decode_image(encode_image(scene.convert("CMYK"), "JPEG", quality=95)), scene) < JPEG_TOLERANCE
    grey = decode_image(encode_image(scene.convert("L")))
    np.testing.assert_array_equal(pixels(grey), pixels(scene.convert("L").convert("RGB")))
    one = decode_image(encode_image(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert one.size == (1, 1) and one.getpixel((0, 0)) == (10, 20, 30)
    wide = decode_image(encode_image(scene.resize((10000, 10))))
    assert wide.size == (10000, 10) and wide.mode == "RGB"


def test_truncated_jpegs_zero_bytes_and_missing_files_are_skipped_for_their_reason(tmp_path):
    jpeg = encode_image(render_example_scene(32), "JPEG")
    assert load_image({"bytes": jpeg[: len(jpeg) // 2], "path": None}) == "undecodable_image"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # truncated data stays an error, globally too
    assert load_image(b"GIF89a and then nothing") == "undecodable_image"
    assert load_image({"bytes": b"", "path": None}) == "empty_image"
    assert load_image({"bytes": b"", "path": "000001.jpg"}) == "empty_image"  # a webdataset member of 0 bytes
    (tmp_path / "empty.png").write_bytes(b"")
    assert load_image(str(tmp_path / "empty.png")) == "empty_image"
    assert load_image(str(tmp_path / "gone.png")) == "missing_image"
    assert load_image({"bytes": None, "path": None}) == load_image(None) == "missing_image"
    assert isinstance(load_image({"bytes": jpeg, "path": "not/there.jpg"}), Image.Image)  # bytes win over paths


def test_captions_longer_than_the_context_are_truncated_and_end_with_eos(tokenizer):
    collator = ImageTextCollator(tokenizer, 12, MEAN, STD, max_length=TEXT_LEN)
    image = {"bytes": encode_image(render_example_scene(16)), "path": None}
    batch = collator([{"image": image, "caption": "a red circle and " + "a very big blue star " * 80}])
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    assert ids.shape == (TEXT_LEN,) and mask.all()
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert (ids == tokenizer.eos_token_id).sum() == 1


# ------------------------------------------------------------------------------ (b) the messy dataset


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return make_messy_dataset(tmp_path_factory.mktemp("messy") / "saved")


def test_the_collator_counts_every_bad_row_and_converts_every_odd_one(messy, tokenizer):
    path, expected = messy
    split = prepare_for_decoding(datasets.load_from_disk(str(path))["train"], ["image"])
    bad = sum(kind in BAD_KINDS for kind in split["kind"])
    assert bad / len(split) == 0.05 and sorted(k for k in split["kind"] if k in ODD_KINDS) == sorted(ODD_KINDS)
    collator = ImageTextCollator(tokenizer, 12, MEAN, STD, max_length=TEXT_LEN)
    batch = collator([{"__index__": i, **row} for i, row in enumerate(split)])
    assert dict(batch["skipped"]) == expected
    assert batch["pixel_values"].shape == (len(split) - bad, 3, 12, 12)
    for index, row in enumerate(split):
        result = collator.process(row, index)
        if row["kind"] in BAD_KINDS:
            assert result == BAD_KINDS[row["kind"]], row["kind"]
        else:
            assert not isinstance(result, str), (row["kind"], result)


# -------------------------------------------------------------------------------------- (c) training

TINY = [*TINY_MODEL, "--eval_at_end", "false", "--save_steps", "1000", "--cpu", "true"]


@pytest.fixture
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run(tmp_path, *flags: str):
    """Train the tiny model; returns the result and its train_summary.json."""
    argv = [*TINY, "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), *flags]
    result = train(*parse_run_args(argv))
    return result, json.loads((tmp_path / "out" / "train_summary.json").read_text())


def test_training_on_the_messy_dataset_skips_exactly_the_bad_rows(messy, tmp_path, fresh_accelerator_state):
    path, expected = messy
    # 100 rows in batches of 10, one epoch: every row is seen exactly once (no partial batch is dropped).
    flags = ["--dataset_name", str(path), "--num_train_epochs", "1", "--per_device_train_batch_size", "10"]
    result, summary = run(tmp_path, *flags)
    assert result.steps == 10 and summary["steps"] == 10
    assert {k: v for k, v in summary["skipped"].items() if v} == expected and summary["num_skipped"] == 5
    assert summary["empty_steps"] == 0


@pytest.mark.parametrize(
    "rows, flags, steps, skipped",
    [
        # stops once the data has been read through: after step 2 (it read on into step 3, 12 rows for 8)
        (8, ["--num_train_epochs", "3"], 2, {"undecodable_image": 8}),
        (16, ["--max_steps", "2"], 2, {"missing_caption": 8}),  # or at the run's last step
    ],
    ids=["junk-images", "number-captions"],
)
def test_data_with_no_usable_sample_stops_the_run_with_one_line(
    tmp_path, rows, flags, steps, skipped, fresh_accelerator_state
):
    from glip_hf.cli import RunStopped

    junk = rows == 8
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string" if junk else "int64")})
    image = {"bytes": b"junk" if junk else encode_image(render_example_scene(16)), "path": None}
    columns = {"image": [image] * rows, "caption": ["a caption"] * rows if junk else list(range(rows))}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "bad"))
    data = ["--dataset_name", str(tmp_path / "bad"), "--per_device_train_batch_size", "4"]
    with pytest.raises(RunStopped, match=r"no sample could be used in .* --caption_column 'caption'") as stopped:
        run(tmp_path, *data, *flags, "--save_steps", "1")  # checkpoints of the untrained model are written
    assert stopped.value.exit_code == 2
    reason, count = next(iter(skipped.items()))
    assert f"{steps} step(s)" in str(stopped.value) and f"{reason} {count}" in str(stopped.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no model trained on nothing
    # It leaves nothing that blocks the same command once the data is fixed (its metrics and the checkpoints of the
    # untrained model did, and the refusal's advice, --resume_from_checkpoint latest, found no checkpoint).
    assert "nothing of the run was kept, so the same command can run again" in str(stopped.value)
    assert not {"metrics.jsonl", "checkpoints"} & {p.name for p in (tmp_path / "out").iterdir()}
    good = ["--dataset_name", str(tmp_path / "good"), "--per_device_train_batch_size", "4"]
    datasets.Dataset.from_dict(
        {
            "image": [{"bytes": encode_image(render_example_scene(16)), "path": None}] * 8,
            "caption": ["a red circle"] * 8,
        },
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "good"))
    AcceleratorState._reset_state(reset_partial_state=True)
    run(tmp_path, *good, "--max_steps", "1")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_no_sample_stop_waits_for_every_process_to_read_its_share_through(tmp_path):
    """Two processes streaming a file each: a's 8 rows all lack their image (2 steps), b's first 12 too, then 8
    good ones. At step 3 a's process has read its share through while b's has not: the run goes on (it stopped)."""
    images = [f"imgs/{i}.png" for i in range(8)]
    make_relative_path_table(tmp_path / "data" / "b.jsonl", images, missing=tuple(f"gone/b{i}.png" for i in range(12)))
    rows = (tmp_path / "data" / "b.jsonl").read_text().splitlines()
    (tmp_path / "data" / "b.jsonl").write_text("\n".join(rows[8:] + rows[:8]) + "\n")  # the 12 missing first
    make_relative_path_table(tmp_path / "data" / "a.jsonl", [], missing=tuple(f"gone/a{i}.png" for i in range(8)))
    flags = ["--dataset_name", "json", "--data_files", str(tmp_path / "data" / "*.jsonl"), "--streaming", "true"]
    flags += ["--shuffle_buffer_size", "1", "--per_device_train_batch_size", "4", "--max_steps", "5"]
    out = tmp_path / "out"
    launch_two_processes(ROOT / "run_pretraining.py", *TINY, *flags, "--output_dir", out, port=29545, cwd=tmp_path)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 5 and summary["empty_steps"] == 3  # each process's rows in file order


@pytest.mark.parametrize("streaming, source", [(False, "data_files"), (True, "data_files"), (False, "data_dir")])
def test_training_on_damaged_webdataset_shards(tmp_path, streaming, source, fresh_accelerator_state):
    root, expected, rows = make_messy_webdataset(tmp_path / "shards")
    shards = ["--data_files", str(root / "*.tar")] if source == "data_files" else ["--data_dir", str(root)]
    flags = ["--dataset_name", "webdataset", *shards]
    flags += ["--image_column", "jpg", "--caption_column", "txt", "--per_device_train_batch_size", "5"]
    # Every readable sample once: one epoch of map-style batches, or as many steps of the stream.
    flags += ["--streaming", "true", "--max_steps", str(rows // 5)] if streaming else ["--num_train_epochs", "1"]
    with pytest.warns(UserWarning, match=r"webdataset shard .*00002\.tar is truncated .* first 4 sample"):
        result, summary = run(tmp_path, *flags)
    assert result.steps == rows // 5 == 4
    assert {k: v for k, v in summary["skipped"].items() if v} == expected


def test_a_stream_of_parquet_files_without_rows_says_the_data_has_none(tmp_path, monkeypatch, fresh_accelerator_state):
    # datasets sleeps this long each time a parquet stream closes (an arrow threading workaround): twice here.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    root = tmp_path / "shards"
    root.mkdir()
    make_parquet(root / "a.parquet", n=0)
    make_parquet(root / "b.parquet", n=0)
    data = ["--dataset_name", "parquet", "--data_files", str(root / "*.parquet"), "--streaming", "true"]
    says = r"has no rows: dataset 'parquet' from .*shards/\*\.parquet, split 'train' yields none \(are its files empty"
    with pytest.raises(ValueError, match=says) as error:
        run(tmp_path, *data, "--max_steps", "1")
    assert "batch_size" not in str(error.value)  # the batch size is not what is wrong


# ----------------------------------------------------------------------------------- (d) evaluation


@pytest.mark.filterwarnings("ignore:.*captions are also the caption of another image")
@pytest.mark.parametrize("task", ["zeroshot_classification", "retrieval", "linear_probe"])
def test_every_eval_task_completes_on_the_messy_dataset(messy, saved_model_dir, task):
    path, expected = messy
    images_only = {k: v for k, v in expected.items() if k != "missing_caption"}
    want = {
        "zeroshot_classification": images_only,  # captions are not read
        "retrieval": expected,  # a row without caption text cannot be retrieved: skipped
        "linear_probe": images_only,  # the test split's, beside its num_samples (skipped_by_split: each split's)
    }[task]
    args = EvalArguments(model=str(saved_model_dir), dataset=str(path), task=task, batch_size=16)
    result = evaluate_model(args)
    json.dumps(result)
    assert {k: v for k, v in result["skipped"].items() if v} == want
    assert result["num_skipped"] == sum(want.values())
    assert result["num_samples"] == 100 - sum(want.values())
    if task == "linear_probe":  # the same messy rows in both splits
        assert [split["skipped"] for split in result["skipped_by_split"].values()] == [result["skipped"]] * 2
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    line = summary_line(result)
    assert f"skipped={result['num_skipped']} (" in line and f"undecodable_image {want['undecodable_image']}" in line


# ---------------------------------------------------------------------------- webdataset loading path


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_missing_members_or_cut_short_load_what_is_whole(tmp_path, streaming):
    root, _, rows = make_messy_webdataset(tmp_path / "shards")
    args = DataArguments(
        dataset_name="webdataset", data_files=str(root / "*.tar"), streaming=streaming, cache_dir=str(tmp_path / "c")
    )
    with pytest.warns(UserWarning, match="00002.tar") as caught:
        dataset = load_image_text_dataset(args, "train")
    assert sum("webdataset shard" in str(w.message) for w in caught) == 1  # one line, naming the shard
    loaded = list(prepare_for_decoding(dataset, ["jpg"]))  # undecoded: some jpg members are not images
    assert [row["__key__"] for row in loaded] == [f"{i:06d}" for i in range(rows)]
    assert loaded[1]["txt"] is None and loaded[3]["jpg"] is None  # samples 1 and 3 lack a member
    assert loaded[14]["txt"] is None and loaded[15]["txt"]  # a Latin-1 caption: None, not a failed split or stream
    assert check_tar_shard(root / "00000.tar").intact and not check_tar_shard(root / "00002.tar").intact


def test_a_shard_with_no_whole_sample_is_left_out_and_intact_shards_are_read_in_place(tmp_path):
    root, _, rows = make_messy_webdataset(tmp_path / "shards")
    (root / "00003.tar").write_bytes((root / "00000.tar").read_bytes()[:700])  # cut inside its first member
    args = DataArguments(dataset_name="webdataset", data_files=str(root / "*.tar"), cache_dir=str(tmp_path / "c"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_image_text_dataset(args, "train")
    messages = [str(w.message) for w in caught if "webdataset shard" in str(w.message)]
    assert len(messages) == 2 and "00003.tar" in messages[1] and "left out" in messages[1]
    assert len(dataset) == rows
    # The intact shards are read where they are; of 00002.tar, a copy of its whole members.
    urls = set(dataset["__url__"])
    repaired = urls - {str(root / "00000.tar"), str(root / "00001.tar")}
    assert len(urls) == 3 and len(repaired) == 1
    assert repaired.pop().startswith(str(tmp_path / "c" / "datasets" / "repaired-shards"))


# ------------------------------------------------------------------------------ (e) images named by relative paths

BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}


def relative_path_data(tmp_path, suffix: str):
    """``tmp_path/data/train.<suffix>``: 13 images at paths relative to its folder, one absolute path, one relative
    path found nowhere, and ``imgs/both.png``, a junk file there but a valid image relative to the directory the run
    starts in, ``tmp_path/cwd`` (which must win). Returns the data file's path relative to ``tmp_path/cwd``."""
    cwd, folder = tmp_path / "cwd", tmp_path / "data"
    (cwd / "imgs").mkdir(parents=True)
    (cwd / "imgs" / "both.png").write_bytes(png_bytes(99, 16))
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "both.png").write_bytes(b"junk")
    absolute = tmp_path / "elsewhere" / "a.png"
    names = [f"imgs/{i:03d}.png" for i in range(13)] + [str(absolute), "imgs/both.png"]
    make_relative_path_table(folder / f"train.{suffix}", names, missing=("imgs/gone.png",))
    absolute.parent.mkdir()
    absolute.write_bytes(png_bytes(98, 16))
    return f"../data/train.{suffix}"


# Streaming parquet is left out: datasets sleeps 5 s after streaming a parquet file (SLEEP_TIME_ON_THREADS_SHUTDOWN).
@pytest.mark.parametrize("suffix, flags", [("parquet", ["--num_workers", "1"]), ("csv", ["--streaming", "true"])])
def test_relative_image_paths_are_found_next_to_the_data_file(
    tmp_path, monkeypatch, suffix, flags, fresh_accelerator_state
):
    data_file = relative_path_data(tmp_path, suffix)
    monkeypatch.chdir(tmp_path / "cwd")
    data = ["--dataset_name", BUILDERS[suffix], "--data_files", data_file, "--per_device_train_batch_size", "4"]
    result, summary = run(tmp_path, *data, "--max_steps", "4", *flags)  # 16 rows: each read once
    assert result.steps == 4
    assert {k: v for k, v in summary["skipped"].items() if v} == {"missing_image": 1}  # only imgs/gone.png


def test_eval_finds_relative_image_paths_in_each_data_files_folder_and_refuses_a_path_found_in_two(
    tmp_path, monkeypatch, saved_model_dir
):
    parts = tmp_path / "parts"
    make_relative_path_table(parts / "a" / "data.jsonl", [f"imgs/a{i}.png" for i in range(3)])
    make_relative_path_table(parts / "b" / "data.jsonl", [f"imgs/b{i}.png" for i in range(3)], ("imgs/gone.png",), 4)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    args = EvalArguments(
        model=str(saved_model_dir),
        dataset="json",
        data_files=str(parts / "*" / "data.jsonl"),
        split="train",
        task="retrieval",
        caption_column="caption",
    )
    result = evaluate_model(args)
    assert result["num_samples"] == 6 and {k: v for k, v in result["skipped"].items() if v} == {"missing_image": 1}
    # b's folder holds an imgs/a0.png of its own: a's row may mean either (a row does not say which file it is
    # from); reading the first folder's would pair b's caption with a's image, silently.
    (parts / "b" / "imgs" / "a0.png").write_bytes(b"junk")
    says = r"image path 'imgs/a0.png' is a file in two of the folders it is looked up in \(.*parts/a and .*parts/b:"
    with pytest.raises(AmbiguousImagePath, match=says):
        evaluate_model(args)


def test_a_path_found_next_to_two_data_files_is_one_line_from_a_dataloader_worker(tmp_path, tokenizer):
    for part in ("a", "b"):
        (tmp_path / part / "imgs").mkdir(parents=True)
        (tmp_path / part / "imgs" / "0.png").write_bytes(png_bytes(0, 16))
    folders = (str(tmp_path / "a"), str(tmp_path / "b"))
    collator = ImageTextCollator(tokenizer, 12, MEAN, STD, max_length=TEXT_LEN, image_folders=folders)
    rows = [{"image": "imgs/0.png", "caption": "a red circle"}]
    loader = torch.utils.data.DataLoader(rows, batch_size=1, collate_fn=collator, num_workers=1)
    with pytest.raises(AmbiguousImagePath, match=r"^image path 'imgs/0.png' is a file in two of the folders") as error:
        next(iter(loader))
    assert "\n" not in str(error.value)  # torch puts the worker's traceback above the message: left out
    assert load_image("imgs/0.png", folders=folders[:1]).size == (16, 16)  # one folder: no doubt


def test_image_lookup_leaves_absolute_paths_bytes_and_hub_datasets_alone(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    make_relative_path_table(folder / "train.jsonl", ["imgs/x.png"])
    monkeypatch.chdir(tmp_path)
    folders = image_folders("data/*.jsonl", None)
    assert folders == (str(folder),) == image_folders(None, "data")
    found = {"bytes": None, "path": str(folder / "imgs" / "x.png")}
    assert locate_image({"bytes": None, "path": "imgs/x.png"}, folders) == found
    assert isinstance(load_image({"bytes": None, "path": "imgs/x.png"}, folders=folders), Image.Image)
    unchanged = [b"bytes", {"bytes": b"bytes", "path": "imgs/x.png"}, str(tmp_path / "imgs/x.png"), "imgs/gone.png"]
    assert [locate_image(value, folders) for value in unchanged] == unchanged
    assert load_image("imgs/gone.png", folders=folders) == "missing_image"
    # A Hub dataset: no local file to look next to, and no listing over the network.
    assert image_folders(None, None) == image_folders("train/*.parquet", None) == image_folders("hf://x/*.jsonl", None)
    assert image_folders(None, None) == ()


def test_a_symlinked_data_file_finds_its_images_next_to_its_target(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    make_relative_path_table(folder / "train.jsonl", ["imgs/x.png"])
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "train.jsonl").symlink_to(folder / "train.jsonl")
    monkeypatch.chdir(tmp_path)
    folders = image_folders("links/train.jsonl", None)
    assert folders == (str(tmp_path / "links"), str(folder))  # the link's folder first, then its target's
    assert isinstance(load_image("imgs/x.png", folders=folders), Image.Image)
