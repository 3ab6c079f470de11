"""GLIPModel behaves as CLIPModel in eval mode and drops the right tokens in training (ModelTester pattern)."""

import json

import pytest
import torch
from conftest import IMAGE_SIZE, PATCH_SIZE, saved_for_backward, tiny_config
from transformers import CLIPModel
from transformers.models.clip.modeling_clip import CLIPAttention

from glip_hf import GLIPModel, GLIPVisionModel, masked_inference, sample_keep_indices
from glip_hf.hub import to_clip_config
from glip_hf.masking import masking_offset, num_kept_patches
from glip_hf.modeling_glip import GLIPAttention, GLIPVisionEmbeddings

NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 225


class GLIPModelTester:
    """Tiny, oddly sized GLIP models and the shape checks transformers runs on CLIP."""

    def __init__(self, batch_size=3, seq_length=7, mask_ratio=0.5):
        self.batch_size, self.seq_length, self.mask_ratio = batch_size, seq_length, mask_ratio
        self.kept = num_kept_patches(NUM_PATCHES, mask_ratio)

    def prepare(self, **config_overrides):
        config = tiny_config(mask_ratio=self.mask_ratio, **config_overrides)
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(self.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        input_ids = torch.randint(2, 99, (self.batch_size, self.seq_length), generator=generator)
        input_ids[:, 0], input_ids[:, -1] = 0, 1
        return config, {"pixel_values": pixel_values, "input_ids": input_ids}

    def create_and_check_model(self, config, inputs, training):
        torch.manual_seed(0)
        model = GLIPModel(config).train(training)
        out = model(**inputs, return_loss=True)
        b, tokens = self.batch_size, 1 + (self.kept if training else NUM_PATCHES)
        assert out.logits_per_image.shape == (b, b) and out.logits_per_text.shape == (b, b)
        assert out.image_embeds.shape == (b, 16) and out.text_embeds.shape == (b, 16)
        assert out.vision_model_output.last_hidden_state.shape == (b, tokens, 32)
        assert out.text_model_output.last_hidden_state.shape == (b, self.seq_length, 32)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)


tester = GLIPModelTester()


@pytest.mark.parametrize("training", [False, True])
def test_model_shapes(training):
    tester.create_and_check_model(*tester.prepare(), training=training)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.918])
def test_exact_token_count_per_ratio(ratio):
    config, inputs = GLIPModelTester(mask_ratio=ratio).prepare()
    model = GLIPVisionModel(config.vision_config).train()
    hidden = model(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert hidden.shape[1] == 1 + max(1, int(NUM_PATCHES * (1 - ratio)))


def test_masked_embeddings_are_the_unmasked_ones_gathered_and_cls_is_kept():
    config, inputs = tester.prepare()
    torch.manual_seed(0)
    embeddings = GLIPVisionEmbeddings(config.vision_config).double()  # float64: two code paths, no float32 noise
    pixel_values = inputs["pixel_values"].double()
    full = embeddings.eval()(pixel_values)  # (B, 1 + N, D) via the convolution
    torch.manual_seed(11)
    masked = embeddings.train()(pixel_values)  # (B, 1 + k, D) via the kept-patch projection
    torch.manual_seed(11)
    keep = sample_keep_indices(tester.batch_size, IMAGE_SIZE // PATCH_SIZE, tester.mask_ratio)
    expected = full[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(masked[:, 1:], expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(masked[:, 0], full[:, 0])  # CLS token: always kept, same value
    cls = embeddings.class_embedding + embeddings.position_embedding.weight[0]
    torch.testing.assert_close(masked[:, 0], cls.expand(tester.batch_size, -1))


def test_eval_outputs_equal_clip_with_same_weights(model, inputs):
    clip = CLIPModel(to_clip_config(model.config))
    clip.load_state_dict(model.state_dict())
    model.eval(), clip.eval()
    ours, theirs = model(**inputs), clip(**inputs)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image, atol=0, rtol=0)
    torch.testing.assert_close(ours.image_embeds, theirs.image_embeds, atol=0, rtol=0)


def test_every_attention_layer_is_glips_and_the_checkpoint_is_clips(model):
    kinds = [type(m) for m in model.modules() if isinstance(m, CLIPAttention)]
    layers = model.config.vision_config.num_hidden_layers + model.config.text_config.num_hidden_layers
    assert kinds == [GLIPAttention] * layers
    assert set(model.state_dict()) == set(CLIPModel(to_clip_config(model.config)).state_dict())


def _attention_pair(dtype=torch.float32):
    config = tester.prepare()[0].text_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    clip = CLIPAttention(config).to(dtype)
    glip = GLIPAttention(config).to(dtype)
    glip.load_state_dict(clip.state_dict())
    return clip, glip


def _attention_step(layer, x, grad, autocast=False):
    """Output, input gradient, parameter gradients and bytes saved for backward (parameters not counted)."""
    layer.zero_grad()
    inputs = x.clone().requires_grad_()
    with saved_for_backward(layer.parameters()) as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = layer(inputs * 1)  # not a leaf, like the layer norm's output: autocast caches no cast of it
    out.backward(grad.to(out.dtype))
    # k_proj.bias: its true gradient is 0 (softmax ignores a shift), what is left is rounding noise of either path
    grads = [p.grad for name, p in layer.named_parameters() if name != "k_proj.bias"]
    return out, inputs.grad, grads, sum(saved.values())


def test_fused_projection_is_clips_attention_in_float64():
    clip, glip = _attention_pair(torch.float64)
    x, grad = torch.randn(5, 7, 32, dtype=torch.float64), torch.randn(5, 7, 32, dtype=torch.float64)
    (out_c, dx_c, dw_c, _), (out_g, dx_g, dw_g, _) = _attention_step(clip, x, grad), _attention_step(glip, x, grad)
    torch.testing.assert_close(out_g, out_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_g, dx_c, rtol=1e-12, atol=1e-12)
    for a, b in zip(dw_g, dw_c):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    glip.eval(), clip.eval()  # eval mode: CLIP's own code, bit for bit, with autograd too (saliency, attacks)
    assert torch.equal(glip(x)[0], clip(x)[0])
    _, dx_c, dw_c, _ = _attention_step(clip, x, grad)
    _, dx_g, dw_g, _ = _attention_step(glip, x, grad)
    assert torch.equal(dx_g, dx_c) and all(torch.equal(a, b) for a, b in zip(dw_g, dw_c))


def test_fused_projection_keeps_one_input_copy_under_autocast_and_stays_within_bf16_rounding():
    """CLIP's q/k/v projections each keep a bf16 copy of their input under autocast; the fused one keeps one."""
    clip, glip = _attention_pair()
    x, grad = torch.randn(5, 7, 32), torch.randn(5, 7, 32)
    (out_c, dx_c, dw_c, bytes_c) = _attention_step(clip, x, grad, autocast=True)
    (out_g, dx_g, dw_g, bytes_g) = _attention_step(glip, x, grad, autocast=True)
    copy = 5 * 7 * 32 * 2  # one bf16 (B, T, D) copy of the input
    weights = 3 * 32 * 32 * 2 - 3 * 32 * 32 * 2  # three bf16 weight copies either way, stacked or not
    assert bytes_c - bytes_g == 2 * copy + weights
    exact = _attention_step(_attention_pair(torch.float64)[0], x.double(), grad.double())
    for ours, theirs, truth in zip((out_g, dx_g, *dw_g), (out_c, dx_c, *dw_c), (exact[0], exact[1], *exact[2])):
        scale = truth.abs().max()  # both within bf16 rounding of the exact value, scaled to its size
        assert (ours.double() - truth).abs().max() <= 0.03 * scale
        assert (theirs.double() - truth).abs().max() <= 0.03 * scale
    assert out_g.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in dw_g)


class _LoRALinear(torch.nn.Module):
    """A linear layer wrapped the way peft's LoRA wraps one: the base layer plus a low-rank term; ``weight`` and
    ``bias`` are the base layer's."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def test_a_wrapped_or_hooked_projection_is_run_not_bypassed_while_training():
    """The fused projection reads q/k/v's weights; a projection that is not a plain linear layer (a LoRA wrapper, a
    forward hook) must still run, or training would silently compute another function than evaluation."""
    clip, glip = _attention_pair(torch.float64)
    torch.manual_seed(1)
    for layer in (clip, glip):
        layer.q_proj = _LoRALinear(layer.q_proj)
        layer.v_proj.register_forward_hook(lambda module, args, out: out * 2)
    glip.load_state_dict(clip.state_dict())
    x, grad = torch.randn(5, 7, 32, dtype=torch.float64), torch.randn(5, 7, 32, dtype=torch.float64)
    (out_c, dx_c, dw_c, _), (out_g, dx_g, dw_g, _) = _attention_step(clip, x, grad), _attention_step(glip, x, grad)
    torch.testing.assert_close(out_g, out_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_g, dx_c, rtol=1e-12, atol=1e-12)
    for a, b in zip(dw_g, dw_c, strict=True):  # the LoRA factors' gradients too
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_training_mode_projects_the_same_way_with_and_without_autograd(inputs):
    """Feature-cached accumulation encodes each micro-batch twice, without then with autograd: both passes must take
    the same code path (the stacked q/k/v projection in training mode, CLIP's three in eval mode), or the cached
    features differ from the recomputed ones by rounding on the GPU."""
    from torch.overrides import TorchFunctionMode

    class LinearShapes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.weights = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                self.weights.add(tuple(args[1].shape))
            return func(*args, **(kwargs or {}))

    config, _ = tester.prepare()
    model = GLIPModel(config)
    stacked = (3 * 32, 32)  # (3 D, D): the three projections in one product
    for training, grad in ((True, False), (True, True), (False, False), (False, True)):
        model.train(training)
        with LinearShapes() as seen, torch.set_grad_enabled(grad):
            model(**inputs)
        assert (stacked in seen.weights) == training, (training, grad)


def test_weights_initialise_as_clip():
    config = tiny_config(mask_ratio=0.5)
    config.vision_config.hidden_size = config.text_config.hidden_size = 64
    torch.manual_seed(0)
    glip = GLIPModel(config).state_dict()
    torch.manual_seed(1)
    clip = CLIPModel(to_clip_config(config)).state_dict()
    assert glip.keys() == clip.keys()
    for name, tensor in glip.items():
        if tensor.numel() < 64 or not tensor.is_floating_point():
            continue
        # Same init distribution: stds within 20% (each from >= 64 draws) and same constant-init values.
        assert tensor.std().item() == pytest.approx(clip[name].std().item(), rel=0.2, abs=1e-6), name
    assert glip["logit_scale"].item() == pytest.approx(clip["logit_scale"].item())
    # The embeddings swapped in after CLIP's construction were initialised by CLIP's rule, not PyTorch's.
    class_std = glip["vision_model.embeddings.class_embedding"].std().item()
    assert class_std == pytest.approx(64**-0.5, rel=0.25)


def test_save_load_round_trip_keeps_outputs_and_prior_buffer(model, inputs, tmp_path):
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = GLIPModel.from_pretrained(tmp_path)
    assert not loaded.training, "from_pretrained returns eval mode"
    torch.testing.assert_close(loaded(**inputs).logits_per_image, model(**inputs).logits_per_image)
    offset = loaded.vision_model.embeddings.mask_offset
    torch.testing.assert_close(offset, masking_offset(15, "gaussian", 0.2))


def test_hidden_states_and_attentions_follow_kept_tokens(inputs):
    config = tiny_config(mask_ratio=0.5)
    config._attn_implementation = "eager"
    model = GLIPModel(config).train()
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    vision = out.vision_model_output
    tokens = 1 + num_kept_patches(NUM_PATCHES, 0.5)
    assert len(vision.hidden_states) == 3 and all(h.shape == (3, tokens, 32) for h in vision.hidden_states)
    assert len(vision.attentions) == 2 and all(a.shape == (3, 4, tokens, tokens) for a in vision.attentions)


def test_batching_equivalence(model, inputs):
    model.double().eval()  # float64: batched and single kernels sum in different orders
    pixel_values = inputs["pixel_values"].double()
    batched = model.get_image_features(pixel_values=pixel_values).pooler_output
    single = torch.cat([model.get_image_features(pixel_values=x[None]).pooler_output for x in pixel_values])
    torch.testing.assert_close(batched, single, atol=1e-10, rtol=1e-10)


def test_sdpa_and_eager_agree_in_masked_training(inputs):
    outputs = []
    for implementation in ("eager", "sdpa"):
        config = tiny_config(mask_ratio=0.5)
        config._attn_implementation = implementation
        torch.manual_seed(0)
        model = GLIPModel(config).double().train()
        torch.manual_seed(5)
        pixel_values = inputs["pixel_values"].double()
        outputs.append(model(input_ids=inputs["input_ids"], pixel_values=pixel_values).logits_per_image)
    # float64 inputs and weights, but eager attention takes its softmax in float32 (transformers' CLIP does): the
    # paths agree to float32 precision, so the bound is float32's eps times a margin, scaled to the logits.
    scale = outputs[0].abs().max().item()
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5 * scale, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(inputs):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GLIPModel(tiny_config(mask_ratio=0.5)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        torch.manual_seed(3)
        model(**inputs, return_loss=True).loss.backward()
        grads.append(model.vision_model.embeddings.patch_embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("training", [False, True])
def test_interpolate_pos_encoding(model, training):
    pixel_values = torch.randn(2, 3, 34, 34)  # 17 x 17 patches, trained at 15 x 15
    model.train(training)
    hidden = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state
    assert hidden.shape[1] == 1 + (num_kept_patches(289, 0.5) if training else 289)
    with pytest.raises(ValueError, match="doesn't match"):
        model.vision_model(pixel_values=pixel_values)


def test_masked_inference_context_manager(model, inputs):
    model.eval()
    vision = model.vision_model
    assert vision(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1] == 1 + NUM_PATCHES
    with masked_inference(model, mask_ratio=0.75, mask_strategy="random"):
        assert vision(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1] == 1 + 56
    assert vision(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1] == 1 + NUM_PATCHES
    model.train()
    with masked_inference(model, mask_ratio=0.0):  # explicit unmasked, even in training
        assert vision(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1] == 1 + NUM_PATCHES
    with pytest.raises(ValueError, match="mask_ratio"), masked_inference(model, mask_ratio=1.5):
        pass
    with pytest.raises(ValueError, match="GLIP"), masked_inference(torch.nn.Linear(2, 2), mask_ratio=0.5):
        pass


def test_masking_runs_on_meta_device(config):
    with torch.device("meta"):
        model = GLIPVisionModel(config.vision_config).train()
        hidden = model(pixel_values=torch.empty(2, 3, IMAGE_SIZE, IMAGE_SIZE)).last_hidden_state
    assert hidden.device.type == "meta" and hidden.shape == (2, 1 + num_kept_patches(NUM_PATCHES, 0.5), 32)


def test_no_split_modules_name_glip_classes():
    assert "GLIPVisionEmbeddings" in GLIPModel._no_split_modules
    assert "CLIPVisionEmbeddings" not in GLIPModel._no_split_modules


def _image_features(model: GLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    features = model.get_image_features(pixel_values=pixel_values)
    return getattr(features, "pooler_output", features)


@pytest.mark.parametrize("flavour", ["glip", "clip"])
def test_vision_classes_load_the_vision_tower_of_a_full_checkpoint(model, inputs, tmp_path, flavour):
    from glip_hf import GLIPVisionModelWithProjection, export_to_clip

    model.eval()
    if flavour == "glip":
        model.save_pretrained(tmp_path)
    else:
        export_to_clip(model, tmp_path)
    pixels = inputs["pixel_values"]
    vision, info = GLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    expected = model.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(vision.eval()(pixel_values=pixels).pooler_output, expected, rtol=0, atol=1e-6)
    projected, info = GLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert projected.config.projection_dim == model.config.projection_dim
    embeds = projected.eval()(pixel_values=pixels).image_embeds
    torch.testing.assert_close(embeds, _image_features(model, pixels), rtol=0, atol=1e-6)
    # Masking follows the checkpoint's settings (the plain CLIP export has none: the GLIP default applies).
    ratio = projected.config.mask_ratio
    tokens = projected.train()(pixel_values=pixels).last_hidden_state.shape[1]
    assert tokens == 1 + num_kept_patches((IMAGE_SIZE // PATCH_SIZE) ** 2, ratio)


@pytest.mark.parametrize("flavour", ["glip", "clip"])
def test_vision_projection_follows_the_top_level_projection_dim(model, inputs, tmp_path, flavour):
    """Older GLIP saves and real CLIP configs keep CLIP's default vision_config.projection_dim (512) beside another
    top-level one: GLIPVisionModelWithProjection builds its projection from the top-level value, as the weights do."""
    from glip_hf import GLIPVisionModelWithProjection, export_to_clip

    model.eval()
    if flavour == "glip":
        model.save_pretrained(tmp_path)
    else:
        export_to_clip(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["projection_dim"] != 512
    saved["vision_config"]["projection_dim"] = 512
    (tmp_path / "config.json").write_text(json.dumps(saved))
    projected, info = GLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert projected.config.projection_dim == saved["projection_dim"]
    pixels = inputs["pixel_values"]
    embeds = projected.eval()(pixel_values=pixels).image_embeds
    torch.testing.assert_close(embeds, _image_features(model, pixels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("recurse", [True, False])
def test_a_model_built_on_the_meta_device_gets_its_prior_back_from_to_empty(config, recurse):
    """Meta-device init (FSDP's materialisation, ``init_empty_weights``) ends in ``to_empty``, which leaves every
    buffer as uninitialised memory; the prior is no checkpoint tensor, so unless ``_init_weights`` ran again nothing
    refilled it and masks were drawn from garbage. (CLIP's ``position_ids`` are refilled only by ``_init_weights``.)
    FSDP1 materialises module by module (``recurse=False``), a plain ``model.to_empty`` all at once."""
    with torch.device("meta"):
        model = GLIPModel(config)
    if recurse:
        model.to_empty(device="cpu")
    else:
        for module in model.modules():
            module.to_empty(device="cpu", recurse=False)
    offset = model.vision_model.embeddings.mask_offset
    assert offset.device.type == "cpu" and offset.dtype == torch.float32
    assert torch.equal(offset, masking_offset(15, "gaussian", 0.2))


def test_a_prior_cast_behind_apply_is_not_used_for_masks(config):
    """FSDP1's ``MixedPrecision(buffer_dtype=torch.bfloat16)`` casts buffers by setting ``.data``, which ``_apply``
    never sees: the masks are still drawn against the exact float32 prior."""
    embeddings = GLIPModel(config).vision_model.embeddings.train()
    pixels = torch.randn(64, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected = embeddings(pixels)
    embeddings.mask_offset.data = embeddings.mask_offset.data.to(torch.bfloat16)
    torch.manual_seed(1)
    assert torch.equal(embeddings(pixels), expected)


def test_the_prior_survives_inference_mode_moves_and_follows_share_memory(config):
    model = GLIPModel(config)
    with torch.inference_mode():
        model.to("cpu")
    embeddings = model.vision_model.embeddings
    assert not embeddings.mask_offset.is_inference()
    model._init_weights(embeddings)  # in place, outside inference mode: fails on an inference tensor
    model.share_memory()
    assert embeddings.mask_offset.is_shared()
    assert torch.equal(embeddings.mask_offset, masking_offset(15, "gaussian", 0.2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_keeps_the_prior_exact(config, dtype):
    """``model.to(torch.bfloat16)`` casts every floating buffer; rounded to bf16, ``1 - pdf`` moved by up to 0.002
    and 14% of the masks of a 15 x 15 grid at 75% changed for the same noise. The prior stays float32."""
    model = GLIPModel(config).to(dtype)
    offset = model.vision_model.embeddings.mask_offset
    assert model.dtype == dtype and offset.dtype == torch.float32
    torch.testing.assert_close(offset, masking_offset(15, "gaussian", 0.2), rtol=0, atol=0)
    model.float()
    assert torch.equal(model.vision_model.embeddings.mask_offset, masking_offset(15, "gaussian", 0.2))
