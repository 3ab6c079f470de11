"""Evaluation of CLIP-style models: zero-shot classification, image-text retrieval and linear probe.

Every task can run with masking off (default) or on (``mask_ratio > 0``: the paper's *masked inference*), batched
under ``torch.inference_mode``, bf16 on GPU, and sharded across processes when launched with Accelerate. Rows
whose image does not decode are skipped and counted. Results follow the schema in DESIGN.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .arguments import DataArguments, EvalArguments
from .data import check_columns, decode_image, load_image_text_dataset, make_image_processor, prepare_for_decoding
from .metrics import classification_metrics, retrieval_metrics
from .modeling_glip import GLIPModel, masked_inference
from .synthetic import PROMPT_TEMPLATES, build_synthetic_dataset

TASKS = ("zeroshot_classification", "retrieval", "linear_probe")
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


def load_model_for_eval(name_or_path: str | None, device: torch.device | str = "cpu"):
    """``(model, tokenizer, image_processor)`` for any CLIP or GLIP checkpoint (directory or Hub id)."""
    from transformers import AutoTokenizer

    if name_or_path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"no --model given and {DEFAULT_MODEL_DIR} does not exist yet; make it with "
                "`accelerate launch run_pretraining.py`, or pass --model DIR_OR_HUB_ID."
            )
        name_or_path = str(DEFAULT_MODEL_DIR)
    if Path(name_or_path).exists() and not (Path(name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {name_or_path} has no config.json; pass a model directory or a Hub id.")
    model = GLIPModel.from_pretrained(name_or_path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = make_image_processor(model.config.vision_config.image_size, name_or_path)
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
    return prepare_for_decoding(dataset, [args.image_column])


def read_list_file(path: str, what: str) -> list[str]:
    """Lines of a text file, or a JSON list; ``what`` names the flag in errors."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--{what} {path} not found; pass a .txt (one per line) or .json list file.")
    text = file.read_text()
    items = json.loads(text) if file.suffix == ".json" else [line.strip() for line in text.splitlines()]
    items = [item for item in items if isinstance(item, str) and item.strip()]
    if not items:
        raise ValueError(f"--{what} {path} lists nothing.")
    return items


def class_names_and_templates(args: EvalArguments, dataset: datasets.Dataset) -> tuple[list[str], list[str]]:
    """Class names from ``--class_names`` or the label column's ClassLabel; templates from ``--templates`` or the
    built-in sets."""
    check_columns(dataset, {"label_column": args.label_column}, f"{args.dataset or BUILTIN}[{args.split}]")
    feature = dataset.features.get(args.label_column)
    if args.class_names:
        names = read_list_file(args.class_names, "class_names")
    elif isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        raise ValueError(
            f"--label_column {args.label_column!r} is not a ClassLabel, so class names are unknown; "
            "pass --class_names FILE (one name per line, in label-id order)."
        )
    if args.templates:
        templates = read_list_file(args.templates, "templates")
    else:
        templates = list(PROMPT_TEMPLATES if args.dataset is None else DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"--templates: every template needs a '{{}}' for the class name; {bad[0]!r} has none.")
    return names, templates


# ------------------------------------------------------------------------------------------------------ encoding


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _sharded_encode(
    accelerator: Accelerator, indices: list[int], batch_size: int, encode: Callable, desc: str
) -> tuple[torch.Tensor, list[int], int]:
    """Run ``encode(chunk) -> (features (b, D) | None, kept indices, skipped)`` over this process's share of
    ``indices``, gather every process's results, and return them in index order."""
    with accelerator.split_between_processes(indices) as mine:
        features, kept, skipped = [], [], 0
        chunks = range(0, len(mine), batch_size)
        for start in tqdm(chunks, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
            out, ids, bad = encode(mine[start : start + batch_size])
            if out is not None:
                features.append(out.cpu())
            kept += ids
            skipped += bad
    local = (torch.cat(features) if features else None, kept, skipped)
    parts = gather_object([local]) if accelerator.num_processes > 1 else [local]
    all_kept = [i for part in parts for i in part[1]]
    all_features = [part[0] for part in parts if part[0] is not None]
    if not all_features:
        raise ValueError(f"no {desc} could be encoded: every one was skipped.")
    stacked = torch.cat(all_features)
    order = sorted(range(len(all_kept)), key=all_kept.__getitem__)
    return stacked[order], [all_kept[i] for i in order], sum(part[2] for part in parts)


@torch.inference_mode()
def encode_images(model, image_processor, dataset, image_column: str, batch_size: int, accelerator: Accelerator):
    """L2-normalised image features ``(N_kept, D)``, the kept row indices, and the number of undecodable rows."""

    images_only = dataset.select_columns([image_column])  # rows without captions and labels

    def encode(rows: list[int]):
        images, ids = [], []
        for index in rows:
            try:
                images.append(decode_image(images_only[index][image_column]))
                ids.append(index)
            except Exception:  # corrupt, empty or missing image: skip and count
                continue
        if not images:
            return None, [], len(rows)
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(accelerator.device)
        with _autocast(accelerator.device):
            embeds = model.get_image_features(pixel_values=pixels).pooler_output
        return F.normalize(embeds.float(), dim=-1), ids, len(rows) - len(ids)

    return _sharded_encode(accelerator, list(range(len(dataset))), batch_size, encode, "images")


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, accelerator: Accelerator) -> torch.Tensor:
    """L2-normalised text features ``(T, D)`` in the order of ``texts``."""

    def encode(rows: list[int]):
        tokens = tokenizer([texts[i] for i in rows], padding=True, truncation=True, return_tensors="pt")
        with _autocast(accelerator.device):
            embeds = model.get_text_features(**tokens.to(accelerator.device)).pooler_output
        return F.normalize(embeds.float(), dim=-1), rows, 0

    return _sharded_encode(accelerator, list(range(len(texts))), batch_size, encode, "texts")[0]


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
) -> dict[str, Any]:
    """Zero-shot classification of ``dataset`` rows (images undecoded or decoded); counts and metrics."""
    classifier = zero_shot_classifier(model, tokenizer, class_names, templates, batch_size, accelerator)
    features, kept, skipped = encode_images(model, image_processor, dataset, image_column, batch_size, accelerator)
    labels = torch.tensor(dataset.select(kept)[label_column])
    metrics = classification_metrics(features @ classifier.t().cpu(), labels, len(class_names))
    return {"num_samples": len(kept), "num_skipped": skipped, "num_classes": len(class_names), "metrics": metrics}


def run_zero_shot(args, model, tokenizer, image_processor, accelerator) -> dict[str, Any]:
    dataset = load_eval_split(args, args.split, model)
    names, templates = class_names_and_templates(args, dataset)
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
    )


def run_retrieval(args, model, tokenizer, image_processor, accelerator) -> dict[str, Any]:
    dataset = load_eval_split(args, args.split, model)
    check_columns(dataset, {"caption_column": args.caption_column}, f"{args.dataset or BUILTIN}[{args.split}]")
    features, kept, skipped = encode_images(
        model, image_processor, dataset, args.image_column, args.batch_size, accelerator
    )
    texts, text_to_image = [], []
    for position, value in enumerate(dataset.select(kept)[args.caption_column]):
        captions = value if isinstance(value, (list, tuple)) else [value]
        for caption in captions:
            if isinstance(caption, str) and caption.strip():
                texts.append(caption)
                text_to_image.append(position)
    if not texts:
        raise ValueError(f"--caption_column {args.caption_column!r} holds no caption text in {args.split!r}.")
    text_features = encode_texts(model, tokenizer, texts, args.batch_size, accelerator)
    metrics = retrieval_metrics(text_features @ features.t(), torch.tensor(text_to_image))
    return {"num_samples": len(kept), "num_skipped": skipped, "num_texts": len(texts), "metrics": metrics}


def fit_linear_probe(train_x, train_y, test_x, test_y, num_classes, val_fraction=0.2, seed=0, val=None):
    """Logistic regression on frozen features, its inverse regularisation C chosen on a validation split.

    Args:
        val: optional ``(features, labels)``; otherwise ``val_fraction`` of the training rows is held out.
    Returns:
        ``(metrics on the test rows, chosen C)``; the final classifier is refit on train + validation.
    """
    from sklearn.linear_model import LogisticRegression

    if val is None:
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
        cut = max(1, int(len(order) * val_fraction))
        val = (train_x[order[:cut]], train_y[order[:cut]])
        train_x, train_y = train_x[order[cut:]], train_y[order[cut:]]
    best_c, best_accuracy = None, -1.0
    for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        probe = LogisticRegression(C=c, max_iter=1000).fit(train_x.numpy(), train_y.numpy())
        accuracy = float((probe.predict(val[0].numpy()) == val[1].numpy()).mean())
        if accuracy > best_accuracy:
            best_c, best_accuracy = c, accuracy
    all_x, all_y = torch.cat([train_x, val[0]]), torch.cat([train_y, val[1]])
    probe = LogisticRegression(C=best_c, max_iter=1000).fit(all_x.numpy(), all_y.numpy())
    scores = torch.full((len(test_y), num_classes), -math.inf)
    scores[:, torch.as_tensor(probe.classes_)] = torch.from_numpy(probe.predict_log_proba(test_x.numpy())).float()
    metrics = classification_metrics(scores, test_y, num_classes)
    return {"top1": metrics["top1"], "mean_per_class_recall": metrics["mean_per_class_recall"]}, best_c


def run_linear_probe(args, model, tokenizer, image_processor, accelerator) -> dict[str, Any]:
    splits = {"train": args.train_split, "test": args.split, "val": args.val_split}
    encoded = {}
    for role, split in splits.items():
        if split is None:
            continue
        dataset = load_eval_split(args, split, model)
        check_columns(dataset, {"label_column": args.label_column}, f"{args.dataset or BUILTIN}[{split}]")
        features, kept, skipped = encode_images(
            model, image_processor, dataset, args.image_column, args.batch_size, accelerator
        )
        labels = torch.tensor(dataset.select(kept)[args.label_column], dtype=torch.long)
        encoded[role] = (features, labels, skipped)
    num_classes = int(max(int(e[1].max()) for e in encoded.values())) + 1
    val = encoded["val"][:2] if "val" in encoded else None
    metrics, c = fit_linear_probe(
        *encoded["train"][:2], *encoded["test"][:2], num_classes, args.linear_probe_val_fraction, args.seed, val
    )
    return {
        "num_samples": len(encoded["test"][1]),
        "num_skipped": sum(e[2] for e in encoded.values()),
        "num_classes": num_classes,
        "num_train_samples": len(encoded["train"][1]),
        "C": c,
        "metrics": metrics,
    }


RUNNERS = {"zeroshot_classification": run_zero_shot, "retrieval": run_retrieval, "linear_probe": run_linear_probe}


def evaluate_model(args: EvalArguments, accelerator: Accelerator | None = None, loaded=None) -> dict[str, Any]:
    """Run one task; returns the DESIGN.md result schema (``task``, ``dataset``, ..., ``metrics``)."""
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r} is not one of {TASKS}.")
    accelerator = accelerator or Accelerator()
    model, tokenizer, image_processor = loaded or load_model_for_eval(args.model, accelerator.device)
    strategy = args.mask_strategy or model.config.vision_config.mask_strategy
    sigma = args.mask_sigma or model.config.vision_config.mask_sigma
    with masked_inference(model, args.mask_ratio, strategy, sigma):  # mask_ratio 0 = unmasked inference
        result = RUNNERS[args.task](args, model, tokenizer, image_processor, accelerator)
    return {
        "task": args.task,
        "dataset": args.dataset or BUILTIN,
        "split": args.split,
        "model": args.model or str(DEFAULT_MODEL_DIR),
        "mask_ratio": args.mask_ratio,
        "mask_strategy": strategy if args.mask_ratio > 0 else None,
        **result,
    }


# -------------------------------------------------------------------------------------------------------- output


def summary_line(result: dict[str, Any]) -> str:
    metrics = " | ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    return (
        f"{result['task']} | {result['dataset']}[{result['split']}] | mask_ratio {result['mask_ratio']} | "
        f"{metrics} | n={result['num_samples']} skipped={result['num_skipped']}"
    )


def write_table(results: list[dict[str, Any]], base: str | Path) -> tuple[Path, Path]:
    """CLIP_benchmark-style "build" table of ``results``: ``<base>.md`` and ``<base>.csv``."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    keys = ["model", "task", "dataset", "split", "mask_ratio", "num_samples", "num_skipped"]
    metric_keys = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    rows = [[r[k] for k in keys] + [r["metrics"].get(m, "") for m in metric_keys] for r in results]
    header = keys + metric_keys
    with (base.with_suffix(".csv")).open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])

    def cell(column: str, value: Any) -> str:
        return f"{value:.4f}" if column in metric_keys and isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(header, row)) + " |" for row in rows]
    (base.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    return base.with_suffix(".md"), base.with_suffix(".csv")


def run_suite(args: EvalArguments, accelerator: Accelerator | None = None) -> list[dict[str, Any]]:
    """Every entry of ``args.suite`` (a YAML ``entries:`` list of EvalArguments fields), one table at the end."""
    path = Path(args.suite)
    if not path.is_file():
        raise FileNotFoundError(f"--suite {path} not found; pass an existing YAML file.")
    spec = yaml.safe_load(path.read_text()) or {}
    entries = spec.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: needs a non-empty 'entries:' list of tasks.")
    accelerator = accelerator or Accelerator()
    defaults = {**asdict(args), **{k: v for k, v in spec.items() if k != "entries"}, "suite": None}
    if args.model is not None:
        defaults["model"] = args.model  # the command line wins over the suite file
    loaded, results = {}, []
    for entry in entries:
        unknown = set(entry) - set(defaults)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} in entry {entry}.")
        entry_args = EvalArguments(**{**defaults, **entry})
        if entry_args.model not in loaded:
            loaded[entry_args.model] = load_model_for_eval(entry_args.model, accelerator.device)
        results.append(evaluate_model(entry_args, accelerator, loaded[entry_args.model]))
        accelerator.print(summary_line(results[-1]))
    if accelerator.is_main_process:
        base = Path(args.output or "eval_results/suite").with_suffix("")
        md, csv_path = write_table(results, base)
        base.with_suffix(".json").write_text(json.dumps(results, indent=1))
        print(f"Wrote {md} and {csv_path}")
    return results
