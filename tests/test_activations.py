"""LeanQuickGELU: the same function as transformers' quick_gelu, with fewer tensors kept for backward."""

import torch
from transformers.activations import QuickGELUActivation

from glip_hf.activations import LeanQuickGELU, use_lean_activations


def _saved_bytes(fn, x: torch.Tensor) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x)
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}  # one storage once
    return sum(unique.values())


def test_forward_is_bit_identical_and_gradient_matches_in_float64():
    x = torch.randn(4, 7, 33, dtype=torch.float64) * 4
    assert torch.equal(LeanQuickGELU()(x), QuickGELUActivation()(x))
    assert torch.autograd.gradcheck(LeanQuickGELU(), (x[:1, :2].clone().requires_grad_(),))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    LeanQuickGELU()(a).backward(grad)
    QuickGELUActivation()(b).backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bfloat16_gradient_within_rounding():
    x = (torch.randn(64, 256) * 3).to(torch.bfloat16)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    LeanQuickGELU()(a).backward(grad)
    QuickGELUActivation()(b).backward(grad)
    exact = x.double().requires_grad_()
    QuickGELUActivation()(exact).backward(grad.double())
    # both within a few bf16 ulps of the exact gradient, scaled to its size
    scale = exact.grad.abs().max()
    assert (a.grad.double() - exact.grad).abs().max() <= 0.02 * scale
    assert (b.grad.double() - exact.grad).abs().max() <= 0.02 * scale


def test_keeps_half_the_activation_memory_for_backward():
    x = torch.randn(8, 50, 96, requires_grad=True)
    lean = _saved_bytes(LeanQuickGELU(), x)
    plain = _saved_bytes(QuickGELUActivation(), x)
    assert lean == x.numel() * 4 and plain == 2 * x.numel() * 4


def test_model_swap_keeps_outputs_and_counts(tmp_path):
    from conftest import tiny_config

    from glip_hf import GLIPModel

    config = tiny_config(mask_ratio=0.0)
    config.vision_config.hidden_act = config.text_config.hidden_act = "quick_gelu"
    model = GLIPModel(config).eval()
    ids = torch.randint(2, 90, (3, 12))
    pixels = torch.randn(3, 3, 30, 30)
    before = model(input_ids=ids, pixel_values=pixels)
    layers = config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    assert use_lean_activations(model) == layers
    assert use_lean_activations(model) == 0  # idempotent
    after = model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(before.logits_per_image, after.logits_per_image)
    model.save_pretrained(tmp_path)  # no parameters change: the checkpoint is CLIP's
    assert torch.equal(
        GLIPModel.from_pretrained(tmp_path).eval()(input_ids=ids, pixel_values=pixels).logits_per_image,
        after.logits_per_image,
    )
