"""Shared fixtures: tiny, oddly sized configs (so shape bugs show), a tokenizer trained offline, saved models."""

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from glip_hf import GLIPConfig, GLIPModel  # noqa: E402
from glip_hf.synthetic import CAPTION_TEMPLATES, COLOURS, SHAPES, SIZES  # noqa: E402
from glip_hf.tokenization import text_config_overrides, train_clip_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPEN_CLIP_PYTHON_ENV = "GLIP_HF_OPENCLIP_PYTHON"


@contextlib.contextmanager
def saved_for_backward(parameters: Iterable[torch.Tensor] = ()) -> Iterator[dict[int, int]]:
    """What autograd saves for backward inside the block: ``{storage pointer: bytes}``, each storage once, the
    storages of ``parameters`` left out (they are held anyway)."""
    held = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


IMAGE_SIZE, PATCH_SIZE = 30, 2  # 15 x 15 = 225 patches
TEXT_LEN = 32
# Flags that shrink a training run (`run_pretraining.py` / `parse_run_args`) to seconds on a CPU.
TINY_MODEL = [
    *("--image_size", "16", "--patch_size", "4", "--projection_dim", "16", "--max_text_length", "16"),
    *("--vision_hidden_size", "32", "--vision_layers", "2", "--vision_heads", "2", "--vision_intermediate_size", "37"),
    *("--text_hidden_size", "32", "--text_layers", "2", "--text_heads", "2", "--text_intermediate_size", "37"),
    *("--tokenizer_vocab_size", "600", "--report_to", "none", "--logging_steps", "1", "--warmup_steps", "1"),
]
# ... on the built-in dataset cut to 40 training rows (5 batches of 8) and 36 held-out ones.
TINY_RUN = [
    *TINY_MODEL,
    "--synthetic_num_train",
    "40",
    "--synthetic_num_test",
    "36",
    "--per_device_train_batch_size",
    "8",
]


def tiny_config(tokenizer=None, **overrides) -> GLIPConfig:
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LEN,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    if tokenizer is not None:
        text.update(text_config_overrides(tokenizer))
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    return GLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)


def launch_two_processes(script, *args: str, port: int, cwd=None, config_file=None) -> str:
    """Run ``script`` under ``accelerate launch --multi_gpu --num_processes 2``: two gloo ranks on the CPU; with
    ``config_file``, under that accelerate config instead of ``--multi_gpu`` (still two processes, no mixed
    precision). Returns what both processes printed (stdout and stderr); a failure shows its end."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--config_file", str(config_file)] if config_file else ["--multi_gpu"]),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(script),
        *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env=env, timeout=300, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-4000:]}"
    return done.stdout


def caption_corpus() -> list[str]:
    return [
        t.format(colour=c, shape=s, size=z) for t in CAPTION_TEMPLATES for c in COLOURS for s in SHAPES for z in SIZES
    ]


@pytest.fixture(scope="session")
def tokenizer():
    return train_clip_tokenizer(caption_corpus(), vocab_size=600, model_max_length=TEXT_LEN)


@pytest.fixture
def config():
    return tiny_config(mask_ratio=0.5, mask_strategy="gaussian", mask_sigma=0.2)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    input_ids = torch.randint(2, 99, (3, 7), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 0, 1  # bos ... eos
    return {"pixel_values": pixel_values, "input_ids": input_ids}


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return GLIPModel(config)


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, tokenizer):
    """A GLIP checkpoint with tokenizer and image processor saved alongside (what a pipeline needs)."""
    from transformers import CLIPImageProcessor

    path = tmp_path_factory.mktemp("glip_model")
    torch.manual_seed(0)
    GLIPModel(tiny_config(tokenizer, mask_ratio=0.5)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size).save_pretrained(path)
    return path


def open_clip_python() -> Path:
    """The open_clip environment's python: skip without it locally, fail under CI (never a silent skip there)."""
    python = Path(os.environ.get(OPEN_CLIP_PYTHON_ENV) or ROOT / ".venv-openclip" / "bin" / "python")
    if not python.is_file():
        reason = (
            f"no open_clip environment at {python} (set {OPEN_CLIP_PYTHON_ENV}); create it as .ci/run does: "
            'python3 -m venv .venv-openclip && .venv-openclip/bin/pip install "torch==2.14.1" "torchvision==0.29.1" '
            '"open_clip_torch==3.3.0" -e .'
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return python
