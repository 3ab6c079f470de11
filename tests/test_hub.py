"""Publishing a run: the prepared folder of each flavour, its model card, the push, all up to the network.

One tiny training run (with unmasked tuning) and two run_eval.py results (unmasked, masked) are shared by the
module. Each flavour's folder is loaded in a fresh process where ``import glip_hf`` fails, as on a user's machine
without it; only the upload call itself is faked.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from huggingface_hub import HfApi, ModelCard, constants
from test_training import CONFIGS, TINY
from transformers.dynamic_module_utils import get_imports

import glip_hf.hub
from glip_hf import GLIPModel
from glip_hf.arguments import parse_eval_args, parse_run_args
from glip_hf.cli import run_cli
from glip_hf.evaluation import evaluate_model
from glip_hf.hub.__main__ import main as hub_main
from glip_hf.hub.publish import default_repo_id
from glip_hf.masking import num_kept_patches
from glip_hf.tokenization import load_pretrained_tokenizer
from glip_hf.training import train

REPO_ID = "someone/glip-tiny"
LABELS = ["a red circle.", "a blue square.", "a green triangle."]
# Run before anything else in the fresh process: `import glip_hf` must fail there, as where it is not installed.
BLOCK_GLIP_HF = """
import importlib.abc, sys

class NoGlipHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "glip_hf":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, NoGlipHF())
try:
    import glip_hf
except ImportError:
    pass
else:
    raise SystemExit("glip_hf is importable")
"""
LOAD_AND_REPORT = """
import json, sys, torch
from PIL import Image
from transformers import AutoModel, CLIPModel, pipeline

folder, flavour, work = sys.argv[1], sys.argv[2], sys.argv[3]
remote = flavour == "glip"
if remote:
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
else:
    model, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
model.eval()
inputs = torch.load(f"{work}/inputs.pt")
with torch.no_grad():
    torch.save(model(**inputs).logits_per_image, f"{work}/logits.pt")
    model.train()
    tokens = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state.shape[1]
classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=remote)
scores = classifier(Image.new("RGB", (40, 30), "red"), candidate_labels=["a red circle.", "a blue square."])
exec(compile(open(f"{work}/snippet.py").read(), "model card snippet", "exec"), {})
report = {
    "class": type(model).__name__,
    "loading_problems": [key for keys in info.values() for key in keys],
    "module": type(model).__module__,
    "is_clip_subclass": any(cls.__name__ == "CLIPModel" for cls in type(model).__mro__),
    "training_tokens": tokens,
    "pipeline_labels": sorted(s["label"] for s in scores),
    "pipeline_total": sum(s["score"] for s in scores),
    "glip_hf_modules": [name for name in sys.modules if name.split(".")[0] == "glip_hf"],
}
json.dump(report, open(f"{work}/report.json", "w"))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run (2 masked steps + 1 unmasked-tuning step) and its two evaluations beside it."""
    tmp = tmp_path_factory.mktemp("hub_run")
    flags = ["--max_steps", "2", "--unmasked_tuning_steps", "1", "--output_dir", str(tmp / "run")]
    try:
        train(*parse_run_args(["--config", str(CONFIGS / "default.yaml"), *TINY, "--cache_dir", str(tmp), *flags]))
        for name, ratio in (("unmasked", "0"), ("masked", "0.5")):
            args = ["--model", str(tmp / "run"), "--cache_dir", str(tmp), "--mask_ratio", ratio, "--mask_draws", "2"]
            (tmp / f"{name}.json").write_text(json.dumps(evaluate_model(parse_eval_args(args))))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return tmp / "run"


def eval_files(run_dir: Path) -> list[Path]:
    return [run_dir.parent / "unmasked.json", run_dir.parent / "masked.json"]


@pytest.fixture(scope="module")
def prepared(run_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("prepared")
    return {
        flavour: glip_hf.hub.prepare_folder(run_dir, out / flavour, flavour, eval_files(run_dir), repo_id=REPO_ID)
        for flavour in ("glip", "clip")
    }


def usage_snippet(readme: str) -> str:
    """The first python block of the card's "How to use" section."""
    section = readme.split("## How to use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def files_in(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("flavour", ["clip", "glip"])
def test_prepared_folder_loads_where_glip_hf_is_not_installed(flavour, prepared, run_dir, tmp_path):
    """Same unmasked logits as the source model, the pipeline, the card's snippet; GLIP masks in training mode."""
    folder = prepared[flavour]
    source = GLIPModel.from_pretrained(run_dir).eval()
    tokenizer = load_pretrained_tokenizer(str(run_dir))
    inputs = dict(tokenizer(LABELS, padding=True, return_tensors="pt"))
    inputs["pixel_values"] = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(inputs, tmp_path / "inputs.pt")
    snippet = usage_snippet((folder / "README.md").read_text())
    assert f'"{REPO_ID}"' in snippet
    (tmp_path / "snippet.py").write_text(snippet.replace(f'"{REPO_ID}"', repr(str(folder))))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    command = [sys.executable, "-c", BLOCK_GLIP_HF + LOAD_AND_REPORT, str(folder), flavour, str(tmp_path)]
    subprocess.run(command, check=True, cwd=tmp_path, env=env, timeout=300)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["glip_hf_modules"] == [] and report["is_clip_subclass"] and report["loading_problems"] == []
    with torch.no_grad():
        expected = source(**inputs).logits_per_image
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)
    assert report["pipeline_labels"] == ["a blue square.", "a red circle."]
    assert abs(report["pipeline_total"] - 1.0) < 1e-5
    patches = (16 // 4) ** 2
    if flavour == "clip":
        assert report["class"] == "CLIPModel" and report["training_tokens"] == 1 + patches
    else:
        assert report["class"] == "GLIPModel" and report["module"].startswith("transformers_modules.")
        assert report["training_tokens"] == 1 + num_kept_patches(patches, 0.5)


def test_folder_contents_of_each_flavour(prepared):
    records = {
        "README.md",
        "masks.png",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "training_run/run_config.yaml",
        "training_run/train_summary.json",
        "training_run/loss_curve.png",
        "eval_results/unmasked.json",
        "eval_results/masked.json",
    }
    code = {"configuration_glip.py", "modeling_glip.py", "masking.py"}
    assert files_in(prepared["clip"]) == records | {"config.json"}
    assert files_in(prepared["glip"]) == records | {"config.json"} | code
    clip_config = json.loads((prepared["clip"] / "config.json").read_text())
    assert clip_config["model_type"] == "clip" and "auto_map" not in clip_config
    assert "mask_ratio" not in clip_config["vision_config"]
    glip_config = json.loads((prepared["glip"] / "config.json").read_text())
    assert glip_config["model_type"] == "glip" and glip_config["vision_config"]["mask_ratio"] == 0.5
    assert glip_config["auto_map"] == {
        "AutoConfig": "configuration_glip.GLIPConfig",
        "AutoModel": "modeling_glip.GLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_glip.GLIPModel",
    }


def test_remote_code_follows_the_library_and_needs_nothing_else(prepared):
    """The entry modules are the library's sources; the flat masking module holds only what the model imports."""
    folder = prepared["glip"]
    package = Path(glip_hf.hub.__file__).resolve().parent.parent
    for name in ("configuration_glip.py", "modeling_glip.py"):
        generated = (folder / name).read_text().split("\n", 1)[1]  # after the "Generated by" line
        assert generated == (package / name).read_text()
    masking = (folder / "masking.py").read_text()
    assert "def keep_indices_from_offset" in masking and "def render_mask_figure" not in masking
    allowed = {"torch", "transformers", "huggingface_hub"}
    for path in folder.glob("*.py"):
        assert set(get_imports(path)) - set(sys.stdlib_module_names) <= allowed, path.name


def test_card_parses_and_its_numbers_are_the_run_files(prepared, run_dir):
    card = ModelCard.load(prepared["clip"] / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.license == "apache-2.0" and {"glip", "clip", "gaussian-masking"} <= set(data.tags)
    assert data.model_name == "glip-tiny"
    results = {(r.metric_config, r.metric_name.split(" ")[0]): r for r in data.eval_results}
    for path in eval_files(run_dir):
        result = json.loads(path.read_text())
        masked = f"masked-{result['mask_ratio']}-gaussian-sigma-{result.get('mask_sigma')}"
        config = "unmasked" if result["mask_ratio"] == 0 else masked
        for metric, value in result["metrics"].items():
            entry = results.pop((config, metric))
            assert entry.metric_value == value and entry.dataset_split == "test"
            assert entry.task_type == "zero-shot-image-classification"
    assert not results  # the held-out result of train_summary.json is the unmasked file's: listed once

    summary = json.loads((run_dir / "train_summary.json").read_text())
    text = card.text
    steps = summary["steps"]
    assert f"| optimizer steps | {steps} ({steps - 1} pre-training + 1 unmasked tuning) |" in text
    assert "| patch masking | Gaussian (GLIP), mask_ratio 0.5, sigma 0.2: the encoder sees 8 of 16 patches" in text
    assert "| global batch | 8 (8 x 1 accumulation x 1 processes) |" in text  # train_summary.json's world_size
    masked = json.loads(eval_files(run_dir)[1].read_text())
    top5 = f"{masked['metrics']['top5']:.3f} +/- {masked['metrics_std']['top5']:.3f}"
    assert re.search(rf"\| top5 \| [0-9.]+ \| {re.escape(top5)} \|", text)
    assert "![Patch masks](masks.png)" in text and "arxiv.org/abs/2403.15837" in text
    assert "trust_remote_code" not in usage_snippet(text)
    assert "trust_remote_code=True" in usage_snippet((prepared["glip"] / "README.md").read_text())


def test_global_batch_counts_processes_when_the_run_records_them():
    from glip_hf.hub.card import global_batch

    config = {"per_device_train_batch_size": 320, "gradient_accumulation_steps": 2}
    assert global_batch(config, {"world_size": 4}) == "2560 (320 x 2 accumulation x 4 processes)"
    assert (
        global_batch(config, {}) == "640 per process (320 x 2 accumulation; the number of processes was not recorded)"
    )


def test_push_uploads_exactly_the_prepared_folder(run_dir, prepared, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        readme = (folder / "README.md").read_text()
        calls["upload_folder"] = (repo_id, files_in(folder), readme, kwargs)

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the network calls themselves are faked
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = glip_hf.hub.push_run(run_dir, REPO_ID, "glip", private=True, eval_files=eval_files(run_dir))

    assert url == f"https://huggingface.co/{REPO_ID}"
    assert calls["create_repo"] == (REPO_ID, {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files, readme, kwargs = calls["upload_folder"]
    assert repo_id == REPO_ID and files == files_in(prepared["glip"])
    assert readme == (prepared["glip"] / "README.md").read_text()
    assert kwargs["repo_type"] == "model" and kwargs["delete_patterns"] == ["*"]


TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")


def test_push_without_a_token_is_one_line_before_any_work(run_dir, tmp_path):
    """For real, in a fresh process: no token variable and an empty HF_HOME (no saved login)."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="0")
    command = [sys.executable, "-m", "glip_hf.hub", "push", str(run_dir), "--repo_id", REPO_ID]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "none is configured" in lines[0], lines
    assert "hf auth login" in lines[0] and "HF_TOKEN" in lines[0]


def test_check_hub_token_for_a_run_about_to_start(tmp_path, monkeypatch):
    for name in TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):  # as in these tests
        glip_hf.hub.check_hub_token()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="hf auth login"):
        glip_hf.hub.check_hub_token()
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    glip_hf.hub.check_hub_token()  # configured: no network call unless validate=True


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_run", "config.json not found; pass the output directory"),
        ("out_not_empty", "pass --overwrite"),
        ("out_is_run", "would replace the run directory"),
        ("eval_not_json", "is not valid JSON"),
        ("eval_not_a_result", "is not a run_eval.py result"),
        ("eval_of_another_model", "evaluate the run itself"),
        ("eval_twice", "both hold zeroshot_classification on builtin[test] with unmasked inference"),
        ("tokenizer_too_large", "but its text tower embeds only"),  # the pipeline then raised an IndexError
        ("tokenizer_id_past_the_vocabulary", "emits ids up to 650 but its text tower embeds only"),  # len() passed
    ],
)
def test_prepare_errors_are_one_line(case, message, run_dir, saved_model_dir, tmp_path, capsys):
    argv = ["prepare", str(run_dir), "--out", str(tmp_path / "out")]
    if case == "missing_run":
        argv[1] = str(tmp_path / "nowhere")
    elif case == "out_not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "out_is_run":
        argv[3] = str(run_dir)
    elif case == "eval_twice":
        argv += ["--eval", *map(str, eval_files(run_dir)), str(eval_files(run_dir)[0])]
    elif case == "tokenizer_too_large":
        argv[1] = str(shutil.copytree(run_dir, tmp_path / "run"))
        tokenizer = load_pretrained_tokenizer(argv[1])
        vocab = json.loads((tmp_path / "run" / "config.json").read_text())["text_config"]["vocab_size"]
        tokenizer.add_tokens([f"newword{i}" for i in range(vocab - len(tokenizer) + 1)])
        tokenizer.save_pretrained(argv[1])
    elif case == "tokenizer_id_past_the_vocabulary":  # as many tokens as the vocabulary, one of them numbered past it
        argv[1] = str(shutil.copytree(run_dir, tmp_path / "run"))
        tokenizer_file = tmp_path / "run" / "tokenizer.json"
        content = json.loads(tokenizer_file.read_text())
        vocab = content["model"]["vocab"]
        vocab[next(token for token, index in vocab.items() if index == len(vocab) // 2)] = 650
        tokenizer_file.write_text(json.dumps(content))
    else:
        result = {"task": "zeroshot_classification", "mask_ratio": 0.0, "metrics": {"top1": 0.5}}
        content = {
            "eval_not_json": "{not json",
            "eval_not_a_result": json.dumps({"top1": 0.5}),
            "eval_of_another_model": json.dumps({**result, "model": str(saved_model_dir)}),
        }[case]
        (tmp_path / "result.json").write_text(content)
        argv += ["--eval", str(tmp_path / "result.json")]
    with pytest.raises(SystemExit) as stopped:
        run_cli(hub_main, argv, prog="python -m glip_hf.hub")
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() or case == "out_not_empty"


def _card_text(record, flavour: str = "clip", mask_picture: str | None = None) -> tuple[str, list[str]]:
    """The card rendered from ``record`` (no folder written): its text and its tags."""
    from glip_hf.hub.card import render_model_card
    from glip_hf.hub.publish import DEFAULT_TEMPLATE

    files = {**dict.fromkeys(("loss_curve", "run_config", "train_summary")), "mask_picture": mask_picture}
    card = render_model_card(record, DEFAULT_TEMPLATE, flavour, REPO_ID, "apache-2.0", 1000, files)
    return card.text, card.data.tags


def test_no_local_path_reaches_the_prepared_folder(run_dir, tmp_path):
    """Paths of the publisher's machine (cache, output, data, initial checkpoint, evaluated model) are replaced by
    ``<local>/<name>`` in every published file, the card included; the run's own files keep them."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "my_data").mkdir()
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config.update(
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(run),
        data_dir=str(tmp_path / "my_data"),
        data_files=[str(tmp_path / "my_data" / "train.parquet")],
        init_from=str(tmp_path / "start"),
        tokenizer_name=str(tmp_path / "tok"),
        dataset_name=str(tmp_path / "my_data"),
    )
    (run / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = json.loads(eval_files(run_dir)[1].read_text())
    (tmp_path / "local.json").write_text(
        json.dumps({**result, "model": str(run), "dataset": str(tmp_path / "my_data")})
    )
    out = glip_hf.hub.prepare_folder(run, tmp_path / "out", "glip", [tmp_path / "local.json"], repo_id=REPO_ID)

    for path in out.rglob("*"):
        if path.is_file() and path.suffix not in (".png", ".safetensors"):
            assert str(tmp_path) not in path.read_text(), path.relative_to(out)
    published = yaml.safe_load((out / "training_run" / "run_config.yaml").read_text())
    assert published["init_from"] == "<local>/start" and published["data_files"] == ["<local>/train.parquet"]
    assert json.loads((out / "eval_results" / "local.json").read_text())["model"] == REPO_ID
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_name for r in card.data.eval_results} == {"my_data"}
    assert card.data.base_model is None and card.data.datasets is None
    assert "| initialisation | `<local>/start` |" in card.text
    assert str(tmp_path) in (run / "run_config.yaml").read_text()  # the user's records are untouched


def test_card_of_a_mask_ratio_0_run_says_clip_not_glip(run_dir):
    from dataclasses import replace

    from glip_hf.hub.card import read_run

    record = read_run(run_dir)
    model_config = json.loads(json.dumps(record.model_config))
    model_config["vision_config"]["mask_ratio"] = 0.0
    text, tags = _card_text(replace(record, model_config=model_config))
    assert "gaussian-masking" not in tags and "random-masking" not in tags
    assert "no patch masking: plain **CLIP** pre-training" in text
    assert "**GLIP**, Gaussian masking" not in text and "GLIP's prior favours" not in text
    masked_text, masked_tags = _card_text(record)
    assert "gaussian-masking" in masked_tags and "**GLIP**, Gaussian masking" in masked_text


def _row(text: str, name: str) -> str | None:
    found = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", text, flags=re.MULTILINE)
    return found.group(1) if found else None


def test_card_of_a_snapshot_summary(run_dir):
    """Snapshots before and during unmasked tuning: steps split by main_steps, recorded rows only, actual precision."""
    from dataclasses import replace

    from glip_hf.hub.card import read_run

    record = read_run(run_dir)
    config = {**record.run_config, "unmasked_tuning_steps": 1000, "mixed_precision": None}
    snapshot = {"steps": 200, "main_steps": 5000, "world_size": 2, "mixed_precision": "bf16", "snapshot": True}
    text, _ = _card_text(replace(record, run_config=config, summary=snapshot))
    assert _row(text, "optimizer steps") == "snapshot at step 200 (200 pre-training + 0 unmasked tuning)"
    assert _row(text, "precision") == "bf16"
    assert _row(text, "samples skipped (unreadable)") is None and _row(text, "steps skipped (non-finite loss)") is None
    assert "a snapshot at step 200, before unmasked tuning" in text and "after unmasked tuning" not in text

    during = {**snapshot, "steps": 5010, "num_skipped": 3, "nonfinite_steps": 0, "mixed_precision": "no"}
    text, _ = _card_text(replace(record, run_config=config, summary=during))
    assert _row(text, "optimizer steps") == "snapshot at step 5010 (5000 pre-training + 10 unmasked tuning)"
    assert _row(text, "samples skipped (unreadable)") == "3" and _row(text, "steps skipped (non-finite loss)") == "0"
    assert _row(text, "precision") == "fp32 (no mixed precision)"
    assert "a snapshot at step 5010, 10 steps into unmasked tuning" in text

    final = {"steps": 6000, "main_steps": 5000}
    text, _ = _card_text(replace(record, run_config=config, summary=final))
    assert _row(text, "optimizer steps") == "6000 (5000 pre-training + 1000 unmasked tuning)"
    assert _row(text, "precision") == "not recorded (Accelerate's configured default)"
    assert "that is after unmasked tuning (1000 steps with masking off)" in text
    old = {"steps": 200}  # a summary without main_steps never gives negative stages
    text, _ = _card_text(replace(record, run_config=config, summary=old))
    assert _row(text, "optimizer steps") == "200 (0 pre-training + 200 unmasked tuning)"


def test_local_datasets_and_mask_sigmas_are_told_apart(run_dir, tmp_path):
    """Results of one builder (imagefolder) on two local folders, and masked inference at two sigmas, are four cells
    of the card and four model-index entries (they were refused as the same cell, and named 'imagefolder' only)."""
    from glip_hf.hub.card import dataset_label, eval_results, read_run

    assert (
        dataset_label("parquet", None, ["<local>/a.parquet", "<local>/b.parquet"]) == "a.parquet, b.parquet (parquet)"
    )
    assert dataset_label(str(tmp_path), str(tmp_path / "sub")) == tmp_path.name  # a local dataset: its own name

    base = {"task": "zeroshot_classification", "split": "test", "metrics": {"top1": 0.5}}
    results = [
        {**base, "dataset": "imagefolder", "data_dir": str(tmp_path / "pets"), "mask_ratio": 0.0},
        {**base, "dataset": "imagefolder", "data_dir": "data/cifar/", "mask_ratio": 0.0},
        {**base, "dataset": "parquet", "data_files": "/data/flowers/test.parquet", "mask_ratio": 0.0},
        *({**base, "mask_ratio": 0.5, "mask_strategy": "gaussian", "mask_sigma": s} for s in (0.2, 0.8)),
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    record = read_run(run_dir, [tmp_path / "results.json"])
    cells = {(e.dataset, e.inference) for e in record.evaluations if e.source != "training_run/train_summary.json"}
    assert cells == {
        ("pets (imagefolder)", "unmasked inference"),
        ("cifar (imagefolder)", "unmasked inference"),
        ("test.parquet (parquet)", "unmasked inference"),
        ("builtin", "masked inference: 50% gaussian sigma 0.2, 1 draws"),
        ("builtin", "masked inference: 50% gaussian sigma 0.8, 1 draws"),
    }
    text, _ = _card_text(record)
    assert "| pets (imagefolder) | test |" in text and "| cifar (imagefolder) | test |" in text
    assert "masked inference: 50% gaussian sigma 0.8, 1 draws" in text
    entries = {(r.dataset_type, r.metric_config) for r in eval_results(record.evaluations)}
    assert {("cifar (imagefolder)", "unmasked"), ("builtin", "masked-0.5-gaussian-sigma-0.8")} <= entries


def test_remote_code_headers_hash_all_generated_modules(tmp_path, monkeypatch):
    """Each generated file's header names a hash of every generated module, so a folder with other modelling code
    but the same configuration_glip.py does not reuse transformers' cached remote modules."""
    from glip_hf.hub import remote_code

    def headers(folder: Path) -> dict[str, str]:
        folder.mkdir()
        return {path.name: path.read_text().split("\n", 1)[0] for path in remote_code.write_remote_code(folder)}

    before = headers(tmp_path / "before")
    load = remote_code._load

    def changed_modeling(name):
        module = load(name)
        if name == "modeling_glip":
            module.source += "\nCHANGED = True\n"
            module.tree = remote_code.ast.parse(module.source)
        return module

    monkeypatch.setattr(remote_code, "_load", changed_modeling)
    after = headers(tmp_path / "after")
    assert len({re.search(r"\(code (\w+)\)", line).group(1) for line in before.values()}) == 1
    for name in ("configuration_glip.py", "modeling_glip.py", "masking.py"):
        assert before[name] != after[name] and glip_hf.__version__ in before[name], name


@pytest.mark.parametrize(
    "folder, repo_id",
    [
        ("run one", "run-one"),
        ("glip_b16.v2", "glip_b16.v2"),
        ("ėxpériènce 1", "xp-ri-nce-1"),
        ("...", "glip-model"),
        ("glip--75", "glip-75"),  # the Hub refuses '--' and '..' in a name
        ("v1..2 - a", "v1.2-a"),
    ],
)
def test_the_default_repo_id_is_a_valid_hub_name(folder, repo_id, tmp_path):
    from huggingface_hub.utils import validate_repo_id

    # a run folder named "run one" put "your-username/run one" in the card's snippet and model-index
    assert default_repo_id(tmp_path / folder) == f"your-username/{repo_id}"
    validate_repo_id(default_repo_id(tmp_path / folder))  # huggingface_hub's own check of a repo id


def test_card_of_an_unmasked_tuning_run_names_the_masked_pre_training(run_dir, tmp_path):
    """configs/unmasked_tuning_vitb16.yaml's way: a run of its own, --init_from a masked GLIP run, --mask_ratio 0. Its
    config says mask_ratio 0; its card called the model plain CLIP pre-training. train_summary.json now records what
    the initial checkpoint was masked with, passed on when a tuned model is tuned again."""
    from glip_hf.hub.card import read_run
    from glip_hf.training import initial_masking

    masked = {"init_from": str(run_dir), "mask_ratio": 0.5, "mask_strategy": "gaussian", "mask_sigma": 0.2}
    tuned = tmp_path / "tuned"
    flags = ["--init_from", str(run_dir), "--mask_ratio", "0", "--max_steps", "1", "--unmasked_tuning_steps", "0"]
    train(
        *parse_run_args(
            [
                "--config",
                str(CONFIGS / "default.yaml"),
                *TINY,
                "--cache_dir",
                str(tmp_path),
                *flags,
                "--output_dir",
                str(tuned),
            ]
        )
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    assert json.loads((tuned / "config.json").read_text())["vision_config"]["mask_ratio"] == 0
    assert json.loads((tuned / "train_summary.json").read_text())["init_masking"] == masked
    assert initial_masking(str(tuned)) == masked  # tuning the tuned model again keeps the original record

    text, tags = _card_text(read_run(tuned), flavour="glip", mask_picture="masks.png")
    assert "gaussian-masking" in tags and "**GLIP**, Gaussian masking" in text
    # The picture's caption said "at the run's mask ratio (50%)" of a run that masked nothing.
    assert "at the mask ratio of the masked pre-training it was tuned from (0.5)" in " ".join(text.split()), text
    assert "plain **CLIP**" not in text and "plain CLIP pre-training" not in text
    assert _row(text, "patch masking").startswith(
        "none in this run (mask_ratio 0); its initial checkpoint `<local>/run` was pre-trained with Gaussian (GLIP), "
        "mask_ratio 0.5, sigma 0.2"
    )
    assert _row(text, "unmasked tuning") == (
        "this whole run: 1 step with masking off (learning rate 0.002), from `<local>/run`"
    ), _row(text, "unmasked tuning")
    from dataclasses import replace

    record = read_run(tuned)  # with a tuning stage of its own: its last steps ran at the tuning learning rate
    config = {**record.run_config, "unmasked_tuning_steps": 2, "unmasked_tuning_learning_rate": 1e-5}
    staged = replace(record, run_config=config, summary={**record.summary, "steps": 5, "main_steps": 3})
    assert _row(_card_text(staged)[0], "unmasked tuning") == (
        "this whole run: 5 steps with masking off (3 steps at learning rate 0.002, then 2 steps at 1e-05), from "
        "`<local>/run`"
    )
    assert "tuned with masking off (the paper's unmasked tuning)" in text
    assert "this checkpoint's config has mask_ratio 0" in usage_snippet(text).lower()
    folder = glip_hf.hub.prepare_folder(tuned, tmp_path / "published", "glip", repo_id=REPO_ID)
    assert (folder / "README.md").is_file() and list(folder.glob("*.png"))  # the mask picture of the pre-training

    # Without the record (a run before this change): not called plain CLIP pre-training either.
    record = read_run(tuned)
    text, tags = _card_text(replace(record, summary={k: v for k, v in record.summary.items() if k != "init_masking"}))
    assert "plain CLIP pre-training" not in _row(text, "patch masking") and "gaussian-masking" not in tags
    assert "was not recorded" in _row(text, "patch masking")


def test_initial_masking_of_clip_and_unrecorded_checkpoints(run_dir, tmp_path):
    from glip_hf.training import initial_masking

    assert initial_masking(None) is None
    glip_hf.export_to_clip(GLIPModel.from_pretrained(run_dir), tmp_path / "clip")
    assert initial_masking(str(tmp_path / "clip")) is None  # a CLIP checkpoint records no masking
    model = GLIPModel.from_pretrained(run_dir, mask_ratio=0.0)
    model.save_pretrained(tmp_path / "unmasked")
    assert initial_masking(str(tmp_path / "unmasked")) is None  # no train_summary.json: nothing known
    (tmp_path / "unmasked" / "train_summary.json").write_text("{not json")
    assert initial_masking(str(tmp_path / "unmasked")) is None


def test_masked_inference_at_ratios_that_round_alike_are_two_columns(run_dir, tmp_path):
    """0.918 and 0.9184 were accepted as two results but shared one column label ("91.8%"), which showed one value
    under both headers."""
    from glip_hf.hub.card import evaluation_table, read_run

    base = {"task": "zeroshot_classification", "split": "test", "mask_strategy": "gaussian", "mask_sigma": 0.2}
    results = [
        {**base, "mask_ratio": 0.918, "metrics": {"top1": 0.25}},
        {**base, "mask_ratio": 0.9184, "metrics": {"top1": 0.5}},
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    evaluations = [e for e in read_run(run_dir, [tmp_path / "results.json"]).evaluations if e.mask_ratio > 0]
    header, rows = evaluation_table(evaluations)
    assert header[-2:] == [
        "masked inference: 91.8% gaussian sigma 0.2, 1 draws",
        "masked inference: 91.84% gaussian sigma 0.2, 1 draws",
    ]
    assert [row[-2:] for row in rows] == [["0.250", "0.500"]]


def test_the_wheel_ships_the_card_template_and_metric_modules(tmp_path):
    """A pip-installed glip_hf rendered no card: the template lay beside the package, outside the wheel."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root)]
    subprocess.run([*command, "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("glip_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "glip_hf/hub/model_card.md" in names
    assert {"glip_hf/metrics/zero_shot_accuracy/zero_shot_accuracy.py"} <= names


def test_the_hub_cli_takes_trust_remote_code_as_its_advice_writes_it():
    """A run whose tokenizer brings code of its own: the error advises --trust_remote_code true, which the hub CLI
    did not have."""
    from glip_hf.hub.__main__ import build_parser

    base = ["prepare", "run", "--out", "out"]
    assert build_parser().parse_args(base).trust_remote_code is False
    assert build_parser().parse_args([*base, "--trust_remote_code", "true"]).trust_remote_code is True
    assert build_parser().parse_args([*base, "--trust_remote_code"]).trust_remote_code is True
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--trust_remote_code", "maybe"])
