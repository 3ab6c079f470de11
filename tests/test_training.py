"""The training loop on CPU: config parsing, a smoke run to a loadable model, exact resume, accumulation, recipes."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from conftest import TINY_RUN, launch_two_processes, tiny_config
from datasets_util import make_broken_dataset
from safetensors.torch import load_file

from glip_hf import GLIPModel
from glip_hf.arguments import load_yaml, parse_run_args
from glip_hf.losses import MAX_LOGIT_SCALE, ContrastiveLoss
from glip_hf.optimization import lr_multiplier, parameter_groups
from glip_hf.training import train, train_step

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY = TINY_RUN


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run(tmp_path: Path, *flags: str, config: Path = CONFIGS / "default.yaml"):
    argv = ["--config", str(config), *TINY, "--cache_dir", str(tmp_path / "cache"), *flags]
    if "--output_dir" not in flags:
        argv += ["--output_dir", str(tmp_path / "out")]
    return train(*parse_run_args(argv))


def test_yaml_then_cli_overrides_and_errors(tmp_path):
    model, data, training = parse_run_args(["--config", str(CONFIGS / "default.yaml"), "--learning_rate", "0.5"])
    assert model.image_size == 48 and model.vision_layers == 4  # the YAML's, not the dataclass defaults (224, 12)
    assert model.mask_ratio is None and model.mask_strategy is None  # it sets none: the model's own masking
    recipe = parse_run_args(["--config", str(CONFIGS / "glip_vitb16_92.yaml"), "--mask_sigma", "0.8"])[0]
    assert (recipe.mask_ratio, recipe.mask_strategy, recipe.mask_sigma) == (0.918, "gaussian", 0.8)
    assert training.learning_rate == 0.5 and data.dataset_name is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learnin_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['learnin_rate'\]"):
        parse_run_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="loss='triplet'"):
        parse_run_args(["--config", str(CONFIGS / "default.yaml"), "--loss", "triplet"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_run_args(["--config", "missing.yaml"])


def test_smoke_run_writes_a_loadable_model_and_its_records(tmp_path):
    result = run(tmp_path, "--max_steps", "4", "--save_steps", "2", "--report_to", "tensorboard")
    out = result.output_dir
    assert result.steps == 4 and result.eval_metrics is not None
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "run_config.yaml",
        "metrics.jsonl",
        "loss_curve.png",
        "train_summary.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert list(out.rglob("events.out.tfevents*")), "tensorboard tracker wrote nothing"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["kept_tokens"] == 1 + 8 for r in records)  # 16 patches at 50% masking, plus CLS
    model = GLIPModel.from_pretrained(out)
    assert model.config.vision_config.mask_ratio == 0.5
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(out))
    from glip_hf.synthetic import render_example_scene

    result = classifier(
        render_example_scene(16), candidate_labels=["red circle", "blue star"], hypothesis_template="{}"
    )
    assert len(result) == 2
    from transformers import AutoProcessor, CLIPProcessor

    processor = AutoProcessor.from_pretrained(out)  # was the tokenizer alone: no processor_config.json
    assert isinstance(processor, CLIPProcessor)
    batch = processor(images=render_example_scene(16), text=["red circle"], return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape == (1, 3, 16, 16) and batch["input_ids"].shape[0] == 1


def run_and_resume_from_copy(tmp_path: Path, flags: list[str], checkpoint: str):
    """Run to the end; copy one of its checkpoints into a fresh run directory (as a stopped run would leave it),
    resume from it, and assert both runs end with the same weights. Returns ``(full, resumed)`` results."""
    full = run(tmp_path, *flags, "--output_dir", str(tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.output_dir / "checkpoints" / checkpoint, resumed_dir / "checkpoints" / checkpoint)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = run(tmp_path, *flags, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest")
    expected, actual = load_file(full.output_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    return full, resumed


def test_resume_mid_epoch_ends_with_the_same_weights(tmp_path):
    # 40 rows / batch 8 = 5 batches per epoch: checkpoint-3 is mid-epoch, and the run crosses into unmasked tuning.
    flags = [
        "--max_steps",
        "4",
        "--unmasked_tuning_steps",
        "3",
        "--save_steps",
        "3",
        "--save_total_limit",
        "3",
        "--eval_at_end",
        "false",
    ]
    full, resumed = run_and_resume_from_copy(tmp_path, flags, "checkpoint-3")
    assert resumed.steps == full.steps == 7
    resumed_dir = resumed.output_dir
    # The test can fail: a run that merely restarts from scratch at step 3 ends elsewhere.
    records = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 4 and records[-1]["stage"] == "unmasked_tuning"


def test_streaming_resume_ends_with_the_same_weights(tmp_path):
    flags = [
        "--streaming",
        "true",
        "--max_steps",
        "5",
        "--save_steps",
        "2",
        "--save_total_limit",
        "3",
        "--eval_at_end",
        "false",
    ]
    run_and_resume_from_copy(tmp_path, flags, "checkpoint-2")


def test_bad_samples_are_counted_in_the_run_summary(tmp_path):
    path, expected = make_broken_dataset(tmp_path / "broken", good=36)
    result = run(tmp_path, "--dataset_name", str(path), "--max_steps", "5", "--per_device_train_batch_size", "4")
    seen = {k: v for k, v in result.skipped.items() if v}
    # 40 rows shuffled into 10 batches of 4: 5 steps see half of them; every bad row seen is counted by reason.
    assert set(seen) <= set(expected) and all(seen[k] <= expected[k] for k in seen)
    full = run(
        tmp_path,
        "--dataset_name",
        str(path),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "epoch"),
    )
    assert {k: v for k, v in full.skipped.items() if v} == expected
    summary = json.loads((tmp_path / "epoch" / "train_summary.json").read_text())
    assert summary["num_skipped"] == 4


def test_streaming_run(tmp_path):
    result = run(tmp_path, "--streaming", "true", "--max_steps", "2", "--eval_at_end", "false")
    assert result.steps == 2


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_feature_cached_accumulation_equals_one_big_batch(loss):
    # float64 throughout: the cached and the one-batch paths sum in different orders, float32 noise differs by CPU.
    torch.manual_seed(0)
    model = GLIPModel(tiny_config(mask_ratio=0.5)).double().train()
    loss_fn = ContrastiveLoss(loss).double()
    generator = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(8, 3, 30, 30, generator=generator, dtype=torch.float64),
        "input_ids": torch.randint(2, 99, (8, 7), generator=generator),
    }
    batch["input_ids"][:, -1] = 1
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(5)
    accumulated_loss = train_step(model, loss_fn, model, halves, accelerator)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    accumulated["bias"] = loss_fn.logit_bias.grad.clone() if loss == "siglip" else None
    model.zero_grad(), loss_fn.zero_grad()

    # Reference: both halves encoded with gradients from the same RNG state (same masks), one loss, one backward.
    torch.manual_seed(5)
    feats = [model(**half) for half in halves]
    images = torch.cat([f.image_embeds for f in feats])
    texts = torch.cat([f.text_embeds for f in feats])
    reference_loss = loss_fn(images, texts, model.logit_scale)
    reference_loss.backward()
    assert accumulated_loss.dtype == torch.float64
    torch.testing.assert_close(accumulated_loss, reference_loss.detach(), rtol=1e-10, atol=0)
    # The absolute bound is scaled to the largest gradient: some are zero in exact arithmetic (attention key biases).
    unit = max(param.grad.abs().max().item() for param in model.parameters() if param.grad is not None)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-9, atol=1e-9 * unit, msg=name)
    if loss == "siglip":
        torch.testing.assert_close(accumulated["bias"], loss_fn.logit_bias.grad, rtol=1e-10, atol=0)


def test_parameter_groups_exempt_norms_biases_embeddings_and_scale():
    model = GLIPModel(tiny_config())
    decay, no_decay = parameter_groups([model], 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in no_decay_names and "vision_model.embeddings.class_embedding" in no_decay_names
    assert "text_model.embeddings.token_embedding.weight" in no_decay_names
    assert "vision_model.embeddings.position_embedding.weight" in no_decay_names
    assert "vision_model.post_layernorm.weight" in no_decay_names
    assert all(name.endswith("bias") for name in no_decay_names if "layers" in name and "norm" not in name)
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in decay_names
    assert "vision_model.embeddings.patch_embedding.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_schedule_warmup_cosine_then_unmasked_tuning():
    values = [lr_multiplier(s, main_steps=10, warmup_steps=2, tuning_steps=4, tuning_ratio=0.01) for s in range(14)]
    assert values[0] == 0.5 and values[1] == 1.0
    assert all(a >= b for a, b in zip(values[1:10], values[2:10]))
    assert values[9] < 0.05 and values[10] == pytest.approx(0.01)
    assert values[12] == pytest.approx(0.005)


def test_logit_scale_is_clamped(tmp_path):
    result = run(tmp_path, "--max_steps", "1", "--eval_at_end", "false")
    model = GLIPModel.from_pretrained(result.output_dir)
    assert model.logit_scale.item() <= MAX_LOGIT_SCALE
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*_vitb16*.yaml")))
def test_recipes_parse_and_start_on_a_tiny_sample(tmp_path, name, tokenizer):
    values = load_yaml(CONFIGS / f"{name}.yaml")
    assert values["per_device_train_batch_size"] in (320, 160)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    from datasets_util import make_parquet

    data = make_parquet(tmp_path / "pairs.parquet", n=8)
    flags = [
        "--config",
        str(CONFIGS / f"{name}.yaml"),
        "--tokenizer_name",
        str(tokenizer_dir),
        "--dataset_name",
        "parquet",
        "--data_files",
        str(data),
        "--image_column",
        "image",
        "--caption_column",
        "caption",
        "--num_workers",
        "0",
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        "1",
        "--mixed_precision",
        "no",
        "--output_dir",
        str(tmp_path / "out"),
        "--vision_hidden_size",
        "32",
        "--vision_layers",
        "1",
        "--vision_heads",
        "2",
        "--vision_intermediate_size",
        "37",
        "--text_hidden_size",
        "32",
        "--text_layers",
        "1",
        "--text_heads",
        "2",
        "--text_intermediate_size",
        "37",
        "--projection_dim",
        "16",
        "--cpu",
        "true",
        "--report_to",
        "none",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    if name.startswith("unmasked"):
        init = tmp_path / "init"
        GLIPModel(tiny_config(tokenizer, mask_ratio=0.75)).save_pretrained(init)
        flags += ["--init_from", str(init)]
    model_args, data_args, training_args = parse_run_args(flags)
    assert data_args.streaming and data_args.crop_scale_min == 0.5
    result = train(model_args, data_args, training_args)
    assert result.steps == 1
    saved = GLIPModel.from_pretrained(result.output_dir)
    expected_ratio = 0.0 if name.startswith(("clip", "unmasked")) else float(values["mask_ratio"])
    assert saved.config.vision_config.mask_ratio == pytest.approx(expected_ratio)
    # The paper trained open_clip's ViT-B-16, whose MLPs use GELU (CLIP's default is quick_gelu); tuning keeps the
    # initial checkpoint's own.
    act = "quick_gelu" if name.startswith("unmasked") else "gelu"
    assert saved.config.vision_config.hidden_act == saved.config.text_config.hidden_act == act


def test_too_small_data_for_one_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size=64"):
        run(tmp_path, "--per_device_train_batch_size", "64", "--max_steps", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="no full batch"):
        run(
            tmp_path,
            "--per_device_train_batch_size",
            "64",
            "--max_steps",
            "1",
            "--streaming",
            "true",
            "--output_dir",
            str(tmp_path / "stream"),
        )


# ------------------------------------------------------------------------------- correctness regressions (issue 7)


def test_masks_differ_across_ranks_data_order_is_shared_and_resume_replays_them(tmp_path):
    script = Path(__file__).parent / "mask_rank_check.py"
    flags = [*TINY, "--mask_strategy", "random", "--max_steps", "3", "--save_steps", "2", "--eval_at_end", "false"]
    flags += ["--cache_dir", tmp_path / "cache"]
    launch_two_processes(script, tmp_path / "full", *flags, "--output_dir", tmp_path / "full_out", port=29536)
    full = [json.loads((tmp_path / f"full-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(f["keep"]) for f in full] == [3, 3]
    for step in range(3):
        same_rows = sum(a == b for a, b in zip(full[0]["keep"][step], full[1]["keep"][step]))
        assert same_rows == 0, f"step {step}: {same_rows} of 8 rows drew the same mask on both ranks"
    # One shared permutation sharded across ranks: the first epoch (2 batches of 8 per rank) never repeats a row.
    first_epoch = [row for rank in (0, 1) for batch in full[rank]["rows"][:2] for row in batch]
    assert len(set(first_epoch)) == len(first_epoch) == 32

    resumed_out = tmp_path / "resumed_out" / "checkpoints" / "checkpoint-2"
    shutil.copytree(tmp_path / "full_out" / "checkpoints" / "checkpoint-2", resumed_out)
    resume = ["--output_dir", tmp_path / "resumed_out", "--resume_from_checkpoint", "latest"]
    launch_two_processes(script, tmp_path / "resumed", *flags, *resume, port=29537)
    for rank in (0, 1):
        resumed = json.loads((tmp_path / f"resumed-rank{rank}.json").read_text())
        assert resumed["keep"] == full[rank]["keep"][2:], f"rank {rank}: the resumed step drew other masks"


def test_init_from_a_checkpoint_without_tokenizer_files_trains_a_tokenizer(tmp_path):
    import glip_hf

    config = tiny_config(mask_ratio=0.5)
    config.text_config.vocab_size = 700
    export = glip_hf.export_to_clip(GLIPModel(config), tmp_path / "clip-export")  # weights + config only
    result = run(tmp_path, "--init_from", str(export), "--tokenizer_vocab_size", "600", "--max_steps", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    assert len(tokenizer) > 515, f"trained with a {len(tokenizer)}-token tokenizer"
    ids = tokenizer("a photo of a small red circle.")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[1:-1]


def _model_args(*flags: str):
    return parse_run_args(["--config", str(CONFIGS / "default.yaml"), *TINY, *flags])[0]


def _pooled_positions(model, input_ids: torch.Tensor) -> list[int]:
    """The sequence position whose final hidden state the text tower pooled, per row."""
    with torch.no_grad():
        out = model.text_model(input_ids=input_ids)
    hits = (out.last_hidden_state == out.pooler_output[:, None]).all(dim=-1)  # (B, L)
    return hits.float().argmax(dim=-1).tolist()


def _first_eos(input_ids: torch.Tensor, eos: int) -> list[int]:
    return (input_ids == eos).float().argmax(dim=-1).tolist()


def roberta_layout_tokenizer():
    """A tokenizer with RoBERTa's special ids: <s> 0, <pad> 1, </s> 2 (CLIP reads eos 2 as a legacy checkpoint)."""
    from conftest import caption_corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in caption_corpus() for w in text.replace(".", " .").split()})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _word_level_tokenizer(template: str, eos: str):
    """A word-level tokenizer with ``[PAD]`` 0, ``<s>`` 1, ``</s>`` 3 and a post-processing ``template``."""
    from conftest import caption_corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in caption_corpus() for w in text.replace(".", " .").split()} | {"cat"})
    vocab = {"[PAD]": 0, "<s>": 1, "[UNK]": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", 1), ("</s>", 3)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=eos, pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.mark.parametrize(
    "template, eos",
    [("", "</s>"), ("</s> $A </s>", "</s>"), ("<s> $A", "</s>")],
    ids=["never-appended", "also-first", "bos-only"],
)
def test_a_tokenizer_that_does_not_end_texts_with_its_eos_is_rejected(template, eos):
    from glip_hf.training import build_model

    with pytest.raises(ValueError, match="end-of-text"):
        build_model(_model_args(), _word_level_tokenizer(template, eos))
    build_model(_model_args(), _word_level_tokenizer("<s> $A </s>", "</s>"))  # the same words, ended right


def test_init_from_with_the_built_in_run_keeps_the_checkpoints_masking(tmp_path, tokenizer):
    """The built-in run sets no masking: from scratch it is GLIPConfig's (Gaussian 0.5, sigma 0.2); from a
    checkpoint (a FLIP model converted from open_clip, say) the checkpoint's own, unless a flag overrides it."""
    from glip_hf.training import build_model

    assert _model_args().mask_ratio is None
    scratch = build_model(_model_args(), tokenizer).config
    assert (scratch.mask_ratio, scratch.mask_strategy, scratch.mask_sigma) == (0.5, "gaussian", 0.2)
    GLIPModel(tiny_config(tokenizer, mask_ratio=0.75, mask_strategy="random")).save_pretrained(tmp_path / "flip")
    kept = build_model(_model_args("--init_from", str(tmp_path / "flip")), tokenizer).config
    assert (kept.mask_ratio, kept.mask_strategy) == (0.75, "random")
    changed = build_model(_model_args("--init_from", str(tmp_path / "flip"), "--mask_ratio", "0.5"), tokenizer).config
    assert (changed.mask_ratio, changed.mask_strategy) == (0.5, "random")


def test_a_run_from_a_flip_checkpoint_trains_and_says_with_its_masking(tmp_path, capsys):
    """The run config prints mask_ratio: null (the model's own); the log says what that is, and the run trains and
    saves the checkpoint's masking."""
    config = tiny_config(mask_ratio=0.75, mask_strategy="random")
    config.text_config.vocab_size = 700
    GLIPModel(config).save_pretrained(tmp_path / "flip")
    result = run(tmp_path, "--init_from", str(tmp_path / "flip"), "--tokenizer_vocab_size", "600", "--max_steps", "1")
    assert "Training masking: random, mask_ratio 0.75\n" in capsys.readouterr().out
    saved = GLIPModel.from_pretrained(result.output_dir).config
    assert (saved.mask_ratio, saved.mask_strategy) == (0.75, "random")


def test_init_from_records_the_checkpoints_activation_and_warns_about_another(tmp_path):
    """A run from a GELU checkpoint trains in GELU; its run_config.yaml said quick_gelu (the flag's default, which
    init_from ignores), and an explicit --hidden_act that was not applied said nothing."""
    config = tiny_config(mask_ratio=0.5)
    config.text_config.vocab_size = 700
    config.vision_config.hidden_act = config.text_config.hidden_act = "gelu"
    GLIPModel(config).save_pretrained(tmp_path / "gelu")
    flags = ["--init_from", str(tmp_path / "gelu"), "--tokenizer_vocab_size", "600", "--max_steps", "1"]
    result = run(tmp_path, *flags)
    assert yaml.safe_load((result.output_dir / "run_config.yaml").read_text())["hidden_act"] == "gelu"
    with pytest.warns(UserWarning, match=r"hidden_act=quick_gelu is not applied: .*gelu was trained with gelu"):
        result = run(tmp_path, *flags, "--hidden_act", "quick_gelu", "--output_dir", str(tmp_path / "asked"))
    assert yaml.safe_load((result.output_dir / "run_config.yaml").read_text())["hidden_act"] == "gelu"
    assert GLIPModel.from_pretrained(result.output_dir).config.text_config.hidden_act == "gelu"


def test_runs_from_an_init_from_resume_with_or_without_it(tmp_path):
    """From an outside pass: a checkpoint written before the activation was recorded (quick_gelu, the flag's
    default, for a GELU model) could not be resumed by the same command, and a resume that dropped --init_from
    compared quick_gelu with gelu; an init_from whose config.json is no mapping gave a traceback."""
    config = tiny_config(mask_ratio=0.5)
    config.text_config.vocab_size = 700
    config.vision_config.hidden_act = config.text_config.hidden_act = "gelu"
    GLIPModel(config).save_pretrained(tmp_path / "gelu")
    flags = ["--init_from", str(tmp_path / "gelu"), "--tokenizer_vocab_size", "600", "--save_steps", "1"]
    run(tmp_path, *flags, "--max_steps", "1")
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    recorded = yaml.safe_load((checkpoint / "run_config.yaml").read_text())
    (checkpoint / "run_config.yaml").write_text(yaml.safe_dump({**recorded, "hidden_act": "quick_gelu"}))  # as before
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = run(tmp_path, *flags, "--max_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed.steps == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = run(tmp_path, *flags[2:], "--max_steps", "3", "--resume_from_checkpoint", "latest")  # no --init_from
    assert resumed.steps == 3
    assert yaml.safe_load((resumed.output_dir / "run_config.yaml").read_text())["hidden_act"] == "gelu"
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match=r"init_from=.*listed holds no model"):
        run(tmp_path, "--init_from", str(tmp_path / "listed"), "--output_dir", str(tmp_path / "other"))


def test_a_tokenizer_whose_eos_is_2_is_rejected():
    from glip_hf.training import build_model

    tokenizer = roberta_layout_tokenizer()
    assert tokenizer("a red star .")["input_ids"][-1] == 2
    with pytest.raises(ValueError, match="eos_token_id"):
        build_model(_model_args(), tokenizer)


def test_legacy_config_with_another_tokenizer_pools_at_the_tokenizers_eos(tmp_path, tokenizer):
    from glip_hf.training import build_model

    config = tiny_config(tokenizer, mask_ratio=0.5)
    config.text_config.eos_token_id = 2  # OpenAI-style config: CLIP pools at argmax(input_ids)
    GLIPModel(config).save_pretrained(tmp_path / "legacy")
    model = build_model(_model_args("--init_from", str(tmp_path / "legacy")), tokenizer)
    ids = tokenizer(["a red star.", "there is a small blue circle in the picture."], padding=True, return_tensors="pt")
    assert _pooled_positions(model, ids["input_ids"]) == _first_eos(ids["input_ids"], tokenizer.eos_token_id)


def test_openai_layout_with_eos_as_the_largest_id_keeps_working(tmp_path, tokenizer):
    from transformers import CLIPTokenizer

    from glip_hf.training import build_model

    # OpenAI's layout: ordinary tokens first, then <|startoftext|>, <|endoftext|> = the largest id; config eos 2.
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    ordinary = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]) if not t.startswith("<|")]
    vocab = {t: i for i, t in enumerate([*ordinary, "<|startoftext|>", "<|endoftext|>"])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    openai = CLIPTokenizer(vocab=vocab, merges=merges)
    assert openai.eos_token_id == len(vocab) - 1
    config = tiny_config(mask_ratio=0.5)
    config.text_config.vocab_size = len(vocab)
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = 0, 2, 1
    GLIPModel(config).save_pretrained(tmp_path / "openai")
    model = build_model(_model_args("--init_from", str(tmp_path / "openai")), openai)
    assert model.config.text_config.eos_token_id == 2  # the checkpoint is left as it is
    ids = openai(["a red star.", "there is a small blue circle in the picture."], padding=True, return_tensors="pt")
    assert _pooled_positions(model, ids["input_ids"]) == _first_eos(ids["input_ids"], openai.eos_token_id)


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_micro_batches_whose_rows_are_all_skipped_do_not_stop_the_run(tmp_path, accumulation):
    from datasets_util import make_sparse_caption_dataset

    path = make_sparse_caption_dataset(tmp_path / "sparse", good=4, missing=8)
    flags = ["--dataset_name", str(path), "--per_device_train_batch_size", "2", "--num_train_epochs", "2"]
    result = run(tmp_path, *flags, "--gradient_accumulation_steps", accumulation)
    assert result.steps == 12 // int(accumulation)
    assert result.skipped["missing_caption"] == 16  # 8 rows a epoch, 2 epochs
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["num_skipped"] == 16
    if accumulation == "1":
        assert summary["empty_steps"] >= 1


def test_a_process_whose_micro_batch_is_empty_keeps_step_with_the_others(tmp_path):
    from datasets_util import make_sparse_caption_dataset

    path = make_sparse_caption_dataset(tmp_path / "sparse", good=4, missing=8)
    out = tmp_path / "out"
    flags = [*TINY, "--dataset_name", path, "--per_device_train_batch_size", "2", "--num_train_epochs", "2"]
    flags += ["--output_dir", out, "--cache_dir", tmp_path / "cache"]
    launch_two_processes(ROOT / "run_pretraining.py", *flags, port=29538, cwd=tmp_path)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["num_skipped"] == 16


def test_streamed_rows_get_distinct_augmentation_with_dataloader_workers(tmp_path, tokenizer):
    from accelerate import Accelerator
    from datasets_util import make_webdataset

    from glip_hf.arguments import DataArguments, TrainingArguments
    from glip_hf.data import ImageTextCollator, load_image_text_dataset
    from glip_hf.data import make_train_dataloader as _make_dataloader

    root = make_webdataset(tmp_path / "shards", shards=2, per_shard=8, same_image=True)
    data_args = DataArguments(
        dataset_name="webdataset",
        data_files=str(root / "*.tar"),
        streaming=True,
        num_workers=2,
        image_column="jpg",
        caption_column="txt",
        cache_dir=str(tmp_path / "cache"),
    )
    collator = ImageTextCollator(tokenizer, 12, [0.5] * 3, [0.25] * 3, "jpg", "txt", max_length=16)
    training_args = TrainingArguments(per_device_train_batch_size=4, max_steps=1)
    loader = _make_dataloader(
        load_image_text_dataset(data_args, "train"), collator, data_args, training_args, Accelerator(cpu=True)
    )
    pixels = torch.cat([batch["pixel_values"] for batch in loader])  # (16, 3, 12, 12): one image, 16 crops
    assert pixels.shape[0] == 16
    assert len({tuple(p.flatten().tolist()) for p in pixels}) == 16


def test_epochs_with_accumulation_consume_every_micro_batch(tmp_path):
    # 40 rows / batch 8 = 5 micro-batches an epoch; at accumulation 2, two epochs are 10 micro-batches = 5 steps.
    flags = ["--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--eval_at_end", "false"]
    result = run(tmp_path, *flags)
    assert result.steps == 5


def test_a_step_skipped_by_the_fp16_gradient_scaler_does_not_advance_the_schedule():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    from glip_hf.arguments import TrainingArguments
    from glip_hf.checkpointing import TrainingProgress
    from glip_hf.optimization import Schedule, build_optimizer, build_scheduler
    from glip_hf.training import _optimizer_step, _Run

    accelerator = Accelerator(cpu=True)
    model, loss_fn = GLIPModel(tiny_config()), ContrastiveLoss("clip")
    args = TrainingArguments(warmup_steps=2, max_steps=10)
    # The real fp16 path: torch's gradient scaler (its CPU build), behind Accelerate's optimizer wrapper.
    optimizer = AcceleratedOptimizer(
        build_optimizer([model, loss_fn], args), device_placement=False, scaler=torch.amp.GradScaler("cpu")
    )
    scheduler = AcceleratedScheduler(
        build_scheduler(optimizer.optimizer, Schedule.of(vars(args), 10)), optimizer, step_with_optimizer=False
    )
    run_state = _Run(accelerator, model, model, loss_fn, optimizer, scheduler, None, args, 10, TrainingProgress())
    optimizer.scaler.scale(model.logit_scale * 1.0).backward()  # as accelerator.backward does under fp16
    for param in model.parameters():
        param.grad = torch.full_like(param, math.inf)  # an overflow in half precision
    before = scheduler.get_last_lr()[0]
    _optimizer_step(run_state)
    assert optimizer.step_was_skipped and scheduler.get_last_lr()[0] == before
    optimizer.scaler.scale(model.logit_scale * 1.0).backward()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    _optimizer_step(run_state)
    assert not optimizer.step_was_skipped and scheduler.get_last_lr()[0] != before


def test_lean_activations_train_like_the_plain_ones(tmp_path, capsys):
    """--lean_activations changes what backward keeps, not the function: 3 steps end at the same weights up to
    float32 rounding, and the saved model is a plain GLIP checkpoint."""
    flags = ("--max_steps", "3", "--eval_at_end", "false")
    plain = run(tmp_path / "plain", *flags)
    AcceleratorState._reset_state(reset_partial_state=True)
    lean = run(tmp_path / "lean", *flags, "--lean_activations", "true")
    assert "--lean_activations: 4 MLPs keep only their first layer's output for backward." in capsys.readouterr().out
    a = load_file(str(Path(plain.output_dir) / "model.safetensors"))
    b = load_file(str(Path(lean.output_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a shift): Adam scales up noise
            continue
        scale = a[name].abs().max().item() + 1e-12
        assert (a[name] - b[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("stated", [8, int(1e30)], ids=["shorter", "sentinel"])
def test_the_saved_tokenizer_truncates_where_training_did(tmp_path, tokenizer, stated):
    """A tokenizer may state a shorter limit than --max_text_length (16 here), or a huge sentinel: the run trains
    at the text tower's context, so its saved tokenizer (what the pipeline and users load) must say that one."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": stated}))
    result = run(tmp_path, "--tokenizer_name", str(tmp_path / "tok"), "--max_steps", "1", "--eval_at_end", "false")
    saved = AutoTokenizer.from_pretrained(result.output_dir)
    assert (
        saved.model_max_length
        == GLIPModel.from_pretrained(result.output_dir).config.text_config.max_position_embeddings
        == 16
    )
    assert len(saved("a red circle " * 20, truncation=True)["input_ids"]) == 16


def test_the_end_of_run_evaluation_reads_a_held_out_column_of_class_names(tokenizer, capsys):
    """The held-out split's labels written as names ("cat", "dog") give the zero-shot figures of the same rows with a
    ClassLabel column (run_eval.py reads them so too); a column of neither is said, not an error."""
    import datasets
    from accelerate import Accelerator
    from conftest import IMAGE_SIZE
    from datasets_util import png_bytes

    from glip_hf.arguments import DataArguments, TrainingArguments
    from glip_hf.data import make_image_processor
    from glip_hf.training import _evaluate_held_out

    names = ["cat", "dog", "dog", "", "cat", "dog"]
    rows = {
        "image": [{"bytes": png_bytes(i, IMAGE_SIZE), "path": None} for i in range(len(names))],
        "name": names,
        "label": [{"cat": 0, "dog": 1}.get(name, -1) for name in names],
    }
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    features["label"] = datasets.ClassLabel(names=["cat", "dog"])
    held_out = datasets.Dataset.from_dict(rows, features=features)
    model = GLIPModel(tiny_config(tokenizer)).eval()
    processor = make_image_processor(IMAGE_SIZE)
    accelerator = Accelerator(cpu=True)
    try:
        results = [
            _evaluate_held_out(
                model,
                tokenizer,
                processor,
                held_out,
                DataArguments(label_column=column),
                TrainingArguments(output_dir="unused"),
                accelerator,
            )
            for column in ("label", "name", "image")
        ]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert results[0] is not None and results[1] == results[0] and results[0]["num_samples"] == 5
    assert results[2] is None
    assert "no column 'image' of class labels or class names" in capsys.readouterr().out
    blank = held_out.map(lambda row: {"name": ""})  # no labelled row: said, and the run goes on to its summary
    accelerator = Accelerator(cpu=True)
    try:
        args = DataArguments(label_column="name"), TrainingArguments(output_dir="unused")
        assert _evaluate_held_out(model, tokenizer, processor, blank, *args, accelerator) is None
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "No zero-shot evaluation: no row has a label in --label_column 'name'" in capsys.readouterr().out


def test_init_from_refuses_a_tokenizer_numbered_past_its_embedding(tmp_path, tokenizer):
    """A vocabulary of as many tokens as the checkpoint embeds, one of them numbered past it: its length passed the
    check and the text tower then raised an IndexError."""
    from glip_hf.tokenization import load_pretrained_tokenizer
    from glip_hf.training import build_model

    GLIPModel(tiny_config(tokenizer, mask_ratio=0.5)).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "tok")
    content = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = content["model"]["vocab"]
    vocab[next(token for token, index in vocab.items() if index == len(vocab) // 2)] = len(vocab) + 50
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(content))
    gapped = load_pretrained_tokenizer(str(tmp_path / "tok"))
    assert len(gapped) == len(tokenizer)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ token ids but .*init embeds only"):
        build_model(_model_args("--init_from", str(tmp_path / "init")), gapped)
