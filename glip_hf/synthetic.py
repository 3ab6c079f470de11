"""The built-in offline dataset: generated scenes of one captioned object, with a centre bias like real photos.

Each image holds one main object whose colour, shape and size the caption describes, placed near the centre
(``placement="center"``, the photographer's bias the paper relies on) or anywhere (``placement="uniform"``, the
centre-agnostic variant), plus small muted distractors near the border. The result is a real
``datasets.DatasetDict`` (``train`` / ``test``) with ``image``, ``caption``, ``captions`` (five per image, for
retrieval) and ``label`` (a ``ClassLabel`` over "colour shape" names, for zero-shot classification), cached with
``save_to_disk`` and deterministic in its seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (230, 200, 25),
    "purple": (135, 50, 170),
    "orange": (240, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = {"small": 0.17, "large": 0.3}  # object radius as a fraction of the image side
PLACEMENTS = ("center", "uniform")

CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {shape}.",
    "a {colour} {shape}.",
    "a {size} {shape} coloured {colour}.",
    "there is a {colour} {shape} in the picture.",
    "a picture showing one {size} {colour} {shape}.",
    "the {shape} is {colour} and {size}.",
    "an image of a {colour} {shape} on a plain background.",
    "{colour} {shape}",
)
PROMPT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def class_names() -> list[str]:
    """Zero-shot class names, "colour shape", in ``ClassLabel`` order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = 0.35 * r
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown polygon shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Draw ``shape`` of radius ``r`` centred at ``(cx, cy)``."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)


def sample_scene(rng: random.Random, image_size: int, placement: str = "center") -> tuple[Image.Image, dict]:
    """One scene and its attributes ``{"colour", "shape", "size", "x", "y"}`` (x, y in [0, 1])."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}.")
    background = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))
    radius = SIZES[size] * image_size * rng.uniform(0.9, 1.1)
    lo, hi = radius, image_size - radius
    if placement == "center":  # a photographer's bias: N(centre, (0.12 * side)^2), kept inside the frame
        cx = min(max(rng.gauss(image_size / 2, 0.12 * image_size), lo), hi)
        cy = min(max(rng.gauss(image_size / 2, 0.12 * image_size), lo), hi)
    else:
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    for _ in range(rng.randint(1, 3)):  # small muted distractors near the border, drawn under the object
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.38, 0.46) * image_size
        mix = tuple((c + b) // 2 for c, b in zip(COLOURS[rng.choice(list(COLOURS))], background))
        dx, dy = image_size / 2 + dist * math.cos(angle), image_size / 2 + dist * math.sin(angle)
        draw_shape(draw, rng.choice(SHAPES), dx, dy, 0.07 * image_size, mix)
    draw_shape(draw, shape, cx, cy, radius, COLOURS[colour])
    attrs = {"colour": colour, "shape": shape, "size": size, "x": cx / image_size, "y": cy / image_size}
    return image, attrs


def captions_for(attrs: dict, rng: random.Random, count: int) -> list[str]:
    """``count`` distinct captions of the scene, each from a different template."""
    templates = rng.sample(CAPTION_TEMPLATES, count)
    return [t.format(colour=attrs["colour"], shape=attrs["shape"], size=attrs["size"]) for t in templates]


def render_example_scene(image_size: int = 224, seed: int = 3) -> Image.Image:
    """A single centre-biased scene, used for the mask picture."""
    image, _ = sample_scene(random.Random(seed), image_size, "center")
    return image


def _generate_split(num: int, image_size: int, seed: int, placement: str) -> dict[str, list]:
    names = class_names()
    columns: dict[str, list] = {"image": [], "caption": [], "captions": [], "label": []}
    for index in range(num):
        rng = random.Random(f"{seed}-{index}")
        image, attrs = sample_scene(rng, image_size, placement)
        captions = captions_for(attrs, rng, 5)
        columns["image"].append(image)
        columns["caption"].append(captions[0])
        columns["captions"].append(captions)
        columns["label"].append(names.index(f"{attrs['colour']} {attrs['shape']}"))
    return columns


def build_synthetic_dataset(
    cache_dir: str | Path,
    num_train: int = 6000,
    num_test: int = 600,
    image_size: int = 48,
    seed: int = 0,
    placement: str = "center",
):
    """Generate (or load from ``cache_dir``) the built-in dataset.

    Returns:
        ``datasets.DatasetDict`` with ``train`` and ``test`` splits; the test split uses other seeds than train.
    """
    import datasets

    params = {
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
        "placement": placement,
        "version": 1,
    }
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"synthetic-{placement}-{key}"
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "label": datasets.ClassLabel(names=class_names()),
        }
    )
    splits = {
        "train": _generate_split(num_train, image_size, seed, placement),
        "test": _generate_split(num_test, image_size, seed + 1_000_003, placement),
    }
    dataset = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()})
    # Every process (each rank of `accelerate launch run_eval.py`, say) writes a folder of its own and renames it into
    # place, which is atomic: a half-written cache is never picked up. A process that loses the race uses the copy
    # already there (the same rows: generation is deterministic) and drops its own.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent))
    dataset.save_to_disk(str(tmp))
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "dataset_dict.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))
