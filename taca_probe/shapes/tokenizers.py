"""The shapes model's tokenizers, made from the captions' words: every caption word is one token.

A byte-level BPE CLIPTokenizer whose merges are learned on the caption words, and a unigram
T5Tokenizer with one piece per word; both are built deterministically, without training data.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any

from ..logs import quiet
from . import dataset as ds

with quiet():  # importing transformers' tokenizers can log torchvision fallbacks of image processors
    from transformers import CLIPTokenizer, T5Tokenizer

__all__ = ["clip_tokenizer", "t5_tokenizer"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes onto printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _learn_bpe(words: dict[tuple[str, ...], int]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol, deterministically.

    ``tokenizers``' BpeTrainer breaks ties between equally frequent pairs differently from one
    process to the next (hash-map order), which would make the "fixed" tokenizer vary between
    builds; here ties go to the lexicographically smallest pair. Pair counts are updated
    incrementally (a max-heap with lazy deletion), so the ~1500 merges take milliseconds.
    """
    symbols = [list(w) for w in words]
    freqs = list(words.values())
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale heap entry: the count changed since it was pushed
        merges.append(pair)
        joined = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            old = symbols[i]
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == pair[0] and old[j + 1] == pair[1]:
                    new.append(joined)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if new == old:
                continue
            for p in zip(old, old[1:]):
                counts[p] -= freqs[i]
                touched.add(p)
            for p in zip(new, new[1:]):
                counts[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
            symbols[i] = new
        for p in sorted(touched):
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


def _caption_words() -> list[str]:
    words = {w for p in ds.training_prompts() + ds.held_out_prompts() for w in p.text.split()}
    return sorted(words)


def clip_tokenizer(max_length: int) -> Any:
    """A byte-level BPE CLIPTokenizer whose merges make every caption word a single token."""

    backend = CLIPTokenizer().backend_tokenizer
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for word in _caption_words():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word)):
            counts[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges = _learn_bpe(dict(sorted(counts.items())))
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
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
