"""A CLIP BPE tokenizer whose vocabulary holds every word of a given grammar as one token.

CLIP's tokenizer is byte-level BPE with an end-of-word marker ``</w>``. We build the vocabulary
by hand: every single byte-character (so unknown words still tokenize, letter by letter) and, for
each grammar word, the merge chain that builds it. Merges are ranked by a BPE-style count over the
grammar words, then we check that every word really ends up as a single token.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the word list (each word weighted once) until every word is a token."""
    splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in splits.values():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        # Most frequent pair first; ties broken alphabetically so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged


def build_clip_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 16) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` for ``words`` into ``out_dir`` and return the tokenizer."""
    words = sorted({w.lower() for w in words if w})
    for word in words:
        if not word.isascii() or not word.isalpha():
            raise ValueError(f"grammar words must be ASCII letters (CLIP splits digits), got {word!r}")
    byte_chars = _byte_characters()
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges = _learn_merges(words)
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += list(SPECIAL_TOKENS)
    seen: set[str] = set()
    vocab: dict[str, int] = {}
    for token in vocab_list:
        if token not in seen:
            seen.add(token)
            vocab[token] = len(vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges],
                              model_max_length=model_max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    # Every grammar word must be exactly one token, or the text encoder sees spelling, not words.
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits grammar words: {split[:10]}")
    return tokenizer
