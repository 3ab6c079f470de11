"""Time GLIP's masked vision embeddings alone: draw the masks, gather the kept patches, project them, add positions.

Forward and backward (to the projection, class and position weights; pixels need no gradient) of
`GLIPVisionEmbeddings` in training mode at ViT-B/16's sizes, median over repeats, on any device. Run it against two
checkouts (``PYTHONPATH=checkout``) to compare implementations of the same step::

    python benchmarks/patch_embedding.py --batch 256 --ratios 0.5,0.75,0.918

Figures in docs/benchmarks.md, with the machine.
"""

from __future__ import annotations

import json
import sys

import torch
from throughput import Setup, _median_seconds, check_list


def time_embeddings(batch: int, ratio: float, device: str, repeats: int, image_size: int = 224) -> float:
    """Median seconds of one forward + backward of the masked embeddings at ``batch`` images and ``ratio``."""
    from glip_hf import GLIPVisionConfig
    from glip_hf.modeling_glip import GLIPVisionEmbeddings

    config = GLIPVisionConfig(hidden_size=768, image_size=image_size, patch_size=16, mask_ratio=ratio)
    embeddings = GLIPVisionEmbeddings(config).to(device).train()
    pixels = torch.randn(batch, 3, image_size, image_size, device=device)

    def once() -> None:
        embeddings(pixels).sum().backward()

    return _median_seconds(once, Setup(device, bf16=False), repeats)


def main(argv: list[str] | None = None) -> None:
    from glip_hf.cli import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ratios", default="0.5,0.75,0.918", help="comma-separated mask ratios in (0, 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        ratios = [float(part) for part in args.ratios.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--ratios {args.ratios!r} is invalid: pass comma-separated numbers, e.g. 0.5,0.75")
    if not ratios or not all(0 < ratio < 1 for ratio in ratios):
        parser.error(f"--ratios {args.ratios!r} is invalid: every ratio must be in (0, 1)")
    check_list(parser, "--ratios", ratios)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    for ratio in ratios:
        seconds = time_embeddings(args.batch, ratio, args.device, args.repeats)
        row = {"batch": args.batch, "ratio": ratio, "device": args.device, "threads": torch.get_num_threads()}
        print(json.dumps({**row, "ms": round(1e3 * seconds, 3)}), flush=True)


if __name__ == "__main__":
    main()
