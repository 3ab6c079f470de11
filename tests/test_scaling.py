"""Scaling out on CPU with gloo: two processes on one node (DDP), two "nodes" on 127.0.0.1, and FSDP.

Every run here is the real ``accelerate launch ... run_pretraining.py`` with the shipped configs in
``configs/accelerate/``, two processes, the tiny model, 4 steps with a checkpoint every 2. The one-node DDP run is the
reference the others are held to. FSDP runs through ``tests/fsdp_on_cpu.py``, which lifts Accelerate's GPU-only gate
for FSDP and changes nothing else.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import TINY_RUN, launch_two_processes
from safetensors.torch import load_file

from glip_hf import GLIPModel
from glip_hf.launch import check_launch

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
FLAGS = [*TINY_RUN, "--max_steps", "4", "--save_steps", "2", "--cpu", "true"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two gloo processes on one node: 4 steps, checkpoints at 2 and 4, the model saved and evaluated."""
    tmp = tmp_path_factory.mktemp("ddp")
    out, cache = tmp / "out", tmp_path_factory.getbasetemp() / "scaling-cache"
    launch_two_processes(
        ROOT / "run_pretraining.py", *FLAGS, "--output_dir", out, "--cache_dir", cache, port=29541, cwd=tmp
    )
    return out


def test_two_gloo_processes_train_checkpoint_and_save(ddp_run):
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    summary = json.loads((ddp_run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    GLIPModel.from_pretrained(ddp_run)


def test_two_nodes_train_as_one_node_with_two_processes(ddp_run, tmp_path):
    """``accelerate launch --num_machines 2 --machine_rank 0|1`` with configs/accelerate/multi_node.yaml, one process
    per "node" on 127.0.0.1: the same global batches as one node with two processes, so the same losses and, bit for
    bit, the same weights; one set of checkpoints and one model."""
    out = tmp_path / "out"
    cache = ddp_run.parent.parent / "scaling-cache"
    nodes = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        command += ["--config_file", ACCELERATE_CONFIGS / "multi_node.yaml", "--num_processes", "2"]
        command += ["--machine_rank", str(rank), "--main_process_port", "29542", "--mixed_precision", "no"]
        command += [ROOT / "run_pretraining.py", *FLAGS, "--output_dir", out, "--cache_dir", cache]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes.append(
            subprocess.Popen(list(map(str, command)), env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        )
    printed = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0]
    assert ["Saved the model" in text for text in printed] == [True, False]  # node 1 holds no main process
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-4").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert losses(out) == losses(ddp_run)
    reference = load_file(ddp_run / "model.safetensors")
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(tensor, reference[name]), name


def test_fsdp_trains_checkpoints_resumes_and_saves_a_full_model(ddp_run, tmp_path):
    """FULL_SHARD (configs/accelerate/fsdp_full_shard.yaml, FSDP2): 4 steps with sharded checkpoints at 2 and 4, a
    full model saved and evaluated; then checkpoint-2 resumed under SHARD_GRAD_OP ends with the same weights, bit for
    bit. The FSDP run follows the DDP run to float32 rounding (same data, masks and temperature handling)."""
    script, cache = Path(__file__).parent / "fsdp_on_cpu.py", ddp_run.parent.parent / "scaling-cache"
    full = tmp_path / "full"
    launch_two_processes(
        script,
        *FLAGS,
        *("--output_dir", full, "--cache_dir", cache),
        port=29543,
        cwd=tmp_path,
        config_file=ACCELERATE_CONFIGS / "fsdp_full_shard.yaml",
    )
    checkpoint = full / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded
    model = GLIPModel.from_pretrained(full)  # a plain full checkpoint, CLIP's shapes
    assert model.logit_scale.shape == () and model.get_input_embeddings().weight.shape[0] > 515
    assert json.loads((full / "train_summary.json").read_text())["held_out_zero_shot"]["num_samples"] == 36

    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / "checkpoint-2")
    printed = launch_two_processes(
        script,
        *FLAGS,
        *("--output_dir", resumed, "--cache_dir", cache, "--resume_from_checkpoint", "latest"),
        *("--eval_at_end", "false", "--weight_decay", "0.123"),  # the checkpoint's value wins (same weights below)
        port=29544,
        cwd=tmp_path,
        config_file=ACCELERATE_CONFIGS / "fsdp_shard_grad_op.yaml",
    )
    assert printed.count("keeps its optimizer state and base learning rates: weight_decay=") == 1  # main process only
    weights, reference = load_file(full / "model.safetensors"), load_file(ddp_run / "model.safetensors")
    for name, tensor in load_file(resumed / "model.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
    # Against DDP: float32 sums in another order (reduce-scatter vs all-reduce) move weights by ~1e-6 after 4 steps of
    # lr 2e-3; an update that went wrong moves them by the order of the learning rate.
    assert losses(full) == pytest.approx(losses(ddp_run), rel=1e-5)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=2e-5, msg=name)


def test_an_fsdp_config_on_cpus_is_refused_not_run_as_plain_data_parallel(monkeypatch):
    """Accelerate 1.15 runs plain DDP when an FSDP config meets ``--cpu``: the run stops with one line instead."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # its setup asks for a GPU before the state is built
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    try:
        with pytest.raises(ValueError, match="asks for FSDP but Accelerate runs NO"):
            check_launch(Accelerator(cpu=True))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_full_state_dict_of_a_compiled_model_has_the_model_names(tmp_path):
    """``--torch_compile``: Accelerate unwraps DDP but keeps the compiled wrapper, whose state dict names start with
    ``_orig_mod.``; the saved model must keep the model's own names, or ``from_pretrained`` starts from random
    weights."""
    from conftest import tiny_config

    from glip_hf.sharding import full_state_dict

    model = GLIPModel(tiny_config())
    accelerator = Accelerator(cpu=True)
    try:
        prepared = accelerator.prepare(torch.compile(model))  # compilation is lazy: nothing runs here
        state = full_state_dict(accelerator, prepared)
        assert state.keys() == model.state_dict().keys()
        accelerator.unwrap_model(prepared).save_pretrained(tmp_path, state_dict=state)
        loaded = GLIPModel.from_pretrained(tmp_path)
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_checkpoint_resumes_only_under_the_sharding_it_was_written_with(tmp_path):
    """An FSDP checkpoint holds model shards (``pytorch_model_fsdp_0/``), a DDP one ``model.safetensors``: crossing
    over is a one-line error naming the checkpoint, not a failure deep inside ``load_state``."""
    from glip_hf.checkpointing import check_resume

    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    (sharded / "pytorch_model_fsdp_0").mkdir(parents=True)
    whole.mkdir()
    (whole / "model.safetensors").touch()
    check_resume(sharded, {}, 2, fsdp=True)
    check_resume(whole, {}, 2, fsdp=False)
    with pytest.raises(ValueError, match=r"sharded was written with FSDP and this run is launched without it"):
        check_resume(sharded, {}, 2, fsdp=False)
    with pytest.raises(ValueError, match=r"whole was written without FSDP and this run is launched with it"):
        check_resume(whole, {}, 2, fsdp=True)


def test_end_processes_destroys_the_process_group():
    """run_eval.py ends with `end_processes` (training with ``end_training``): a gloo group left to the interpreter's
    teardown aborted a process of a two-process ``accelerate launch run_eval.py`` now and then (exit status 1)."""
    import torch.distributed as dist

    from glip_hf.launch import end_processes

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29546", rank=0, world_size=1)
    try:
        end_processes()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)


def test_siglip_under_fsdp_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    """Accelerate's FSDP2 maps every optimizer parameter to a sharded model parameter: SigLIP's bias, a parameter of
    the loss, made `prepare` raise a KeyError traceback on every rank (found by an outside audit). Refused first."""
    import glip_hf.training
    from glip_hf.arguments import parse_run_args

    monkeypatch.setattr(glip_hf.training, "uses_fsdp", lambda accelerator: True)
    argv = [*TINY_RUN, "--loss", "siglip", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path)]
    try:
        with pytest.raises(ValueError, match=r"loss='siglip' under FSDP is not supported: .* pass --loss clip"):
            glip_hf.training.train(*parse_run_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "out").exists()
