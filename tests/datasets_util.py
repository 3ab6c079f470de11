"""Small local datasets in every supported layout, with deliberately broken samples where asked."""

import io
import json
import tarfile
from pathlib import Path

import datasets
from PIL import Image

from glip_hf.synthetic import render_example_scene


def png_bytes(seed: int, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    render_example_scene(size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def captions(n: int) -> list[str]:
    return [f"a photo of scene number {i}." for i in range(n)]


def make_imagefolder(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as meta:
        for i, text in enumerate(captions(n)):
            (root / f"{i:03d}.png").write_bytes(png_bytes(i))
            meta.write(json.dumps({"file_name": f"{i:03d}.png", "text": text}) + "\n")
    return root


def make_parquet(path: Path, n: int = 8) -> Path:
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"image": [{"bytes": png_bytes(i), "path": None} for i in range(n)], "caption": captions(n)}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def make_webdataset(root: Path, shards: int = 2, per_shard: int = 4, same_image: bool = False) -> Path:
    """``shards`` tar files of ``per_shard`` jpg/txt pairs; with ``same_image`` every sample shows one image."""
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard in range(shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                image = _jpeg(0 if same_image else index)
                for ext, payload in (("jpg", image), ("txt", captions(index + 1)[-1].encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                index += 1
    return root


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    render_example_scene(20, seed=seed).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_broken_dataset(path: Path, good: int = 20) -> tuple[Path, dict[str, int]]:
    """A saved dataset with good rows plus one of each kind of bad row; returns the expected skip counts."""
    images = [{"bytes": png_bytes(i, 16), "path": None} for i in range(good)]
    texts = captions(good)
    images += [
        {"bytes": b"not an image at all", "path": None},
        {"bytes": b"", "path": None},
        {"bytes": png_bytes(99, 16), "path": None},
        {"bytes": png_bytes(98, 16), "path": None},
    ]
    texts += ["corrupt bytes", "zero bytes", None, "   "]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "caption": texts}, features=features).save_to_disk(str(path))
    return path, {"undecodable_image": 1, "missing_image": 1, "missing_caption": 2}


def blank_image() -> Image.Image:
    return Image.new("RGB", (8, 8))


def make_sparse_caption_dataset(path: Path, good: int = 4, missing: int = 8) -> Path:
    """A saved dataset of ``good`` captioned rows and ``missing`` rows without a caption, interleaved."""
    rows = good + missing
    texts = [captions(rows)[i] if i % (rows // good) == 0 else None for i in range(rows)]
    images = [{"bytes": png_bytes(i, 16), "path": None} for i in range(rows)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "caption": texts}, features=features).save_to_disk(str(path))
    return path
