"""Which split a document lands in, decided by a hash of its content, and the token blocks of
each split.

A hash rather than a random draw: the same text lands on the same side in every file, shard,
stream and restart, whatever order the documents come in.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from evo.data.text import canonical


def is_heldout(text: str, seed: int, frac: float) -> bool:
    """Stable split: a document is held out from a hash of (seed, content) alone, so the same
    text lands in the same split in every shard, stream and restart."""
    digest = hashlib.blake2b(f"{seed}\x00heldout\x00{canonical(text)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < frac


def selection_split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(search documents, selection documents) of one evaluation file, by content hash.

    The ``round(fraction * n)`` documents with the smallest hashes of their canonical text are
    held out for selection (at least one on each side when there are two or more), so the split
    does not depend on the file's order and a document never lands on both sides. Order is kept.
    """
    if fraction <= 0 or len(docs) < 2:
        return list(docs), []
    rank = sorted(range(len(docs)), key=lambda i: hashlib.blake2b(
        f"selection\x00{canonical(docs[i])}".encode("utf-8"), digest_size=8).digest())
    k = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    held = set(rank[:k])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def to_blocks(ids: list[int], seq_len: int) -> np.ndarray:
    """Cut a token stream into int64 blocks [n, seq_len]; the ragged tail is dropped."""
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def split_blocks(texts: list[str], tokenizer, *, seq_len: int, seed: int,
                 heldout_frac: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Train and held-out blocks of documents (each followed by EOS when the tokenizer has one;
    held-out chosen by :func:`is_heldout`), and the number of tokens before cutting into blocks."""
    train_ids: list[int] = []
    held_ids: list[int] = []
    for text, ids in zip(texts, _token_ids(texts, tokenizer)):
        (held_ids if is_heldout(text, seed, heldout_frac) else train_ids).extend(ids)
    return to_blocks(train_ids, seq_len), to_blocks(held_ids, seq_len), len(train_ids) + len(held_ids)


def _token_ids(texts: list[str], tokenizer) -> list[list[int]]:
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    return [list(x) + ([eos] if eos is not None else []) for x in ids]


def tokenizer_id(tokenizer) -> str:
    """A fingerprint of the vocabulary, so a resumed stream refuses a different tokenizer."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary API: fall back to its size
        return f"n{len(tokenizer)}"
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
