"""Data pipeline throughput: images/s per CPU worker, from JPEG webdataset shards to training batches.

Generates realistic JPEG shards once (400-600 px, smooth gradients + shapes + noise, quality 90, a caption each) into
``--cache_dir``, then times DataLoader workers that decode, RandomResizedCrop to 224, normalise, tokenise and collate:

- ``glip``: this project's collator (`glip_hf.data.ImageTextCollator`, the training run's), with each cheap win on
  and off: ``jpeg_draft`` (decode at reduced size when the crop allows) and ``uint8`` (uint8 batches, normalised on
  the device by `glip_hf.data.normalize_pixels`);
- ``open_clip``: the torchvision pipeline open_clip trains with (PIL decode to RGB, ``RandomResizedCrop(224,
  scale=(0.9, 1.0), bicubic)``, ``ToTensor``, ``Normalize`` with CLIP's mean and std), same shards, same tokenizer;
  skipped with a message where torchvision does not import;
- on a CUDA device, the host-to-device copy: pageable vs pinned memory with a non-blocking copy, float32 vs uint8
  batches (uint8 normalised on the device), and the loader with ``pin_memory`` on and off.

Both pipelines use the same crop scale (open_clip's default, ``--crop_scale``) and the same offline-trained BPE
tokenizer (77 tokens). The shards are read by a plain tar reader that deals samples round-robin to the workers, not
by ``datasets`` (which a training run reads webdataset shards with): what is timed is the decode / transform /
tokenise / collate path both pipelines share the shape of. Prints a table and writes JSON (``--out``).

    PYTHONPATH=. python benchmarks/data_pipeline.py --quick --out /tmp/quick.json       # smoke test, seconds
    PYTHONPATH=. python benchmarks/data_pipeline.py --workers 1 2 --out data_pipeline.json              # 2 cores
    PYTHONPATH=. python3 benchmarks/data_pipeline.py --workers 1 8 15 --batches_per_worker 16 --out FILE.json  # 16
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFilter

from glip_hf import synthetic
from glip_hf.cli import OneLineErrorParser
from glip_hf.data import ImageTextCollator, normalize_pixels
from glip_hf.tokenization import train_clip_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image statistics, as open_clip and transformers use
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
TEXT_LENGTH = 77
H200_IMAGES_PER_S = 7000  # the step rate the speed issue targets on one H200 at 75% masking
# The built-in dataset's colours, and a few more for backgrounds.
COLOURS = {**synthetic.COLOURS, "white": (235, 235, 235), "black": (25, 25, 25), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "ellipse", "rectangle")


# ------------------------------------------------------------------------------------------------- shards


def scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One natural-ish picture (``400..600 x 400..600``) and its caption: a two-colour gradient background, 2-4
    soft-edged shapes, sensor-like noise."""
    width, height = (int(v) for v in rng.integers(400, 601, size=2))
    names = list(COLOURS)
    background = [names[i] for i in rng.choice(len(names), 2, replace=False)]
    top, bottom = (np.array(COLOURS[name], dtype=np.float32) for name in background)
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    t = xs * math.cos(angle) / width + ys * math.sin(angle) / height
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    pixels = top * (1 - t[..., None]) + bottom * t[..., None]  # (H, W, 3)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    described = []
    for _ in range(int(rng.integers(2, 5))):
        colour, shape = names[int(rng.integers(len(names)))], SHAPES[int(rng.integers(len(SHAPES)))]
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        r = rng.uniform(0.08, 0.25) * min(width, height)
        box = (cx - r, cy - r * (0.6 if shape in ("ellipse", "rectangle") else 1), cx + r, cy + r)
        if shape in ("circle", "ellipse"):
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        else:
            draw.rectangle(box, fill=COLOURS[colour])
        described.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
    caption = f"{', '.join(described[:-1])} and {described[-1]} on a {background[0]} and {background[1]} background"
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), caption


def write_shard(path: Path, indices: range, seed: int) -> None:
    """One tar of samples ``KEY.jpg`` (quality 90) + ``KEY.txt``, keyed by their index; the pictures drawn from
    ``(seed, first index)``."""
    rng = np.random.default_rng([seed, indices.start])
    partial = path.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        for index in indices:
            image, caption = scene(rng)
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=90)
            for name, data in ((f"{index:08d}.jpg", encoded.getvalue()), (f"{index:08d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    partial.replace(path)


def write_shards(directory: Path, images: int, shards: int, seed: int = 0) -> list[Path]:
    """``shards`` tar files of ``images`` samples in ``directory`` (sample ``i`` in shard ``i % shards``), written by
    a process per core; made once: a directory whose ``done.json`` records the same request is reused."""
    request = {"images": images, "shards": shards, "seed": seed, "quality": 90, "generator": 2}
    done = directory / "done.json"
    paths = [directory / f"shard-{i:05d}.tar" for i in range(shards)]
    if done.is_file() and json.loads(done.read_text()) == request and all(p.is_file() for p in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [(path, range(shard, images, shards), seed) for shard, path in enumerate(paths)]
    with multiprocessing.get_context("fork").Pool(min(shards, available_cpus())) as pool:
        pool.starmap(write_shard, jobs)
    done.write_text(json.dumps(request))
    return paths


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TarSamples(torch.utils.data.IterableDataset):
    """Rows ``{"jpg": {"bytes", "path"}, "txt": caption, "__index__": i}`` of webdataset shards, read with tarfile;
    sample ``i`` goes to worker ``i % num_workers`` (every worker walks the headers, reads only its own members)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, rank = (1, 0) if worker is None else (worker.num_workers, worker.id)
        for path in self.paths:
            rows: dict[str, dict] = {}
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    key, field = info.name.rsplit(".", 1)  # the key is the sample's index (see write_shards)
                    if int(key) % workers != rank:
                        continue
                    data = tar.extractfile(info).read()
                    row = rows.setdefault(key, {"__index__": int(key)})
                    row[field] = {"bytes": data, "path": info.name} if field == "jpg" else data.decode()
                    if "jpg" in row and "txt" in row:
                        yield rows.pop(key)


# ------------------------------------------------------------------------------------------------- pipelines


class TorchvisionCollate:
    """open_clip's training transform on each row (PIL decode to RGB as webdataset's ``pilrgb`` does), the same
    tokenizer call as the project's collator, then a stacked batch."""

    def __init__(self, tokenizer, crop_scale: tuple[float, float]):
        from torchvision import transforms

        self.tokenizer = tokenizer
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    IMAGE_SIZE, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC
                ),
                lambda image: image.convert("RGB"),
                transforms.ToTensor(),
                transforms.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def __call__(self, rows: list[dict]) -> dict:
        pixels = []
        for row in rows:
            image = Image.open(io.BytesIO(row["jpg"]["bytes"]))
            image.load()
            pixels.append(self.transform(image.convert("RGB")))
        text = self.tokenizer(
            [row["txt"] for row in rows],
            padding="max_length",
            truncation=True,
            max_length=TEXT_LENGTH,
            return_tensors="pt",
        )
        return {"pixel_values": torch.stack(pixels), "input_ids": text["input_ids"]}


def pipelines(tokenizer, crop_scale: tuple[float, float]) -> tuple[dict, str | None]:
    """``{name: collate_fn}`` to time, and why the torchvision side is missing (None when it is there)."""

    def glip(uint8: bool, draft: bool) -> ImageTextCollator:
        return ImageTextCollator(
            tokenizer,
            IMAGE_SIZE,
            list(CLIP_MEAN),
            list(CLIP_STD),
            "jpg",
            "txt",
            max_length=TEXT_LENGTH,
            crop_scale=crop_scale,
            uint8=uint8,
            jpeg_draft=draft,
        )

    found = {
        "glip": glip(False, False),
        "glip jpeg_draft": glip(False, True),
        "glip uint8": glip(True, False),
        "glip jpeg_draft+uint8": glip(True, True),
    }
    try:
        found["open_clip (torchvision)"] = TorchvisionCollate(tokenizer, crop_scale)
    except Exception as error:  # torchvision absent, or built for another torch (it then fails on import)
        return found, f"torchvision does not import here ({type(error).__name__}: {error}); open_clip side skipped"
    return found, None


# ------------------------------------------------------------------------------------------------- timing


def time_loader(
    dataset, collate, workers: int, batch_size: int, per_worker: int, pin_memory: bool = False, device=None
) -> dict:
    """Images/s of a DataLoader with ``workers`` workers over ``dataset``, counted over ``per_worker`` batches per
    worker after each worker has delivered its first (worker start-up excluded). With ``device``, each batch is
    copied there (non-blocking when pinned) and uint8 pixels normalised there."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory
    )
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    if device is not None:
        mean, std = mean.to(device), std.to(device)
    start, counted, batches = None, 0, 0
    for batch in loader:
        if device is not None:
            pixels = batch["pixel_values"].to(device, non_blocking=pin_memory)
            if pixels.dtype == torch.uint8:
                pixels = normalize_pixels(pixels, mean, std)
        batches += 1
        if batches == workers:  # every worker has started and delivered once
            start = time.perf_counter()
        elif batches > workers:
            counted += batch["pixel_values"].shape[0]
        if batches == workers * (per_worker + 1):
            break
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start if start is not None else math.nan
    rate = counted / seconds if counted else math.nan
    return {
        "workers": workers,
        "images": counted,
        "seconds": seconds,
        "images_per_s": rate,
        "per_worker": rate / workers,
    }


def time_copies(device: torch.device, batch_size: int, repeats: int = 20) -> list[dict]:
    """Host-to-device copy rate of one batch of pixels: float32 vs uint8 (then normalised on the device), pageable
    memory with a blocking copy vs pinned memory with a non-blocking one."""
    rows = []
    mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    for dtype in (torch.float32, torch.uint8):
        host = torch.randint(0, 256, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8).to(dtype)
        for pinned in (False, True):
            source = host.pin_memory() if pinned else host
            for _ in range(3):
                source.to(device, non_blocking=pinned)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                pixels = source.to(device, non_blocking=pinned)
                if dtype == torch.uint8:
                    pixels = normalize_pixels(pixels, mean, std)
            torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) / repeats
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "pinned_non_blocking": pinned,
                    "ms_per_batch": 1000 * seconds,
                    "images_per_s": batch_size / seconds,
                    "GB_per_s": host.element_size() * host.numel() / seconds / 1e9,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches_per_worker", type=int, default=24, help="timed batches per worker, each count")
    parser.add_argument(
        "--images", type=int, default=None, help="images in the shards (default: enough for the largest --workers)"
    )
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="rounds in which every pipeline is timed in turn")
    parser.add_argument("--crop_scale", type=float, nargs=2, default=[0.9, 1.0], help="open_clip's default")
    parser.add_argument("--cache_dir", default=".cache/glip-hf/bench-shards")
    parser.add_argument("--only", nargs="+", default=None, help="time only these pipelines (names as printed)")
    parser.add_argument("--out", default="data_pipeline.json", help="JSON results")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 16 images, 1 worker, batch 4")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.shards, args.batch_size, args.workers, args.batches_per_worker = 16, 2, 4, [1], 2
    if min(args.workers) < 1 or args.batches_per_worker < 1 or args.repeats < 1:
        parser.error("--workers, --batches_per_worker and --repeats must be >= 1")
    if args.batch_size < 1 or args.shards < 1:
        parser.error(f"--batch_size {args.batch_size} and --shards {args.shards} must be >= 1")
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        parser.error(f"--crop_scale {low} {high} is invalid; expected 0 < min <= max <= 1")
    # Each worker delivers its first batch, its timed ones, and has up to 2 more in flight when the timing stops.
    needed = args.batch_size * max(args.workers) * (args.batches_per_worker + 3)
    if args.images is None:
        args.images = needed
    elif args.images < needed - 2 * args.batch_size * max(args.workers):
        parser.error(f"--images {args.images} is too few for --workers and --batches_per_worker; use >= {needed}")
    return args


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "cpus": available_cpus(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:
        info["torchvision"] = None
    return info


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    cache = Path(args.cache_dir) / f"{args.images}x{args.shards}"
    started = time.perf_counter()
    paths = write_shards(cache, args.images, args.shards)
    captions = [row["txt"] for row in TarSamples(paths[:1])]
    tokenizer = train_clip_tokenizer(captions, vocab_size=600, model_max_length=TEXT_LENGTH)
    print(f"shards: {len(paths)} in {cache} ({args.images} images, ready in {time.perf_counter() - started:.1f} s)")
    found, missing = pipelines(tokenizer, tuple(args.crop_scale))
    if missing:
        print(missing)
    dataset = TarSamples(paths)
    unknown = sorted(set(args.only or ()) - set(found))
    if unknown:
        message = f"data_pipeline.py: error: --only: no pipeline {unknown} here; choose from {list(found)}"
        print(message, file=sys.stderr)
        raise SystemExit(2)
    timed = [(name, collate) for name, collate in found.items() if not args.only or name in args.only]
    runs = []  # every measurement; the pipelines take turns in each repeat, so a slow spell hits them alike
    for repeat in range(args.repeats):
        for workers in args.workers:
            for name, collate in timed:
                row = time_loader(dataset, collate, workers, args.batch_size, args.batches_per_worker)
                runs.append({"pipeline": name, "repeat": repeat, **row})
                rate, per_worker = row["images_per_s"], row["per_worker"]
                print(f"{name:<26} workers {workers:>3}: {rate:8.1f} img/s  {per_worker:7.1f} per worker")
    results = [median_run(runs, name, workers) for workers in args.workers for name, _ in timed]
    device = torch.device("cuda") if torch.cuda.is_available() else None
    copies, pinned = [], []
    if device is None:
        print("pinned memory / non-blocking copies: skipped (no CUDA device)")
    else:
        copies = time_copies(device, args.batch_size * 8)
        for row in copies:
            print(
                f"copy {row['dtype']:<8} pinned+non_blocking={row['pinned_non_blocking']!s:<5}: "
                f"{row['images_per_s']:10.0f} img/s  {row['GB_per_s']:6.1f} GB/s"
            )
        for pin in (False, True):
            row = time_loader(
                dataset,
                found["glip jpeg_draft+uint8"],
                max(args.workers),
                args.batch_size,
                args.batches_per_worker,
                pin,
                device,
            )
            pinned.append({"pipeline": "glip jpeg_draft+uint8 -> cuda", "pin_memory": pin, **row})
            print(f"loader -> cuda, pin_memory={pin!s:<5}: {row['images_per_s']:8.1f} img/s")
    table = format_table(results)
    print(table)
    needed = workers_needed(results)
    for line in needed.values():
        print(line)
    report = {
        "machine": machine(),
        "args": vars(args),
        "torchvision_skipped": missing,
        "results": results,
        "runs": runs,
        "copies": copies,
        "loader_to_device": pinned,
        "workers_for_h200_extrapolation": needed,
        "note": "shards read by a plain tar reader (no datasets); crop scale and tokenizer the same for all pipelines",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


def median_run(runs: list[dict], name: str, workers: int) -> dict:
    """The median images/s of a pipeline at a worker count over the repeats, with the range."""
    rates = sorted(r["images_per_s"] for r in runs if r["pipeline"] == name and r["workers"] == workers)
    rate = float(np.median(rates))
    return {
        "pipeline": name,
        "workers": workers,
        "images_per_s": rate,
        "per_worker": rate / workers,
        "min": rates[0],
        "max": rates[-1],
        "repeats": len(rates),
    }


def format_table(results: list[dict]) -> str:
    lines = ["| pipeline | workers | images/s (median) | min-max | images/s per worker |", "|---|---|---|---|---|"]
    for row in results:
        lines.append(
            f"| {row['pipeline']} | {row['workers']} | {row['images_per_s']:.1f} | {row['min']:.1f}-{row['max']:.1f} "
            f"| {row['per_worker']:.1f} |"
        )
    return "\n".join(lines)


def workers_needed(results: list[dict]) -> dict[str, str]:
    """Per pipeline: workers one H200 would need at ``H200_IMAGES_PER_S``, from the per-worker rate at the largest
    worker count timed here (an extrapolation: it assumes the rate per worker holds at that many workers)."""
    needed = {}
    for name in dict.fromkeys(row["pipeline"] for row in results):
        row = max((r for r in results if r["pipeline"] == name), key=lambda r: r["workers"])
        if math.isfinite(row["per_worker"]) and row["per_worker"] > 0:
            count = math.ceil(H200_IMAGES_PER_S / row["per_worker"])
            needed[name] = (
                f"extrapolation: {name} needs ~{count} workers for {H200_IMAGES_PER_S} img/s "
                f"({row['per_worker']:.1f} img/s per worker at {row['workers']} workers)"
            )
    return needed


if __name__ == "__main__":
    main(sys.argv[1:])
