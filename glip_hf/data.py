"""Image-caption data: any HF dataset (name, local path, imagefolder, parquet, webdataset, streaming) to batches.

A row goes through: decode image -> RandomResizedCrop -> normalise; pick a caption -> tokenize; collate. Images are
decoded here rather than by ``datasets`` so that a corrupt file is skipped and counted instead of crashing the run.
Augmentation randomness is derived from ``(seed, epoch, sample index)``, so a batch is the same whichever worker
builds it and whenever (a resumed run sees the very same pixels).
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from .arguments import DataArguments

SKIP_REASONS = ("missing_image", "undecodable_image", "empty_image", "missing_caption")


def _looks_like_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_image_text_dataset(args: DataArguments, split: str) -> datasets.Dataset | datasets.IterableDataset:
    """Load ``split`` of ``args.dataset_name``: a Hub name, a ``save_to_disk`` folder, or a builder such as
    ``imagefolder`` / ``parquet`` / ``webdataset`` with ``data_dir`` / ``data_files``."""
    name = args.dataset_name
    if name is not None and Path(name).is_dir() and _looks_like_saved_dataset(Path(name)):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split {split!r} not in {name}; it has {sorted(loaded)}.")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if args.streaming else loaded
    data_files = args.data_files
    if data_files is not None and not any(ch in data_files for ch in "*?[") and not Path(data_files).exists():
        raise FileNotFoundError(f"data_files {data_files} does not exist; pass an existing file or a glob.")
    try:
        return datasets.load_dataset(
            name,
            args.dataset_config_name,
            data_dir=args.data_dir,
            data_files=data_files,
            split=split,
            streaming=args.streaming,
            cache_dir=str(Path(args.cache_dir) / "datasets"),
        )
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise FileNotFoundError(f"dataset {name!r} could not be loaded ({error}); check --dataset_name.") from None


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


def prepare_for_decoding(dataset, image_columns: list[str]):
    """Turn ``Image`` columns to raw bytes so decoding happens (and may fail) in the collator."""
    features = dataset.features or {}
    for name in image_columns:
        if isinstance(features.get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def decode_image(value: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, ``{"bytes", "path"}`` dict, raw bytes or a file path."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        image = Image.open(io.BytesIO(data)) if data else Image.open(path)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        image = Image.open(value)
    image.load()
    return image.convert("RGB")


def random_resized_crop(
    image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random, ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """torchvision's RandomResizedCrop on a PIL image (area fraction in ``scale``, log-uniform aspect ``ratio``)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    side = min(width, height)  # fallback: central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` float tensor normalised by ``mean`` / ``std`` (each ``(3, 1, 1)``)."""
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    pixels = pixels.permute(2, 0, 1).float().div_(255.0)
    return (pixels - mean) / std


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows carry their index (``__index__``), which seeds their augmentation."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"__index__": index, **self.dataset[index]}


class ImageTextCollator:
    """Rows -> ``{"pixel_values" (B, 3, S, S), "input_ids" (B, L), "attention_mask" (B, L), "skipped": Counter}``.

    Bad rows are dropped from the batch and counted by reason (see ``SKIP_REASONS``); the batch may be smaller.
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
    ):
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.image_mean = torch.tensor(image_mean).view(3, 1, 1)
        self.image_std = torch.tensor(image_std).view(3, 1, 1)
        self.image_columns, self.caption_column = image_column.split(","), caption_column
        self.crop_scale, self.seed = crop_scale, seed
        self.epoch = 0  # set by the training loop before each epoch

    def _caption(self, row: dict, rng: random.Random) -> str | None:
        caption = row.get(self.caption_column)
        if isinstance(caption, (list, tuple)):
            caption = [c for c in caption if isinstance(c, str) and c.strip()]
            caption = rng.choice(caption) if caption else None
        return caption if isinstance(caption, str) and caption.strip() else None

    def _image(self, row: dict) -> Any:
        return next((row[c] for c in self.image_columns if row.get(c) is not None), None)

    def process(self, row: dict, index: int) -> tuple[torch.Tensor, str] | str:
        """One row to ``(pixels, caption)``, or the reason it is skipped."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        raw, caption = self._image(row), self._caption(row, rng)
        if raw is None or (isinstance(raw, dict) and not raw.get("bytes") and not raw.get("path")):
            return "missing_image"
        if caption is None:
            return "missing_caption"
        try:
            image = decode_image(raw)
        except Exception:  # PIL raises many types for corrupt data; any of them means "skip this sample"
            return "undecodable_image"
        if image.width == 0 or image.height == 0:
            return "empty_image"
        image = random_resized_crop(image, self.image_size, self.crop_scale, rng)
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
                "pixel_values": torch.zeros(0, 3, self.image_size, self.image_size),
                "input_ids": torch.zeros(0, self.max_length, dtype=torch.long),
                "attention_mask": torch.zeros(0, self.max_length, dtype=torch.long),
                "skipped": skipped,
            }
        text = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "skipped": skipped,
        }


def caption_sample(dataset, caption_column: str, limit: int = 50_000) -> list[str]:
    """Up to ``limit`` caption strings (list-valued captions flattened), for training a tokenizer."""
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


def make_image_processor(image_size: int, name_or_path: str | None = None):
    """The checkpoint's image processor if it has one, else CLIP's (resize shortest edge, centre crop, CLIP
    mean/std) at ``image_size``. The PIL backend is used where torchvision is not installed."""
    import importlib.util

    import transformers

    if name_or_path is not None:
        try:
            return transformers.AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError):
            pass
    # Name the PIL class directly without torchvision: asking for CLIPImageProcessor then warns about the fallback.
    name = "CLIPImageProcessor" if importlib.util.find_spec("torchvision") else "CLIPImageProcessorPil"
    return getattr(transformers, name)(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
