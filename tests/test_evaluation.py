"""run_eval.py / glip_hf.evaluation: metric definitions by hand, every task on tiny local data, errors, suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from conftest import IMAGE_SIZE, launch_two_processes
from datasets_util import png_bytes

import glip_hf
from glip_hf.arguments import EvalArguments
from glip_hf.evaluation import encode_images, evaluate_model, load_model_for_eval, run_suite, zero_shot_classifier
from glip_hf.metrics import classification_metrics, load_metric, retrieval_metrics
from glip_hf.synthetic import build_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent
SCORES = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.8, 0.8], [0.5, 0.5, 0.4], [0.1, 0.3, 0.3]])  # (texts, images)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2])
# By hand, ties ranked by index. Text queries: t0 finds image 0 first (tie with 1); t1 ranks it last; t2 and t3
# lose their ties. Image queries: image 0 finds t0 first; image 1 finds t2 third; image 2 finds t3 third.
EXPECTED_RETRIEVAL = {
    "image_retrieval_recall@1": 0.25,
    "image_retrieval_recall@2": 0.75,
    "image_retrieval_recall@5": 1.0,
    "text_retrieval_recall@1": 1 / 3,
    "text_retrieval_recall@2": 1 / 3,
    "text_retrieval_recall@5": 1.0,
}


def test_retrieval_recall_by_hand_with_ties():
    assert retrieval_metrics(SCORES, TEXT_TO_IMAGE, ks=(1, 2, 5)) == pytest.approx(EXPECTED_RETRIEVAL)
    module = load_metric("retrieval_recall")
    result = module.compute(predictions=SCORES.tolist(), references=TEXT_TO_IMAGE.tolist(), ks=(1, 2, 5))
    assert result == pytest.approx(EXPECTED_RETRIEVAL)


def test_classification_metrics_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 2, 2])  # correct, correct, wrong (2nd), wrong (2nd), wrong (2nd)
    expected = {"top1": 0.4, "top5": 1.0, "mean_per_class_recall": (1.0 + 0.5 + 0.0) / 3}
    assert classification_metrics(logits, labels, 3) == pytest.approx(expected)
    module = load_metric("zero_shot_accuracy")
    assert module.compute(predictions=logits.tolist(), references=labels.tolist()) == pytest.approx(expected)


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory):
    """A saved DatasetDict (train/test) at the tiny models' image size, with labels and five captions per image."""
    root = tmp_path_factory.mktemp("eval_data")
    build_synthetic_dataset(root, num_train=72, num_test=24, image_size=IMAGE_SIZE, seed=1)
    return str(next(root.glob("synthetic-*")))


def args_for(model_dir, dataset, **kwargs) -> EvalArguments:
    return EvalArguments(model=str(model_dir), dataset=dataset, batch_size=7, **kwargs)


@pytest.mark.parametrize("task", ["zeroshot_classification", "retrieval", "linear_probe"])
def test_every_task_writes_the_design_schema(saved_model_dir, eval_dataset, task):
    result = evaluate_model(args_for(saved_model_dir, eval_dataset, task=task))
    assert {"task", "dataset", "split", "model", "mask_ratio", "num_samples", "num_skipped", "metrics"} <= set(result)
    assert result["task"] == task and result["num_samples"] == 24 and result["num_skipped"] == 0
    expected = {
        "zeroshot_classification": {"top1", "top5", "mean_per_class_recall"},
        "retrieval": {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)},
        "linear_probe": {"top1", "mean_per_class_recall"},
    }[task]
    assert set(result["metrics"]) == expected
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    if task != "retrieval":
        assert result["num_classes"] == 36
    json.dumps(result)  # serialisable as is


def test_masked_inference_feeds_fewer_tokens(saved_model_dir, eval_dataset):
    loaded = load_model_for_eval(str(saved_model_dir))
    lengths = []
    hook = loaded[0].vision_model.encoder.register_forward_hook(
        lambda m, a, k, o: lengths.append(k["inputs_embeds"].shape[1]) if "inputs_embeds" in k else None,
        with_kwargs=True,
    )  # noqa: E501
    evaluate_model(args_for(saved_model_dir, eval_dataset, mask_ratio=0.5), Accelerator(), loaded)
    masked = set(lengths)
    lengths.clear()
    evaluate_model(args_for(saved_model_dir, eval_dataset), Accelerator(), loaded)
    hook.remove()
    assert masked == {1 + 112} and set(lengths) == {1 + 225}


def test_predictions_agree_with_the_zero_shot_pipeline(saved_model_dir, eval_dataset):
    from transformers import pipeline

    model, tokenizer, processor = load_model_for_eval(str(saved_model_dir))
    test = datasets.load_from_disk(eval_dataset)["test"].select(range(8))
    labels = ["red circle", "blue square", "green star", "yellow cross"]
    classifier = zero_shot_classifier(model, tokenizer, labels, ["a photo of a {}."], 16, Accelerator())
    raw = test.cast_column("image", datasets.Image(decode=False))
    features, kept, _ = encode_images(model, processor, raw, "image", 16, Accelerator())
    with torch.no_grad():
        ours = (model.logit_scale.exp() * features @ classifier.t()).softmax(dim=-1)
    pipe = pipeline("zero-shot-image-classification", model=str(saved_model_dir))
    outputs = pipe(list(test["image"]), candidate_labels=labels, hypothesis_template="a photo of a {}.")
    for row, output in zip(ours, outputs):
        theirs = torch.tensor([next(o["score"] for o in output if o["label"] == label) for label in labels])
        torch.testing.assert_close(row, theirs, atol=1e-4, rtol=1e-3)
        assert labels[int(row.argmax())] == output[0]["label"]


def test_plain_clip_checkpoints_evaluate_too(saved_model_dir, eval_dataset, tmp_path):
    model, tokenizer, processor = load_model_for_eval(str(saved_model_dir))
    clip_dir = glip_hf.export_to_clip(model, tmp_path / "clip")
    tokenizer.save_pretrained(clip_dir)
    processor.save_pretrained(clip_dir)
    assert json.loads((clip_dir / "config.json").read_text())["model_type"] == "clip"
    ours = evaluate_model(args_for(saved_model_dir, eval_dataset))["metrics"]
    theirs = evaluate_model(args_for(clip_dir, eval_dataset))["metrics"]
    assert ours == pytest.approx(theirs)


def broken_classification_dataset(path: Path) -> str:
    names = ["a", "b"]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names), "text_label": datasets.Value("int64")}
    )
    images = [{"bytes": png_bytes(i, IMAGE_SIZE), "path": None} for i in range(6)]
    images += [{"bytes": b"garbage", "path": None}, {"bytes": b"", "path": None}]
    rows = {"image": images, "label": [0, 1] * 4, "text_label": [0, 1] * 4}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(path))
    return str(path)


def test_undecodable_images_are_counted(saved_model_dir, tmp_path):
    dataset = broken_classification_dataset(tmp_path / "broken")
    result = evaluate_model(args_for(saved_model_dir, dataset))
    assert result["num_samples"] == 6 and result["num_skipped"] == 2 and result["num_classes"] == 2


def test_bad_input_errors_name_what_is_missing(saved_model_dir, eval_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"--image_column 'picture' .* has \['image', 'caption', 'captions'"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, image_column="picture"))
    with pytest.raises(ValueError, match=r"--label_column 'class'"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, label_column="class"))
    with pytest.raises(ValueError, match=r"--caption_column 'texts'"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, task="retrieval", caption_column="texts"))
    dataset = broken_classification_dataset(tmp_path / "broken")
    with pytest.raises(ValueError, match="--class_names"):
        evaluate_model(args_for(saved_model_dir, dataset, label_column="text_label"))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    result = evaluate_model(args_for(saved_model_dir, dataset, label_column="text_label", class_names=str(names)))
    assert result["num_classes"] == 2
    bad_templates = tmp_path / "templates.txt"
    bad_templates.write_text("a photo\n")
    with pytest.raises(ValueError, match=r"templates.*'\{\}'"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, templates=str(bad_templates)))
    with pytest.raises(ValueError, match="--task"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, task="captioning"))


def test_missing_default_model_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="accelerate launch run_pretraining.py"):
        evaluate_model(EvalArguments())


def test_suite_writes_markdown_and_csv(saved_model_dir, eval_dataset, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"dataset: {eval_dataset}\nbatch_size: 16\nentries:\n  - task: zeroshot_classification\n"
        "  - task: zeroshot_classification\n    mask_ratio: 0.5\n  - task: retrieval\n"
    )
    results = run_suite(EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "t")))
    assert [r["mask_ratio"] for r in results] == [0.0, 0.5, 0.0]
    markdown = (tmp_path / "t.md").read_text().splitlines()
    assert len(markdown) == 2 + 3 and "top1" in markdown[0] and "image_retrieval_recall@1" in markdown[0]
    csv_rows = (tmp_path / "t.csv").read_text().splitlines()
    assert len(csv_rows) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - task: retrieval\n    colour: red\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        run_suite(EvalArguments(model=str(saved_model_dir), suite=str(bad)))


def test_cli_single_process_and_two_processes_agree(saved_model_dir, eval_dataset, tmp_path):
    common = ["--model", str(saved_model_dir), "--dataset", eval_dataset, "--batch_size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "run_eval.py"), *common, "--output", str(tmp_path / "one.json")],
        check=True,
        env=env,
        timeout=300,
    )
    launch_two_processes(ROOT / "run_eval.py", *common, "--output", tmp_path / "two.json", port=29535)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["num_samples"] == two["num_samples"] == 24
    assert one["metrics"] == pytest.approx(two["metrics"], abs=1e-6)
