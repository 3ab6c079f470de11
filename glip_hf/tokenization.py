"""Tokenizers: load a pretrained one, or train a small byte-level BPE offline and save it as a CLIP tokenizer.

The real path is ``AutoTokenizer.from_pretrained(name_or_path)``; the offline BPE is what the built-in default run
and the tests use when no pretrained tokenizer can be downloaded. Like CLIP's own BPE it covers every byte (each byte
alone and word-final), so no word maps to an unknown token, let alone to ``<|endoftext|>``, where CLIP pools (only the
literal special-token texts, such as ``"<|endoftext|>"`` typed into a caption, encode as those tokens, as in CLIP).
Training is deterministic: merges are chosen by count, ties broken by the pair itself, never by hash order.
"""

from __future__ import annotations

import heapq
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, CLIPTokenizer

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, UNK)  # ids 0, 1, 2: the end-of-text id is never 2 (CLIP's legacy pooling marker)
WORD_END = "</w>"  # CLIP marks the last symbol of a word
MIN_PAIR_COUNT = 2  # a pair seen once is memorisation, not a subword
LEGACY_EOS_ID = 2  # CLIP's text model pools at argmax(input_ids) when config.eos_token_id == 2


def base_vocabulary() -> list[str]:
    """Special tokens, the 256 byte symbols of byte-level BPE, then the same symbols word-final."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return [*SPECIAL_TOKENS, *alphabet, *(symbol + WORD_END for symbol in alphabet)]


def _word_counts(texts: Iterable[str], splitter: CLIPTokenizer) -> Counter:
    """Byte-level words of ``texts`` with their counts, split exactly as ``splitter`` splits at encoding time."""
    normalizer = splitter.backend_tokenizer.normalizer
    pre_tokenizer = splitter.backend_tokenizer.pre_tokenizer
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def learn_merges(word_counts: Counter, num_merges: int, min_count: int = MIN_PAIR_COUNT) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first; ties go to the smallest pair, so the result depends only on
    ``word_counts``. Words end in a ``</w>`` symbol, as CLIP's BPE expects."""
    ordered = sorted(word_counts)
    words = [[*word[:-1], word[-1] + WORD_END] for word in ordered]
    counts = [word_counts[word] for word in ordered]
    pair_counts: Counter = Counter()
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[index]
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # stale entry: the pair's count changed since it was pushed
        if -negative < min_count:
            break
        merges.append(pair)
        changed = set()
        for index in sorted(pair_words.pop(pair)):
            changed |= _merge_word(words, index, pair, counts[index], pair_counts, pair_words)
        for other in sorted(changed - {pair}):
            if pair_counts.get(other, 0) > 0:
                heapq.heappush(heap, (-pair_counts[other], other))
        pair_counts.pop(pair, None)
    return merges


def _merge_word(words, index, pair, count, pair_counts, pair_words) -> set:
    """Replace ``pair`` in ``words[index]`` by its merge; update the pair statistics; return the pairs touched."""
    symbols = words[index]
    old_pairs = list(zip(symbols, symbols[1:]))
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    words[index] = merged
    new_pairs = list(zip(merged, merged[1:]))
    for old in old_pairs:
        pair_counts[old] -= count
    for new in new_pairs:
        pair_counts[new] += count
    for old in set(old_pairs) - set(new_pairs):
        pair_words.get(old, set()).discard(index)
    for new in new_pairs:
        pair_words[new].add(index)
    return set(old_pairs) | set(new_pairs)


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 77) -> CLIPTokenizer:
    """Train a byte-level BPE with CLIP's normalisation and word split, returned as a `CLIPTokenizer`.

    Ids: ``<|startoftext|>`` 0, ``<|endoftext|>`` 1 (also padding, as in CLIP), ``<|unk|>`` 2 (never produced:
    every byte is in the vocabulary), then the 512 byte symbols, then one token per merge, up to ``vocab_size``.
    """
    base = base_vocabulary()
    if vocab_size < len(base):
        raise ValueError(
            f"tokenizer_vocab_size={vocab_size} is too small for a byte-level BPE: it needs {len(base)} base tokens "
            f"(3 special, 256 bytes, 256 word-final bytes) plus merges; use at least {len(base) + 64}."
        )
    splitter = CLIPTokenizer(vocab={token: i for i, token in enumerate(base)}, merges=[], unk_token=UNK)
    merges = learn_merges(_word_counts(texts, splitter), vocab_size - len(base))
    vocab = {token: i for i, token in enumerate([*base, *(a + b for a, b in merges)])}
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=UNK, model_max_length=model_max_length)


def text_config_overrides(tokenizer) -> dict[str, int]:
    """Text-config fields that must agree with ``tokenizer`` (vocabulary size and special ids)."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def load_pretrained_tokenizer(name_or_path: str, max_length: int | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(name_or_path)``, or None when it holds no tokenizer. It pads on the right,
    with its end-of-text token when it has no padding token of its own.

    A folder without tokenizer files can still yield a tokenizer of special tokens only (transformers builds an
    empty CLIPTokenizer for a CLIP config): that counts as missing too, since it maps every word to one id.
    A tokenizer that brings its own code (``auto_map``) is only loaded with ``trust_remote_code``.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise ValueError(
                f"tokenizer {name_or_path} runs code of its own (auto_map); pass --trust_remote_code true only if "
                "you trust that code, or use another tokenizer."
            ) from None
        if Path(name_or_path).is_dir():
            return None  # a local checkpoint folder without tokenizer files
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r} could not be loaded ({error}); check the name or path, and that the Hub "
            "is reachable unless it is cached."
        ) from None
    if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
        return None
    # CLIP's text tower reads texts from position 0 and pools at the first end-of-text token, which is often also
    # the padding token: padding on the left would pool a padded text at its padding.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as CLIP's own tokenizer pads (GPT-2's has no padding token)
    if max_length is not None:
        tokenizer.model_max_length = min(tokenizer.model_max_length, max_length)
    return tokenizer


def load_or_train_tokenizer(
    name_or_path: str | None,
    texts: Callable[[], Iterable[str]],
    vocab_size: int = 1024,
    max_length: int = 77,
    must_load: bool = False,
    trust_remote_code: bool = False,
):
    """The tokenizer of ``name_or_path``; if there is no name, or (unless ``must_load``) the name holds no
    tokenizer, a BPE trained offline on ``texts()``."""
    if name_or_path is not None:
        try:
            tokenizer = load_pretrained_tokenizer(name_or_path, max_length, trust_remote_code)
        except FileNotFoundError:
            if must_load:
                raise
            tokenizer = None
        if tokenizer is not None:
            return tokenizer
        if must_load:
            raise FileNotFoundError(
                f"tokenizer_name {name_or_path!r} holds no tokenizer (no tokenizer files, or special tokens only); "
                "check --tokenizer_name, or drop it to train one offline."
            )
        warnings.warn(
            f"{name_or_path} holds no tokenizer: training a BPE offline, whose ids do not match the text embeddings "
            "a pretrained checkpoint learned; pass its own tokenizer with --tokenizer_name if it has one.",
            stacklevel=2,
        )
    return train_clip_tokenizer(texts(), vocab_size=vocab_size, model_max_length=max_length)


def _largest_id(tokenizer) -> int:
    return max(tokenizer.get_vocab().values())


def id_count(tokenizer) -> int:
    """The embedding rows ``tokenizer``'s ids need: its length, or more when its vocabulary is numbered with gaps."""
    return max(len(tokenizer), _largest_id(tokenizer) + 1)


def pooling_matches(text_config, tokenizer) -> bool:
    """Whether CLIP's text tower, configured by ``text_config``, pools at ``tokenizer``'s end-of-text token.

    With ``eos_token_id == 2`` CLIP pools at ``argmax(input_ids)`` (OpenAI's checkpoints, whose end-of-text is the
    largest id); otherwise at the first ``eos_token_id``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    if text_config.eos_token_id == LEGACY_EOS_ID:
        return eos == _largest_id(tokenizer)
    return eos == text_config.eos_token_id


TRAINING_TOKENIZER_FIX = (
    "use a tokenizer whose post-processor appends it (CLIP's does), or drop --tokenizer_name to train one offline"
)


def check_ends_with_eos(tokenizer, source: str, fix: str = TRAINING_TOKENIZER_FIX) -> None:
    """Raise a one-line ValueError unless encoding a text puts the end-of-text token at its end and nowhere before:
    CLIP pools at the first end-of-text token (a tokenizer that never appends it, or that also opens texts with it,
    as GPT-2's does, would pool every text at one position)."""
    ids = tokenizer("a photo of a cat")["input_ids"]
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos or eos in ids[:-1]:
        raise ValueError(
            f"the tokenizer of {source} encodes 'a photo of a cat' as {ids} with eos_token_id={eos}: CLIP's text "
            f"tower pools at the first end-of-text token, so every text must end with it, once; {fix}."
        )


def check_tokenizer_serves(text_config, tokenizer, source: str) -> None:
    """Raise a one-line ValueError unless ``tokenizer`` can feed the text tower of ``text_config``: every text ends
    with its end-of-text token, the tower pools there, and every id it emits has an embedding row. ``source`` names
    the model folder in the message (``--model DIR``, ``RUN_DIR``)."""
    check_ends_with_eos(tokenizer, source, fix="save the tokenizer the model was trained with beside it")
    if not pooling_matches(text_config, tokenizer):
        raise ValueError(
            f"{source}: its text tower pools at eos_token_id={text_config.eos_token_id} but its tokenizer ends text "
            f"with id {tokenizer.eos_token_id}; fix text_config.eos_token_id in its config.json or save the matching "
            "tokenizer."
        )
    ids = id_count(tokenizer)
    if ids > text_config.vocab_size:  # ids past the embedding: an IndexError, a CUDA assert, other rows
        raise ValueError(
            f"{source}: its tokenizer emits ids up to {ids - 1} but its text tower embeds only "
            f"{text_config.vocab_size} tokens; save the tokenizer the model was trained with beside it."
        )


def align_pooling_token(text_config, tokenizer, source: str) -> bool:
    """Make ``text_config`` pool at ``tokenizer``'s end-of-text token, or raise a one-line ValueError.

    Returns:
        True when ``text_config.eos_token_id`` was changed (remapped to the tokenizer's id).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"the tokenizer has no end-of-text token ({source}), and CLIP's text tower pools there; set its "
            "eos_token (and add it at the end of every text), or drop --tokenizer_name to train one offline."
        )
    check_ends_with_eos(tokenizer, source)
    if pooling_matches(text_config, tokenizer):
        return False
    if eos == LEGACY_EOS_ID:
        raise ValueError(
            f"the tokenizer's eos_token_id={eos} cannot be pooled by CLIP's text tower ({source}): id 2 means "
            "'pool at the largest id' there; use a tokenizer whose end-of-text id is not 2 (e.g. drop "
            "--tokenizer_name to train one offline)."
        )
    text_config.eos_token_id = eos
    return True


__all__ = [
    "align_pooling_token",
    "base_vocabulary",
    "check_ends_with_eos",
    "learn_merges",
    "load_or_train_tokenizer",
    "load_pretrained_tokenizer",
    "pooling_matches",
    "text_config_overrides",
    "train_clip_tokenizer",
]
