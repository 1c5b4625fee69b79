"""De-duplication memory: exact copies by content key, near copies by MinHash.

Near duplicates are found with MinHash signatures in an LSH index (datasketch), so each new
document is compared with a few candidates, not with every document seen before.
"""
from __future__ import annotations

import re
from typing import Iterable, Literal

import numpy as np

from evo.data.text import content_key

_WORD = re.compile(r"\w+")

Verdict = Literal["new", "duplicate", "near_duplicate"]


def shingles(text: str, n: int = 3) -> set[bytes]:
    """Word n-grams (lower-cased) of a document, the sets MinHash compares."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


class DuplicateFilter:
    """Every document seen so far, remembered to drop later copies (the first one wins).

    ``seen``: exact keys of kept and near-duplicate documents; ``signatures``: MinHash values
    (uint32) of the kept ones, the near-duplicate memory.
    """

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH  # imported on use: a heavy import only streams need

        self.threshold = float(threshold)
        self.num_perm = int(num_perm)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.seen: set[str] = set()
        self.signatures: dict[str, np.ndarray] = {}

    def add(self, text: str) -> tuple[Verdict, str]:
        """Judge a cleaned document against everything before it, and remember it: (verdict,
        its content key). An exact copy is not remembered again; a near copy's key is, so a
        later exact copy of it counts as exact."""
        from datasketch import MinHash

        key = content_key(text)
        if key in self.seen:
            return "duplicate", key
        self.seen.add(key)
        mh = MinHash(num_perm=self.num_perm, scheme="affine32")
        mh.update_batch(list(shingles(text)))
        if self._is_near_duplicate(mh):
            return "near_duplicate", key
        self._index(key, mh.hashvalues)
        return "new", key

    def restore(self, seen: Iterable[str], signatures: dict[str, np.ndarray]) -> None:
        """Take back the memory of a saved stream (``seen`` and ``signatures`` as above)."""
        self.seen = set(seen)
        for key, values in signatures.items():
            self._index(key, values)

    def _is_near_duplicate(self, mh) -> bool:
        # LSH candidates are verified on the estimated Jaccard similarity, dropping the band
        # collisions of pairs below the threshold.
        for other in self._lsh.query(mh):
            if float(np.mean(self.signatures[other] == mh.hashvalues)) >= self.threshold:
                return True
        return False

    def _index(self, key: str, hashvalues: np.ndarray) -> None:
        from datasketch import MinHash

        self.signatures[key] = np.asarray(hashvalues, dtype=np.uint32)
        if key not in self._lsh:
            self._lsh.insert(key, MinHash(num_perm=self.num_perm, scheme="affine32",
                                          hashvalues=self.signatures[key]))
