"""Data sources (imagefolder, parquet, webdataset, saved, streaming), column errors and skip-and-count."""

import datasets
import pytest
import torch
from conftest import TEXT_LEN
from datasets.distributed import split_dataset_by_node
from datasets_util import make_broken_dataset, make_imagefolder, make_parquet, make_webdataset

from glip_hf.arguments import DataArguments
from glip_hf.data import (
    ImageTextCollator,
    IndexedDataset,
    check_columns,
    load_image_text_dataset,
    prepare_for_decoding,
    random_resized_crop,
    uneven_stream_split,
)

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def collate(dataset, tokenizer, image_column="image", caption_column="caption", **kwargs):
    dataset = prepare_for_decoding(dataset, image_column.split(","))
    collator = ImageTextCollator(tokenizer, 12, MEAN, STD, image_column, caption_column, max_length=TEXT_LEN, **kwargs)
    return collator([{"__index__": i, **row} for i, row in enumerate(dataset)])


def data_args(tmp_path, **kwargs) -> DataArguments:
    return DataArguments(cache_dir=str(tmp_path / "cache"), **kwargs)


def test_imagefolder_with_metadata_captions(tmp_path, tokenizer):
    root = make_imagefolder(tmp_path / "folder")
    dataset = load_image_text_dataset(data_args(tmp_path, dataset_name="imagefolder", data_dir=str(root)), "train")
    check_columns(dataset, {"image_column": "image", "caption_column": "text"}, "imagefolder")
    batch = collate(dataset, tokenizer, caption_column="text")
    assert batch["pixel_values"].shape == (6, 3, 12, 12) and batch["input_ids"].shape == (6, TEXT_LEN)
    assert sum(batch["skipped"].values()) == 0


def test_parquet_files(tmp_path, tokenizer):
    path = make_parquet(tmp_path / "pairs.parquet")
    dataset = load_image_text_dataset(data_args(tmp_path, dataset_name="parquet", data_files=str(path)), "train")
    assert len(dataset) == 8
    assert collate(dataset, tokenizer)["pixel_values"].shape[0] == 8


def test_webdataset_shards(tmp_path, tokenizer):
    root = make_webdataset(tmp_path / "shards")
    args = data_args(tmp_path, dataset_name="webdataset", data_files=str(root / "*.tar"))
    dataset = load_image_text_dataset(args, "train")
    assert {"jpg", "txt"} <= set(dataset.column_names)
    batch = collate(dataset, tokenizer, image_column="png,jpg", caption_column="txt")
    assert batch["pixel_values"].shape[0] == 8


def test_streaming_split_by_node_reads_disjoint_rows(tmp_path):
    path = make_parquet(tmp_path / "pairs.parquet", n=10)
    args = data_args(tmp_path, dataset_name="parquet", data_files=str(path), streaming=True)
    stream = load_image_text_dataset(args, "train")
    assert isinstance(stream, datasets.IterableDataset)
    seen = [[row["caption"] for row in split_dataset_by_node(stream, rank, 2)] for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 10


@pytest.mark.parametrize("shards, reads", [(4, 2), (3, 3)])
def test_a_stream_whose_files_do_not_divide_over_the_processes_is_read_whole_by_each_and_said(tmp_path, shards, reads):
    """datasets gives each process files of its own only when their number divides over the processes; otherwise
    every process reads every file (and datasets says so at INFO level only): the run warns."""
    root = make_webdataset(tmp_path / "shards", shards=shards, per_shard=2)
    args = data_args(tmp_path, dataset_name="webdataset", data_files=str(root / "*.tar"), streaming=True)
    stream = load_image_text_dataset(args, "train")
    assert stream.num_shards == shards
    assert split_dataset_by_node(stream, 0, 2).num_shards == reads  # files process 0 reads
    assert uneven_stream_split(shards, 1) is None
    warning = uneven_stream_split(shards, 2)
    assert (warning is None) == (reads < shards)
    if warning:
        assert "3 file(s)" in warning and "every process reads all of them" in warning


def test_saved_dataset_and_wrong_column_error_lists_columns(tmp_path):
    path, _ = make_broken_dataset(tmp_path / "saved")
    dataset = load_image_text_dataset(data_args(tmp_path, dataset_name=str(path)), "train")
    with pytest.raises(ValueError, match=r"--caption_column 'text' is not a column of .*\['image', 'caption'\]"):
        check_columns(dataset, {"image_column": "image", "caption_column": "text"}, str(path))
    with pytest.raises(FileNotFoundError, match="data_files"):
        load_image_text_dataset(data_args(tmp_path, dataset_name="parquet", data_files="nope.parquet"), "train")


def test_an_empty_or_damaged_parquet_file_is_left_out_and_a_split_with_no_rows_is_a_one_line_error(tmp_path, caplog):
    root = tmp_path / "shards"
    root.mkdir()
    make_parquet(root / "a.parquet", n=4)
    make_parquet(root / "b.parquet", n=0)  # a shard with no rows: valid parquet, which datasets fails to read
    (root / "c.parquet").write_bytes(b"not parquet")
    for streaming in (False, True):
        args = data_args(tmp_path, dataset_name="parquet", data_files=str(root / "*.parquet"), streaming=streaming)
        assert len(list(load_image_text_dataset(args, "train").select_columns(["caption"]))) == 4
    assert "c.parquet" in caplog.text  # left out with a warning naming it
    empty = data_args(tmp_path, dataset_name="parquet", data_files=str(root / "b.parquet"))
    with pytest.raises(ValueError, match=r"dataset 'parquet' from .*b\.parquet, split 'train': .* no data.*hold rows"):
        load_image_text_dataset(empty, "train")


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer):
    path, expected = make_broken_dataset(tmp_path / "broken")
    batch = collate(datasets.load_from_disk(str(path)), tokenizer)
    assert dict(batch["skipped"]) == expected
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 20


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path, tokenizer):
    path = make_parquet(tmp_path / "pairs.parquet", n=4)
    dataset = IndexedDataset(prepare_for_decoding(datasets.Dataset.from_parquet(str(path)), ["image"]))
    collator = ImageTextCollator(tokenizer, 12, MEAN, STD, max_length=TEXT_LEN, seed=3)
    first = collator([dataset[2], dataset[0]])["pixel_values"]
    again = collator([dataset[0], dataset[2]])["pixel_values"]
    torch.testing.assert_close(first[0], again[1])  # same sample, other batch position: same crop
    collator.epoch = 1
    assert not torch.equal(collator([dataset[2]])["pixel_values"][0], first[0])  # new epoch: new crop


def test_random_resized_crop_covers_the_requested_area():
    import random

    from datasets_util import blank_image

    image = blank_image().resize((100, 50))
    out = random_resized_crop(image, 24, (0.5, 1.0), random.Random(0))
    assert out.size == (24, 24)


def test_streamed_rows_get_distinct_augmentation(tmp_path, tokenizer):
    path = make_parquet(tmp_path / "pairs.parquet", n=8)
    stream = load_image_text_dataset(
        data_args(tmp_path, dataset_name="parquet", data_files=str(path), streaming=True), "train"
    )
    from glip_hf.data import with_stream_index as _with_index

    rows = list(prepare_for_decoding(stream, ["image"]).map(_with_index, with_indices=True))
    assert [row["__index__"] for row in rows] == list(range(8))
    collator = ImageTextCollator(tokenizer, 12, MEAN, STD, max_length=TEXT_LEN, seed="0-rank0")
    same_image = [{**rows[0], "__index__": i} for i in range(4)]  # one image at four stream positions
    pixels = collator(same_image)["pixel_values"]
    assert len({tuple(p.flatten()[:50].tolist()) for p in pixels}) == 4


def test_data_files_are_read_relative_to_data_dir_as_datasets_resolves_them(tmp_path, monkeypatch):
    (tmp_path / "data" / "part").mkdir(parents=True)
    make_parquet(tmp_path / "data" / "part" / "a.parquet", n=3)
    monkeypatch.chdir(tmp_path)  # "part/a.parquet" is a file relative to --data_dir only
    for pattern in ("part/a.parquet", "part/*.parquet"):
        args = data_args(tmp_path, dataset_name="parquet", data_dir="data", data_files=pattern)
        assert len(load_image_text_dataset(args, "train")) == 3
    with pytest.raises(FileNotFoundError, match=r"data_files part/b.parquet does not exist in --data_dir data; "):
        load_image_text_dataset(
            data_args(tmp_path, dataset_name="parquet", data_dir="data", data_files="part/b.parquet"), "train"
        )


def test_the_built_in_dataset_survives_another_process_building_it_at_the_same_time(tmp_path, monkeypatch):
    """Each rank of `accelerate launch run_eval.py` builds the built-in dataset when the cache lacks it. Here the other
    process finishes while this one is about to save its copy (the real interleaving, made deterministic): this one
    must use the cache the other wrote, not fail renaming onto it (OSError: Directory not empty) or leave a
    temporary folder behind."""
    from glip_hf.synthetic import build_synthetic_dataset

    save = datasets.DatasetDict.save_to_disk
    other = []

    def other_process_finishes_first(self, *args, **kwargs):
        if not other:  # the first save is this process's: the other one runs to the end before it
            other.append(None)
            other[0] = build_synthetic_dataset(tmp_path, num_train=4, num_test=2, image_size=8)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", other_process_finishes_first)
    built = build_synthetic_dataset(tmp_path, num_train=4, num_test=2, image_size=8)
    assert built["train"]["caption"] == other[0]["train"]["caption"] and len(built["test"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("synthetic-*")).name]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_folder_of_shards_named_as_the_dataset_reads_a_latin1_caption_as_none(tmp_path, streaming):
    """`--dataset_name <folder of train-*.tar>` (or a Hub repository of shards) is a webdataset that datasets finds by
    itself: its captions decode as `--dataset_name webdataset`'s do, a Latin-1 one as None (skipped and counted),
    not a lost split or a UnicodeDecodeError partway through a stream."""
    import io
    import tarfile

    root = make_webdataset(tmp_path / "shards", shards=1, per_shard=3)
    folder = tmp_path / "folder"
    folder.mkdir()
    with tarfile.open(root / "00000.tar") as src, tarfile.open(folder / "train-00000.tar", "w") as dst:
        for member in src.getmembers():
            payload = "café".encode("latin-1") if member.name == "000002.txt" else src.extractfile(member).read()
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    loaded = load_image_text_dataset(data_args(tmp_path, dataset_name=str(folder), streaming=streaming), "train")
    assert [row["txt"] is None for row in prepare_for_decoding(loaded, ["jpg"])] == [False, False, True]


def _tar(path, samples) -> None:
    """A webdataset shard of ``samples``: ``(key, extension, image format or None for a caption)`` members in order."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for key, extension, fmt in samples:
            if fmt is None:
                data = f"caption {key}".encode()
            else:
                buffer = io.BytesIO()
                Image.new("RGB", (12, 12), (int(key) * 20 % 256, 0, 0)).save(buffer, fmt)
                data = buffer.getvalue()
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _sample(i: int, image: str = "jpg") -> list:
    return [(f"{i:06d}", image, "PNG" if image == "png" else "JPEG"), (f"{i:06d}", "txt", None)]


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_png_samples_after_five_jpg_ones_are_read(tmp_path, tokenizer, streaming):
    """datasets infers a shard's columns from its first 5 samples: with --image_column jpg,png, the png samples after
    them had no column and were all counted as missing images."""
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "000.tar", [m for i in range(8) for m in _sample(i, "jpg" if i < 6 else "png")])
    args = data_args(tmp_path, dataset_name="webdataset", data_files=str(tmp_path / "shards" / "*.tar"))
    args.image_column, args.caption_column, args.streaming = "jpg,png", "txt", streaming
    batch = collate(load_image_text_dataset(args, "train"), tokenizer, "jpg,png", "txt")
    assert batch["pixel_values"].shape[0] == 8 and not batch["skipped"]


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_sample_written_twice_keeps_its_first_copy(tmp_path, streaming):
    """datasets raised on a repeated member: the split was refused, a streaming run died partway through."""
    (tmp_path / "shards").mkdir()
    members = [m for i in (0, 1, 2, 2, 3) for m in _sample(i)]
    _tar(tmp_path / "shards" / "000.tar", members)
    args = data_args(tmp_path, dataset_name="webdataset", data_files=str(tmp_path / "shards" / "*.tar"))
    args.streaming = streaming
    assert [row["__key__"] for row in load_image_text_dataset(args, "train")] == [
        "000000",
        "000001",
        "000002",
        "000003",
    ]


def test_an_empty_archive_as_the_first_shard_is_left_out_with_a_warning(tmp_path):
    """A well-formed tar of no member was taken as a whole shard; datasets inferred no column from it and refused the
    split with "Must pass at least one table", naming no file."""
    import tarfile

    (tmp_path / "shards").mkdir()
    tarfile.open(tmp_path / "shards" / "000.tar", "w").close()
    _tar(tmp_path / "shards" / "001.tar", [m for i in range(6) for m in _sample(i)])
    args = data_args(tmp_path, dataset_name="webdataset", data_files=str(tmp_path / "shards" / "*.tar"))
    with pytest.warns(UserWarning, match=r"000\.tar is an empty archive: it is left out"):
        assert len(load_image_text_dataset(args, "train")) == 6


def test_an_image_path_the_file_system_cannot_look_at_is_a_missing_image():
    """A file name longer than the file system allows made is_file() raise: a traceback that killed the run."""
    from glip_hf.data import load_image

    long = "y" * 300 + ".jpg"
    assert load_image(long) == load_image(f"imgs/{long}", folders=("/tmp",)) == "missing_image"
    assert load_image({"bytes": None, "path": long}, folders=("/tmp",)) == "missing_image"


def test_a_16_bit_image_with_a_transparent_colour_key_is_composited_over_white():
    import io

    import numpy as np
    from PIL import Image

    from glip_hf.data import decode_image

    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(buffer, "PNG", transparency=0)
    assert np.asarray(decode_image(buffer.getvalue()))[0, :, 0].tolist() == [255, 255]  # the key was drawn black
