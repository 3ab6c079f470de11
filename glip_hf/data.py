"""Image-caption data: any HF dataset (name, local path, imagefolder, parquet, webdataset, streaming) to batches.

A row goes through: decode image -> RandomResizedCrop -> normalise; pick a caption -> tokenize; collate. Images are
decoded here rather than by ``datasets`` so that a corrupt file is skipped and counted (by reason, ``SKIP_REASONS``)
instead of crashing the run, while odd but valid images (EXIF-rotated, 16-bit, CMYK, transparent, palette, tiny or
extreme aspect ratios) are converted to what they show (`to_rgb`). Local webdataset shards are checked before
``datasets`` reads them, so that a shard cut short loses only its tail (`check_webdataset_shards`).
Augmentation randomness is derived from ``(seed, epoch, sample index)``, so a batch is the same whichever worker
builds it and whenever (a resumed run sees the very same pixels).

Training asks this module once (`training_batches`) and gets micro-batches on its device, epoch after epoch, from
where a checkpoint left off. Sections: loading datasets; webdataset shards; images and the collator; training batches.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
import random
import socket
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .preemption import spare_worker
from .synthetic import build_synthetic_dataset

if TYPE_CHECKING:  # imported where used: decoding and collating a batch need neither datasets nor accelerate
    import datasets

    from .arguments import DataArguments, ModelArguments, TrainingArguments

SKIP_REASONS = ("missing_image", "undecodable_image", "empty_image", "missing_caption")


def _looks_like_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_image_text_dataset(args: DataArguments, split: str) -> datasets.Dataset | datasets.IterableDataset:
    """Load ``split`` of ``args.dataset_name``: a Hub name, a ``save_to_disk`` folder, or a builder such as
    ``imagefolder`` / ``parquet`` / ``webdataset`` with ``data_dir`` / ``data_files``.

    ``webdataset`` with local ``.tar`` ``data_files`` goes through `check_webdataset_shards` first: damaged shards
    are read up to the damage (with a warning naming each), and samples lacking a member load with None there."""
    import datasets

    name = args.dataset_name
    if name is not None and Path(name).is_dir() and _looks_like_saved_dataset(Path(name)):
        folder = Path(name)
        if (folder / "dataset_dict.json").is_file():  # only the split asked for is loaded
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise ValueError(f"split {split!r} not in {name}; it has {sorted(splits)}.")
            folder = folder / split
        try:
            loaded = datasets.load_from_disk(str(folder))
        except IndexError:  # datasets fails so on a saved split of no rows (no table to concatenate)
            loaded = []
        if len(loaded) == 0:
            raise ValueError(
                f"split {split!r} of {name} has no rows; pick a split that has (--split / --train_split)."
            )
        return loaded.to_iterable_dataset() if args.streaming else loaded
    data_files, data_dir, features = args.data_files, args.data_dir, None
    where = f" in --data_dir {data_dir}" if data_dir is not None else ""
    if data_files is not None and not any(ch in data_files for ch in "*?["):
        # datasets reads data_files relative to data_dir when it is given (an absolute path stays as it is)
        base = Path(data_dir).expanduser() if data_dir is not None else Path()
        if not (base / Path(data_files).expanduser()).exists():
            raise FileNotFoundError(
                f"data_files {data_files} does not exist{where}; pass an existing file (relative to --data_dir when "
                "it is given) or a glob."
            )
    elif data_files is not None and "://" not in data_files and not resolve_data_files(data_files, data_dir):
        # a local glob that matches nothing: datasets' own message blamed a metadata file
        raise FileNotFoundError(f"data_files {data_files} matches no file{where}; pass a glob of your files.")
    if name == "webdataset" and (data_files is not None or data_dir is not None):
        # With --data_dir alone, the split's shards are found as datasets finds them (train-*.tar, test-*.tar, ...).
        patterns = data_files if data_files is not None else _split_patterns(data_dir, split)
        repair_dir = Path(args.cache_dir) / "datasets" / "repaired-shards"
        wanted = [*args.image_column.split(","), args.caption_column]  # columns later samples may bring
        checked = check_webdataset_shards(patterns, data_dir, repair_dir, wanted) if patterns else None
        if checked is not None:
            shards, features = checked
            data_files, data_dir = (shards if data_files is not None else {split: shards}), None
    # A parquet file that cannot be read (cut short, not parquet, or without rows, which datasets fails on too) is
    # left out with a warning naming it, as a damaged webdataset shard is, instead of losing the whole split.
    options = {"on_bad_files": "warn"} if name == "parquet" else {}
    try:
        loaded = _load_split(
            name,
            split,
            args.streaming,
            name=args.dataset_config_name,
            data_dir=data_dir,
            data_files=data_files,
            cache_dir=str(Path(args.cache_dir) / "datasets"),
            features=features,
            **options,
        )
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise FileNotFoundError(f"dataset {name!r} could not be loaded ({error}); check --dataset_name.") from None
    except ConnectionError as error:  # a Hub name while offline (HF_HUB_OFFLINE=1, or no network)
        raise FileNotFoundError(
            f"dataset {name!r} could not be reached ({error}); check --dataset_name, or download it first and pass "
            "its local folder."
        ) from None
    except datasets.exceptions.DatasetGenerationError as error:  # a file the builder cannot read
        raise ValueError(
            f"dataset {name!r} could not be read from {data_files or data_dir} ({error.__cause__}); fix or remove "
            "the file."
        ) from None
    except ValueError as error:  # datasets' own: a split it does not have or that has no rows, a malformed file
        raise ValueError(
            f"dataset {name!r} from {data_files or data_dir}, split {split!r}: {error}; check the split name, and "
            "that its files hold rows and are well-formed."
        ) from None
    except IndexError:  # datasets' folder builders index the first metadata file's rows: an empty one fails so
        raise ValueError(
            f"dataset {name!r} could not be loaded from {data_dir or data_files}: is a metadata file "
            "(metadata.jsonl / .csv) empty? Give it one row per image, or remove it."
        ) from None
    return loaded


def _load_split(path: str, split: str, streaming: bool, **kwargs: Any) -> datasets.Dataset | datasets.IterableDataset:
    """``datasets.load_dataset(path, split=split, streaming=streaming, **kwargs)`` (its steps, in its order), except
    that datasets' webdataset builder reads a text member that is not UTF-8 as None (`glip_hf.lenient_webdataset`):
    one such caption is then skipped and counted, instead of failing the split or, streaming, the run. That is
    ``path="webdataset"`` and also a folder or Hub repository of ``.tar`` shards, which datasets reads with the same
    builder."""
    import datasets
    from datasets.load import configure_builder_class
    from datasets.packaged_modules.webdataset.webdataset import WebDataset
    from datasets.utils.info_utils import is_small_dataset

    from .lenient_webdataset import LenientWebDataset

    builder = datasets.load_dataset_builder(path, **kwargs)
    kind = type(builder)
    if kind is WebDataset:
        builder.__class__ = LenientWebDataset  # the same builder, its text decoders aside
    elif kind.__mro__[1] is WebDataset and "BUILDER_CONFIGS" in vars(kind):  # datasets' configured copy of it
        builder.__class__ = configure_builder_class(  # the same copy of ours (it pickles by its parent class)
            LenientWebDataset, kind.BUILDER_CONFIGS, kind.DEFAULT_CONFIG_NAME, builder.dataset_name
        )
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split, in_memory=is_small_dataset(builder.info.dataset_size))


# ------------------------------------------------------------------------------------------- webdataset shards

TAR_BLOCK = 512
END_OF_ARCHIVE = 2 * TAR_BLOCK  # a tar archive ends with two zero blocks
# Column types of webdataset members, by extension, as datasets' WebDataset builder decodes them.
WEBDATASET_TEXT_EXTENSIONS = ("txt", "text", "transcript")
WEBDATASET_INT_EXTENSIONS = ("cls", "cls2", "index", "inx", "id")


@dataclass
class TarShardCheck:
    """What `check_tar_shard` found in one ``.tar`` shard.

    ``intact``: every member is whole and nothing unreadable follows the last one. Otherwise ``members`` regular
    members (``samples`` webdataset samples) are whole, and ``data_end`` is the byte just past the last one's data.
    """

    path: Path
    intact: bool
    members: int = 0
    samples: int = 0
    data_end: int = 0
    empty: bool = False  # a well-formed archive of no member (only its end-of-archive marker)


def check_tar_shard(path: Path) -> TarShardCheck:
    """Whether a local ``.tar`` shard is whole, reading tar headers only.

    A shard that ends in an end-of-archive marker (its last 1024 bytes zero) is taken as whole without reading more,
    so checking thousands of shards costs one small read each. Any other shard has its headers walked (``tarfile``
    seeks over member data) up to the first member whose data runs past the end of the file, a header that does not
    parse, or the end; it is whole only when nothing but zero padding follows its last member. (A cut that leaves
    1024 zero bytes of member data, block-aligned, at the end would pass for whole; datasets then raises as before.)
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size >= END_OF_ARCHIVE and size % TAR_BLOCK == 0:
            first = handle.read(TAR_BLOCK)
            handle.seek(size - END_OF_ARCHIVE)
            if not any(handle.read(END_OF_ARCHIVE)):
                if not any(first):  # no header at all: datasets would infer no column from it
                    return TarShardCheck(path, intact=False, empty=True)
                return TarShardCheck(path, intact=True)
        members, data_end, keys, clean_end = 0, 0, [], False
        try:
            with tarfile.open(path, "r:") as tar:
                while (info := tar.next()) is not None:
                    if info.offset_data + info.size > size:  # the header promises data the file no longer holds
                        break
                    data_end = info.offset_data + info.size
                    if info.isreg():
                        members += 1
                        keys.append(_webdataset_key(info.name)[0])
                else:  # tarfile stopped at a zero block, the end of the file or a header it cannot parse
                    handle.seek(data_end + -data_end % TAR_BLOCK)
                    block = handle.read(TAR_BLOCK)  # whole only if a zero block follows: the end-of-archive marker
                    clean_end = len(block) == TAR_BLOCK and not any(block)
        except tarfile.TarError:  # an empty or non-tar file, or a member whose padding was cut off
            pass
    samples = len([key for i, key in enumerate(keys) if key is not None and (i == 0 or key != keys[i - 1])])
    return TarShardCheck(path, clean_end, members, samples, data_end)


def _webdataset_key(name: str) -> tuple[str | None, str | None]:
    """``(sample key, field)`` of a member name, split as datasets' WebDataset builder splits it."""
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    if Path(name).name.startswith((".", "__")):  # hidden members, which datasets skips
        return None, None
    return base_plus_ext(name)


def _repaired_copy(check: TarShardCheck, directory: Path) -> Path:
    """A copy of the whole members of a damaged shard, closed by an end-of-archive marker (made once, atomically)."""
    stat = check.path.stat()
    key = hashlib.sha1(f"{check.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = directory / f"{key}-{check.path.name}"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{socket.gethostname()}-{os.getpid()}.partial")  # unique per node
    with check.path.open("rb") as source, partial.open("wb") as copy:
        remaining = check.data_end
        while remaining:
            chunk = source.read(min(remaining, 1 << 20))
            copy.write(chunk)
            remaining -= len(chunk)
        copy.write(bytes(-check.data_end % TAR_BLOCK + END_OF_ARCHIVE))
    os.replace(partial, target)
    return target


def _first_sample_fields(path: Path, count: int) -> list[list[str]]:
    """The member fields (``jpg``, ``txt``, ...) of the first ``count`` samples of a shard, from its headers."""
    samples: list[list[str]] = []
    last_key = None
    try:
        with tarfile.open(path, "r:") as tar:
            while (info := tar.next()) is not None:
                key, field_name = _webdataset_key(info.name) if info.isreg() else (None, None)
                if key is None:
                    continue
                if key != last_key:
                    if len(samples) == count:
                        break
                    samples.append([])
                    last_key = key
                samples[-1].append(field_name)
    except tarfile.TarError:  # not a tar after all: datasets will say so
        pass
    return samples


def webdataset_features(first_shard: Path, wanted: Sequence[str] = ()) -> datasets.Features | None:
    """Column types to hand ``load_dataset("webdataset")`` when it cannot infer them, else None.

    datasets infers the columns from the first 5 samples of the first shard and refuses to load when their members
    differ (one lacks its caption, say), and has no column for a member that only later samples have (``png``
    samples after five ``jpg`` ones: with ``--image_column jpg,png`` they were all lost as missing images). Then the
    columns are the union of those samples' members and the ``wanted`` ones (the image and caption columns asked
    for), typed as datasets types them (an image extension: ``Image``; ``txt``: string; ``cls``: int64); a sample
    without one of them gets None there, which the collator counts as a missing image or caption. None too when a
    member's type cannot be told from its extension (``json``, ...): datasets then raises its own error.
    """
    import datasets
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    def kind(name: str) -> datasets.Image | datasets.Value | None:
        extension = name.rsplit(".", 1)[-1].lower()
        if extension in WebDataset.IMAGE_EXTENSIONS:
            return datasets.Image()
        if extension in WEBDATASET_TEXT_EXTENSIONS:
            return datasets.Value("string")
        if extension in WEBDATASET_INT_EXTENSIONS:
            return datasets.Value("int64")
        return None

    fields = _first_sample_fields(first_shard, WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE)
    seen = {field_name for sample in fields for field_name in sample}
    # A wanted name no member type can have (--image_column image on shards of jpg) is left to the column check.
    later = [name for name in wanted if name not in seen and kind(name) is not None]
    if len({frozenset(sample) for sample in fields}) <= 1 and not later:
        return None
    columns = {}
    for name in dict.fromkeys([*(f for sample in fields for f in sample), *later]):
        columns[name] = kind(name)
        if columns[name] is None:
            return None
    return datasets.Features({**columns, "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})


def _split_patterns(data_dir: str, split: str) -> list[str]:
    """The file patterns datasets infers for ``split`` in ``data_dir`` (all files when no split is named)."""
    import datasets

    base = Path(data_dir).expanduser().resolve().as_posix()
    try:
        patterns = datasets.data_files.get_data_patterns(base)
    except FileNotFoundError:
        return []
    return list(patterns.get(split, []))


def resolve_data_files(data_files: str | list[str], data_dir: str | None) -> list[str]:
    """The files ``data_files`` patterns match, relative to ``data_dir`` (else the current directory) as datasets
    resolves them, in order, each once; a pattern matching nothing is left out."""
    import datasets

    base = Path(data_dir or "").expanduser().resolve().as_posix()
    files: list[str] = []
    for pattern in [data_files] if isinstance(data_files, str) else data_files:
        try:
            files += [f for f in datasets.data_files.resolve_pattern(pattern, base) if f not in files]
        except FileNotFoundError:
            continue
    return files


def image_folders(data_files: str | None, data_dir: str | None) -> tuple[str, ...]:
    """The local folders a relative image path in the data is looked up in when it is no file relative to the
    current directory (`locate_image`): the folder of each local data file ``data_files`` matches, in order (for a
    symbolic link, its folder then its target's), then ``data_dir``. Empty for Hub datasets and remote files
    (nothing local to look in)."""
    folders = []
    if data_files is not None and "://" not in data_files:  # a remote pattern would be listed over the network
        for file in resolve_data_files(data_files, data_dir):
            if Path(file).is_file():  # a symbolic link's folder, then its target's
                folders += [str(Path(file).parent), str(Path(file).resolve().parent)]
    if data_dir is not None and Path(data_dir).expanduser().is_dir():
        folders.append(str(Path(data_dir).expanduser().resolve()))
    return tuple(dict.fromkeys(folders))


def check_webdataset_shards(
    data_files: str | list[str], data_dir: str | None, repair_dir: Path, wanted: Sequence[str] = ()
) -> tuple[list[str], datasets.Features | None] | None:
    """The shards to load for local ``.tar`` webdataset ``data_files``, and the column types if they need giving.

    datasets reads a tar as a stream and raises as soon as a member is cut short, losing the whole split (or the
    run, when streaming). So each shard is checked first (`check_tar_shard`, headers only). A damaged shard is
    replaced by a copy of its whole members in ``repair_dir`` (made once per shard version): its samples before the
    damage are read, the rest is lost, and one warning line names the shard; a sample cut in two keeps its whole
    members and is counted by the collator (a missing image or caption). A shard with no whole member is left out,
    with a warning. Returns None, changing nothing, for patterns that match no file or anything but local ``.tar``
    files (remote and compressed shards go to datasets untouched).
    """
    files = resolve_data_files(data_files, data_dir)
    if not files:
        return None
    if not all(Path(file).suffix == ".tar" and Path(file).is_file() for file in files):
        return None
    shards = []
    for file in files:
        check = check_tar_shard(Path(file))
        if check.intact:
            shards.append(file)
            continue
        if check.empty:
            warnings.warn(f"webdataset shard {check.path} is an empty archive: it is left out.", stacklevel=2)
            continue
        lost = f"{check.path} is truncated or corrupt after byte {check.data_end} of {check.path.stat().st_size}"
        if check.members == 0:
            warnings.warn(f"webdataset shard {lost}: it holds no whole sample and is left out.", stacklevel=2)
            continue
        warnings.warn(
            f"webdataset shard {lost}: reading its first {check.samples} sample(s) only; the rest is lost.",
            stacklevel=2,
        )
        shards.append(str(_repaired_copy(check, repair_dir)))
    if not shards:
        raise ValueError(f"--data_files {data_files}: every shard is empty or damaged before its first sample.")
    return shards, webdataset_features(Path(shards[0]), wanted)


def column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """The columns of a dataset; for a stream without declared features, those of its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def check_columns(dataset, required: dict[str, str], source: str) -> None:
    """Raise a one-line ValueError if a column named by a flag is missing, listing the columns that exist.

    Args:
        required: ``{flag name: column value}``; a value ``"a,b"`` is satisfied by any of its names.
    """
    existing = column_names(dataset)
    for flag, value in required.items():
        if not any(name in existing for name in value.split(",")):
            raise ValueError(f"--{flag} {value!r} is not a column of {source}; it has {existing}.")


def first_image(row: dict, image_columns: Sequence[str]) -> Any:
    """The value of the first of ``image_columns`` (``--image_column a,b``) the row has, or None."""
    return next((row[c] for c in image_columns if row.get(c) is not None), None)


def prepare_for_decoding(dataset, image_columns: list[str]):
    """Turn ``Image`` columns to raw bytes so decoding happens (and may fail) in the collator."""
    import datasets

    features = dataset.features or {}
    for name in image_columns:
        if isinstance(features.get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def decode_image(value: Any, before_load: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, ``{"bytes", "path"}`` dict, raw bytes or a file path (see `to_rgb`).

    ``before_load(image)`` sees the opened image before its pixels are decoded (its size and format are known then:
    `draft_for_crop` uses it to decode a JPEG at reduced size). Raises whatever PIL raises for data that is not a
    complete image: a truncated JPEG stays an error (PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off),
    so it is skipped rather than trained on half grey."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        # Bytes win over the path: webdataset rows carry a made-up "key.jpg" path beside their bytes.
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        image = Image.open(value)
    if before_load is not None:
        before_load(image)
    image.load()
    return to_rgb(image)


def image_data(value: Any) -> Any:
    """What an image cell holds: a PIL image, its bytes, or its path; None when it holds none of them."""
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    return None if value is None or (isinstance(value, str) and not value) else value


class AmbiguousImagePath(ValueError):
    """A relative image path that is a file in more than one of the folders it is looked up in (`locate_image`): a
    row does not say which data file it came from, so which image it means is unknown.

    Raised in a DataLoader worker, it reaches the main process as torch re-raises it there, the worker's traceback
    put above the message: only the message (the last line) is kept, so the error stays one line."""

    def __init__(self, message: str):
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def _is_file(path: str | Path) -> bool:
    """``Path(path).is_file()``, False also where the path cannot be looked at (a name too long for the file
    system, a folder without permission, an I/O error, a NUL byte), which ``is_file`` raises instead."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def locate_image(value: Any, folders: Sequence[str]) -> Any:
    """An image cell with its relative path made to point at a file: as given when that is a file relative to the
    current directory, else the one of ``folders`` (see `image_folders`) holding it. A cell whose path is found
    nowhere, an absolute path, bytes, a PIL image or a dict with bytes are returned unchanged. A path that is a file
    in two folders (two data files' folders each holding an ``imgs/0.png``, say) is an `AmbiguousImagePath`: taking
    the first would pair a row of the second data file with the first one's image."""
    data = image_data(value)
    if not folders or not isinstance(data, (str, Path)) or Path(data).is_absolute() or _is_file(data):
        return value
    holding = [folder for folder in folders if _is_file(Path(folder) / data)]
    if not holding:
        return value
    if len({(Path(folder) / data).resolve() for folder in holding}) > 1:
        raise AmbiguousImagePath(
            f"image path {str(data)!r} is a file in two of the folders it is looked up in ({holding[0]} and "
            f"{holding[1]}: the data files' folders, then --data_dir), and a row does not say which data file it is "
            "from; write the paths relative to one folder above them and run from there (or pass that folder as "
            "--data_dir), or make them absolute."
        )
    found = Path(holding[0]) / data
    return {**value, "path": str(found)} if isinstance(value, dict) else str(found)


def load_image(
    value: Any, before_load: Callable[[Image.Image], None] | None = None, folders: Sequence[str] = ()
) -> Image.Image | str:
    """The RGB image of a raw image cell, or the reason (an entry of ``SKIP_REASONS``) it has none: no value or no
    such file (``missing_image``), zero bytes (``empty_image``), or data PIL cannot decode (``undecodable_image``).
    ``before_load``: see `decode_image`. A relative path is looked up in ``folders`` too (`locate_image`)."""
    value = locate_image(value, folders)
    data = image_data(value)
    if isinstance(data, (str, Path)):
        if not _is_file(data):
            return "missing_image"
        try:
            if Path(data).stat().st_size == 0:
                return "empty_image"
        except OSError:  # gone or unreadable since
            return "missing_image"
    elif data is None:
        return "missing_image"
    elif isinstance(data, (bytes, bytearray)) and not data:
        return "empty_image"
    try:
        image = decode_image(value, before_load)
    except Exception:  # PIL raises many types for corrupt data; any of them means "skip this sample"
        return "undecodable_image"
    return image if image.width and image.height else "empty_image"


# Pillow's modes deeper than 8 bits per channel, which its own convert("RGB") clips (a 16-bit mid-grey turns white).
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
UINT16_MAX = 65535


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image as it is meant to be seen, deterministically.

    The EXIF orientation is applied (a phone photo stored sideways comes out upright); 16-bit, 32-bit integer and
    float images are scaled to 8 bits (see `scale_to_8bit`); transparent pixels (RGBA, LA, palette or colour-key
    transparency) are composited over white, as ``transformers.image_transforms.convert_to_rgb`` does; every other
    mode (L, 1, P, CMYK, YCbCr, ...) goes through PIL's ``convert("RGB")``.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block does not make the pixels unusable: keep them as stored
        orientation = 1
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in DEEP_MODES:
        key = image.info.get("transparency")  # a colour key, lost by the scaling: kept as an alpha channel
        transparent = np.asarray(image) == key if isinstance(key, (int, float)) else None
        image = scale_to_8bit(image)
        if transparent is not None:
            image.putalpha(Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8)))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def scale_to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel image of a deep mode as 8-bit ``L``, scaled rather than clipped.

    ``I;16*``: ``v / 65535``. ``I`` (how Pillow may open 16-bit PNGs): the same when every value fits in 16 bits,
    else min-max. ``F``: ``v`` when every value is in [0, 1], else min-max. Then ``round(255 * x)``.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))  # (H, W)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= UINT16_MAX):
        unit = values / UINT16_MAX
    elif image.mode == "F" and low >= 0 and high <= 1:
        unit = values
    else:
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(unit * 255).clip(0, 255).astype(np.uint8))


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random, ratio=(3 / 4, 4 / 3)
) -> Box:
    """torchvision's RandomResizedCrop box for a ``width x height`` image (area fraction in ``scale``, log-uniform
    aspect ``ratio``; after 10 misses the central square)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def random_resized_crop(
    image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random, ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """torchvision's RandomResizedCrop on a PIL image (see `random_crop_box`), bicubic, to ``size x size``."""
    return image.resize((size, size), Image.BICUBIC, box=random_crop_box(*image.size, scale, rng, ratio))


JPEG_REDUCTIONS = (8, 4, 2)  # the scales a JPEG decoder can decode at directly (libjpeg's DCT scaling)
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def shown_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened image as `to_rgb` will return it (after its EXIF orientation), from the
    header alone."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # as in to_rgb: a malformed EXIF block is ignored
        orientation = 1
    return image.size[::-1] if orientation in TRANSPOSING_ORIENTATIONS else image.size


def draft_for_crop(image: Image.Image, box: Box, size: int) -> None:
    """Ask a JPEG's decoder (``Image.draft``) for the largest reduction (1/2, 1/4, 1/8) that still leaves the crop
    ``box`` (in `shown_size` pixels) at least ``size`` pixels on each side, so the decode does less work and the
    resize never upsamples what a full decode would not. Other formats are left alone."""
    if image.format != "JPEG":
        return
    shortest = min(box[2] - box[0], box[3] - box[1])
    reduction = next((r for r in JPEG_REDUCTIONS if shortest >= r * size), 1)
    if reduction > 1:
        width, height = image.size
        # Floor, not ceil: PIL picks the largest scale s with size // requested >= s, so a ceil'd request for an
        # odd width (501 // 251 = 1) got no reduction at all; the decoded image is ceil(size / s) either way.
        image.draft(image.mode, (width // reduction, height // reduction))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` uint8 tensor of an RGB image."""
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1)


def normalize_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``(..., 3, H, W)`` to float32 ``(x / 255 - mean) / std`` (``mean`` / ``std`` ``(3, 1, 1)``), on
    the pixels' device: the collator's float path (`to_normalized_tensor`) and ``uint8_batches`` (on the device)."""
    return (pixels.float().div_(255.0) - mean) / std


def to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` float tensor normalised by ``mean`` / ``std`` (each ``(3, 1, 1)``)."""
    # Contiguous first: the float arithmetic and the batch's stack then run over plain memory (about 40% faster).
    return normalize_pixels(to_uint8_tensor(image).contiguous(), mean, std)


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows carry their index (``__index__``), which seeds their augmentation."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"__index__": index, **self.dataset[index]}


class ImageTextCollator:
    """Rows -> ``{"pixel_values" (B, 3, S, S), "input_ids" (B, L), "attention_mask" (B, L), "skipped": dict}``.

    Bad rows are dropped from the batch and counted by reason (see ``SKIP_REASONS``); the batch may be smaller.
    ``"skipped"`` is a plain dict, not a Counter: a pinning DataLoader copies a mapping and ``update``s the copy with
    its own items, which doubles every count of a Counter.
    ``uint8``: pixel values stay uint8 (a quarter of the bytes to move between processes and to the device), to be
    normalised where they are used (`normalize_pixels`, as `TrainingBatches` does on the device). ``jpeg_draft``:
    the crop is drawn from the JPEG header's size first, and the JPEG decoded at the largest reduction that keeps
    the crop at least ``image_size`` pixels wide (`draft_for_crop`): the same crop, less decoding, slightly other
    pixels (the decoder's downscaling replaces part of the bicubic one). ``image_folders``: where a relative image
    path that is no file relative to the current directory is looked up too (`image_folders`, `locate_image`).
    """

    def __init__(
        self,
        tokenizer,
        image_size: int,
        image_mean: list[float],
        image_std: list[float],
        image_column: str = "image",
        caption_column: str = "caption",
        max_length: int = 77,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        seed: int | str = 0,
        uint8: bool = False,
        jpeg_draft: bool = False,
        image_folders: Sequence[str] = (),
    ):
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.image_mean = torch.tensor(image_mean).view(3, 1, 1)
        self.image_std = torch.tensor(image_std).view(3, 1, 1)
        self.image_columns, self.caption_column = image_column.split(","), caption_column
        self.crop_scale, self.seed = crop_scale, seed
        self.uint8, self.jpeg_draft = uint8, jpeg_draft
        self.image_folders = tuple(image_folders)
        self.epoch = 0  # set by the training loop before each epoch

    def _caption(self, row: dict, rng: random.Random) -> str | None:
        caption = row.get(self.caption_column)
        if isinstance(caption, (list, tuple)):
            caption = [c for c in caption if isinstance(c, str) and c.strip()]
            caption = rng.choice(caption) if caption else None
        return caption if isinstance(caption, str) and caption.strip() else None

    def _image(self, row: dict) -> Any:
        return first_image(row, self.image_columns)

    def process(self, row: dict, index: int) -> tuple[torch.Tensor, str] | str:
        """One row to ``(pixels, caption)``, or the reason it is skipped."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        raw, caption = self._image(row), self._caption(row, rng)
        if image_data(raw) is None:
            return "missing_image"
        if caption is None:
            return "missing_caption"
        drafted: list[tuple[tuple[int, int], Box]] = []  # (shown size, crop box) when the crop is drawn first

        def draft(opened: Image.Image) -> None:
            size = shown_size(opened)
            drafted.append((size, random_crop_box(*size, self.crop_scale, rng)))
            draft_for_crop(opened, drafted[0][1], self.image_size)

        image = load_image(raw, draft if self.jpeg_draft else None, self.image_folders)
        if isinstance(image, str):
            return image
        if drafted:
            (width, height), box = drafted[0]
            x, y = image.width / width, image.height / height  # 1, or the decoder's reduction
            box = (box[0] * x, box[1] * y, box[2] * x, box[3] * y)
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        else:
            image = random_resized_crop(image, self.image_size, self.crop_scale, rng)
        if self.uint8:
            return to_uint8_tensor(image), caption
        return to_normalized_tensor(image, self.image_mean, self.image_std), caption

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        pixels, captions, skipped = [], [], Counter()
        for position, row in enumerate(rows):
            result = self.process(row, row.get("__index__", position))
            if isinstance(result, str):
                skipped[result] += 1
                continue
            pixels.append(result[0])
            captions.append(result[1])
        if not pixels:  # every row skipped: an empty batch, which the loss and the loop accept
            return {
                "pixel_values": torch.zeros(
                    0, 3, self.image_size, self.image_size, dtype=torch.uint8 if self.uint8 else torch.float32
                ),
                "input_ids": torch.zeros(0, self.max_length, dtype=torch.long),
                "attention_mask": torch.zeros(0, self.max_length, dtype=torch.long),
                "skipped": dict(skipped),
            }
        text = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "skipped": dict(skipped),
        }


def caption_sample(dataset, caption_column: str, limit: int = 50_000) -> list[str]:
    """Up to ``limit`` caption strings (list-valued captions flattened), for training a tokenizer."""
    import datasets

    source = dataset.select_columns([caption_column])
    if isinstance(source, datasets.Dataset):
        source = source.select(range(min(limit, len(source))))
    texts: list[str] = []
    for row in source:
        value = row[caption_column]
        texts.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str))
        if len(texts) >= limit:
            break
    return texts


def make_image_processor(image_size: int, name_or_path: str | None = None, trust_remote_code: bool = False):
    """The checkpoint's image processor if it has one, else CLIP's (resize shortest edge, centre crop, CLIP
    mean/std) at ``image_size``. The PIL backend is used where torchvision is not installed. One that brings its own
    code is only loaded with ``trust_remote_code`` (without it: a one-line error, not a silent fallback)."""
    import importlib.util

    import transformers

    if name_or_path is not None:
        try:
            return transformers.AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            if "trust_remote_code" in str(error):
                raise ValueError(
                    f"image processor of {name_or_path} runs code of its own (auto_map); pass --trust_remote_code "
                    "true only if you trust that code."
                ) from None
    # Name the PIL class directly without torchvision: asking for CLIPImageProcessor then warns about the fallback.
    name = "CLIPImageProcessor" if importlib.util.find_spec("torchvision") else "CLIPImageProcessorPil"
    return getattr(transformers, name)(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


# ------------------------------------------------------------------------------------------- training batches


def save_processor(folder: str | Path, tokenizer, image_processor) -> None:
    """Save the tokenizer and image processor a model was trained with into its folder, and the
    ``processor_config.json`` that makes ``AutoProcessor.from_pretrained(folder)`` a ``CLIPProcessor`` of the two
    (without it, AutoProcessor returns the tokenizer alone: no ``processor(images=...)``)."""
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    write_processor_config(Path(folder))


def write_processor_config(folder: Path) -> None:
    """``folder/processor_config.json`` naming ``CLIPProcessor``, unless the folder has one."""
    if not (folder / "processor_config.json").is_file():
        (folder / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}, indent=2))


def load_training_data(data_args: DataArguments, model_args: ModelArguments):
    """``(train, held_out or None)`` datasets; the built-in generated dataset when no dataset is named."""
    from .arguments import DataArguments

    if data_args.dataset_name is None:
        synthetic = build_synthetic_dataset(
            Path(data_args.cache_dir) / "synthetic",
            num_train=data_args.synthetic_num_train,
            num_test=data_args.synthetic_num_test,
            image_size=model_args.image_size,
            seed=data_args.synthetic_seed,
            placement=data_args.synthetic_placement,
        )
        train = synthetic["train"].to_iterable_dataset() if data_args.streaming else synthetic["train"]
        return train, synthetic["test"]
    train = load_image_text_dataset(data_args, data_args.train_split)
    held_out = None
    if data_args.eval_split:
        held_out = load_image_text_dataset(
            DataArguments(**{**vars(data_args), "streaming": False}), data_args.eval_split
        )
    return train, held_out


def text_context(model_args: ModelArguments, model_config) -> int:
    """The tokens a training text is cut to: ``max_text_length``, within the text tower's positions."""
    return min(model_args.max_text_length, model_config.text_config.max_position_embeddings)


def make_train_collator(
    tokenizer, model_config, image_processor, model_args: ModelArguments, data_args: DataArguments, seed: int
) -> ImageTextCollator:
    """Rows -> batches at the model's image size, normalised as the saved image processor does."""
    return ImageTextCollator(
        tokenizer,
        model_config.vision_config.image_size,
        list(image_processor.image_mean),
        list(image_processor.image_std),
        data_args.image_column,
        data_args.caption_column,
        max_length=text_context(model_args, model_config),
        crop_scale=(data_args.crop_scale_min, data_args.crop_scale_max),
        seed=seed,
        uint8=data_args.uint8_batches,
        jpeg_draft=data_args.jpeg_draft,
        image_folders=image_folders(data_args.data_files, data_args.data_dir),
    )


def with_stream_index(row: dict, index: int) -> dict:
    """The row's position in this process's stream, unique across DataLoader workers (each worker counts its own
    rows from 0), so that it seeds an augmentation no other row shares."""
    worker = torch.utils.data.get_worker_info()
    return {"__index__": index if worker is None else index * worker.num_workers + worker.id}


def uneven_stream_split(num_shards: int, num_processes: int) -> str | None:
    """The warning for a stream whose ``num_shards`` (its files) do not divide over ``num_processes``: datasets'
    ``split_dataset_by_node`` then has every process read every file and keep one row in ``num_processes`` (and
    says so only at INFO level). None when each process reads files of its own."""
    if num_processes == 1 or num_shards % num_processes == 0:
        return None
    return (
        f"--streaming: the training data has {num_shards} file(s) (shards), not a multiple of the {num_processes} "
        f"processes, so every process reads all of them and keeps one row in {num_processes} ({num_processes} times "
        f"the reading); split it into a multiple of {num_processes} files for each process to read its own."
    )


def make_train_dataloader(
    train_data, collator: ImageTextCollator, data_args: DataArguments, training_args: TrainingArguments, accelerator
) -> torch.utils.data.DataLoader:
    """Map-style: shuffled, seeded, with row indices (sharded by ``accelerator.prepare``). Streaming: shuffled
    through a buffer and split across processes with ``split_dataset_by_node``. Pinned memory on a CUDA device."""
    train_data = prepare_for_decoding(train_data, data_args.image_column.split(","))
    limit = data_args.max_train_samples
    if limit is not None:
        train_data = (
            train_data.take(limit) if data_args.streaming else train_data.select(range(min(limit, len(train_data))))
        )
    # A generator of the loader's own: creating an iterator then never draws from the global RNG (which also
    # draws the patch masks), so a resumed run, whose iterator starts mid-epoch, keeps the same mask sequence.
    loader_kwargs = dict(
        batch_size=training_args.per_device_train_batch_size,
        collate_fn=collator,
        num_workers=data_args.num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(training_args.seed),
        pin_memory=accelerator.device.type == "cuda",
        # a scheduler's stop signal reaches the workers too; the main process (this one) acts on it
        worker_init_fn=functools.partial(spare_worker, main_process=os.getpid()),
    )
    if not data_args.streaming:
        if len(train_data) < training_args.per_device_train_batch_size * accelerator.num_processes:
            raise ValueError(
                f"per_device_train_batch_size={training_args.per_device_train_batch_size} x "
                f"{accelerator.num_processes} process(es) exceeds the {len(train_data)} training rows; "
                "lower the batch size."
            )
        return torch.utils.data.DataLoader(IndexedDataset(train_data), shuffle=True, **loader_kwargs)
    from datasets.distributed import split_dataset_by_node

    uneven = uneven_stream_split(train_data.num_shards, accelerator.num_processes)
    if uneven and accelerator.is_main_process:
        warnings.warn(uneven, stacklevel=2)
    stream = train_data.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    stream = split_dataset_by_node(stream, accelerator.process_index, accelerator.num_processes)
    # Streamed rows are indexed per process, so the rank joins the seed of their augmentation.
    stream = stream.map(with_stream_index, with_indices=True)
    collator.seed = f"{training_args.seed}-rank{accelerator.process_index}"
    return torch.utils.data.DataLoader(stream, **loader_kwargs)


def describe_source(data_args: DataArguments) -> str:
    """The training data as its flags name it, for messages (``dataset 'parquet' from d/*.parquet, split 'train'``)."""
    where = data_args.data_files or data_args.data_dir
    name = "the built-in dataset" if data_args.dataset_name is None else f"dataset {data_args.dataset_name!r}"
    return f"{name}{f' from {where}' if where else ''}, split {data_args.train_split!r}"


def no_batch_error(stream, source: str, accelerator) -> ValueError:
    """Why an epoch gave no batch: a ``stream`` (None for map-style data, whose size is checked up front) with no
    row at all, or fewer rows than one batch. ``source``: `describe_source`."""
    if stream is not None and next(iter(stream), None) is None:
        share = "" if accelerator.num_processes == 1 else f" (process {accelerator.process_index}'s share)"
        return ValueError(
            f"the training data has no rows{share}: {source} yields none (are its files empty?); give it files that "
            "hold rows."
        )
    return ValueError("the training data yields no full batch; lower --per_device_train_batch_size.")


def epoch_batches(
    dataloader, collator: ImageTextCollator, progress, accelerator, streaming: bool, source: str = "the data"
) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch, starting at ``progress`` (a ``TrainingProgress``: mid-epoch on
    resume), which is kept up to date with the position of the last batch yielded. ``source`` names the data in the
    error raised when an epoch gives no batch (`no_batch_error`)."""
    epoch, start = progress.epoch, progress.batch_in_epoch
    while True:
        collator.epoch = epoch
        if streaming:
            dataloader.dataset.set_epoch(epoch)
            loader = itertools.islice(dataloader, start, None)
        else:
            dataloader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(dataloader, start) if start else dataloader
        produced = False
        for index, batch in enumerate(loader, start=start):
            progress.epoch, progress.batch_in_epoch = epoch, index + 1
            produced = True
            yield batch
        if not produced and start == 0:
            raise no_batch_error(dataloader.dataset if streaming else None, source, accelerator)
        epoch, start = epoch + 1, 0
        progress.epoch, progress.batch_in_epoch = epoch, 0


@dataclass
class TrainingBatches:
    """The training loop's data: rows turned into micro-batches on the device (see `training_batches`).

    ``dataloader`` is prepared by Accelerate (map-style: sharded over processes, its sampler checkpointed with the
    run) or, streaming, split by `make_train_dataloader`; either way without device placement, which `batches`
    does itself: non-blocking copies from pinned memory on CUDA, and uint8 pixels normalised on the device.
    """

    dataloader: torch.utils.data.DataLoader
    collator: ImageTextCollator
    accelerator: Any
    streaming: bool
    source: str = "the training data"  # `describe_source`, for errors

    @property
    def per_epoch(self) -> int | None:
        """Micro-batches per epoch on each process; None for a stream, which has no length."""
        return None if self.streaming else len(self.dataloader)

    def batches(self, progress) -> Iterator[dict]:
        """Micro-batches forever from ``progress`` on (`epoch_batches`): tensors on the device, pixel values
        float32 and normalised, ``"skipped"`` the batch's skip counts."""
        device = self.accelerator.device
        non_blocking = device.type == "cuda"
        mean, std = self.collator.image_mean.to(device), self.collator.image_std.to(device)
        epochs = epoch_batches(self.dataloader, self.collator, progress, self.accelerator, self.streaming, self.source)
        for batch in epochs:
            moved = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if k != "skipped"}
            if moved["pixel_values"].dtype == torch.uint8:
                moved["pixel_values"] = normalize_pixels(moved["pixel_values"], mean, std)
            yield {**moved, "skipped": batch["skipped"]}


def training_batches(
    train_data,
    tokenizer,
    model_config,
    image_processor,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    accelerator,
) -> TrainingBatches:
    """Rows -> batches for training, end to end: the collator (the model's image size and text length, the image
    processor's mean and std), the DataLoader, and its preparation by ``accelerator`` (map-style data)."""
    collator = make_train_collator(tokenizer, model_config, image_processor, model_args, data_args, training_args.seed)
    dataloader = make_train_dataloader(train_data, collator, data_args, training_args, accelerator)
    if not data_args.streaming:
        dataloader = accelerator.prepare_data_loader(dataloader, device_placement=False)
    return TrainingBatches(dataloader, collator, accelerator, data_args.streaming, describe_source(data_args))
