"""The shapes model's tokenizers, made from the captions' words: every caption word is one token.

A byte-level BPE CLIPTokenizer whose merges are learned on the caption words, and a unigram
T5Tokenizer with one piece per word; both are built deterministically, without training data.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from ..logs import quiet
from . import dataset as ds

with quiet():  # importing transformers' tokenizers can log torchvision fallbacks of image processors
    from transformers import CLIPTokenizer, T5Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["clip_tokenizer", "t5_tokenizer"]


def _learn_bpe(words: dict[tuple[str, ...], int]) -> list[tuple[str, str]]:
    """BPE merges until every word is one symbol; ties go to the smallest pair.

    Not ``tokenizers``' BpeTrainer: it breaks ties between equally frequent pairs by hash-map order,
    which differs from one process to the next, so the "fixed" tokenizer would vary between builds.
    """
    symbols = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for syms, freq in zip(symbols, words.values()):
            for pair in itertools.pairwise(syms):
                counts[pair] += freq
        if not counts:
            return merges
        a, b = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append((a, b))
        for syms in symbols:  # merge left to right, non-overlapping
            j = 0
            while j < len(syms) - 1:
                if syms[j] == a and syms[j + 1] == b:
                    syms[j : j + 2] = [a + b]
                j += 1


def _caption_words() -> list[str]:
    return sorted({w for p in ds.training_prompts() + ds.held_out_prompts() for w in p.text.split()})


def clip_tokenizer(max_length: int) -> Any:
    """A byte-level BPE CLIPTokenizer whose merges make every caption word a single token."""
    backend = CLIPTokenizer().backend_tokenizer
    counts: Counter[tuple[str, ...]] = Counter()
    for word in _caption_words():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word)):
            counts[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges = _learn_bpe(dict(sorted(counts.items())))
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}  # first occurrence wins
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int) -> Any:
    """A unigram T5Tokenizer with one piece per caption word (and character fallbacks).

    The vocabulary is written directly instead of trained with sentencepiece: whole words score 0
    and single characters -10, so Viterbi segmentation keeps every caption word whole, and the
    result does not depend on sentencepiece's EM. Ids follow T5: <pad>=0, </s>=1, <unk>=2.
    """
    words = _caption_words()
    chars = sorted({c for w in words for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, 0.0) for w in words] + [("\u2581", -10.0)] + [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
