"""Run under `accelerate launch --multi_gpu --num_processes 2`: loss and gradients of one DDP step on shards.

    python dist_loss_check.py OUT KIND [FSDP_MODE ...]

Rank r takes rows [starts[r], starts[r+1]) of a fixed batch (uneven shards on purpose), computes the global
contrastive loss with features gathered across processes, back-propagates through DDP, and rank 0 saves the
reduced loss and the synchronised gradients, clipped to a total norm of MAX_NORM as the training loop clips them
(the loss module's own parameters, SigLIP's bias, included), to OUT. Everything runs in float64, so that the
comparison with one process measures the gathering, not float32 summation order (which differs between CPUs).

Launched with an FSDP accelerate config (``--config_file configs/accelerate/fsdp_*.yaml``), the model is sharded by
Accelerate as that config says (on CPU: see `fsdp_on_cpu.py`) and the full gradients are gathered from the shards;
each FSDP_MODE (``VERSION:STRATEGY``, e.g. ``1:SHARD_GRAD_OP``) then repeats the step with that FSDP version and
strategy, the other settings from the config, and OUT maps each mode ("config" first) to its loss and gradients.
"""

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from fsdp_on_cpu import allow_fsdp_on_cpu  # noqa: E402

from glip_hf import GLIPModel  # noqa: E402
from glip_hf.losses import ContrastiveLoss  # noqa: E402
from glip_hf.sharding import gradient_norm, make_shardable, uses_fsdp  # noqa: E402

MAX_NORM = 0.05  # below the step's gradient norm: clipping is on


def fixed_batch():
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(8, 3, 30, 30, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(2, 99, (8, 7), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 0, 1
    return pixel_values, input_ids


def one_step(accelerator: Accelerator, kind: str) -> dict:
    """The loss (mean over processes) and the full gradients of one step on this process's rows."""
    torch.manual_seed(0)
    model = GLIPModel(tiny_config(mask_ratio=0.0)).double()
    if uses_fsdp(accelerator):
        make_shardable(model)
    loss_fn = ContrastiveLoss(kind).double()
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))  # FSDP2 takes both at once
    pixel_values, input_ids = fixed_batch()
    starts = [0, 5, 8]  # rank 0: 5 rows, rank 1: 3 rows
    rows = slice(starts[accelerator.process_index], starts[accelerator.process_index + 1])
    out_model = model(pixel_values=pixel_values[rows], input_ids=input_ids[rows])
    unwrapped = accelerator.unwrap_model(model)
    loss = loss_fn(out_model.image_embeds, out_model.text_embeds, unwrapped.logit_scale)  # read after forward
    accelerator.backward(loss)
    extra = list(loss_fn.parameters())
    for param in extra:  # as the training loop does: the loss module stays outside DDP / FSDP
        param.grad = accelerator.reduce(param.grad, "mean")
    norm = gradient_norm(accelerator, model, extra, MAX_NORM)
    grads = {**full_gradients(accelerator, model), **{f"loss.{n}": p.grad for n, p in loss_fn.named_parameters()}}
    return {"loss": accelerator.reduce(loss.detach(), "mean"), "grads": grads, "norm": norm}


def full_gradients(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, in the unsharded model's shapes (FSDP: gathered from the shards)."""
    from torch.distributed.tensor import DTensor

    unwrapped = accelerator.unwrap_model(model)
    if uses_fsdp(accelerator) and not accelerator.is_fsdp2:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {n: p.grad.clone().reshape(p.shape) for n, p in unwrapped.named_parameters() if p.grad is not None}
    grads = {}
    for name, param in unwrapped.named_parameters():
        if param.grad is not None:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name] = grad.clone()
    return grads


def main(out: str, kind: str, modes: list[str]) -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
        allow_fsdp_on_cpu()
    accelerator = Accelerator(cpu=True)
    results = {"config": one_step(accelerator, kind)}
    for mode in modes:  # FSDP: the same settings with another version / strategy
        version, strategy = mode.split(":")
        reshard = {"FULL_SHARD": "true", "SHARD_GRAD_OP": "false"}[strategy] if version == "2" else strategy
        os.environ.update(FSDP_VERSION=version, FSDP_RESHARD_AFTER_FORWARD=reshard)
        accelerator.free_memory()  # forget the previous model: clipping looks each prepared model up
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        results[mode] = one_step(accelerator, kind)
    if accelerator.is_main_process:
        torch.save({**results, "world": accelerator.num_processes, "type": str(accelerator.distributed_type)}, out)
    # As the run's own end (training._end): every process together, the prepared model released first, then the
    # process group destroyed; a gloo group torn down under a live wrapped model can abort a rank at exit (SIGABRT).
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
