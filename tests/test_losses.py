"""Contrastive losses: CLIP's formula on one process, SigLIP by hand, and two gloo ranks (DDP, FSDP) against one
process."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import launch_two_processes, tiny_config
from dist_loss_check import MAX_NORM, fixed_batch

from glip_hf import GLIPModel
from glip_hf.losses import ContrastiveLoss, clip_loss, siglip_loss

ROOT = Path(__file__).resolve().parent.parent


def test_clip_loss_matches_transformers_loss(model, inputs):
    model.eval()
    out = model(**inputs, return_loss=True)
    ours = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    torch.testing.assert_close(ours, out.loss)


def test_siglip_loss_by_hand():
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    texts = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scale, bias = torch.tensor(0.0), torch.tensor(-1.0)  # exp(0) = 1
    sims = images @ texts.t()
    expected = 0.0
    for i in range(2):
        for j in range(2):
            z = 1.0 if i == j else -1.0
            expected -= F.logsigmoid(z * (sims[i, j] + bias)).item()
    assert siglip_loss(images, texts, scale, bias).item() == pytest.approx(expected / 2, rel=1e-6)


def test_empty_batch_gives_zero_loss_with_a_graph():
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = clip_loss(empty, empty, torch.tensor(2.0))
    assert loss.item() == 0.0 and loss.requires_grad


def test_loss_module_rejects_unknown_kind():
    with pytest.raises(ValueError, match="loss"):
        ContrastiveLoss("triplet")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tmp_path, kind):
    out = tmp_path / "dist.pt"
    launch_two_processes(Path(__file__).parent / "dist_loss_check.py", out, kind, port=29533)
    distributed = torch.load(out)
    assert distributed["world"] == 2
    assert_matches_one_process(distributed["config"], kind)


def test_fsdp_full_shard_and_shard_grad_op_match_one_process(tmp_path):
    """Accelerate's FSDP2 as configs/accelerate/fsdp_full_shard.yaml sets it up (the temperature made shardable, the
    CLIP encoder layers of both towers wrapped), then SHARD_GRAD_OP: gradients gathered from the shards equal one
    process's. On CPU through tests/fsdp_on_cpu.py (Accelerate itself turns FSDP on only for GPUs)."""
    out = tmp_path / "fsdp.pt"
    config = ROOT / "configs" / "accelerate" / "fsdp_full_shard.yaml"
    launch_two_processes(
        Path(__file__).parent / "dist_loss_check.py", out, "siglip", "2:SHARD_GRAD_OP", port=29540, config_file=config
    )
    distributed = torch.load(out)
    assert distributed["type"] == "DistributedType.FSDP" and distributed["world"] == 2
    for mode in ("config", "2:SHARD_GRAD_OP"):
        assert_matches_one_process(distributed[mode], "siglip")


def assert_matches_one_process(distributed: dict, kind: str) -> None:
    """``distributed`` (loss, clipped full gradients and their norm before clipping, of two ranks on a split batch)
    equals one process on the whole batch."""
    torch.manual_seed(0)
    model = GLIPModel(tiny_config(mask_ratio=0.0)).double()
    pixel_values, input_ids = fixed_batch()
    single = model(pixel_values=pixel_values, input_ids=input_ids)
    loss_fn = ContrastiveLoss(kind).double()
    loss = loss_fn(single.image_embeds, single.text_embeds, model.logit_scale)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([*model.parameters(), *loss_fn.parameters()], MAX_NORM)
    assert norm > 2 * MAX_NORM  # the comparison is of clipped gradients
    torch.testing.assert_close(distributed["norm"], norm, rtol=1e-9, atol=0)
    # Both sides in float64: summation order (gather, DDP all-reduce) moves results by ~1e-16 relative, so bounds of
    # 1e-9 hold on any CPU and still catch a wrong gather or weight. The absolute bound is scaled to the largest
    # gradient: some gradients are zero in exact arithmetic (attention key biases), their float64 noise is not.
    assert distributed["loss"].dtype == torch.float64
    torch.testing.assert_close(distributed["loss"], loss.detach(), rtol=1e-9, atol=0)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    grads.update({f"loss.{name}": p.grad for name, p in loss_fn.named_parameters()})
    assert grads.keys() == distributed["grads"].keys()
    unit = max(grad.abs().max().item() for grad in grads.values())
    for name, grad in grads.items():
        # FSDP trains the temperature as a 1-element tensor (it shards no 0-dim parameter)
        got = distributed["grads"][name].reshape(grad.shape)
        torch.testing.assert_close(got, grad, rtol=1e-9, atol=1e-9 * unit, msg=name)
