"""Run under `accelerate launch --multi_gpu --num_processes 2`: loss and gradients of one DDP step on shards.

Rank r takes rows [starts[r], starts[r+1]) of a fixed batch (uneven shards on purpose), computes the global
contrastive loss with features gathered across processes, back-propagates through DDP, and rank 0 saves the
reduced loss and the synchronised gradients to argv[1]. Everything runs in float64, so that the comparison with one
process measures the gathering, not float32 summation order (which differs between CPUs).
"""

import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from glip_hf import GLIPModel  # noqa: E402
from glip_hf.losses import ContrastiveLoss  # noqa: E402


def fixed_batch():
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(8, 3, 30, 30, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(2, 99, (8, 7), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 0, 1
    return pixel_values, input_ids


def main(out: str, kind: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = GLIPModel(tiny_config(mask_ratio=0.0)).double()
    loss_fn = ContrastiveLoss(kind).double()
    model = accelerator.prepare(model)
    pixel_values, input_ids = fixed_batch()
    starts = [0, 5, 8]  # rank 0: 5 rows, rank 1: 3 rows
    rows = slice(starts[accelerator.process_index], starts[accelerator.process_index + 1])
    out_model = model(pixel_values=pixel_values[rows], input_ids=input_ids[rows])
    unwrapped = accelerator.unwrap_model(model)
    loss = loss_fn(out_model.image_embeds, out_model.text_embeds, unwrapped.logit_scale)
    accelerator.backward(loss)
    total = accelerator.reduce(loss.detach(), "mean")
    grads = {name: p.grad.clone() for name, p in unwrapped.named_parameters() if p.grad is not None}
    if accelerator.is_main_process:
        torch.save({"loss": total, "grads": grads, "world": accelerator.num_processes}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
