"""LeanMLP: CLIP's MLP with one MLP-wide tensor kept for backward instead of three; the same function."""

import pytest
import torch
from conftest import saved_for_backward
from transformers import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPMLP

from glip_hf.activations import LeanMLP, use_lean_activations


def _saved_bytes(fn, *inputs: torch.Tensor) -> int:
    """Bytes of the storages ``fn(*inputs)`` saves for backward, each storage once, parameters not counted."""
    with saved_for_backward(getattr(fn, "parameters", list)()) as saved:
        fn(*inputs)
    return sum(saved.values())


def _pair(act: str, dtype=torch.float64) -> tuple[CLIPMLP, LeanMLP]:
    config = CLIPTextConfig(hidden_size=24, intermediate_size=40, hidden_act=act)
    plain = CLIPMLP(config).to(dtype)
    lean = LeanMLP.from_mlp(CLIPMLP(config).to(dtype))
    lean.load_state_dict(plain.state_dict())
    return plain, lean


def _grads(mlp, x, grad):
    x = x.clone().requires_grad_()
    out = mlp(x)
    out.backward(grad)
    return out, [x.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "relu"])
def test_same_function_and_gradients_in_float64(act):
    plain, lean = _pair(act)
    x = torch.randn(3, 7, 24, dtype=torch.float64) * 2
    grad = torch.randn(3, 7, 24, dtype=torch.float64)
    out_plain, grads_plain = _grads(plain, x, grad)
    out_lean, grads_lean = _grads(lean, x, grad)
    assert torch.equal(out_plain, out_lean)  # the same operations forward
    for a, b in zip(grads_plain, grads_lean):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lean, (x[:1, :2].clone().requires_grad_(),))


def test_under_bfloat16_autocast_forward_is_identical_and_gradients_are_float32_within_rounding():
    plain, lean = _pair("quick_gelu", torch.float32)
    x = torch.randn(4, 9, 24)
    grad = torch.randn(4, 9, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, grads_plain = _grads(plain, x, grad)
        out_lean, grads_lean = _grads(lean, x, grad)
    assert out_lean.dtype == torch.bfloat16 and torch.equal(out_plain, out_lean)
    exact, _ = _pair("quick_gelu")
    exact.load_state_dict(plain.state_dict())
    _, grads_exact = _grads(exact, x.double(), grad.double())
    for a, b, e in zip(grads_plain, grads_lean, grads_exact):
        assert a.dtype == b.dtype == torch.float32  # parameter gradients in the parameters' dtype
        scale = e.abs().max()  # both within bf16 rounding of the exact gradient, scaled to its size
        assert (a.double() - e).abs().max() <= 0.03 * scale and (b.double() - e).abs().max() <= 0.03 * scale


@pytest.mark.parametrize("autocast", [False, True])
def test_keeps_one_mlp_wide_tensor_instead_of_three(autocast):
    plain, lean = _pair("quick_gelu", torch.float32)
    x = torch.randn(8, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain_bytes, lean_bytes = _saved_bytes(plain, x), _saved_bytes(lean, x)
    wide = 8 * 5 * 40 * (2 if autocast else 4)  # one (B, T, intermediate) tensor
    # plain: fc1's output, quick_gelu's sigmoid and fc2's input (and, under autocast, a bf16 copy of fc2's weight)
    weight_copy = 24 * 40 * 2 if autocast else 0
    assert plain_bytes - lean_bytes == 2 * wide + weight_copy


def test_second_derivatives_are_refused_not_wrong():
    """The recomputed activation is detached in backward: a gradient of the gradient (a gradient penalty,
    ``create_graph=True``) would miss terms, so it must fail loudly."""
    _, lean = _pair("quick_gelu")
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(lean(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.pow(2).sum().backward()


def test_a_wrapped_or_hooked_fc2_is_run_not_bypassed():
    """``fc2`` is called by the autograd function through its weight; a layer that is not a plain linear one (a
    forward hook, a LoRA-style wrapper) must run as in the plain MLP."""
    plain, lean = _pair("quick_gelu")
    for mlp in (plain, lean):
        mlp.fc2.register_forward_hook(lambda module, args, out: out * 2)
    x, grad = torch.randn(3, 7, 24, dtype=torch.float64), torch.randn(3, 7, 24, dtype=torch.float64)
    (out_plain, grads_plain), (out_lean, grads_lean) = _grads(plain, x, grad), _grads(lean, x, grad)
    assert torch.equal(out_plain, out_lean)
    for a, b in zip(grads_plain, grads_lean):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["prelu", "xielu"])
def test_an_activation_with_parameters_gets_their_gradients(act):
    """Backward differentiates the recomputed activation by its input only: an activation with parameters of its
    own (``prelu``, ``xielu``) must take the plain path, or its parameters silently get no gradient."""
    plain, lean = _pair(act)
    x, grad = torch.randn(3, 7, 24, dtype=torch.float64), torch.randn(3, 7, 24, dtype=torch.float64)
    (_, grads_plain), (_, grads_lean) = _grads(plain, x, grad), _grads(lean, x, grad)
    for a, b in zip(grads_plain, grads_lean, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_graph_needed_means_the_plain_path():
    _, lean = _pair("quick_gelu", torch.float32)
    with torch.no_grad():
        assert _saved_bytes(lean, torch.randn(2, 3, 24)) == 0
        assert lean(torch.randn(2, 3, 24)).shape == (2, 3, 24)


def test_model_swap_keeps_outputs_checkpoint_and_counts(tmp_path):
    from conftest import tiny_config

    from glip_hf import GLIPModel

    config = tiny_config(mask_ratio=0.0)
    model = GLIPModel(config).eval()
    ids = torch.randint(2, 90, (3, 12))
    pixels = torch.randn(3, 3, 30, 30)
    before = model(input_ids=ids, pixel_values=pixels)
    keys = set(model.state_dict())
    layers = config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    assert use_lean_activations(model) == layers
    assert use_lean_activations(model) == 0  # idempotent
    assert set(model.state_dict()) == keys
    after = model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(before.logits_per_image, after.logits_per_image)
    model.save_pretrained(tmp_path)  # no parameters change: the checkpoint is CLIP's
    assert torch.equal(
        GLIPModel.from_pretrained(tmp_path).eval()(input_ids=ids, pixel_values=pixels).logits_per_image,
        after.logits_per_image,
    )


def test_lean_model_compiles_in_one_graph():
    """Under torch.compile LeanMLP's selective checkpoint traces into the model's one graph: no graph break."""
    from test_benchmarks import _small_model

    model = _small_model(0.75)
    use_lean_activations(model)
    ids = torch.randint(2, 98, (4, 16))
    ids[:, -1] = 99
    inputs = dict(input_ids=ids, pixel_values=torch.randn(4, 3, 32, 32), attention_mask=torch.ones_like(ids))
    explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "relu"])
@pytest.mark.parametrize("autocast", [False, True])
def test_under_torch_compile_the_activation_is_recomputed_not_kept(act, autocast):
    """Compiled, LeanMLP is a selective activation checkpoint: the compiler's plan keeps fc1's output and recomputes
    the activation (one graph); gradients as eager. (backend aot_eager: AOTAutograd's plan without inductor's code
    generation, which takes minutes here; inductor's plan is counted by benchmarks/activation_memory.py --compile.)"""
    torch._dynamo.reset()
    plain, lean = _pair(act, torch.float32)
    x, grad = torch.randn(8, 5, 24), torch.randn(8, 5, 24)
    compiled = {
        name: torch.compile(mlp, backend="aot_eager", fullgraph=True)
        for name, mlp in (("plain", plain), ("lean", lean))
    }
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for mlp in compiled.values():
            _grads(mlp, x, grad)  # compile outside the count
        inputs = x.clone().requires_grad_()
        saved = {name: _saved_bytes(mlp, inputs) for name, mlp in compiled.items()}
        eager_lean = _saved_bytes(lean, inputs)
        _, eager_grads = _grads(plain, x, grad)
        _, compiled_grads = _grads(compiled["lean"], x, grad)
    assert saved["lean"] == eager_lean  # the same tensors as the eager LeanMLP
    if act != "relu":  # relu's backward needs only its output, which fc2 keeps anyway: nothing to gain
        assert saved["plain"] - saved["lean"] >= 8 * 5 * 40 * (2 if autocast else 4)  # one wide tensor or more
    for a, b in zip(eager_grads, compiled_grads):
        scale = a.abs().max()
        assert (b - a).abs().max() <= (1e-2 if autocast else 1e-5) * scale


@pytest.mark.parametrize("autocast", [False, True])
def test_under_torch_compile_backward_recomputes_no_matrix_product(autocast):
    """Compiled, backward recomputes the activation and no matrix product (fc2's would be a silent slowdown).
    Counted in the backward graph AOTAutograd hands the compiler: as many products as the plain MLP's, one more
    activation."""
    from collections import Counter

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def ops_of_backward(mlp) -> Counter:
        graphs = []

        def backend(module, inputs):
            def keep(graph, _):
                graphs.append(graph)
                return make_boxed_func(graph)

            return aot_module_simplified(
                module, inputs, fw_compiler=lambda graph, _: make_boxed_func(graph), bw_compiler=keep
            )

        torch._dynamo.reset()
        x = torch.randn(8, 5, 24, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.compile(mlp, backend=backend, fullgraph=True)(x).sum().backward()
        (graph,) = graphs
        return Counter(node.target.__name__ for node in graph.graph.nodes if node.op == "call_function")

    plain, lean = _pair("quick_gelu", torch.float32)
    plain_ops, lean_ops = ops_of_backward(plain), ops_of_backward(lean)
    products = ("mm.default", "addmm.default", "bmm.default", "baddbmm.default", "linear.default", "matmul.default")
    assert [lean_ops[op] for op in products] == [plain_ops[op] for op in products]
    assert lean_ops["sigmoid.default"] == plain_ops["sigmoid.default"] + 1  # the activation, recomputed


def test_under_torch_compile_with_gradient_checkpointing_lean_keeps_no_more_than_plain(monkeypatch):
    """Inside transformers' gradient checkpointing (each encoder layer recomputed in backward) LeanMLP's own
    checkpoint must not make the compiler keep anything the plain layers do not; and it warns users of nothing they
    could act on (torch warns about in-place ops when a checkpoint under compile is given a custom policy)."""
    from test_benchmarks import _small_model

    warnings = []
    monkeypatch.setattr(torch._higher_order_ops.wrap, "warning_once", lambda *args: warnings.append(args))
    ids = torch.randint(2, 98, (4, 16))
    ids[:, -1] = 99
    inputs = (ids, torch.randn(4, 3, 32, 32), torch.ones_like(ids))  # input_ids, pixel_values, attention_mask
    saved = {}
    for lean in (False, True):
        torch._dynamo.reset()
        model = _small_model(0.0)
        if lean:
            use_lean_activations(model)
        model.gradient_checkpointing_enable()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(*inputs).logits_per_image.sum().backward()  # compile outside the count
            saved[lean] = _saved_bytes(compiled, *inputs)
    assert saved[True] <= saved[False]
    assert not warnings
