"""Offline tokenizers: train a small byte-level BPE on captions and save it as a CLIP tokenizer.

The real path is ``AutoTokenizer.from_pretrained(name_or_path)``; this is what the built-in default run and the
tests use when no pretrained tokenizer can be downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 32) -> CLIPTokenizer:
    """Train a byte-level BPE with CLIP's normalisation and word split, returned as a `CLIPTokenizer`.

    Special tokens come first (``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1; padding uses ``<|endoftext|>``
    as in CLIP), so the end-of-text id is never 2, which CLIP's text model would read as a legacy checkpoint.
    """
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    state = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges, model_max_length=model_max_length)


def text_config_overrides(tokenizer) -> dict[str, int]:
    """Text-config fields that must agree with ``tokenizer`` (vocabulary size and special ids)."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def load_or_train_tokenizer(
    name_or_path: str | None,
    texts: Callable[[], Iterable[str]],
    vocab_size: int = 1024,
    max_length: int = 77,
    must_load: bool = False,
):
    """``AutoTokenizer.from_pretrained(name_or_path)``; if there is no name, or (unless ``must_load``) the name has
    no tokenizer files, a BPE trained offline on ``texts()``."""
    if name_or_path is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            tokenizer.model_max_length = min(tokenizer.model_max_length, max_length)
            return tokenizer
        except (OSError, ValueError) as error:
            if must_load:
                raise FileNotFoundError(
                    f"tokenizer {name_or_path!r} could not be loaded ({error}); check --tokenizer_name."
                ) from None
    return train_clip_tokenizer(texts(), vocab_size=vocab_size, model_max_length=max_length)
