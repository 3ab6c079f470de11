"""Small local datasets in every supported layout, with deliberately broken or odd samples where asked."""

import csv
import io
import json
import random
import tarfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from glip_hf.synthetic import captions_for, class_names, render_example_scene, sample_scene


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
    return path, {"undecodable_image": 1, "empty_image": 1, "missing_caption": 2}


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


# ------------------------------------------------------------------------------------ corrupt and odd data

# Bad rows: what each is and the reason the collator skips it for.
BAD_KINDS = {
    "truncated_jpeg": "undecodable_image",  # the first half of a JPEG
    "not_an_image": "undecodable_image",  # HTML where the image should be
    "zero_bytes": "empty_image",
    "empty_caption": "missing_caption",  # blank caption(s)
    "none_caption": "missing_caption",
}
# Odd rows whose image (or caption) is valid and must be used, converted where needed.
ODD_KINDS = (
    "grayscale",  # mode L
    "cmyk_jpeg",
    "rgba_png",  # left half fully transparent
    "palette_png",  # mode P with a transparent palette index in the top half
    "png_16bit",  # mode I;16, the 8-bit greys times 257
    "one_by_one",
    "wide_10000x10",
    "exif_rotated_6",  # stored sideways, EXIF orientation 6 (rotate 90 degrees clockwise to view)
    "exif_rotated_8",  # stored sideways, EXIF orientation 8 (rotate 90 degrees counter-clockwise to view)
    "long_caption",  # a caption many times longer than any text context
)
LONG_CAPTION_WORDS = 300
NOT_AN_IMAGE = b"<html><body>404 not found</body></html>"
EXIF_ORIENTATION = 0x0112


def encode_image(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_rotated_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG stored sideways whose EXIF orientation (6 or 8) says how to turn it back to ``upright``."""
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode_image(stored, "JPEG", quality=95, exif=exif.tobytes())


def transparent_rgba(image: Image.Image) -> Image.Image:
    """``image`` as RGBA with its left half fully transparent."""
    rgba = image.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, rgba.width // 2, rgba.height))
    rgba.putalpha(alpha)
    return rgba


def transparent_palette(image: Image.Image) -> Image.Image:
    """``image`` quantised to a 15-colour palette, its top half painted with a 16th, transparent, palette index."""
    paletted = image.quantize(colors=15)  # up to 15 colours: indices 0-14
    colours = paletted.getpalette()[: 15 * 3]
    paletted.putpalette(colours + [0] * (16 * 3 - len(colours)))  # index 15: black, seen if transparency is lost
    paletted.paste(15, (0, 0, paletted.width, paletted.height // 2))
    paletted.info["transparency"] = 15
    return paletted


def grey_16bit(image: Image.Image) -> Image.Image:
    """``image``'s 8-bit greys as a 16-bit (mode I;16) image: each value times 257, so 255 -> 65535."""
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)


def odd_image_bytes(kind: str, image: Image.Image) -> bytes:
    """The encoded image of an odd-but-valid row of ``kind`` made from the RGB ``image``."""
    if kind == "grayscale":
        return encode_image(image.convert("L"))
    if kind == "cmyk_jpeg":
        return encode_image(image.convert("CMYK"), "JPEG", quality=95)
    if kind == "rgba_png":
        return encode_image(transparent_rgba(image))
    if kind == "palette_png":
        return encode_image(transparent_palette(image), transparency=15)
    if kind == "png_16bit":
        return encode_image(grey_16bit(image))
    if kind == "one_by_one":
        return encode_image(image.resize((1, 1)))
    if kind == "wide_10000x10":
        return encode_image(image.resize((10000, 10)))
    if kind in ("exif_rotated_6", "exif_rotated_8"):
        return exif_rotated_jpeg(image, int(kind[-1]))
    return encode_image(image)


def long_caption(caption: str) -> str:
    return caption + " " + " ".join(["and"] + [f"detail{i % 10}" for i in range(LONG_CAPTION_WORDS)])


def _messy_row(kind: str, rng: random.Random, image_size: int) -> dict:
    image, attrs = sample_scene(rng, image_size)
    captions = captions_for(attrs, rng, 3)
    label = class_names().index(f"{attrs['colour']} {attrs['shape']}")
    data = odd_image_bytes(kind, image) if kind in ODD_KINDS else encode_image(image)
    if kind == "truncated_jpeg":
        jpeg = encode_image(image, "JPEG", quality=95)
        data = jpeg[: len(jpeg) // 2]
    elif kind in ("not_an_image", "zero_bytes"):
        data = NOT_AN_IMAGE if kind == "not_an_image" else b""
    elif kind == "empty_caption":
        captions = ["   ", ""]
    elif kind == "long_caption":
        captions = [long_caption(captions[0]), *captions[1:]]
    caption = None if kind == "none_caption" else captions[0]
    row_captions = None if kind == "none_caption" else captions
    return {"image": {"bytes": data, "path": None}, "caption": caption, "captions": row_captions, "label": label}


def make_messy_dataset(path: Path, good: int = 85, image_size: int = 24, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """A saved ``DatasetDict`` (``train`` and ``test``) of generated scenes in which each split holds ``good`` clean
    rows, one row of each of ``BAD_KINDS`` and one of each of ``ODD_KINDS``, shuffled (seeded). With the default 85
    clean rows a split has 100 rows, 5 of them bad (5%) and 10 odd but valid.

    Columns: ``image`` (``Image``), ``caption`` (string or None), ``captions`` (list of strings or None, for
    retrieval), ``label`` (``ClassLabel`` "colour shape", as in the built-in dataset) and ``kind`` (the row's kind:
    ``good`` or a key of ``BAD_KINDS`` / ``ODD_KINDS``).

    Returns:
        ``(path, expected)``: ``expected`` is the exact skip count by reason of one split when every row is read
        once with its caption (training); without captions (classification) drop ``missing_caption``.
    """
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "label": datasets.ClassLabel(names=class_names()),
            "kind": datasets.Value("string"),
        }
    )
    splits = {}
    for split in ("train", "test"):
        kinds = ["good"] * good + list(BAD_KINDS) + list(ODD_KINDS)
        random.Random(f"messy-{seed}-{split}").shuffle(kinds)
        rows = [
            {**_messy_row(kind, random.Random(f"messy-{seed}-{split}-{i}"), image_size), "kind": kind}
            for i, kind in enumerate(kinds)
        ]
        columns = {name: [row[name] for row in rows] for name in features}
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    expected: dict[str, int] = {}
    for reason in BAD_KINDS.values():
        expected[reason] = expected.get(reason, 0) + 1
    return path, expected


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_messy_webdataset(root: Path, shards: int = 3, per_shard: int = 8) -> tuple[Path, dict[str, int], int]:
    """``shards`` webdataset ``.tar`` shards of jpg/txt samples, damaged the ways real shards are.

    In the first shard (among the 5 samples datasets infers its columns from) sample 1 has no ``txt`` member,
    sample 2 a zero-byte ``jpg`` and sample 3 no ``jpg``; the second shard holds a CMYK, a grayscale and an
    EXIF-rotated JPEG (odd but valid), a ``jpg`` that is not an image, a blank ``txt`` and a ``txt`` in Latin-1 (not
    UTF-8: datasets failed the split, or a stream, on it); the last shard is cut off
    in the middle of the ``jpg`` of its sample ``per_shard // 2``, so only its samples before that one survive.

    Returns:
        ``(root, expected skip counts by reason, number of samples readable)``.
    """
    root.mkdir(parents=True, exist_ok=True)
    special = {1: "no_txt", 2: "zero_jpg", 3: "no_jpg"}
    special.update({per_shard + 1: "cmyk_jpeg", per_shard + 2: "grayscale", per_shard + 3: "exif_rotated_6"})
    special.update({per_shard + 4: "not_an_image", per_shard + 5: "blank_txt", per_shard + 6: "latin1_txt"})
    cut_sample = (shards - 1) * per_shard + per_shard // 2
    for shard in range(shards):
        path = root / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                kind = special.get(index, "good")
                rng = random.Random(f"messy-wds-{index}")
                image, attrs = sample_scene(rng, 24)
                jpg = odd_image_bytes(kind, image) if kind in ODD_KINDS else encode_image(image, "JPEG")
                jpg = {"zero_jpg": b"", "not_an_image": NOT_AN_IMAGE}.get(kind, jpg)
                txt = b"  " if kind == "blank_txt" else captions_for(attrs, rng, 1)[0].encode()
                txt = "a café, in Latin-1".encode("latin-1") if kind == "latin1_txt" else txt  # not UTF-8
                if index == cut_sample:
                    cut = tar.offset + tarfile.BLOCKSIZE + len(jpg) // 2  # after its header, inside its data
                if kind != "no_jpg":
                    _add_member(tar, f"{index:06d}.jpg", jpg)
                if kind != "no_txt":
                    _add_member(tar, f"{index:06d}.txt", txt)
        if shard == shards - 1:
            path.write_bytes(path.read_bytes()[:cut])
    expected = {"missing_caption": 3, "empty_image": 1, "missing_image": 1, "undecodable_image": 1}
    return root, expected, (shards - 1) * per_shard + per_shard // 2


# ------------------------------------------------------------------------------- images named by relative paths


def write_table(path: Path, rows: list[dict]) -> Path:
    """``rows`` (dicts of strings, same keys) as a ``.jsonl``, ``.csv`` or ``.parquet`` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]}).to_parquet(str(path))
    return path


def make_relative_path_table(path: Path, names: list[str], missing: tuple[str, ...] = (), first: int = 0) -> Path:
    """A data file at ``path`` whose ``image`` column holds ``names`` then ``missing``, as given (relative or
    absolute paths), each row with its own caption (numbered from ``first``). A PNG is written at
    ``path.parent / name`` for each relative name of ``names`` that has no file there yet; ``missing`` get none."""
    for i, name in enumerate(names):
        image = path.parent / name
        if not Path(name).is_absolute() and not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(png_bytes(first + i, 16))
    names = [*names, *missing]
    texts = captions(first + len(names))[first:]
    return write_table(path, [{"image": name, "caption": text} for name, text in zip(names, texts)])
