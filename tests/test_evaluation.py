"""run_eval.py / glip_hf.evaluation: metric definitions by hand, every task on tiny local data, errors, suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import IMAGE_SIZE, launch_two_processes
from datasets_util import png_bytes

import glip_hf
from glip_hf.arguments import EvalArguments, parse_eval_args, parse_run_args
from glip_hf.evaluation import (
    class_names_and_templates,
    encode_images,
    evaluate_model,
    fit_linear_probe,
    label_names,
    labelled_rows,
    load_model_for_eval,
    names_to_ids,
    run_suite,
    summary_line,
    zero_shot_classifier,
)
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
        top2 = row.topk(2).values
        if top2[0] - top2[1] > 1e-4:  # a near tie may flip between the two float32 code paths
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


def test_a_dataset_with_no_decodable_image_is_a_one_line_error_with_the_counts(saved_model_dir, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": b"junk", "path": None}] * 2 + [{"bytes": b"", "path": None}], "label": [0, 1, 0]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "junk"))
    match = r"no images could be encoded: all 3 were skipped \(empty_image 1, undecodable_image 2\); check the "
    match += r"column that holds them \(--image_column\)"
    with pytest.raises(ValueError, match=match):
        evaluate_model(args_for(saved_model_dir, str(tmp_path / "junk")))


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


def partly_labelled_dataset(path: Path) -> str:
    """8 images in a train and a test split: 4 labelled, 2 with None and 2 with -1 (datasets' ClassLabel "no
    label", as in test splits whose labels are withheld); ``raw`` holds an id past 2 classes, ``word`` strings."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b"]),
            "raw": datasets.Value("int64"),
            "word": datasets.Value("string"),
        }
    )
    rows = {
        "image": [{"bytes": png_bytes(i, IMAGE_SIZE), "path": None} for i in range(8)],
        "label": [0, 1, None, -1, 1, 0, -1, None],
        "raw": [0, 1, 0, 5, 1, 0, 1, 0],
        "word": ["a", "b"] * 4,
    }
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path / "partly"))
    labelled = split.select([i for i, label in enumerate(rows["label"]) if label is not None and label >= 0])
    datasets.DatasetDict({"train": labelled, "test": labelled}).save_to_disk(str(path / "labelled"))
    return str(path / "partly"), str(path / "labelled")


def test_rows_without_a_label_are_skipped_and_bad_labels_are_one_line_errors(saved_model_dir, tmp_path):
    partly, labelled = partly_labelled_dataset(tmp_path)
    for task in ("zeroshot_classification", "linear_probe"):  # the probe reads 2 splits, and counts each
        result = evaluate_model(args_for(saved_model_dir, partly, task=task))
        assert result["num_samples"] == 4 and result["skipped"]["missing_label"] == result["num_skipped"] == 4
        if task == "linear_probe":  # its counts sat beside the test split's num_samples, summed over both splits
            by_split = {role: counts["num_skipped"] for role, counts in result["skipped_by_split"].items()}
            assert by_split == {"train (train)": 4, "test (test)": 4}
        assert result["metrics"] == evaluate_model(args_for(saved_model_dir, labelled, task=task))["metrics"]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"--label_column 'raw' holds class id 5, but there are 2 class names"):
        evaluate_model(args_for(saved_model_dir, partly, label_column="raw", class_names=str(names)))


def test_a_label_column_of_class_names_is_read_as_those_classes(saved_model_dir, tmp_path):
    """Labels written as names ("cat", "dog"; a blank or None is no label) evaluate as the same rows with class ids:
    the names come from the column (sorted) or from --class_names, in any order, since ids follow the names."""
    names = ["cat", "dog", "", "dog", None, "cat", "dog", "cat", "dog"]
    rows = {
        "image": [{"bytes": png_bytes(i, IMAGE_SIZE), "path": None} for i in range(len(names))],
        "name": names,
        "id": [{"cat": 0, "dog": 1}.get(name) for name in names],
    }
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    features["id"] = datasets.ClassLabel(names=["cat", "dog"])
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "named"))
    before = sorted(p.name for p in (tmp_path / "named" / "test").iterdir())
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("dog\ncat\n")
    for task in ("zeroshot_classification", "linear_probe"):
        by_id = evaluate_model(args_for(saved_model_dir, str(tmp_path / "named"), task=task, label_column="id"))
        # the probe's fit breaks ties by class id, so its figures move with the ids' order: compared in one order
        for extra in ({}, {"class_names": str(swapped)}) if task == "zeroshot_classification" else ({},):
            by_name = evaluate_model(
                args_for(saved_model_dir, str(tmp_path / "named"), task=task, label_column="name", **extra)
            )
            assert by_name["metrics"] == by_id["metrics"], (task, extra)
            assert by_name["num_samples"] == by_id["num_samples"] == 7
            assert by_name["skipped"]["missing_label"] == by_id["skipped"]["missing_label"] > 0
    assert sorted(p.name for p in (tmp_path / "named" / "test").iterdir()) == before  # no cache file written there
    only_cats = tmp_path / "cats.txt"
    only_cats.write_text("cat\n")
    with pytest.raises(
        ValueError, match=r"^--label_column 'name' holds 1 name\(s\) that are not among the 1 class names \('dog'\)"
    ):
        evaluate_model(
            args_for(saved_model_dir, str(tmp_path / "named"), label_column="name", class_names=str(only_cats))
        )


def test_class_names_are_read_without_the_spaces_around_them(tmp_path):
    """A csv written "img, cat" holds ' cat': the class is cat, and a cell of spaces is no label (not a class)."""
    (tmp_path / "d.csv").write_text("image,label\na.png, cat\nb.png,cat\nc.png,dog \nd.png,  \n")
    split = datasets.load_dataset("csv", data_files=str(tmp_path / "d.csv"), cache_dir=str(tmp_path / "c"))["train"]
    assert label_names([split], "label") == ["cat", "dog"]
    assert names_to_ids(split, "label", ["dog", "cat"])["label"] == [1, 1, 0, None]


def test_a_class_name_listed_twice_is_a_one_line_error_for_a_column_of_names(tmp_path):
    """--class_names naming a class twice cannot map a label column of names to ids: the error names the flag and
    the name (it was datasets' ClassLabel error, which names neither)."""
    (tmp_path / "d.csv").write_text("image,label\na.png,cat\nb.png,dog\n")
    split = datasets.load_dataset("csv", data_files=str(tmp_path / "d.csv"), cache_dir=str(tmp_path / "c"))["train"]
    with pytest.raises(ValueError, match=r"^--class_names lists 'cat' twice \(entries 1 and 3\); "):
        names_to_ids(split, "label", ["cat", "dog", "cat"])


def test_a_label_column_of_names_and_ids_mixed_is_a_one_line_error_that_says_so(tmp_path):
    """A json column of names and ids mixed (read as Json): the error says so, not that 'cat' is no name."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"label": y}) + "\n" for y in ("cat", 1, "dog")))
    split = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "c"))["train"]
    with pytest.raises(ValueError, match=r"^--label_column 'label' holds class names and ids mixed \('cat' and 1\); "):
        labelled_rows(split, "label")


def test_a_csv_label_column_with_an_empty_cell_is_read_as_class_ids(saved_model_dir, tmp_path):
    """pandas reads a csv column of ids with an empty cell as floats (0.0, 1.0, None): whole floats are class ids,
    the empty cell a missing label, as in the same rows from a json file."""
    images = []
    for i in range(5):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png_bytes(i, IMAGE_SIZE))
    labels = ["0", "1", "", "1", "-1"]
    (tmp_path / "d.csv").write_text("image,label\n" + "".join(f"{p},{y}\n" for p, y in zip(images, labels)))
    ids = [0, 1, None, 1, -1]
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"image": str(p), "label": y}) + "\n" for p, y in zip(images, ids))
    )
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    results = [
        evaluate_model(
            args_for(
                saved_model_dir,
                builder,
                data_files=str(tmp_path / f"d.{suffix}"),
                split="train",
                class_names=str(names),
            )
        )
        for builder, suffix in (("csv", "csv"), ("json", "jsonl"))
    ]
    assert results[0]["num_samples"] == 3 and results[0]["skipped"]["missing_label"] == 2
    assert results[0]["metrics"] == results[1]["metrics"]
    (tmp_path / "half.csv").write_text(f"image,label\n{images[0]},0.5\n")
    with pytest.raises(ValueError, match=r"--label_column 'label' holds 0.5 \(float\), not a class id"):
        evaluate_model(
            args_for(
                saved_model_dir, "csv", data_files=str(tmp_path / "half.csv"), split="train", class_names=str(names)
            )
        )


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
    bad.write_text("entries:\n  - task: retrieval\n    task: zeroshot_classification\n")  # PyYAML kept the later
    with pytest.raises(ValueError, match=r"bad.yaml: key 'task' written twice .*line 3"):
        run_suite(EvalArguments(model=str(saved_model_dir), suite=str(bad)))
    bad.write_text("- task: retrieval\n")  # was an AttributeError traceback
    with pytest.raises(ValueError, match=r"bad.yaml: a suite must be a mapping"):
        run_suite(EvalArguments(model=str(saved_model_dir), suite=str(bad)))


def test_an_empty_split_is_a_one_line_error(saved_model_dir, eval_dataset, tmp_path):
    """A saved split with no rows crashed inside datasets with an IndexError traceback."""
    source = datasets.load_from_disk(eval_dataset)
    datasets.DatasetDict(test=source["test"].select([]), train=source["train"]).save_to_disk(tmp_path / "empty")
    for task in ("zeroshot_classification", "retrieval", "linear_probe"):
        with pytest.raises(ValueError, match=r"split 'test' of .*empty has no rows; pick a split that has"):
            evaluate_model(args_for(saved_model_dir, str(tmp_path / "empty"), task=task))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            'entries:\n  - task: zeroshot_classification\n    mask_ratio: "0.5"\n',
            None,
        ),  # converted, as in a run config
        ("entries:\n  - task: zeroshot_classification\n    batch_size: 1e1\n", None),  # 10
        ("bogus: 1\nentries:\n  - task: zeroshot_classification\n", r"unknown key\(s\) \['bogus'\] at the top level"),
        ("entries:\n  - task: zeroshot_classification\n    batch_size: 0\n", r"entry 1: batch_size=0 is invalid"),
        (
            "entries:\n  - task: retrieval\n  - task: zeroshot_classification\n    max_samples: 0\n",
            r"entry 2: max_samples=0",
        ),
        ("entries:\n  - task: zeroshot_classification\n    seed: 1.5\n", r"seed=1.5 is invalid: expected an integer"),
        ("entries:\n  - zeroshot_classification\n", r"entry 1 is 'zeroshot_classification', not a mapping"),
        ("entries:\n  - task: zeroshot_classification\n    mask_ratio: yes\n", r"mask_ratio=True is invalid"),
        ("entries:\n  - task: retrieval\n    output: o.json\n", r"unknown key\(s\) \['output'\] in entry 1"),
        ("suite: other.yaml\nentries:\n  - task: retrieval\n", r"unknown key\(s\) \['suite'\] .*at the top level"),
    ],
)
def test_suite_entries_are_converted_and_checked_as_flags_are(saved_model_dir, tmp_path, text, message):
    """Suite entries went to EvalArguments as written: strings and 1e1 crashed with a TypeError traceback, a top-level
    typo too, 0 batches failed deep inside, and seed 1.5 was accepted. Now each is converted to its field's type and
    checked before the first entry runs."""
    from glip_hf.arguments import suite_entries

    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    spec = glip_hf.arguments.read_yaml(suite)
    if message is None:
        (entry,) = suite_entries(suite, spec, EvalArguments(model=str(saved_model_dir)))
        assert (entry.mask_ratio, entry.batch_size) in ((0.5, 256), (0.0, 10)), entry
        return
    with pytest.raises(ValueError, match=message) as raised:
        suite_entries(suite, spec, EvalArguments(model=str(saved_model_dir)))
    assert str(suite) in str(raised.value) and "\n" not in str(raised.value)


def test_a_suite_output_with_a_dot_in_its_name_keeps_it(saved_model_dir, eval_dataset, tmp_path):
    """--output mask0.5 wrote mask0.md / .csv / .json, replacing a user's mask0.md (and mask0.75's results)."""
    (tmp_path / "mask0.md").write_text("my notes\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"dataset: {eval_dataset}\nentries:\n  - task: zeroshot_classification\n")
    run_suite(EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "mask0.5")))
    assert (tmp_path / "mask0.md").read_text() == "my notes\n"
    assert {p.name for p in tmp_path.glob("mask0.5.*")} == {"mask0.5.md", "mask0.5.csv", "mask0.5.json"}
    run_suite(EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "named.json")))
    assert {p.name for p in tmp_path.glob("named.*")} == {"named.md", "named.csv", "named.json"}
    (tmp_path / "folder").mkdir()  # a suite's --output names its files' base, even where a folder has that name
    run_suite(EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "folder")))
    assert {p.name for p in tmp_path.glob("folder.*")} == {"folder.md", "folder.csv", "folder.json"}


def test_an_image_column_list_reads_each_row_from_the_column_it_has(saved_model_dir, eval_dataset, tmp_path):
    """--image_column jpg,png, as training takes it (webdataset shards of jpg and png samples), failed in
    select_columns with a traceback; now each row's image comes from the first of the columns it has."""
    test = datasets.load_from_disk(eval_dataset)["test"].cast_column("image", datasets.Image(decode=False))
    images = test["image"]
    split = datasets.Dataset.from_dict(
        {
            "jpg": [image if i % 2 else None for i, image in enumerate(images)],
            "png": [None if i % 2 else image for i, image in enumerate(images)],
            "label": test["label"],
        },
        features=datasets.Features(jpg=datasets.Image(), png=datasets.Image(), label=test.features["label"]),
    )
    datasets.DatasetDict(test=split).save_to_disk(tmp_path / "two_columns")
    both = evaluate_model(args_for(saved_model_dir, str(tmp_path / "two_columns"), image_column="jpg,png"))
    spaced = parse_eval_args(["--model", str(saved_model_dir), "--image_column", "jpg, png"])  # " png": no column
    assert spaced.image_column == "jpg,png"
    flags = ["--config", str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")]
    flags += ["--image_column", " jpg , png"]
    assert parse_run_args(flags)[1].image_column == "jpg,png"
    reference = evaluate_model(args_for(saved_model_dir, eval_dataset))
    assert both["num_samples"] == len(images) and both["num_skipped"] == 0
    assert both["metrics"] == reference["metrics"]


def test_a_suite_replaces_its_own_outputs_but_no_other_file(saved_model_dir, eval_dataset, tmp_path):
    """--output notes overwrote a user's notes.md with the table; a suite's own files are still replaced on a rerun."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"dataset: {eval_dataset}\nentries:\n  - task: zeroshot_classification\n")
    args = EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "run"))
    run_suite(args)
    run_suite(args)  # its own .md, .csv and .json: replaced
    for suffix in (".md", ".csv", ".json"):
        (tmp_path / f"notes{suffix}").write_text("mine\n")
        with pytest.raises(FileExistsError, match=rf"^--output .*notes: .*notes\{suffix} exists and is not a table"):
            run_suite(EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "notes")))
        assert (tmp_path / f"notes{suffix}").read_text() == "mine\n"
        (tmp_path / f"notes{suffix}").unlink()
    (tmp_path / "notes.json").write_text("[]")  # no suite writes an empty list; an outside pass saw it replaced
    (tmp_path / "notes.md").symlink_to(tmp_path / "elsewhere.md")  # dangling: the table would have made its target
    for name in ("notes.json", "notes.md"):
        with pytest.raises(FileExistsError, match=rf"{name} exists and is not a table"):
            run_suite(EvalArguments(model=str(saved_model_dir), suite=str(suite), output=str(tmp_path / "notes")))
        (tmp_path / name).unlink()
    assert not (tmp_path / "elsewhere.md").exists()


def test_cli_single_process_and_two_processes_agree(saved_model_dir, eval_dataset, tmp_path):
    # Masked inference: images and texts sharded, and masks seeded per batch, not per process.
    common = ["--model", str(saved_model_dir), "--dataset", eval_dataset, "--batch_size", "5"]
    common += ["--mask_ratio", "0.5", "--mask_draws", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "run_eval.py"), *common, "--output", str(tmp_path / "one.json")],
        check=True,
        env=env,
        timeout=300,
    )
    # --cpu true: without it, Accelerate on a GPU-less machine joins neither process and the launch is refused.
    printed = launch_two_processes(
        ROOT / "run_eval.py", *common, "--cpu", "true", "--output", tmp_path / "two.json", port=29535
    )
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    # one summary line and one writer of --output (every process used to print it and write the same file)
    assert printed.splitlines().count(summary_line(two)) == 1
    assert one["num_samples"] == two["num_samples"] == 24
    # Sharding changes float32 batch composition, which can flip a near-tied image: allow one image, no more.
    assert one["metrics"] == pytest.approx(two["metrics"], abs=1 / 24 + 1e-9)
    for draw_one, draw_two in zip(one["metrics_per_draw"], two["metrics_per_draw"]):
        assert draw_one == pytest.approx(draw_two, abs=1 / 24 + 1e-9)


# ------------------------------------------------------------------------------- correctness regressions (issue 7)


def _recorded_masks(monkeypatch) -> list:
    from glip_hf import modeling_glip

    draws, original = [], modeling_glip.keep_indices_from_offset

    def recording(*args, **kwargs):
        keep = original(*args, **kwargs)
        draws.append(keep.clone())
        return keep

    monkeypatch.setattr(modeling_glip, "keep_indices_from_offset", recording)
    return draws


def test_masked_inference_is_seeded_and_reports_the_spread_over_draws(saved_model_dir, eval_dataset, monkeypatch):
    draws = _recorded_masks(monkeypatch)
    loaded = load_model_for_eval(str(saved_model_dir))
    first = evaluate_model(
        args_for(saved_model_dir, eval_dataset, mask_ratio=0.5, mask_draws=3), Accelerator(), loaded
    )
    first_draws = list(draws)
    draws.clear()
    torch.rand(100)  # other users of the global RNG must not change the masks
    again = evaluate_model(
        args_for(saved_model_dir, eval_dataset, mask_ratio=0.5, mask_draws=3), Accelerator(), loaded
    )
    assert len(draws) == len(first_draws) and all(torch.equal(a, b) for a, b in zip(draws, first_draws))
    assert again["metrics"] == first["metrics"] and again["metrics_std"] == first["metrics_std"]
    assert first["mask_draws"] == 3 and first["seed"] == 0 and set(first["metrics_std"]) == set(first["metrics"])
    assert first["mask_sigma"] == loaded[0].config.vision_config.mask_sigma  # recorded: the card tells sigmas apart
    per_draw = len(first_draws) // 3  # image batches of one draw
    assert not torch.equal(first_draws[0], first_draws[per_draw]), "every draw used the same masks"
    draws.clear()
    evaluate_model(
        args_for(saved_model_dir, eval_dataset, mask_ratio=0.5, mask_draws=1, seed=1), Accelerator(), loaded
    )
    assert not torch.equal(draws[0], first_draws[0]), "--seed does not reach the masks"


def test_unmasked_evaluation_runs_once_and_reports_no_spread(saved_model_dir, eval_dataset):
    result = evaluate_model(args_for(saved_model_dir, eval_dataset, mask_draws=5))
    assert result["mask_draws"] == 1 and "metrics_std" not in result and result["mask_sigma"] is None


def test_zero_and_other_falsy_mask_values_are_rejected_not_replaced(saved_model_dir, eval_dataset, model):
    with pytest.raises(ValueError, match="mask_sigma"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, mask_ratio=0.5, mask_sigma=0.0))
    with pytest.raises(ValueError, match="mask_strategy"):
        evaluate_model(args_for(saved_model_dir, eval_dataset, mask_ratio=0.5, mask_strategy=""))
    from glip_hf import masked_inference

    with pytest.raises(ValueError, match="mask_sigma"), masked_inference(model, 0.5, mask_sigma=0.0):
        pass


def _hard_probe_problem(n: int, seed: int):
    """Two classes told apart along a low-variance direction, hidden by a correlated high-variance one, at a tiny
    feature scale."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    shared = torch.randn(n, generator=generator) * 5.0
    signal = (labels.float() * 2 - 1) * 0.6 + torch.randn(n, generator=generator) * 0.25
    features = torch.stack([shared + signal, shared - signal, torch.randn(n, generator=generator)], dim=1)
    features[:, 0] += labels.float() * -0.5  # the class means point the wrong way along the first axis
    return features * 1e-3, labels


def test_linear_probe_finds_a_low_variance_direction_at_any_feature_scale():
    """The probe whitens the features, so the scale of a direction does not decide how hard C must be pushed to
    use it (the unwhitened probe needed C > 100 here and scored 0.5 below that)."""
    train, test = _hard_probe_problem(400, 0), _hard_probe_problem(400, 1)
    for scale in (1e-3, 1.0, 1e3):
        metrics, _ = fit_linear_probe(train[0] * scale, train[1], test[0] * scale, test[1], 2)
        assert metrics["top1"] > 0.95, (scale, metrics)


@pytest.mark.filterwarnings("error")  # its fits at C down to 1e-9 stalled short of their tolerance, with a warning
def test_linear_probe_extends_its_search_past_the_grid_edge():
    """Labels that are noise: every small C predicts the majority class alike, the smallest C wins the tie, and the
    search extends down a decade at a time to its limit."""
    from glip_hf import linear_probe

    generator = torch.Generator().manual_seed(0)
    x, labels = torch.randn(300, 4, generator=generator), torch.randint(0, 3, (300,), generator=generator)
    _, chosen = fit_linear_probe(x[:200], labels[:200], x[200:], labels[200:], 3)
    assert chosen["C"] <= 10.0 ** linear_probe.LOG10_C_LIMITS[0]  # then refined below it


def test_linear_probe_of_constant_features_is_a_bias_only_probe():
    """Every axis is dropped by the whitening; the fit crashed on the empty weight (scikit-learn fit it)."""
    x, labels = torch.full((60, 8), 0.1), torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    metrics, _ = fit_linear_probe(x, labels, x[:20], labels[:20], 3)
    assert metrics["top1"] == 1.0  # the majority class, which the first 20 rows are


def test_linear_probe_refuses_features_that_are_not_finite():
    """NaN training rows failed in eigh with a message about conditioning; NaN test rows were scored as class 0."""
    generator = torch.Generator().manual_seed(0)
    x, labels = torch.randn(90, 4, generator=generator), torch.arange(90) % 3
    bad = x.clone()
    bad[65, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^the linear probe's test features hold NaN or inf in 1 of 30 rows"):
        fit_linear_probe(x[:60], labels[:60], bad[60:], labels[60:], 3)
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^the linear probe's train features hold NaN or inf in 1 of 60 rows"):
        fit_linear_probe(bad[:60], labels[:60], x[60:], labels[60:], 3)


def _ill_conditioned_features(n: int, seed: int, classes: int = 8, dim: int = 32):
    """L2-normalised features whose principal variances fall over 16 decades, as a contrastive model's do."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    scales = 10.0 ** (-torch.arange(dim) / 4.0)
    latent = (means[labels] + 2.0 * torch.randn(n, dim, generator=generator)) * scales
    return F.normalize(latent + 3.0 * scales[0] / dim, dim=-1), labels


@pytest.mark.filterwarnings("error")  # a fit that stops short of its tolerance warns
def test_linear_probe_is_the_same_under_float_rounding():
    """Features perturbed at float32 rounding (1e-7 of their size, as other threads or another CPU give) choose the
    same C and score the same. The probe before fit raw float32 features with scikit-learn's L-BFGS, which stopped
    far from the optimum: it went from C=1e4, top-1 0.632 to C=1e3, top-1 0.592 here (converged: 0.705)."""
    train, test = _ill_conditioned_features(800, 0), _ill_conditioned_features(400, 1)
    reference = fit_linear_probe(*train, *test, 8)
    generator = torch.Generator().manual_seed(5)

    def perturbed(x: torch.Tensor) -> torch.Tensor:
        return (x.double() * (1 + 1e-7 * torch.randn(x.shape, generator=generator, dtype=torch.float64))).float()

    for _ in range(2):
        assert fit_linear_probe(perturbed(train[0]), train[1], perturbed(test[0]), test[1], 8) == reference
    assert reference[0]["top1"] > 0.68, reference


def test_a_linear_probe_with_training_rows_of_one_class_is_a_one_line_error():
    """It was scikit-learn's 'This solver needs samples of at least 2 classes', naming no split and no fix."""
    x, test = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), (torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^--train_split: .* 2 or more classes; every usable one is class 0\."):
        fit_linear_probe(x, torch.zeros(10, dtype=torch.long), *test, 2)
    labels = torch.tensor([0] * 9 + [1])  # the one row of class 1 (row 9) lands in the validation rows at seed 4
    with pytest.raises(ValueError, match=r"^--linear_probe_val_fraction 0.5 leaves training rows of one class"):
        fit_linear_probe(x, labels, *test, 2, val_fraction=0.5, seed=4)


def test_linear_probe_reports_the_chosen_c(saved_model_dir, eval_dataset):
    result = evaluate_model(args_for(saved_model_dir, eval_dataset, task="linear_probe"))
    assert result["C"] > 0 and 0.0 <= result["val_top1"] <= 1.0
    assert "C_per_draw" not in result
    masked = evaluate_model(args_for(saved_model_dir, eval_dataset, task="linear_probe", mask_ratio=0.5, mask_draws=2))
    assert len(masked["C_per_draw"]) == len(masked["val_top1_per_draw"]) == 2  # draw 0's alone were reported
    assert masked["C"] == masked["C_per_draw"][0]


def test_retrieval_counts_and_warns_about_duplicate_captions(saved_model_dir, eval_dataset):
    with pytest.warns(UserWarning, match="tie"):
        result = evaluate_model(args_for(saved_model_dir, eval_dataset, task="retrieval"))
    test = datasets.load_from_disk(eval_dataset)["test"]
    owners: dict[str, set] = {}
    for image, captions in enumerate(test["captions"]):
        for caption in captions:
            owners.setdefault(caption, set()).add(image)
    shared = sum(1 for captions in test["captions"] for caption in captions if len(owners[caption]) > 1)
    assert shared > 0 and result["num_duplicate_captions"] == shared
    assert result["num_texts"] == sum(len(c) for c in test["captions"])


def test_captions_that_differ_only_in_case_or_spacing_count_as_shared(tokenizer):
    from glip_hf.evaluation import count_shared_captions

    texts = ["A red circle.", "a red circle.", "a  red   circle. ", "a blue star", "a blue star"]
    assert count_shared_captions(tokenizer, texts, [0, 1, 2, 3, 3], max_length=32) == 3  # the star: one image


def test_evaluating_a_model_without_tokenizer_is_a_one_line_error(saved_model_dir, tmp_path):
    model, _, _ = load_model_for_eval(str(saved_model_dir))
    export = glip_hf.export_to_clip(model, tmp_path / "no-tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no-tokenizer has no tokenizer.*save_pretrained"):
        load_model_for_eval(str(export))


def test_evaluating_a_model_whose_pooling_token_is_not_the_tokenizers_eos_is_an_error(saved_model_dir, tmp_path):
    model, tokenizer, _ = load_model_for_eval(str(saved_model_dir))
    model.config.text_config.eos_token_id = 2  # legacy argmax pooling, but this tokenizer's eos is not the max id
    model.save_pretrained(tmp_path / "legacy")
    tokenizer.save_pretrained(tmp_path / "legacy")
    with pytest.raises(ValueError, match="eos_token_id"):
        load_model_for_eval(str(tmp_path / "legacy"))


def test_a_tokenizer_larger_than_the_text_towers_vocabulary_is_a_one_line_error(saved_model_dir, tmp_path):
    """Ids past the embedding crashed retrieval with an IndexError and gave zero-shot results of other tokens."""
    model, tokenizer, _ = load_model_for_eval(str(saved_model_dir))
    tokenizer.add_tokens([f"newword{i}" for i in range(model.config.text_config.vocab_size - len(tokenizer) + 1)])
    model.save_pretrained(tmp_path / "big")
    tokenizer.save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"its tokenizer emits ids up to \d+ but its text tower embeds only \d+"):
        load_model_for_eval(str(tmp_path / "big"))


def test_prompts_longer_than_the_text_context_are_truncated(saved_model_dir):
    model, tokenizer, _ = load_model_for_eval(str(saved_model_dir))
    tokenizer.model_max_length = 1000  # a tokenizer that allows more than the model's 32 positions
    template = "a photo of a " + "very " * 60 + "{}."
    classifier = zero_shot_classifier(model, tokenizer, ["red circle", "blue star"], [template], 4, Accelerator())
    assert classifier.shape == (2, 16) and torch.isfinite(classifier).all()


def test_a_left_padding_tokenizer_is_padded_on_the_right(saved_model_dir, tmp_path):
    import shutil

    from glip_hf.evaluation import encode_texts

    left = tmp_path / "left"
    shutil.copytree(saved_model_dir, left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    model, tokenizer, _ = load_model_for_eval(str(left))
    alone = encode_texts(model, tokenizer, ["a red star"], 8, Accelerator())
    batched = encode_texts(
        model, tokenizer, ["a red star", "there is a small blue circle in the picture"], 8, Accelerator()
    )
    # The same text, batched with a longer one (so padded), keeps its embedding.
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_list_files_are_stripped_and_a_gap_in_class_names_is_an_error(tmp_path):
    from glip_hf.evaluation import read_list_file

    def write(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    assert read_list_file(write("a.txt", "cat\n  dog  \n\n"), "class_names") == ["cat", "dog"]
    assert read_list_file(write("a.json", '[" cat", "dog "]'), "class_names") == ["cat", "dog"]
    gap = write("gap.txt", "cat\n\ndog\n")  # dropping the blank would make dog class 1, not 2
    with pytest.raises(ValueError, match=r"^--class_names .*gap.txt: line 2 is blank, and a name's position"):
        read_list_file(gap, "class_names")
    assert read_list_file(gap, "templates") == ["cat", "dog"]  # no ids: left out
    with pytest.raises(ValueError, match=r"^--class_names .*gap.json: entry 1 is blank"):
        read_list_file(write("gap.json", '["", "dog"]'), "class_names")
    with pytest.raises(ValueError, match=r"is not valid JSON .*; write a JSON list of strings"):
        read_list_file(write("broken.json", '["cat", '), "class_names")
    for text in ('["cat", 3]', '{"cat": 0}'):
        with pytest.raises(ValueError, match=r"must hold a JSON list of strings"):
            read_list_file(write("bad.json", text), "class_names")
    with pytest.raises(ValueError, match="lists nothing"):
        read_list_file(write("empty.json", '["", " "]'), "templates")


@pytest.mark.parametrize("template", ["a {} in {style}.", "a {} and a {}.", "a {0} photo.", "a {} photo }", "{{}}"])
def test_a_template_with_other_format_fields_is_a_one_line_error(template, tmp_path):
    """Exactly one '{}' per template: other fields were a KeyError / IndexError traceback after the model loaded, and
    an escaped '{{}}' made a prompt without the class name."""
    labelled = datasets.Dataset.from_dict(
        {"label": [0]}, features=datasets.Features({"label": datasets.ClassLabel(names=["cat"])})
    )
    file = tmp_path / "templates.txt"
    file.write_text(f"a photo of a {{}}.\n{template}\n")
    with pytest.raises(ValueError, match=r"^--templates: .* must hold exactly one '\{\}' for the class name"):
        class_names_and_templates(EvalArguments(dataset="local", templates=str(file)), labelled)
    file.write_text("a {} with {{braces}}.\n")
    names, templates = class_names_and_templates(EvalArguments(dataset="local", templates=str(file)), labelled)
    assert [t.format(n) for t in templates for n in names] == ["a cat with {braces}."]


def test_list_files_read_without_a_byte_order_mark(tmp_path):
    """A file saved with a UTF-8 byte order mark (Windows editors) and CRLF line ends: the mark is no part of the
    first class name (it made the prompt 'a photo of a \\ufeffcat.') and a .json file is read, not refused; a file in
    another encoding is a one-line error (it was a UnicodeDecodeError traceback)."""
    from glip_hf.evaluation import read_list_file

    (tmp_path / "names.txt").write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\n\r\n")
    (tmp_path / "names.json").write_bytes(b'\xef\xbb\xbf["cat", "dog"]')
    for name in ("names.txt", "names.json"):
        assert read_list_file(str(tmp_path / name), "class_names") == ["cat", "dog"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"^--class_names .*latin1.txt is not UTF-8 text .*; save it as UTF-8"):
        read_list_file(str(tmp_path / "latin1.txt"), "class_names")


def test_retrieval_does_not_move_with_the_batch_size(saved_model_dir, eval_dataset):
    """A caption shared by several images was encoded in different batches, padded to other lengths: its features
    differed in the last bits, the ties broke by float noise and recall moved with --batch_size (unmasked)."""
    results = []
    for batch_size in (1, 2, 5, 64):
        with pytest.warns(UserWarning, match="tie"):
            result = evaluate_model(
                EvalArguments(
                    model=str(saved_model_dir), dataset=eval_dataset, task="retrieval", batch_size=batch_size
                )
            )
        results.append(result["metrics"])
    assert all(r == results[0] for r in results), results


def test_texts_that_tokenize_alike_get_identical_features(saved_model_dir):
    from glip_hf.evaluation import encode_texts

    model, tokenizer, _ = load_model_for_eval(str(saved_model_dir))
    texts = ["a red circle.", "a large blue square in the top left corner of it", "a red circle.", "A red circle."]
    for batch_size in (1, 2, 3):
        features = encode_texts(model, tokenizer, texts, batch_size, Accelerator(cpu=True))
        assert features.shape == (4, model.config.projection_dim)
        assert torch.equal(features[0], features[2])
        if tokenizer(texts[0])["input_ids"] == tokenizer(texts[3])["input_ids"]:
            assert torch.equal(features[0], features[3])
    alone = encode_texts(model, tokenizer, texts[1:2], 1, Accelerator(cpu=True))
    torch.testing.assert_close(features[1], alone[0], atol=1e-5, rtol=1e-5)
