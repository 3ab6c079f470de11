"""Reliability promises, each proven against the real script: stop signals, SIGKILL and resume (bit-exact), a kill in
the middle of a checkpoint, non-finite steps, and earlier runs that are never overwritten by mistake."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils.other import load as accelerate_load
from conftest import TINY_RUN
from safetensors.torch import load_file

from glip_hf.arguments import parse_run_args
from glip_hf.checkpointing import list_checkpoints, resolve_checkpoint
from glip_hf.cli import RunStopped
from glip_hf.losses import MAX_LOGIT_SCALE
from glip_hf.modeling_glip import GLIPModel
from glip_hf.training import train

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_RUN, "--eval_at_end", "false"]
STEPS = 24  # 5 batches per epoch: the runs cross epochs, and the last 4 steps are unmasked tuning
RUN = [*TINY, "--max_steps", str(STEPS - 4), "--unmasked_tuning_steps", "4", "--save_total_limit", "3"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def start(output_dir: Path, cache: Path, *flags: str) -> subprocess.Popen:
    """``python run_pretraining.py`` in its own session (signals reach it alone), one thread, output captured."""
    command = [sys.executable, "run_pretraining.py", *RUN, "--cache_dir", str(cache), "--output_dir", str(output_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [*command, *flags],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def logged_step(output_dir: Path) -> int:
    """The last step ``metrics.jsonl`` records (complete lines only)."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1] if line.strip()]
    return steps[-1] if steps else 0


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker it started
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    expected, actual = load_file(expected_dir / "model.safetensors"), load_file(actual_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    """The reference: the same run, never interrupted."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, output = finish(start(output_dir, cache, "--save_steps", "100"))
    assert code == 0, output
    return output_dir


# ----------------------------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_checkpoints_the_current_step_and_resume_matches_an_uninterrupted_run(
    tmp_path, cache, uninterrupted, signum
):
    output_dir = tmp_path / "run"
    process = start(output_dir, cache, "--save_steps", "5")
    target = random.randint(5, STEPS - 6)  # after the first checkpoint
    wait_for(lambda: logged_step(output_dir) >= target, process, f"step {target}")
    process.send_signal(signum)
    code, output = finish(process)
    assert code == 128 + signum, output
    stopped = re.search(rf"stopped by {signum.name} after step (\d+): saved (\S+checkpoint-(\d+))", output)
    assert stopped, output
    step = int(stopped.group(1))
    assert stopped.group(3) == str(step) and 5 <= step < STEPS
    assert list_checkpoints(output_dir)[-1].name == f"checkpoint-{step}"  # the step it stopped at, saved
    assert "Traceback" not in output
    assert not (output_dir / "model.safetensors").exists()

    code, output = finish(start(output_dir, cache, "--save_steps", "5", "--resume_from_checkpoint", "latest"))
    assert code == 0, output
    assert f"at step {step}," in output  # "Resumed from .../checkpoint-<step> at step <step>, epoch ..."
    assert_same_weights(uninterrupted, output_dir)
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, across the stop
    print(f"{signum.name} stopped the run after step {step}; resumed, weights bit-identical")


def test_a_stop_signal_to_every_process_of_the_job_spares_the_dataloader_workers(tmp_path, cache):
    """SLURM signals every process of a job step (scancel, preemption, ``--signal`` without ``B:``), DataLoader
    workers too: a worker the signal killed crashed the run (``DataLoader worker ... is killed by signal``) before it
    could checkpoint. The workers leave the signal to the main process, which stops as without workers."""
    output_dir = tmp_path / "run"
    process = start(output_dir, cache, "--save_steps", "100", "--num_workers", "2")
    wait_for(lambda: logged_step(output_dir) >= 3, process, "step 3")
    os.killpg(process.pid, signal.SIGTERM)  # the run and both of its workers, as the scheduler does
    code, output = finish(process)
    assert code == 128 + signal.SIGTERM and "Traceback" not in output, output
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", output).group(1))
    assert list_checkpoints(output_dir)[-1].name == f"checkpoint-{step}"


FORKED_WORKER = """
import os, sys, time
from glip_hf.preemption import spare_worker
worker = os.fork()  # as a DataLoader worker under the fork start method: one thread, whatever its parent ran
if worker == 0:
    spare_worker(0, main_process=int(sys.argv[1]))
    print(os.getpid(), "ready", flush=True)
    time.sleep(60)
    os._exit(3)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]))  # 0: it took the signal and left
"""


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="spare_worker needs sigwaitinfo")
def test_a_spared_worker_ignores_other_senders_but_obeys_the_process_that_iterates_it():
    """A worker's parent need not be the process iterating the loader: a SIGTERM from the process bound as
    ``main_process`` ends the worker (torch's way of ending a stuck one); one from anyone else (the scheduler) does
    not. Here the worker is forked by a middle process, as by a forkserver; this test is the main one. (A worker that
    imports torch afresh, under spawn or forkserver, has threads that do not block the signals: not spared there.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    middle = subprocess.Popen(
        [sys.executable, "-c", FORKED_WORKER, str(os.getpid())], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pid, state = middle.stdout.readline().split()
        assert state == "ready"
        subprocess.run(["kill", "-TERM", pid], check=True)  # another sender: ignored
        time.sleep(0.5)
        assert middle.poll() is None
        os.kill(int(pid), signal.SIGTERM)  # the main process: obeyed
        assert middle.wait(timeout=20) == 0
    finally:
        middle.kill()


def test_sigterm_to_accelerate_launch_stops_every_process_at_the_same_checkpoint(tmp_path, cache):
    """Two gloo processes under ``accelerate launch --multi_gpu``: torch's launcher forwards SIGTERM to both, which
    agree on the step, write one checkpoint together and stop, with one line."""
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", "29539", "run_pretraining.py", *RUN, "--cache_dir", str(cache)]
    command += ["--output_dir", str(output_dir), "--save_steps", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(lambda: list_checkpoints(output_dir), process, "the first checkpoint", poll=0.01)
    process.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler signals the job's main process
    code, output = finish(process)
    assert code != 0, output
    stops = re.findall(r"stopped by (SIGTERM|a stop signal) after step (\d+)", output)
    assert len(stops) == 1, output  # the main process says it for both (each printed it: twice, alike)
    step = int(stops[0][1])
    assert list_checkpoints(output_dir)[-1].name == f"checkpoint-{step}"
    assert sorted(p.name for p in list_checkpoints(output_dir)[-1].glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


# ------------------------------------------------------------------------------------------- kill and resume


def kill_mid_checkpoint(process: subprocess.Popen, output_dir: Path, since: float, timeout: float = 240) -> str:
    """Freeze the run as soon as a temporary checkpoint directory it made (after ``since``) exists; if it is still
    there (the checkpoint is being written), SIGKILL the run, else let it go on and wait for the next one. A leftover
    of an earlier kill (older) does not count. Returns the partial checkpoint's name."""
    root = output_dir / "checkpoints"

    def partial() -> list[str]:
        found = []
        for path in root.glob(".tmp-checkpoint-*") if root.is_dir() else []:
            try:
                if path.stat().st_mtime >= since:
                    found.append(path.name)
            except FileNotFoundError:  # renamed meanwhile
                pass
        return found

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended before a kill mid-checkpoint:\n{process.stdout.read()}")
        if partial():
            os.kill(process.pid, signal.SIGSTOP)
            still = partial()
            if still:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return still[0]
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.0005)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("never caught a checkpoint being written")


def test_sigkill_at_a_random_step_and_mid_checkpoint_then_resume_is_bit_exact(tmp_path, cache, uninterrupted):
    output_dir = tmp_path / "run"
    # 1. SIGKILL at a random step after the first checkpoint (step 3).
    target = random.randint(4, STEPS - 8)
    process = start(output_dir, cache, "--save_steps", "3")
    wait_for(lambda: logged_step(output_dir) >= target, process, f"step {target}")
    process.kill()
    process.wait()
    killed_at = logged_step(output_dir)
    assert not (output_dir / "model.safetensors").exists(), "the run finished before it was killed"
    latest = resolve_checkpoint("latest", output_dir)
    assert 3 <= int(latest.name.split("-")[1]) <= killed_at, (latest, killed_at)

    # 2. Resume, and SIGKILL it while it writes a checkpoint (one per step now).
    since = time.time() - 0.01  # file times may be coarser than the clock
    process = start(output_dir, cache, "--save_steps", "1", "--resume_from_checkpoint", "latest")
    partial = kill_mid_checkpoint(process, output_dir, since)
    partial_step = int(partial.rsplit("-", 1)[1])
    assert (output_dir / "checkpoints" / partial).is_dir()
    latest = resolve_checkpoint("latest", output_dir)
    assert int(latest.name.split("-")[1]) == partial_step - 1, f"latest is not the last complete one ({target=})"
    assert all((c / "progress.json").is_file() for c in list_checkpoints(output_dir))

    # 3. Resume to the end: the same weights, bit for bit, as the run that was never interrupted.
    code, output = finish(start(output_dir, cache, "--save_steps", "5", "--resume_from_checkpoint", "latest"))
    assert code == 0, output
    assert_same_weights(uninterrupted, output_dir)
    assert not list((output_dir / "checkpoints").glob(".tmp-*")), "the partial checkpoint was not cleaned up"
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"killed at {killed_at}, then mid-checkpoint {partial_step}"
    print(f"SIGKILL at step {killed_at} and while writing {partial}: resumed twice, weights bit-identical")


def test_incomplete_checkpoints_are_never_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("checkpoint-4", True), ("checkpoint-8", False), (".tmp-checkpoint-12", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "progress.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-4"
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=latest: no complete checkpoint"):
        resolve_checkpoint("latest", tmp_path / "elsewhere")
    assert resolve_checkpoint("auto", tmp_path / "elsewhere") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint directory"):
        resolve_checkpoint(str(root / "checkpoint-8"), tmp_path)


# ------------------------------------------------------------------------------------------ non-finite steps


def in_process(tmp_path: Path, *flags: str):
    argv = ["--config", str(ROOT / "configs" / "default.yaml"), *RUN, "--cache_dir", str(tmp_path / "cache")]
    return train(*parse_run_args([*argv, "--output_dir", str(tmp_path / "out"), *flags]))


@pytest.fixture
def inject_nan(monkeypatch):
    """``inject_nan(calls, where)``: the listed forward passes (counted from 1) return NaN image features
    (``where="loss"``) or finite features whose gradient is NaN (``where="gradient"``)."""
    forward = GLIPModel.forward

    def install(calls: set[int], where: str = "loss"):
        count = {"n": 0}

        def faulty(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            count["n"] += 1
            if count["n"] in calls and self.training:
                if where == "loss":
                    out.image_embeds = out.image_embeds * float("nan")
                else:
                    out.image_embeds.register_hook(lambda grad: torch.full_like(grad, float("nan")))
            return out

        monkeypatch.setattr(GLIPModel, "forward", faulty)

    return install


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_steps_are_skipped_counted_and_leave_the_model_unchanged(tmp_path, inject_nan, where):
    inject_nan({3, 4}, where)  # steps 3 and 4
    in_process(tmp_path, "--max_steps", "6", "--unmasked_tuning_steps", "0", "--save_steps", "1")
    out = tmp_path / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["nonfinite_steps"] == 2 and summary["steps"] == 6
    weights = {step: load_file(out / "checkpoints" / f"checkpoint-{step}" / "model.safetensors") for step in (4, 5)}
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert [records[s]["nonfinite_steps"] for s in (2, 3, 4, 5)] == [0, 1, 2, 2]
    assert all(finite(t) for t in weights[5].values())
    final = GLIPModel.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in final.parameters())
    assert final.logit_scale.item() <= MAX_LOGIT_SCALE


def finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def test_a_run_that_keeps_diverging_stops_with_its_last_checkpoint_intact(tmp_path, inject_nan):
    inject_nan(set(range(3, 100)))  # every step from step 3 on
    with pytest.raises(RunStopped, match=r"3 consecutive steps had a non-finite loss or gradient") as stopped:
        in_process(tmp_path, "--save_steps", "2", "--max_nonfinite_steps", "3")
    out = tmp_path / "out"
    assert "stopped at step 5" in str(stopped.value) and "checkpoint-4, is intact" in str(stopped.value)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]  # nothing after the stop
    two, four = (load_file(out / "checkpoints" / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4))
    assert all(finite(t) for t in four.values())
    assert all(torch.equal(two[k], four[k]) for k in two), "a non-finite step updated the model"
    assert not (out / "model.safetensors").exists()


def test_model_is_unchanged_by_skipped_steps(tmp_path, inject_nan):
    inject_nan({2, 3}, "loss")
    in_process(
        tmp_path, "--max_steps", "4", "--unmasked_tuning_steps", "0", "--save_steps", "1", "--save_total_limit", "9"
    )
    checkpoints = tmp_path / "out" / "checkpoints"
    one, three = (load_file(checkpoints / f"checkpoint-{s}" / "model.safetensors") for s in (1, 3))
    assert all(torch.equal(one[k], three[k]) for k in one), "a skipped step changed the weights"
    four = load_file(checkpoints / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(three[k], four[k]) for k in one), "the step after the skipped ones made no update"


# ----------------------------------------------------------------------------------- nothing overwritten


def test_an_earlier_run_is_never_overwritten_without_the_flag(tmp_path):
    flags = ["--max_steps", "2", "--unmasked_tuning_steps", "0", "--save_steps", "1", "--save_total_limit", "5"]
    in_process(tmp_path, *flags, "--report_to", "tensorboard")
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    earlier_events = list(out.glob("glip/**/events.out.tfevents.*"))
    assert earlier_events
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(FileExistsError, match=r"output_dir=.*out holds an earlier run .*--overwrite_output_dir true"):
        in_process(tmp_path, *flags)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "a refused run changed files"

    AcceleratorState._reset_state(reset_partial_state=True)
    (out / "notes.txt").write_text("mine")
    in_process(tmp_path, "--max_steps", "1", "--unmasked_tuning_steps", "0", "--overwrite_output_dir", "true")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # the earlier run's 1, 2 were cleared
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not any(p.exists() for p in earlier_events)  # TensorBoard would draw both runs' curves as one
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(NotADirectoryError, match="output_dir=.*is a file"):
        in_process(tmp_path, "--output_dir", str(out / "notes.txt"))


def test_no_pickle_is_loaded_unsafely(tmp_path):
    """Weights are safetensors; the project never calls torch.load without weights_only=True, and its checkpoints
    hold no pickle that Accelerate loads with weights_only=False (its custom_checkpoint files)."""
    offenders = []
    for path in [*ROOT.glob("glip_hf/**/*.py"), *ROOT.glob("*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders
    in_process(tmp_path, "--max_steps", "1", "--unmasked_tuning_steps", "0", "--loss", "siglip")
    checkpoint = list_checkpoints(tmp_path / "out")[-1]
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "model.safetensors" in names and "loss.safetensors" in names
    assert not [n for n in names if n.startswith("custom_checkpoint")], names
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list((tmp_path / "out").glob("*.bin"))
    for name in names:
        if name.endswith((".bin", ".pkl")):  # optimizer, scheduler, RNG: plain tensors and numpy arrays
            accelerate_load(checkpoint / name, weights_only=True)  # what Accelerate's load_state does


def test_a_tokenizer_with_its_own_code_runs_only_with_trust_remote_code(tmp_path, tokenizer):
    from glip_hf.tokenization import load_pretrained_tokenizer

    folder, marker = tmp_path / "custom", tmp_path / "code-ran"
    tokenizer.save_pretrained(folder)
    (folder / "custom_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass Custom(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Custom", auto_map={"AutoTokenizer": [None, "custom_tokenizer.Custom"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"runs code of its own .* --trust_remote_code true"):
        load_pretrained_tokenizer(str(folder))
    assert not marker.exists(), "the folder's code ran without trust_remote_code"
    with pytest.raises(ValueError, match="trust_remote_code"):
        in_process(tmp_path, "--tokenizer_name", str(folder), "--max_steps", "1")
    assert not marker.exists()
    assert type(load_pretrained_tokenizer(str(folder), trust_remote_code=True)).__name__ == "Custom"
    assert marker.exists()


def test_fp16_overflowing_steps_go_through_the_scaler_and_count_as_non_finite():
    """Accelerate has no gradient scaler on the CPU, so the fp16 path is driven here with torch's CPU scaler behind
    Accelerate's optimizer wrapper: two overflowing steps in a row (the second used to fail in `unscale_`), each
    skipped by the scaler, which halves its scale; a NaN loss with finite gradients, skipped too (it used to update);
    then a finite step updates."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    from conftest import tiny_config

    from glip_hf.arguments import TrainingArguments
    from glip_hf.checkpointing import TrainingProgress
    from glip_hf.losses import ContrastiveLoss
    from glip_hf.optimization import Schedule, build_optimizer, build_scheduler
    from glip_hf.training import _Run, _update

    accelerator = Accelerator(cpu=True)
    model, loss_fn = GLIPModel(tiny_config()), ContrastiveLoss("clip")
    args = TrainingArguments(max_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    optimizer = AcceleratedOptimizer(build_optimizer([model, loss_fn], args), device_placement=False, scaler=scaler)
    scheduler = AcceleratedScheduler(
        build_scheduler(optimizer.optimizer, Schedule.of(vars(args), 10)), optimizer, step_with_optimizer=False
    )
    # What Accelerator(mixed_precision="fp16") holds on a GPU: the scaler, and the mode in which clip_grad_norm_
    # unscales the gradients first (as in a real fp16 step).
    accelerator.scaler, accelerator.native_amp, accelerator.state._mixed_precision = scaler, True, "fp16"
    accelerator._optimizers.append(optimizer)
    run = _Run(accelerator, model, model, loss_fn, optimizer, scheduler, None, args, 10, TrainingProgress())
    # Two overflowing steps, a NaN loss with finite gradients (each skipped), then a finite step.
    for loss_value, grad_value in ((1.0, math.inf), (1.0, math.inf), (math.nan, 1e-3)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss = model.logit_scale * loss_value
        scaler.scale(loss).backward()
        for param in model.parameters():
            param.grad = torch.full_like(param, grad_value)
        scale = scaler.get_scale()
        _, nonfinite, stop = _update(run, loss.detach(), False)
        assert nonfinite and not stop
        assert scaler.get_scale() == (scale / 2 if grad_value == math.inf else scale)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a skipped step updated"
    loss = model.logit_scale * 1.0
    scaler.scale(loss).backward()
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e-3)
    _, nonfinite, _ = _update(run, loss.detach(), False)
    assert not nonfinite
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "a finite step made no update"


# ------------------------------------------------------------------------------------- resume, from every side


def test_auto_resumes_or_starts_but_never_replaces_a_finished_run(tmp_path):
    out = tmp_path / "out"
    # Killed before its first checkpoint (a run_config.yaml and a metrics line): auto starts it again.
    out.mkdir()
    (out / "run_config.yaml").write_text("seed: 0\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    flags = ["--max_steps", "2", "--unmasked_tuning_steps", "0", "--save_steps", "1", "--resume_from_checkpoint"]
    in_process(tmp_path, *flags, "auto")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    weights = (out / "model.safetensors").read_bytes()
    AcceleratorState._reset_state(reset_partial_state=True)
    in_process(tmp_path, *flags, "auto")  # finished, with checkpoints: resumes at its last step, nothing to do
    assert (out / "model.safetensors").read_bytes() == weights
    for checkpoint in list_checkpoints(out):
        shutil.rmtree(checkpoint)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(FileExistsError, match=r"auto: output_dir=.* holds a finished run .*--overwrite_output_dir"):
        in_process(tmp_path, *flags, "auto", "--seed", "7")
    assert (out / "model.safetensors").read_bytes() == weights


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    flags = ["--max_steps", "6", "--unmasked_tuning_steps", "0", "--save_total_limit", "3"]
    in_process(tmp_path, *flags, "--save_steps", "2", "--output_dir", str(tmp_path / "reference"))
    out = tmp_path / "out"
    AcceleratorState._reset_state(reset_partial_state=True)
    in_process(tmp_path, *flags, "--save_steps", "2")
    AcceleratorState._reset_state(reset_partial_state=True)
    (out / "model.safetensors").unlink()
    older = out / "checkpoints" / "checkpoint-2"
    in_process(
        tmp_path, *flags, "--save_steps", "1", "--save_total_limit", "2", "--resume_from_checkpoint", str(older)
    )
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    (aside,) = (out / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # set aside, not deleted
    assert_same_weights(tmp_path / "reference", out)  # the same steps again, from step 2


def test_a_checkpoint_resumes_only_with_the_model_it_was_written_for(tmp_path):
    flags = ["--max_steps", "2", "--unmasked_tuning_steps", "0", "--save_steps", "1"]
    with pytest.raises(RunStopped):  # leave a checkpoint behind, as a stopped run does
        in_process(tmp_path, *flags, "--max_nonfinite_steps", "1", "--learning_rate", "1e30")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"was written with vision_hidden_size=32 \(now 64\).*start a new run"):
        in_process(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--vision_hidden_size", "64")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"loss='clip' \(now 'siglip'\)"):
        in_process(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--loss", "siglip")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"torch_compile=False \(now True\)"):  # its weights are named otherwise
        in_process(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--torch_compile", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.warns(UserWarning, match=r"keeps its optimizer state and base learning rates: learning_rate=1e\+30"):
        in_process(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-9")
    # Another batch size or seed places the checkpoint's batch count at other rows of its epoch: said, not silent.
    AcceleratorState._reset_state(reset_partial_state=True)
    moved = r"per_device_train_batch_size=8 \(now 4\): its position, 2 batch\(es\) into epoch 0, .* repeats some rows"
    with pytest.warns(UserWarning, match=moved):
        in_process(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--per_device_train_batch_size", "4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_resume_trains_the_checkpoints_model_whatever_init_from_says_then(tmp_path, dtype):
    """A run from --init_from (a FLIP model: random masking, 75%), requeued without the flag (its path may be gone):
    the resume rebuilt the model from the command line, GLIPConfig's Gaussian 50%, and trained on silently with
    other masks. A checkpoint now holds its model's config and image processor, so a resume trains what it saved,
    to the same weights as the uninterrupted run, and the run still records where it started."""
    flip = tmp_path / "flip"
    in_process(tmp_path, "--max_steps", "1", "--unmasked_tuning_steps", "0", "--output_dir", str(flip / "run"))
    flip_model = GLIPModel.from_pretrained(flip / "run", mask_ratio=0.75, mask_strategy="random")
    flip_model.to(dtype).save_pretrained(flip / "model")  # saved in bf16, it still trains in float32 (autocast's job)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(flip / "run" / name, flip / "model" / name)
    flags = ["--max_steps", "4", "--unmasked_tuning_steps", "0", "--save_steps", "2", "--eval_at_end", "false"]
    AcceleratorState._reset_state(reset_partial_state=True)
    full = in_process(tmp_path, *flags, "--init_from", str(flip / "model"), "--output_dir", str(tmp_path / "full"))
    checkpoint = full.output_dir / "checkpoints" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["vision_config"]["mask_strategy"] == "random"
    # bf16 parameters lost most of a tuning run's small updates (only 4% of the weights moved at lr 1e-5)
    assert {t.dtype for t in load_file(full.output_dir / "model.safetensors").values()} == {torch.float32}
    again = tmp_path / "again"  # requeued with the very same command, --init_from included, once it is gone
    shutil.copytree(checkpoint, again / "checkpoints" / "checkpoint-2")
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / "checkpoint-2")
    shutil.rmtree(flip / "model")  # the initial checkpoint is gone by the time the job is requeued
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.warns(
        UserWarning, match=r"goes on training the model it saved .* init_from=None on this command line"
    ):
        in_process(tmp_path, *flags, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest")
    config = json.loads((resumed_dir / "config.json").read_text())["vision_config"]
    assert (config["mask_ratio"], config["mask_strategy"]) == (0.75, "random")
    kept = [json.loads(line)["kept_tokens"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    full_kept = [
        json.loads(line)["kept_tokens"] for line in (full.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert kept == full_kept[-len(kept) :]
    expected, actual = load_file(full.output_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    assert yaml_load(resumed_dir / "run_config.yaml")["init_from"] == str(flip / "model")
    summary = json.loads((resumed_dir / "train_summary.json").read_text())
    assert summary["init_masking"]["mask_strategy"] == "random"
    AcceleratorState._reset_state(reset_partial_state=True)  # it said the folder did not exist, before any check
    in_process(
        tmp_path,
        *flags,
        "--init_from",
        str(flip / "model"),
        "--output_dir",
        str(again),
        "--resume_from_checkpoint",
        "latest",
    )
    for name, tensor in load_file(again / "model.safetensors").items():
        assert torch.equal(tensor, actual[name]), name


def test_a_training_checkpoint_is_no_init_from(tmp_path):
    """Checkpoints hold config.json now, so --init_from took one: from a compiled run's checkpoint it loaded no weight
    (named _orig_mod.*) and trained a random model; from an FSDP one, a traceback."""
    from glip_hf.training import check_init_from

    flags = ["--max_steps", "1", "--unmasked_tuning_steps", "0", "--save_steps", "1", "--eval_at_end", "false"]
    in_process(tmp_path, *flags)
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    with pytest.raises(ValueError, match=r"is a training checkpoint; pass --resume_from_checkpoint .* or init_from"):
        check_init_from(str(checkpoint))
    check_init_from(str(tmp_path / "out"))  # the run's own model directory is fine


def test_a_checkpoint_without_its_models_config_resumes_only_with_its_init_from(tmp_path):
    """Checkpoints written before they held the model's config are rebuilt from --init_from: a changed one is an
    error, not other masks."""
    flags = ["--max_steps", "2", "--unmasked_tuning_steps", "0", "--save_steps", "1", "--eval_at_end", "false"]
    in_process(tmp_path, *flags)
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    (checkpoint / "config.json").unlink()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"written with init_from=None \(now '.*'\) .* resume without --init_from"):
        in_process(tmp_path, *flags, "--resume_from_checkpoint", "latest", "--init_from", str(tmp_path / "out"))


def yaml_load(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_the_refusal_of_a_run_directory_without_checkpoints_does_not_advise_resuming_it(tmp_path):
    """A run killed before its first checkpoint: the refusal said to pass --resume_from_checkpoint latest, which
    then said there was no checkpoint and to drop the flag: a loop."""
    from glip_hf.checkpointing import plan_start

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError) as refused:
        plan_start(tmp_path, None, overwrite=False)
    message = str(refused.value)
    assert "holds no checkpoint to continue from" in message and "--resume_from_checkpoint" not in message
    assert "--overwrite_output_dir true" in message
    (tmp_path / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-1" / "progress.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest to continue it"):
        plan_start(tmp_path, None, overwrite=False)


def test_a_failed_start_leaves_nothing_that_blocks_the_retry(tmp_path):
    with pytest.raises(ValueError, match="--caption_column 'nope' is not a column"):
        in_process(tmp_path, "--max_steps", "1", "--caption_column", "nope")
    assert not (tmp_path / "out" / "run_config.yaml").exists()
    AcceleratorState._reset_state(reset_partial_state=True)
    in_process(tmp_path, "--max_steps", "1", "--unmasked_tuning_steps", "0")  # the fixed command, same directory
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # A start that wrote its run_config.yaml and tokenizer, then failed in its first batch, does not block either.
    retry = tmp_path / "retry"
    retry.mkdir()
    (retry / "run_config.yaml").write_text("max_text_length: 1\n")
    shutil.copy(tmp_path / "out" / "tokenizer.json", retry / "tokenizer.json")
    AcceleratorState._reset_state(reset_partial_state=True)
    in_process(tmp_path, "--max_steps", "1", "--unmasked_tuning_steps", "0", "--output_dir", str(retry))
    assert (retry / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- --push_to_hub


def test_push_to_hub_checks_the_token_first_and_uploads_each_checkpoint_and_the_end(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    flags = ["--max_steps", "2", "--unmasked_tuning_steps", "0", "--save_steps", "1", "--push_to_hub", "true"]
    flags += ["--hub_model_id", "someone/glip-tiny", "--hub_strategy", "every_save", "--hub_flavour", "clip"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the network calls themselves are faked below
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "empty_hf_home" / "token"))
    with pytest.raises(ValueError, match="needs a token and none is configured"):
        in_process(tmp_path, *flags)
    assert not (tmp_path / "out" / "run_config.yaml").exists(), "the token is checked before anything is written"

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        folder = Path(folder_path)
        config = json.loads((folder / "config.json").read_text())
        uploads.append((repo_id, commit_message, config["model_type"], (folder / "README.md").is_file()))

    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    AcceleratorState._reset_state(reset_partial_state=True)
    in_process(tmp_path, *flags)
    assert uploads == [
        ("someone/glip-tiny", "Checkpoint at step 1", "clip", True),
        ("someone/glip-tiny", "End of training, step 2", "clip", True),  # the last checkpoint's push is this one
    ]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["main_steps"] == 2 and summary["mixed_precision"] == "no"

    def failing_upload(self, **kwargs):
        raise ConnectionError("the network is down")

    monkeypatch.setattr(HfApi, "upload_folder", failing_upload)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.warns(
        UserWarning, match=r"pushing checkpoint at step 1 to someone/glip-tiny failed .*network is down"
    ):
        in_process(tmp_path, *flags, "--output_dir", str(tmp_path / "offline"))
    assert (tmp_path / "offline" / "model.safetensors").is_file()  # the run finished regardless


def test_a_symlinked_checkpoint_resumes_as_the_checkpoint_it_names(tmp_path):
    from glip_hf.checkpointing import plan_start

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "progress.json").write_text("{}")
    (root / "best").symlink_to(root / "checkpoint-4")
    plan = plan_start(tmp_path, str(root / "best"), overwrite=False)
    assert plan.checkpoint == (root / "checkpoint-4").resolve()
    assert [p.name for p in plan.abandoned] == ["checkpoint-6"] and plan.replaced == []


def test_overwrite_changes_nothing_when_the_new_run_fails_its_checks(tmp_path):
    flags = ["--max_steps", "1", "--unmasked_tuning_steps", "0"]
    in_process(tmp_path, *flags)
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="--caption_column 'nope'"):
        in_process(tmp_path, *flags, "--overwrite_output_dir", "true", "--caption_column", "nope")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A check after the tokenizer is resolved: the earlier run's model keeps its own tokenizer beside it.
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=50 exceeds the 5 batches per epoch"):
        overwrite = ["--overwrite_output_dir", "true", "--tokenizer_vocab_size", "700"]
        in_process(tmp_path, *overwrite, "--max_steps", "-1", "--gradient_accumulation_steps", "50")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------ resume under another lr schedule


def lrs(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())}


def files(output_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}


def test_a_longer_or_shorter_masked_stage_resumes_on_the_new_schedule_from_the_first_step(tmp_path):
    """Warmup 3 makes steps 1-4 the same under 4 and 8 masked steps, so a 4-step run extended to 8 must end with
    the weights of the 8-step run, bit for bit: its first resumed update too follows the new schedule (it used the
    restored lr of the old one, which had ended, and logged that lr)."""
    flags = ["--unmasked_tuning_steps", "0", "--warmup_steps", "3", "--save_steps", "1"]
    in_process(tmp_path, *flags, "--max_steps", "8", "--output_dir", str(tmp_path / "reference"))
    AcceleratorState._reset_state(reset_partial_state=True)
    in_process(tmp_path, *flags, "--max_steps", "4")
    out = tmp_path / "out"
    AcceleratorState._reset_state(reset_partial_state=True)
    jump = r"at step 4, at the end of its run .* the learning rate of step 5 goes from none \(it had ended\) to "
    with pytest.warns(UserWarning, match=jump + f"{lrs(tmp_path / 'reference')[5]:.4g}, and the run follows"):
        in_process(tmp_path, *flags, "--max_steps", "8", "--resume_from_checkpoint", "latest")
    assert_same_weights(tmp_path / "reference", out)
    assert lrs(out) == lrs(tmp_path / "reference")

    # Shorter, still in the masked stage: allowed down to the checkpoint's step, not below it.
    before = files(out)
    AcceleratorState._reset_state(reset_partial_state=True)
    older = str(out / "checkpoints" / "checkpoint-6")
    with pytest.raises(ValueError, match=r"at step 6, in its masked stage \(step 6 of 8\); max_steps=5 \(was 8\) "):
        in_process(tmp_path, *flags, "--max_steps", "5", "--resume_from_checkpoint", older)
    assert files(out) == before, "a refused resume wrote something"
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.warns(
        UserWarning, match=r"step 7 goes from 0.000691 to 0.0002929, and"
    ):  # 2e-3 * (1 + cos(pi * 3 / 4)) / 2
        in_process(tmp_path, *flags, "--max_steps", "7", "--resume_from_checkpoint", older)
    assert sorted(lrs(out)) == list(range(1, 8))


def test_a_resume_in_or_after_unmasked_tuning_cannot_change_the_masked_stage(tmp_path):
    """A run of 3 masked + 2 tuning steps: raising --max_steps at its end is refused (it appended "tuning" steps
    under a masked stage it never ran); so are a new warmup, and a tuning stage that ends before the checkpoint.
    Lengthening tuning is allowed, and its first step updates (it used the ended schedule's lr, 0)."""
    flags = ["--max_steps", "3", "--unmasked_tuning_steps", "2", "--save_steps", "1"]
    in_process(tmp_path, *flags)
    out, latest = tmp_path / "out", ["--resume_from_checkpoint", "latest"]
    before = files(out)
    refused = [
        (
            ["--max_steps", "5"],
            r"at step 5, at the end of its run \(3 masked \+ 2 unmasked tuning steps\); "
            r"max_steps=5 \(was 3\) would change its masked stage .* resume with --max_steps 3, or train on in a new "
            r"run with --init_from",
        ),
        (
            ["--warmup_steps", "2"],
            r"warmup_steps=2 \(was 1\) would change its masked stage .* resume with --warmup_steps 1, or",
        ),
        (
            ["--unmasked_tuning_steps", "0", "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-4")],
            r"at step 4, in unmasked tuning \(step 1 of 2\); unmasked_tuning_steps=0 \(was 2\) would end unmasked "
            r"tuning at step 3, before it: resume with --unmasked_tuning_steps 1 or more",
        ),
    ]
    for change, message in refused:
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(ValueError, match=message):
            in_process(tmp_path, *flags, *latest, *change)
        assert files(out) == before, f"{change} wrote something before it was refused"

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.warns(UserWarning, match=r"step 6 goes from none \(it had ended\) to 5e-06, and the run follows"):
        in_process(tmp_path, *flags, *latest, "--unmasked_tuning_steps", "4")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in log][3:] == [(s, "unmasked_tuning") for s in (4, 5, 6, 7)]
    assert log[5]["lr"] == pytest.approx(5e-6)  # 1e-5 * (1 + cos(pi / 2)) / 2, step 2 of 4 of tuning
    checkpoints = out / "checkpoints"
    unchanged = load_file(checkpoints / "checkpoint-5" / "model.safetensors")
    updated = load_file(checkpoints / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(unchanged[k], updated[k]) for k in unchanged), "the first resumed step made no update"


def test_the_checkpoints_schedule_is_known_without_its_main_steps_and_by_epochs(tmp_path):
    """No training: `resume_schedule` on checkpoint folders holding only progress.json and run_config.yaml."""
    import yaml

    from glip_hf.arguments import to_flat_dict
    from glip_hf.checkpointing import resume_schedule
    from glip_hf.optimization import Schedule

    def config(*flags: str) -> dict:
        return to_flat_dict(*parse_run_args([*TINY, "--output_dir", str(tmp_path / "out"), *flags]))

    def checkpoint(name: str, progress: dict, run_config: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "progress.json").write_text(json.dumps(progress))
        (tmp_path / name / "run_config.yaml").write_text(yaml.safe_dump(run_config))
        return tmp_path / name

    # Older than main_steps in progress.json: max_steps stands for it...
    old = checkpoint("old", {"step": 5}, config("--max_steps", "3", "--unmasked_tuning_steps", "2"))
    new = config("--max_steps", "5", "--unmasked_tuning_steps", "2")
    with pytest.raises(ValueError, match=r"max_steps=5 \(was 3\)"):
        resume_schedule(old, new, Schedule.of(new, 5))
    # ... and a run by epochs is taken to have this run's masked stage (as every resume did before).
    epochs = checkpoint("epochs", {"step": 5}, config("--num_train_epochs", "2", "--unmasked_tuning_steps", "0"))
    new = config("--num_train_epochs", "2", "--unmasked_tuning_steps", "0", "--gradient_accumulation_steps", "2")
    assert resume_schedule(epochs, new, Schedule.of(new, 5)) == Schedule.of(new, 5)
    # A recorded masked stage: more epochs while in it is a warning naming the flag; fewer, ending before it, an error.
    run = config("--num_train_epochs", "2", "--unmasked_tuning_steps", "0")
    recorded = checkpoint("recorded", {"step": 4, "main_steps": 10}, run)
    new = config("--num_train_epochs", "3", "--unmasked_tuning_steps", "0")
    with pytest.warns(UserWarning, match=r"changes its schedule with num_train_epochs=3\.0 \(was 2\.0\) to 15 masked"):
        resume_schedule(recorded, new, Schedule.of(new, 15))
    new = config("--num_train_epochs", "2", "--unmasked_tuning_steps", "0", "--gradient_accumulation_steps", "4")
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=4 \(was 1\) would end the masked stage at "):
        resume_schedule(recorded, new, Schedule.of(new, 3))
    # Steps are optimizer steps: with --max_steps, another accumulation leaves the schedule as it was.
    steps = checkpoint("steps", {"step": 4, "main_steps": 6}, config("--max_steps", "6"))
    new = config("--max_steps", "6", "--gradient_accumulation_steps", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resume_schedule(steps, new, Schedule.of(new, 6)) == Schedule.of(new, 6)


def test_a_setting_the_checkpoint_keeps_is_recorded_as_kept_for_the_next_resume(tmp_path):
    """--unmasked_tuning_learning_rate on a resume has no effect (the warning says so: tuning keeps the checkpoint's
    ratio to the restored base rate); the checkpoints that run writes record the value it used, so that resuming
    one of them with the same command warns again and still has no effect (it made tuning's lr 10x, silently)."""
    flags = ["--max_steps", "1", "--unmasked_tuning_steps", "3", "--save_steps", "1", "--save_total_limit", "5"]
    in_process(tmp_path, *flags)
    reference, checkpoints = lrs(tmp_path / "out"), tmp_path / "out" / "checkpoints"
    for step in (1, 2):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.warns(UserWarning, match=r"keeps its optimizer state .*unmasked_tuning_learning_rate=1e-05 \("):
            in_process(
                tmp_path, *flags, "--unmasked_tuning_learning_rate", "1e-4",
                "--resume_from_checkpoint", str(checkpoints / f"checkpoint-{step}"),
            )  # fmt: skip
    assert lrs(tmp_path / "out") == reference


def test_progress_written_by_a_later_version_loads_without_its_extra_fields(tmp_path):
    from glip_hf.checkpointing import TrainingProgress

    TrainingProgress(step=7, epoch=1, main_steps=9).save(tmp_path)
    saved = json.loads((tmp_path / "progress.json").read_text())
    (tmp_path / "progress.json").write_text(json.dumps({**saved, "a_later_field": [1, 2]}))
    loaded = TrainingProgress.load(tmp_path)
    assert (loaded.step, loaded.epoch, loaded.main_steps) == (7, 1, 9)


def test_a_resume_whose_new_schedule_ends_at_the_checkpoint_says_it_takes_no_step(tmp_path):
    """Dropping --unmasked_tuning_steps at the end of the masked stage leaves nothing to train: the warning said
    the learning rate of the next step 'stays' a value, and that the run follows the new schedule from there."""
    import yaml

    from glip_hf.arguments import to_flat_dict
    from glip_hf.checkpointing import resume_schedule
    from glip_hf.optimization import Schedule

    def config(*flags: str) -> dict:
        return to_flat_dict(*parse_run_args([*TINY_RUN, "--output_dir", str(tmp_path / "out"), *flags]))

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "progress.json").write_text(json.dumps({"step": 4, "main_steps": 4}))
    (checkpoint / "run_config.yaml").write_text(
        yaml.safe_dump(config("--max_steps", "4", "--unmasked_tuning_steps", "2"))
    )
    new = config("--max_steps", "4", "--unmasked_tuning_steps", "0")
    with pytest.warns(UserWarning, match=r"unmasked tuning steps: the run ends at step 4, with no step to take\.$"):
        resume_schedule(checkpoint, new, Schedule.of(new, 4))
