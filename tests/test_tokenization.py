"""The offline BPE tokenizer and tokenizer loading: full byte coverage, reproducible training, missing tokenizers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import caption_corpus, tiny_config

import glip_hf
from glip_hf import GLIPModel
from glip_hf.tokenization import load_or_train_tokenizer, train_clip_tokenizer

# Words, scripts and symbols the caption corpus never shows: every one must encode without an end-of-text token.
UNSEEN = [
    "This is a photo of five.",
    "a photo of a yak",
    "naïve café, 東京 🙂 — 42% off!",
    "Zebra? QUIZ: jump & vex 7x",
]


def test_unseen_text_encodes_without_an_early_end_of_text(tokenizer):
    assert tokenizer.unk_token_id != tokenizer.eos_token_id
    for text in UNSEEN:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id, text
        assert tokenizer.eos_token_id not in ids[1:-1] and tokenizer.unk_token_id not in ids, (text, ids)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)  # CLIP decodes each word followed by a space
        assert decoded.replace(" ", "") == text.lower().replace(" ", ""), (text, decoded)


def test_prompts_with_unseen_class_names_get_distinct_text_embeddings(tokenizer):
    torch.manual_seed(0)
    model = GLIPModel(tiny_config(tokenizer)).eval()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    tokens = tokenizer([f"This is a photo of {name}." for name in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens).pooler_output.double()  # (10, D)
    distances = torch.cdist(features, features)  # (10, 10)
    off_diagonal = distances[~torch.eye(len(names), dtype=torch.bool)]
    # Prompts cut at a shared prefix would give identical rows (distance 0 up to float noise).
    assert off_diagonal.min() > 1e-3 * features.norm(dim=-1).mean()


def test_tokenizer_is_bit_identical_across_processes(tmp_path):
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import caption_corpus\n"
        "from glip_hf.tokenization import train_clip_tokenizer\n"
        "tokenizer = train_clip_tokenizer(caption_corpus() * 3, vocab_size=700)\n"
        "state = json.loads(tokenizer.backend_tokenizer.to_str())['model']\n"
        "print(json.dumps({'vocab': state['vocab'], 'merges': state['merges']}, sort_keys=True))\n"
    )
    runs = []
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert len(runs[0]["merges"]) > 50
    assert runs[0] == runs[1] == runs[2]


def test_vocabulary_too_small_for_bytes_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer_vocab_size=300"):
        train_clip_tokenizer(caption_corpus(), vocab_size=300)


def test_checkpoint_without_tokenizer_files_is_missing_not_empty(tmp_path, model, tokenizer):
    export = glip_hf.export_to_clip(model, tmp_path / "clip-export")  # config + weights, no tokenizer files
    with pytest.warns(UserWarning, match="holds no tokenizer: training a BPE offline"):
        trained = load_or_train_tokenizer(str(export), caption_corpus, vocab_size=600, max_length=16)
    assert len(trained) > 515
    assert trained("a red circle")["input_ids"][1] not in (trained.eos_token_id, trained.unk_token_id)
    from glip_hf.tokenization import load_pretrained_tokenizer

    assert load_pretrained_tokenizer(str(export)) is None
    tokenizer.save_pretrained(export)
    loaded = load_pretrained_tokenizer(str(export))
    assert loaded is not None and loaded.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="nothing-here' could not be loaded"):
        load_or_train_tokenizer(str(tmp_path / "nothing-here"), caption_corpus, must_load=True)
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer_name .*empty-folder' holds no tokenizer"):
        load_or_train_tokenizer(str(tmp_path / "empty-folder"), caption_corpus, must_load=True)


def test_a_tokenizer_without_a_padding_token_pads_with_its_end_of_text(tmp_path):
    """GPT-2's layout: byte-level BPE, one <|endoftext|> (bos = eos = id 0), appended to every text, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    backend.train_from_iterator(caption_corpus(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
    )
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos).save_pretrained(tmp_path / "gpt2")
    tokenizer = load_or_train_tokenizer(str(tmp_path / "gpt2"), caption_corpus, max_length=16, must_load=True)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    texts = ["a red circle", "there is a large blue star in the middle of the picture, and more"]
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    first_eos = (tokens["input_ids"] == 0).int().argmax(dim=-1)  # where CLIP's text tower pools
    assert first_eos.tolist() == (tokens["attention_mask"].sum(dim=-1) - 1).tolist()  # the end of each text
    assert first_eos[0] < 15 and first_eos[1] == 15  # the long one cut to the context, ending with its eos
