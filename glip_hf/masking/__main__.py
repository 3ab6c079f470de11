"""Render the mask picture: ``python -m glip_hf.masking --out docs/masks.png``."""

from __future__ import annotations

import torch

from ..cli import OneLineErrorParser, run_cli
from . import render_mask_figure


def _load_image(path: str | None, size: int) -> torch.Tensor:
    """An RGB image resized to ``size x size`` as ``(3, size, size)`` in [0, 1]; a generated scene if no path."""
    from PIL import Image

    if path is None:
        from ..synthetic import render_example_scene

        pil = render_example_scene(size)
    else:
        try:
            pil = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        except OSError as error:  # no such file, or not an image PIL can read
            raise ValueError(f"--image {path} could not be read as an image ({error}).") from None
    pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and render; a bad value is a one-line error with exit status 2 (`glip_hf.cli.run_cli`)."""
    run_cli(_render, argv, prog="python -m glip_hf.masking")


def _render(argv: list[str]) -> None:
    parser = OneLineErrorParser(
        prog="python -m glip_hf.masking", description="Render random vs Gaussian patch masks and keep frequencies."
    )
    parser.add_argument("--out", default="docs/masks.png", help="PNG to write")
    parser.add_argument("--image", default=None, help="image file; default: a generated scene")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.2, 0.8])
    parser.add_argument("--num_samples", type=int, default=4096, help="draws for the keep-frequency maps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f"--image_size must be at least 1, got {args.image_size}.")
    image = _load_image(args.image, args.image_size)
    path = render_mask_figure(
        image, args.out, args.patch_size, args.mask_ratio, tuple(args.sigmas), args.num_samples, args.seed
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
