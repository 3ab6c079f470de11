"""Evaluation of CLIP-style models: zero-shot classification, image-text retrieval and linear probe.

Every task can run with masking off (default) or on (``mask_ratio > 0``: the paper's *masked inference*), batched
under ``torch.inference_mode``, bf16 on GPU, and sharded across processes when launched with Accelerate. Rows
without a usable image (missing, empty or undecodable; odd-but-valid images are converted, see ``data.to_rgb``),
for retrieval without caption text, and for classification without a label are skipped and counted by reason
(``skipped``; ``num_skipped`` is their sum).
Results follow the schema in DESIGN.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import statistics
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .arguments import DataArguments, EvalArguments, read_yaml, suite_entries
from .data import (
    SKIP_REASONS,
    check_columns,
    column_names,
    first_image,
    image_folders,
    load_image,
    load_image_text_dataset,
    make_image_processor,
    prepare_for_decoding,
)
from .launch import check_launch, use_cores_on_cpu
from .linear_probe import fit_linear_probe
from .metrics import classification_metrics, retrieval_metrics
from .modeling_glip import GLIPModel, masked_inference
from .seeding import derive_seed
from .synthetic import PROMPT_TEMPLATES, build_synthetic_dataset
from .tokenization import check_tokenizer_serves, load_pretrained_tokenizer

TASKS = ("zeroshot_classification", "retrieval", "linear_probe")
EVAL_SKIP_REASONS = (*SKIP_REASONS, "missing_label")
NO_LABEL = -1  # datasets' ClassLabel value for a row without a label (test splits whose labels are withheld)
BUILTIN = "builtin"
DEFAULT_MODEL_DIR = Path("outputs/default")
# Generic prompts for photos when a dataset brings none (averaged in embedding space, as CLIP does).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
)


# ----------------------------------------------------------------------------------------------- model and data


def load_model_for_eval(name_or_path: str | None, device: torch.device | str = "cpu", trust_remote_code: bool = False):
    """``(model, tokenizer, image_processor)`` for any CLIP or GLIP checkpoint (directory or Hub id).

    The checkpoint must bring a tokenizer whose end-of-text token is where its text tower pools."""
    if name_or_path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"no --model given and {DEFAULT_MODEL_DIR} does not exist yet; make it with "
                "`accelerate launch run_pretraining.py`, or pass --model DIR_OR_HUB_ID."
            )
        name_or_path = str(DEFAULT_MODEL_DIR)
    if Path(name_or_path).exists() and not (Path(name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {name_or_path} has no config.json; pass a model directory or a Hub id.")
    tokenizer = load_pretrained_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise FileNotFoundError(
            f"--model {name_or_path} has no tokenizer (no tokenizer files, or special tokens only); save the one it "
            "was trained with beside it: tokenizer.save_pretrained(DIR)."
        )
    model = GLIPModel.from_pretrained(name_or_path).to(device).eval()
    check_tokenizer_serves(model.config.text_config, tokenizer, f"--model {name_or_path}")
    image_processor = make_image_processor(model.config.vision_config.image_size, name_or_path, trust_remote_code)
    return model, tokenizer, image_processor


def _builtin_dataset(args: EvalArguments, model):
    """The built-in generated dataset with the parameters of the run that made ``args.model`` (if recorded)."""
    params = DataArguments()
    run_config = Path(args.model or DEFAULT_MODEL_DIR) / "run_config.yaml"
    recorded = yaml.safe_load(run_config.read_text()) if run_config.is_file() else {}
    return build_synthetic_dataset(
        Path(args.cache_dir) / "synthetic",
        num_train=recorded.get("synthetic_num_train", params.synthetic_num_train),
        num_test=recorded.get("synthetic_num_test", params.synthetic_num_test),
        image_size=model.config.vision_config.image_size,
        seed=recorded.get("synthetic_seed", params.synthetic_seed),
        placement=recorded.get("synthetic_placement", params.synthetic_placement),
    )


def load_eval_split(args: EvalArguments, split: str, model) -> datasets.Dataset:
    """One split of ``args.dataset`` (or the built-in dataset), truncated to ``max_samples``, images undecoded."""
    if args.dataset is None:
        builtin = _builtin_dataset(args, model)
        if split not in builtin:
            raise ValueError(f"--split {split!r}: the built-in dataset has {sorted(builtin)}.")
        dataset = builtin[split]
    else:
        source = DataArguments(
            dataset_name=args.dataset,
            dataset_config_name=args.dataset_config_name,
            data_dir=args.data_dir,
            data_files=args.data_files,
            cache_dir=args.cache_dir,
        )
        dataset = load_image_text_dataset(source, split)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    check_columns(dataset, {"image_column": args.image_column}, f"{args.dataset or BUILTIN}[{split}]")
    return prepare_for_decoding(dataset, args.image_column.split(","))


def read_list_file(path: str, what: str) -> list[str]:
    """The entries of a text file (one per line) or a JSON list of strings, stripped of surrounding spaces; ``what``
    names the flag in errors. A blank line or entry before the last one is an error for ``class_names``, whose
    order gives the class ids (dropping it would shift every id after it); for others it is left out."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--{what} {path} not found; pass a .txt (one per line) or .json list file.")
    try:  # utf-8-sig: a byte order mark (Windows editors write one) is no part of the first entry
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"--{what} {path} is not UTF-8 text ({error}); save it as UTF-8.") from None
    if file.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--{what} {path} is not valid JSON ({error}); write a JSON list of strings.") from None
        where = "entry"
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"--{what} {path} must hold a JSON list of strings.")
    else:
        items, where = text.splitlines(), "line"
    items = [item.strip() for item in items]
    while items and not items[-1]:
        items.pop()
    if not items:
        raise ValueError(f"--{what} {path} lists nothing.")
    blank = next((index for index, item in enumerate(items) if not item), None)
    if blank is not None and what == "class_names":
        raise ValueError(
            f"--{what} {path}: {where} {blank + 1} is blank, and a name's position is its class id; remove it, or "
            "name the class."
        )
    return [item for item in items if item]


def class_names_and_templates(args: EvalArguments, dataset: datasets.Dataset) -> tuple[list[str], list[str]]:
    """Class names from ``--class_names`` or the label column's ClassLabel; templates from ``--templates`` or the
    built-in sets."""
    check_columns(dataset, {"label_column": args.label_column}, f"{args.dataset or BUILTIN}[{args.split}]")
    feature = dataset.features.get(args.label_column)
    if args.class_names:
        names = read_list_file(args.class_names, "class_names")
    elif isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif is_name_column(dataset, args.label_column):
        names = label_names([dataset], args.label_column)
    else:
        raise ValueError(
            f"--label_column {args.label_column!r} is not a ClassLabel, so class names are unknown; "
            "pass --class_names FILE (one name per line, in label-id order)."
        )
    if args.templates:
        templates = read_list_file(args.templates, "templates")
    else:
        templates = list(PROMPT_TEMPLATES if args.dataset is None else DEFAULT_TEMPLATES)
    for template in templates:
        check_template(template)
    return names, templates


def check_template(template: str) -> None:
    """A prompt template must hold exactly one ``{}`` (the class name) and no other format field; literal braces are
    written ``{{`` and ``}}``. A one-line ValueError otherwise (``str.format`` raised KeyError / IndexError)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:  # a single '{' or '}'
        fields = [f"({error})"]
    if fields != [""]:
        raise ValueError(
            f"--templates: {template!r} must hold exactly one '{{}}' for the class name and no other '{{...}}' "
            "field (write a literal brace as '{{' or '}}')."
        )


def is_name_column(dataset: datasets.Dataset, label_column: str) -> bool:
    """Whether ``label_column`` holds class names (strings) rather than class ids."""
    feature = dataset.features.get(label_column)
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _name(value: Any) -> str | None:
    """A name cell's class name: its text without the spaces around it (a csv written ``img, cat`` holds
    ``' cat'``); None for a blank or None cell (no label)."""
    return (value.strip() or None) if isinstance(value, str) else None


def label_names(splits: Sequence[datasets.Dataset], label_column: str) -> list[str]:
    """The class names a column of names holds over ``splits``, sorted (ids in that order; blanks are no label)."""
    return sorted({name for split in splits for name in map(_name, split[label_column]) if name})


def names_to_ids(dataset: datasets.Dataset, label_column: str, names: Sequence[str]) -> datasets.Dataset:
    """A column of class names turned to the ids of ``names`` (a ClassLabel column), spaces around a name ignored; a
    blank or None label becomes None (no label). Unchanged if the column does not hold names. A name not in
    ``names``, or one ``names`` holds twice, is a one-line ValueError. Computed in memory: nothing is written next to
    the user's data."""
    if not is_name_column(dataset, label_column):
        return dataset
    ids: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in ids:  # a column of ids may share a name (ImageNet's two 'crane's); a name must be one id
            raise ValueError(
                f"--class_names lists {name!r} twice (entries {ids[name] + 1} and {index + 1}); a label column of "
                "names needs each class named once: rename one of them."
            )
        ids[name] = index
    unknown = sorted({name for name in map(_name, dataset[label_column]) if name and name not in ids})
    if unknown:
        raise ValueError(
            f"--label_column {label_column!r} holds {len(unknown)} name(s) that are not among the {len(names)} class "
            f"names ({', '.join(map(repr, unknown[:3]))}{', ...' if len(unknown) > 3 else ''}); add them to "
            "--class_names, or leave --class_names out to take the names the column holds."
        )
    features = dataset.features.copy()
    features[label_column] = datasets.ClassLabel(names=list(names))
    return dataset.map(
        lambda batch: {label_column: [ids.get(_name(value)) for value in batch[label_column]]},
        batched=True,
        features=features,
        keep_in_memory=True,
        desc="class names to ids",
    )


def labelled_rows(
    dataset: datasets.Dataset, label_column: str, num_classes: int | None = None
) -> tuple[datasets.Dataset, int]:
    """``(rows of dataset that have a class id, how many have none)``: a label of None, NaN or -1 (datasets' "no
    label") is a row to skip and count as ``missing_label``. A whole float is the class id it equals (pandas reads a
    csv column of ids with an empty cell as floats). A label that is no whole number, below -1, or (with
    ``num_classes``) ``num_classes`` or more is a one-line ValueError: the column or the class names do not fit."""
    labels = [_class_id(value) for value in dataset[label_column]]
    an_id = next((v for v in labels if v is not None and not isinstance(v, str)), None)
    for value in labels:
        if value is None:
            continue
        if isinstance(value, str) and an_id is not None:  # names beside ids (a json column, read as Json)
            raise ValueError(
                f"--label_column {label_column!r} holds class names and ids mixed ({value!r} and {an_id!r}); write "
                "every label as a class name, or every one as a class id."
            )
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(
                f"--label_column {label_column!r} holds {value!r} ({type(value).__name__}), not a class id or name; "
                "pass a column of integer labels, of class names (strings), or a ClassLabel."
            )
        if value < NO_LABEL:
            raise ValueError(f"--label_column {label_column!r} holds class id {value}; ids are 0 or more (-1: none).")
        if num_classes is not None and value >= num_classes:
            raise ValueError(
                f"--label_column {label_column!r} holds class id {value}, but there are {num_classes} class names; "
                "pass --class_names FILE with a name for every id (one per line, in id order)."
            )
    keep = [i for i, value in enumerate(labels) if value is not None and value != NO_LABEL]
    if not keep:
        raise ValueError(
            f"no row has a label in --label_column {label_column!r} (every one is None or -1, as in test splits "
            "whose labels are withheld); evaluate a split that has labels."
        )
    return (dataset if len(keep) == len(labels) else dataset.select(keep)), len(labels) - len(keep)


def _class_id(value: Any) -> Any:
    """A label cell as a class id where it is one written as a float (``1.0``), None for NaN; else as it is."""
    if isinstance(value, float):
        return None if math.isnan(value) else int(value) if value.is_integer() else value
    return value


def label_tensor(dataset: datasets.Dataset, label_column: str) -> torch.Tensor:
    """``(N,)`` long: the class ids of ``dataset``'s rows (all labelled: `labelled_rows`), floats ``1.0`` as ``1``."""
    return torch.tensor([_class_id(value) for value in dataset[label_column]], dtype=torch.long)


# ------------------------------------------------------------------------------------------------------ encoding


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sharded_encode(
    accelerator: Accelerator, indices: list[int], batch_size: int, encode: Callable, desc: str
) -> tuple[torch.Tensor, list[int], Counter]:
    """Run ``encode(chunk) -> (features (b, D) | None, kept indices, Counter of skip reasons)`` over this process's
    share of ``indices``, gather every process's results, and return them in index order with the summed counts.

    Chunks are cut from all of ``indices`` first and dealt to the processes in turn, so a chunk holds the same rows
    whatever the number of processes (masked inference seeds its masks per chunk)."""
    chunks = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    mine = chunks[accelerator.process_index :: accelerator.num_processes]
    features, kept, skipped = [], [], Counter()
    for chunk in tqdm(mine, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        out, ids, bad = encode(chunk)
        if out is not None:
            features.append(out.cpu())
        kept += ids
        skipped += bad
    local = (torch.cat(features) if features else None, kept, skipped)
    parts = gather_object([local]) if accelerator.num_processes > 1 else [local]
    all_kept = [i for part in parts for i in part[1]]
    all_features = [part[0] for part in parts if part[0] is not None]
    all_skipped = sum((part[2] for part in parts), Counter())
    if not all_features:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(all_skipped.items()))
        raise ValueError(
            f"no {desc} could be encoded: all {len(indices)} were skipped ({reasons}); check the column that holds "
            f"them ({'--image_column' if desc == 'images' else '--caption_column'}) and the data files (a relative "
            "image path is looked up from the current directory, then next to the data files and in --data_dir)."
        )
    stacked = torch.cat(all_features)
    order = sorted(range(len(all_kept)), key=all_kept.__getitem__)
    return stacked[order], [all_kept[i] for i in order], all_skipped


@dataclass
class MaskDraw:
    """The masks of one masked-inference draw, seeded batch by batch from ``--seed``, the draw and the batch's first
    row: the same masks for an image whatever the number of processes (they do depend on ``--batch_size``)."""

    seed: int
    draw: int
    generator: torch.Generator  # on the model's device, handed to `masked_inference`

    def reseed(self, first_row: int) -> None:
        self.generator.manual_seed(derive_seed(self.seed, "eval-masks", self.draw, first_row))


@torch.inference_mode()
def encode_images(
    model,
    image_processor,
    dataset,
    image_column: str,
    batch_size: int,
    accelerator: Accelerator,
    mask_draw: MaskDraw | None = None,
    image_folders: Sequence[str] = (),
):
    """L2-normalised image features ``(N_kept, D)``, the kept row indices, and a Counter of the skipped rows by
    reason (``missing_image``, ``empty_image``, ``undecodable_image``). A relative image path is looked up in
    ``image_folders`` too (`data.locate_image`)."""

    columns = [name for name in image_column.split(",") if name in column_names(dataset)]  # "jpg,png": each in turn
    images_only = dataset.select_columns(columns)  # rows without captions and labels

    def encode(rows: list[int]):
        if mask_draw is not None:
            mask_draw.reseed(rows[0])
        images, ids, skipped = [], [], Counter()
        for index in rows:
            image = load_image(first_image(images_only[index], columns), folders=image_folders)
            if isinstance(image, str):  # the reason it has no image
                skipped[image] += 1
                continue
            images.append(image)
            ids.append(index)
        if not images:
            return None, [], skipped
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(accelerator.device)
        with _autocast(accelerator.device):
            embeds = model.get_image_features(pixel_values=pixels).pooler_output
        return F.normalize(embeds.float(), dim=-1), ids, skipped

    return _sharded_encode(accelerator, list(range(len(dataset))), batch_size, encode, "images")


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, accelerator: Accelerator) -> torch.Tensor:
    """L2-normalised text features ``(T, D)`` in the order of ``texts``.

    Texts that tokenize alike are encoded once and share the features: the same tokens padded to another length in
    another batch give features that differ in the last bits, and retrieval's ties (captions shared by several
    images) would then be broken by float noise that moves with ``batch_size``."""
    # Truncate at the text tower's context too: a tokenizer may allow longer inputs than the model embeds.
    context = model.config.text_config.max_position_embeddings
    keys = [tuple(ids) for ids in tokenizer(list(texts), truncation=True, max_length=context)["input_ids"]]
    first: dict[tuple[int, ...], str] = {}  # one text per distinct token sequence, in order of appearance
    for key, text in zip(keys, texts):
        first.setdefault(key, text)
    distinct = list(first.values())
    position = {key: i for i, key in enumerate(first)}

    def encode(rows: list[int]):
        tokens = tokenizer(
            [distinct[i] for i in rows], padding=True, truncation=True, max_length=context, return_tensors="pt"
        )
        with _autocast(accelerator.device):
            embeds = model.get_text_features(**tokens.to(accelerator.device)).pooler_output
        return F.normalize(embeds.float(), dim=-1), rows, Counter()

    features = _sharded_encode(accelerator, list(range(len(distinct))), batch_size, encode, "texts")[0]
    return features[torch.tensor([position[key] for key in keys], dtype=torch.long, device=features.device)]


def zero_shot_classifier(
    model, tokenizer, class_names: Sequence[str], templates: Sequence[str], batch_size: int, accelerator: Accelerator
) -> torch.Tensor:
    """Class embeddings averaged over the prompt templates in embedding space, as CLIP does: ``(C, D)``."""
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = encode_texts(model, tokenizer, prompts, batch_size, accelerator)  # (C * T, D)
    return F.normalize(embeds.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)


# --------------------------------------------------------------------------------------------------------- tasks


def zero_shot_on_dataset(
    model,
    tokenizer,
    image_processor,
    dataset,
    class_names: Sequence[str],
    templates: Sequence[str],
    image_column: str,
    label_column: str,
    batch_size: int,
    accelerator: Accelerator,
    mask_draws: Sequence[MaskDraw | None] = (None,),
    image_folders: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Zero-shot classification of ``dataset`` rows (images undecoded or decoded): counts and metrics for each mask
    draw (one entry for unmasked inference). The class embeddings do not depend on the masks: encoded once.
    Rows without a label are skipped and counted (`labelled_rows`). ``image_folders``: see `encode_images`."""
    dataset, unlabelled = labelled_rows(dataset, label_column, len(class_names))
    classifier = zero_shot_classifier(model, tokenizer, class_names, templates, batch_size, accelerator)
    results = []
    for mask_draw in mask_draws:
        features, kept, skipped = encode_images(
            model, image_processor, dataset, image_column, batch_size, accelerator, mask_draw, image_folders
        )
        skipped["missing_label"] += unlabelled
        labels = label_tensor(dataset.select(kept), label_column)
        metrics = classification_metrics(features @ classifier.t().cpu(), labels, len(class_names))
        results.append(
            {"num_samples": len(kept), **skip_counts(skipped), "num_classes": len(class_names), "metrics": metrics}
        )
    return results


def run_zero_shot(args, model, tokenizer, image_processor, accelerator, mask_draws) -> list[dict[str, Any]]:
    dataset = load_eval_split(args, args.split, model)
    names, templates = class_names_and_templates(args, dataset)
    dataset = names_to_ids(dataset, args.label_column, names)  # a column of class names
    return zero_shot_on_dataset(
        model,
        tokenizer,
        image_processor,
        dataset,
        names,
        templates,
        args.image_column,
        args.label_column,
        args.batch_size,
        accelerator,
        mask_draws,
        image_folders(args.data_files, args.data_dir),
    )


def run_retrieval(args, model, tokenizer, image_processor, accelerator, mask_draws) -> list[dict[str, Any]]:
    """Retrieval metrics for each mask draw; the captions do not depend on the masks: encoded once."""
    dataset = load_eval_split(args, args.split, model)
    check_columns(dataset, {"caption_column": args.caption_column}, f"{args.dataset or BUILTIN}[{args.split}]")
    # A row without caption text is skipped before its image is decoded: it could only be a query that never hits.
    captions = [_caption_texts(value) for value in dataset[args.caption_column]]
    captioned = [index for index, texts in enumerate(captions) if texts]
    if not captioned:
        raise ValueError(f"--caption_column {args.caption_column!r} holds no caption text in {args.split!r}.")
    subset = dataset if len(captioned) == len(dataset) else dataset.select(captioned)
    folders = image_folders(args.data_files, args.data_dir)
    images = [
        encode_images(model, image_processor, subset, args.image_column, args.batch_size, accelerator, draw, folders)
        for draw in mask_draws
    ]  # [(features (N_kept, D), kept, skipped)]; the same images decode (or not) in every draw
    kept, skipped = images[0][1], images[0][2] + Counter(missing_caption=len(dataset) - len(captioned))
    texts, text_to_image = [], []
    for position, index in enumerate(kept):
        texts += captions[captioned[index]]
        text_to_image += [position] * len(captions[captioned[index]])
    duplicates = count_shared_captions(
        tokenizer, texts, text_to_image, model.config.text_config.max_position_embeddings
    )
    if duplicates:
        warnings.warn(
            f"{duplicates} of {len(texts)} captions are also the caption of another image: their scores tie "
            "exactly, ties are ranked by index, so recall@K depends on row order (see num_duplicate_captions).",
            stacklevel=2,
        )
    text_features = encode_texts(model, tokenizer, texts, args.batch_size, accelerator)
    counts = {"num_samples": len(kept), **skip_counts(skipped), "num_texts": len(texts)}
    counts["num_duplicate_captions"] = duplicates
    return [
        {**counts, "metrics": retrieval_metrics(text_features @ features.t(), torch.tensor(text_to_image))}
        for features, _, _ in images
    ]


def _caption_texts(value: Any) -> list[str]:
    """The caption strings of a caption cell (a string or a list of them), blank ones left out."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [text for text in values if isinstance(text, str) and text.strip()]


def count_shared_captions(tokenizer, texts: Sequence[str], text_to_image: Sequence[int], max_length: int) -> int:
    """Captions that the model sees exactly as a caption of another image (same token ids after the tokenizer's
    normalisation and truncation: identical features, so a tie in every ranking)."""
    keys = [tuple(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    images_per_key: dict[tuple, set[int]] = {}
    for key, image in zip(keys, text_to_image):
        images_per_key.setdefault(key, set()).add(image)
    return sum(1 for key in keys if len(images_per_key[key]) > 1)


PROBE_SPLIT_FLAGS = {"train": "train_split", "test": "split", "val": "val_split"}  # the probe's roles -> flags


def run_linear_probe(args, model, tokenizer, image_processor, accelerator, mask_draws) -> list[dict[str, Any]]:
    """A probe fit on each mask draw's features (the splits are loaded once)."""
    splits = {role: getattr(args, flag) for role, flag in PROBE_SPLIT_FLAGS.items()}
    datasets_by_role = {}
    for role, split in splits.items():
        if split is None:
            continue
        dataset = load_eval_split(args, split, model)
        check_columns(dataset, {"label_column": args.label_column}, f"{args.dataset or BUILTIN}[{split}]")
        datasets_by_role[role] = dataset
    named = [d for d in datasets_by_role.values() if is_name_column(d, args.label_column)]
    if named:  # columns of class names: one id per name over every split
        names = read_list_file(args.class_names, "class_names") if args.class_names else None
        names = names or label_names(named, args.label_column)
        datasets_by_role = {r: names_to_ids(d, args.label_column, names) for r, d in datasets_by_role.items()}
    # (labelled rows, unlabelled count) per split
    datasets_by_role = {r: labelled_rows(d, args.label_column) for r, d in datasets_by_role.items()}
    folders = image_folders(args.data_files, args.data_dir)
    return [_linear_probe(args, model, image_processor, accelerator, datasets_by_role, d, folders) for d in mask_draws]


def _linear_probe(
    args, model, image_processor, accelerator, datasets_by_role, mask_draw, folders: Sequence[str]
) -> dict[str, Any]:
    encoded = {}
    for role, (dataset, unlabelled) in datasets_by_role.items():
        features, kept, skipped = encode_images(
            model, image_processor, dataset, args.image_column, args.batch_size, accelerator, mask_draw, folders
        )
        skipped["missing_label"] += unlabelled
        labels = label_tensor(dataset.select(kept), args.label_column)
        encoded[role] = (features, labels, skipped)
    num_classes = int(max(int(e[1].max()) for e in encoded.values())) + 1
    val = encoded["val"][:2] if "val" in encoded else None
    metrics, chosen = fit_linear_probe(
        *encoded["train"][:2], *encoded["test"][:2], num_classes, args.linear_probe_val_fraction, args.seed, val
    )
    return {
        "num_samples": len(encoded["test"][1]),
        **skip_counts(encoded["test"][2]),  # of the evaluated split, beside its num_samples
        "skipped_by_split": {
            f"{role} ({getattr(args, PROBE_SPLIT_FLAGS[role])})": skip_counts(e[2]) for role, e in encoded.items()
        },
        "num_classes": num_classes,
        "num_train_samples": len(encoded["train"][1]),
        **chosen,
        "metrics": metrics,
    }


RUNNERS = {"zeroshot_classification": run_zero_shot, "retrieval": run_retrieval, "linear_probe": run_linear_probe}


def evaluate_model(args: EvalArguments, accelerator: Accelerator | None = None, loaded=None) -> dict[str, Any]:
    """Run one task; returns the DESIGN.md result schema (``task``, ``dataset``, ..., ``metrics``)."""
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r} is not one of {TASKS}.")
    if args.mask_draws < 1:
        raise ValueError(f"--mask_draws {args.mask_draws} is invalid: expected >= 1.")
    accelerator = accelerator or Accelerator(cpu=args.cpu)
    check_launch(accelerator)
    use_cores_on_cpu(accelerator)  # accelerate launch leaves a CPU process one thread otherwise
    model, tokenizer, image_processor = loaded or load_model_for_eval(
        args.model, accelerator.device, args.trust_remote_code
    )
    vision = model.config.vision_config
    strategy = vision.mask_strategy if args.mask_strategy is None else args.mask_strategy
    sigma = vision.mask_sigma if args.mask_sigma is None else args.mask_sigma
    masked = args.mask_ratio > 0
    # One generator for every draw: each batch re-seeds it from (seed, draw, first row). mask_ratio 0 = unmasked
    # inference, one deterministic pass.
    generator = torch.Generator(device=accelerator.device) if masked else None
    draws = [MaskDraw(args.seed, draw, generator) for draw in range(args.mask_draws)] if masked else [None]
    with masked_inference(model, args.mask_ratio, strategy, sigma, generator):
        runs = RUNNERS[args.task](args, model, tokenizer, image_processor, accelerator, draws)
    result = {**runs[0], "metrics": _mean_metrics([run["metrics"] for run in runs])}
    if masked:
        result["metrics_std"] = _std_metrics([run["metrics"] for run in runs])
        result["metrics_per_draw"] = [run["metrics"] for run in runs]
        for key in ("C", "val_top1"):  # the linear probe's choice, made on each draw's features
            if key in runs[0]:
                result[f"{key}_per_draw"] = [run[key] for run in runs]
    return {
        "task": args.task,
        "dataset": args.dataset or BUILTIN,
        "data_dir": args.data_dir,  # what a builder (imagefolder, parquet, ...) read: which data `dataset` is
        "data_files": args.data_files,
        "split": args.split,
        "model": args.model or str(DEFAULT_MODEL_DIR),
        "mask_ratio": args.mask_ratio,
        "mask_strategy": strategy if masked else None,
        "mask_sigma": sigma if masked and strategy == "gaussian" else None,
        "mask_draws": len(runs),
        "seed": args.seed,
        **result,
    }


def skip_counts(skipped: Counter) -> dict[str, Any]:
    """``{"num_skipped": total, "skipped": {reason: count}}`` over every reason in ``EVAL_SKIP_REASONS``."""
    return {
        "num_skipped": sum(skipped.values()),
        "skipped": {reason: skipped.get(reason, 0) for reason in EVAL_SKIP_REASONS},
    }


def _mean_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.fmean(run[name] for run in runs) for name in runs[0]}


def _std_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """Sample standard deviation over mask draws (0 for a single draw)."""
    return {name: statistics.stdev(r[name] for r in runs) if len(runs) > 1 else 0.0 for name in runs[0]}


# -------------------------------------------------------------------------------------------------------- output


def summary_line(result: dict[str, Any]) -> str:
    spread = result.get("metrics_std", {})
    metrics = " | ".join(
        f"{k} {v:.4f}" + (f" +/- {spread[k]:.4f}" if k in spread else "") for k, v in result["metrics"].items()
    )
    reasons = ", ".join(f"{reason} {n}" for reason, n in result.get("skipped", {}).items() if n)
    return (
        f"{result['task']} | {result['dataset']}[{result['split']}] | mask_ratio {result['mask_ratio']} | "
        f"{metrics} | n={result['num_samples']} skipped={result['num_skipped']}" + (f" ({reasons})" if reasons else "")
    )


def write_table(results: list[dict[str, Any]], base: str | Path) -> tuple[Path, Path]:
    """CLIP_benchmark-style "build" table of ``results``: ``<base>.md`` and ``<base>.csv``."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    keys = ["model", "task", "dataset", "split", "mask_ratio", "num_samples", "num_skipped"]
    # Masked-inference rows carry the spread over mask draws as `<metric>_std` columns.
    values = [{**r["metrics"], **{f"{k}_std": v for k, v in r.get("metrics_std", {}).items()}} for r in results]
    metric_keys = list(dict.fromkeys(k for v in values for k in v))
    rows = [[r[k] for k in keys] + [v.get(m, "") for m in metric_keys] for r, v in zip(results, values)]
    header = keys + metric_keys
    with _beside(base, ".csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])

    def cell(column: str, value: Any) -> str:
        return f"{value:.4f}" if column in metric_keys and isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(header, row)) + " |" for row in rows]
    _beside(base, ".md").write_text("\n".join(lines) + "\n")
    return _beside(base, ".md"), _beside(base, ".csv")


SUITE_SUFFIXES = (".json", ".md", ".csv")


def _beside(base: Path, suffix: str) -> Path:
    """``base`` + ``suffix``: ``mask0.5`` -> ``mask0.5.md`` (``with_suffix`` would write ``mask0.md``)."""
    return base.with_name(base.name + suffix)


def suite_base(output: str | None) -> Path:
    """The path the suite's ``.md``, ``.csv`` and ``.json`` share: ``--output`` less one of those suffixes."""
    out = Path(output or "eval_results/suite")
    return out.with_suffix("") if out.suffix in SUITE_SUFFIXES else out


TABLE_HEADER = ("model", "task")  # how the tables write_table writes begin


def _is_suite_output(path: Path) -> bool:
    """Whether ``path`` reads as a file an earlier suite wrote (a `write_table` table, or a JSON list of results)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    first = text.split("\n", 1)[0]
    if path.suffix == ".md":
        return first.startswith("| " + " | ".join(TABLE_HEADER) + " |")
    if path.suffix == ".csv":
        return first.startswith(",".join(TABLE_HEADER) + ",")
    try:
        results = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(results, list)
        and bool(results)  # a suite writes one result per entry, and has at least one
        and all(isinstance(r, dict) and {"task", "metrics"} <= r.keys() for r in results)
    )


def check_suite_outputs(base: Path) -> None:
    """Refuse, before any evaluation, to replace a file at ``base`` + .md / .csv / .json that no suite wrote: the
    user named ``base``, not those files (``--output notes`` would have overwritten their notes.md)."""
    for suffix in SUITE_SUFFIXES:
        path = _beside(base, suffix)
        dangling = path.is_symlink() and not path.exists()  # writing would create the link's target elsewhere
        if path.is_dir() or dangling or (path.exists() and not _is_suite_output(path)):
            raise FileExistsError(
                f"--output {base}: {path} exists and is not a table or result list of an earlier suite, which the "
                "suite would replace; pass another --output (the suite writes NAME.md, NAME.csv and NAME.json)."
            )


def run_suite(args: EvalArguments, accelerator: Accelerator | None = None) -> list[dict[str, Any]]:
    """Every entry of ``args.suite`` (a YAML ``entries:`` list of EvalArguments fields), one table at the end."""
    path = Path(args.suite)
    if not path.is_file():
        raise FileNotFoundError(f"--suite {path} not found; pass an existing YAML file.")
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a suite must be a mapping with an 'entries:' list of tasks.")
    entries = spec.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: needs a non-empty 'entries:' list of tasks.")
    accelerator = accelerator or Accelerator(cpu=args.cpu)
    check_launch(accelerator)
    use_cores_on_cpu(accelerator)  # accelerate launch leaves a CPU process one thread otherwise
    entries = suite_entries(path, spec, args)  # all checked before the first runs
    check_suite_outputs(suite_base(args.output))  # on every process: all stop, none waits for the main one
    loaded, results = {}, []
    for entry_args in entries:
        if entry_args.model not in loaded:
            loaded[entry_args.model] = load_model_for_eval(
                entry_args.model, accelerator.device, entry_args.trust_remote_code
            )
        results.append(evaluate_model(entry_args, accelerator, loaded[entry_args.model]))
        accelerator.print(summary_line(results[-1]))
    if accelerator.is_main_process:
        base = suite_base(args.output)
        md, csv_path = write_table(results, base)
        _beside(base, ".json").write_text(json.dumps(results, indent=1))
        print(f"Wrote {md} and {csv_path}")
    return results
