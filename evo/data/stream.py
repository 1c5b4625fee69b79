"""Evaluation and training text: local files, data versions, and the shard stream.

A data version is a content hash of the text and of how it is cut into tokens, so fitness
measured on different data is never confused (the fitness cache is keyed by it).

:class:`DataStream` watches a folder of shards (``*.jsonl`` with a ``text`` field, or ``*.txt``)
and turns each new complete shard into a data version: cleaned, de-duplicated against everything
seen before (exactly and approximately), tokenised, and split into train / held-out by a hash of
each document's content. Producers write a shard under a temporary name (``*.tmp``, ``*.part``
or a dot-file) and rename it into place: the stream never reads those, so a half-written shard
is never consumed. Shards are immutable once renamed; a later change is reported and ignored.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from evo.core.errors import EvoError
from evo.core.fs import read_records

log = logging.getLogger("evo.data.stream")

STATE_FORMAT = 1
SHARD_SUFFIXES = (".jsonl", ".txt")
PARTIAL_SUFFIXES = (".tmp", ".part")
# settings that change what a shard keeps or how it is cut: part of every version id, and a
# resumed stream must use the same ones (replay size and shard order may change)
CONTENT_SETTINGS = ("seq_len", "heldout_frac", "seed", "min_chars", "near_dup_threshold", "num_perm", "tokenizer")


def read_texts(path: str | Path) -> list[str]:
    """Documents of a ``.jsonl`` file (one ``{"text": ...}`` per line) or a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise EvoError(f"{path}: file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvoError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    docs = []
    for lineno, record in read_records(path):
        if not isinstance(record.get("text"), str):
            raise EvoError(f"{path}:{lineno}: line has no string field 'text'")
        docs.append(record["text"])
    return docs


def data_version(paths: Iterable[str | Path], **settings) -> str:
    """``d-`` + a short hash of the files' bytes and of the tokenisation settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in sorted(map(str, paths)):
        h.update(Path(p).name.encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return "d-" + h.hexdigest()[:12]


# ------------------------------------------------------------------------------------ cleaning
# C0/C1 control characters except tab and newline (which carry layout in code and prose).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]{2,}")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")


def clean_document(text: str) -> str:
    """NFC-normalise and tidy one document.

    Rules: ``\\r\\n``/``\\r`` become ``\\n``; control characters other than tab and newline are
    dropped; runs of spaces *inside* a line collapse to one space (leading indentation is kept,
    since it is syntax in code); trailing spaces and leading or trailing blank lines go; three or more newlines become two.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_INNER_SPACE.sub(" ", line).rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def canonical(text: str) -> str:
    """Whitespace-insensitive form of a document: the content that keys and splits compare."""
    return " ".join(text.split())


def content_key(text: str) -> str:
    """Exact-duplicate key of a document (128-bit BLAKE2b of its canonical form, hex): copies
    that differ only in whitespace or line breaks are duplicates."""
    return hashlib.blake2b(canonical(text).encode("utf-8"), digest_size=16).hexdigest()


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


def shingles(text: str, n: int = 3) -> set[bytes]:
    """Word n-grams (lower-cased) of a document, the sets MinHash compares."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def to_blocks(ids: list[int], seq_len: int) -> np.ndarray:
    """Cut a token stream into int64 blocks [n, seq_len]; the ragged tail is dropped."""
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# --------------------------------------------------------------------------------- reports, window
@dataclass
class ShardReport:
    """What one shard contributed. ``skipped`` names why it gave no version (else None)."""

    shard: str
    version: str | None = None
    docs: int = 0
    kept: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    rejected: dict = field(default_factory=dict)   # reason -> count
    tokens: int = 0
    train_blocks: int = 0
    heldout_blocks: int = 0
    skipped: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DataWindow:
    """The newest data version: ``train`` and ``heldout`` token blocks of that version, and
    ``replay``, a bounded seeded sample of held-out blocks of older versions (retention).
    Arrays are int64 numpy [n, seq_len]; the object pickles (Ray ships it to evaluators)."""

    version: str
    train: np.ndarray
    heldout: np.ndarray
    replay: np.ndarray
    versions: tuple

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


# ------------------------------------------------------------------------------------- stream
class DataStream:
    """A folder of shards, consumed in order (by name, or by mtime with ``order="mtime"``).

    Call :meth:`poll` to pick up new complete shards and :meth:`window` for the newest version.
    With ``state_path`` the stream resumes from (and after every poll rewrites, atomically) a
    JSON state: which shards it consumed and its de-duplication memory. The token blocks are
    rebuilt on resume from the shards themselves, filtered to the documents kept the first time.
    """

    def __init__(self, folder, tokenizer, *, seq_len: int, heldout_frac: float = 0.1,
                 replay_blocks: int = 64, seed: int = 0, min_chars: int = 32,
                 near_dup_threshold: float = 0.8, num_perm: int = 128, order: str = "name",
                 state_path=None, replay_train_blocks: int = 256):
        if seq_len < 2:
            raise EvoError(f"DataStream: seq_len must be at least 2, got {seq_len}")
        if not 0.0 <= heldout_frac < 1.0:
            raise EvoError(f"DataStream: heldout_frac must be in [0, 1), got {heldout_frac}")
        if not 0.0 < near_dup_threshold <= 1.0:
            raise EvoError(f"DataStream: near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
        if order not in ("name", "mtime"):
            raise EvoError(f"DataStream: order must be 'name' or 'mtime', got {order!r}")
        if replay_blocks < 0:
            raise EvoError(f"DataStream: replay_blocks must be >= 0, got {replay_blocks}")
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.settings = {
            "seq_len": int(seq_len), "heldout_frac": float(heldout_frac), "replay_blocks": int(replay_blocks),
            "seed": int(seed), "min_chars": int(min_chars), "near_dup_threshold": float(near_dup_threshold),
            "num_perm": int(num_perm), "order": order, "tokenizer": _tokenizer_id(tokenizer),
        }
        self.state_path = Path(state_path) if state_path is not None else None
        from datasketch import MinHashLSH

        # Near duplicates: MinHash signatures in an LSH index (datasketch), so each new document
        # is compared with a few candidates, not with every document seen before.
        self._lsh = MinHashLSH(threshold=near_dup_threshold, num_perm=num_perm)
        self._signatures: dict[str, np.ndarray] = {}   # key -> uint32 hash values (kept docs)
        self._seen: set[str] = set()                   # exact keys: kept and near-dup dropped
        self._shards: list[dict] = []                  # consumed shards, in consumption order
        self._heldout: dict[str, np.ndarray] = {}      # version -> held-out blocks
        self._train: np.ndarray | None = None          # train blocks of the newest version
        # a bounded, seeded sample of every version's training blocks: rehearsal for later LoRA
        # fits (never held-out text), so adapting to new data need not forget the old
        self.replay_train_blocks = int(replay_train_blocks)
        self._train_sample: dict[str, np.ndarray] = {}
        self._changed_warned: set[str] = set()
        if self.state_path is not None and self.state_path.is_file():
            self._load(_read_state(self.state_path))

    # ------------------------------------------------------------------------------ public
    @property
    def versions(self) -> list[str]:
        return [s["version"] for s in self._shards if s["version"]]

    def poll(self, max_versions: int | None = None) -> list[ShardReport]:
        """Consume new complete shards, oldest first; one report per shard.

        ``max_versions``: stop once that many new versions were made (skipped shards do not
        count), so a loop can take shards that arrived together one version at a time.
        """
        reports = []
        made = 0
        for path in self._new_shards():
            if max_versions is not None and made >= max_versions:
                break
            try:
                report = self._consume(path)
            except OSError as err:  # renamed or removed between listing and reading: retry next poll
                log.warning("%s: could not read shard (%s); will retry", path, err.strerror or type(err).__name__)
                continue
            reports.append(report)
            made += report.version is not None
        if reports and self.state_path is not None:
            from evo.core.fs import atomic_write_text

            atomic_write_text(self.state_path, json.dumps(self.state()))
        return reports

    def window(self) -> DataWindow:
        """The newest version's train / held-out blocks and a replay sample of older ones."""
        versions = self.versions
        if not versions:
            raise EvoError(f"{self.folder}: no data version yet (no complete shard with new text)")
        newest = versions[-1]
        seq = self.settings["seq_len"]
        older = [self._heldout[v] for v in versions[:-1] if len(self._heldout[v])]
        pool = np.concatenate(older) if older else np.zeros((0, seq), dtype=np.int64)
        k = min(self.settings["replay_blocks"], len(pool))
        # seeded by (stream seed, version): the same window always gets the same replay sample
        rng = np.random.default_rng([self.settings["seed"], int(newest.rsplit("-", 1)[-1], 16)])
        replay = pool[np.sort(rng.choice(len(pool), size=k, replace=False))] if k else pool[:0]
        train = self._train if self._train is not None else np.zeros((0, seq), dtype=np.int64)
        return DataWindow(newest, train, self._heldout[newest], replay, tuple(versions))

    def train_sample(self, version: str) -> np.ndarray:
        """Up to ``replay_train_blocks`` training blocks of one version (seeded, stable)."""
        if version not in self._train_sample:
            raise EvoError(f"{self.folder}: unknown data version {version!r}")
        return self._train_sample[version]

    def _keep_train_sample(self, version: str, train: np.ndarray) -> None:
        k = min(self.replay_train_blocks, len(train))
        rng = np.random.default_rng([self.settings["seed"], int(version.rsplit("-", 1)[-1], 16), 1])
        self._train_sample[version] = train[np.sort(rng.choice(len(train), size=k, replace=False))] if k else train[:0]

    def heldout(self, version: str) -> np.ndarray:
        """The held-out blocks of one consumed version (for a replay sample of one's own)."""
        if version not in self._heldout:
            raise EvoError(f"{self.folder}: unknown data version {version!r}")
        return self._heldout[version]

    def state(self) -> dict:
        """JSON-ready state: settings, consumed shards, exact and near-duplicate memory."""
        return {
            "format": STATE_FORMAT,
            "folder": str(self.folder),
            "settings": dict(self.settings),
            "shards": [dict(s) for s in self._shards],
            "seen": sorted(self._seen),
            "signatures": {k: base64.b64encode(v.astype("<u4").tobytes()).decode() for k, v in self._signatures.items()},
        }

    @classmethod
    def from_state(cls, state: dict, tokenizer, *, folder=None, state_path=None) -> "DataStream":
        """Resume a stream from :meth:`state` (settings come from the state)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "settings" not in state:
            raise EvoError(f"stream state: unknown format (expected format {STATE_FORMAT})")
        kw = {k: v for k, v in state["settings"].items() if k != "tokenizer"}
        stream = cls(folder if folder is not None else state["folder"], tokenizer, **kw)
        stream._load(state)
        stream.state_path = Path(state_path) if state_path is not None else None
        return stream

    # ----------------------------------------------------------------------------- shards
    def _new_shards(self) -> list[Path]:
        if not self.folder.is_dir():
            raise EvoError(f"{self.folder}: stream folder not found")
        done = {s["name"]: s for s in self._shards}
        found = []
        for path in self.folder.iterdir():
            name = path.name
            if name.startswith(".") or name.endswith(PARTIAL_SUFFIXES) or not name.endswith(SHARD_SUFFIXES):
                continue  # in-progress writes (write-then-rename) and foreign files
            if not path.is_file():
                continue
            if name in done:
                self._check_unchanged(path, done[name])
                continue
            found.append(path)
        if self.settings["order"] == "mtime":
            return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
        return sorted(found, key=lambda p: p.name)

    def _check_unchanged(self, path: Path, record: dict) -> None:
        if path.stat().st_size != record["size"] and path.name not in self._changed_warned:
            self._changed_warned.add(path.name)
            log.warning("%s: shard changed after it was consumed; ignored (shards are immutable: write a new one)", path)

    def _read_shard(self, path: Path, report: ShardReport) -> tuple[bytes, list[str]]:
        """Raw bytes and documents of one shard; bad lines are counted in ``report.rejected``."""
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.skipped = f"not UTF-8 (byte {exc.start})"
            return raw, []
        if path.suffix == ".txt":
            return raw, [text] if text.strip() else []
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                _count(report.rejected, "bad_json")
                log.warning("%s:%d: not valid JSON; line skipped", path, lineno)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                _count(report.rejected, "no_text")
                log.warning("%s:%d: line has no string field 'text'; line skipped", path, lineno)
                continue
            docs.append(record["text"])
        return raw, docs

    def _consume(self, path: Path) -> ShardReport:
        t0 = time.perf_counter()
        report = ShardReport(path.name)
        raw, docs = self._read_shard(path, report)
        report.docs = len(docs) + sum(report.rejected.values())
        kept: list[str] = []
        keys: list[str] = []
        if report.skipped is None:
            kept, keys = self._filter(docs, report)
        record = {"name": path.name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                  "version": None, "skipped": None, "kept": keys}
        if report.skipped is None and not docs:
            report.skipped = "empty (no documents)"
        elif report.skipped is None and not kept:
            report.skipped = "no new text (every document rejected or a duplicate)"
        if report.skipped is not None:
            log.warning("%s: shard skipped: %s", path, report.skipped)
            record["skipped"] = report.skipped
        else:
            prev = self.versions[-1] if self.versions else ""
            record["version"] = report.version = self._version_id(path, record["sha256"], prev)
            train, heldout, report.tokens = self._tokenise(kept)
            self._train, self._heldout[report.version] = train, heldout
            self._keep_train_sample(report.version, train)
            report.train_blocks, report.heldout_blocks = len(train), len(heldout)
            if not len(train) or not len(heldout):
                log.warning("%s: version %s has %d train and %d held-out blocks of %d tokens",
                            path, report.version, len(train), len(heldout), self.settings["seq_len"])
        self._shards.append(record)
        report.seconds = time.perf_counter() - t0
        return report

    def _filter(self, docs: list[str], report: ShardReport) -> tuple[list[str], list[str]]:
        """Clean, then drop short texts, exact duplicates and near duplicates (first one wins)."""
        from datasketch import MinHash

        kept, keys = [], []
        for doc in docs:
            text = clean_document(doc)
            if len(text) < self.settings["min_chars"]:
                _count(report.rejected, "too_short")
                continue
            key = content_key(text)
            if key in self._seen:
                report.duplicates += 1
                continue
            self._seen.add(key)
            mh = MinHash(num_perm=self.settings["num_perm"], scheme="affine32")
            mh.update_batch(list(shingles(text)))
            if self._is_near_duplicate(mh):
                report.near_duplicates += 1
                continue
            self._index(key, mh.hashvalues)
            kept.append(text)
            keys.append(key)
        report.kept = len(kept)
        return kept, keys

    def _is_near_duplicate(self, mh) -> bool:
        # LSH candidates are verified on the estimated Jaccard similarity, dropping the band
        # collisions of pairs below the threshold.
        for other in self._lsh.query(mh):
            if float(np.mean(self._signatures[other] == mh.hashvalues)) >= self.settings["near_dup_threshold"]:
                return True
        return False

    def _index(self, key: str, hashvalues: np.ndarray) -> None:
        from datasketch import MinHash

        self._signatures[key] = np.asarray(hashvalues, dtype=np.uint32)
        if key not in self._lsh:
            self._lsh.insert(key, MinHash(num_perm=self.settings["num_perm"], scheme="affine32",
                                          hashvalues=self._signatures[key]))

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [list(x) + ([eos] if eos is not None else []) for x in ids]

    def _tokenise(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Train and held-out blocks of kept documents (held-out chosen by content hash), and
        the number of tokens before cutting into blocks."""
        s = self.settings
        train_ids: list[int] = []
        held_ids: list[int] = []
        for text, ids in zip(texts, self._token_ids(texts)):
            (held_ids if is_heldout(text, s["seed"], s["heldout_frac"]) else train_ids).extend(ids)
        return to_blocks(train_ids, s["seq_len"]), to_blocks(held_ids, s["seq_len"]), len(train_ids) + len(held_ids)

    def _version_id(self, path: Path, sha: str, prev: str) -> str:
        # chained over the previous version: what a shard keeps depends on everything before it
        content = {k: self.settings[k] for k in CONTENT_SETTINGS}
        h = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
        h.update(prev.encode())
        h.update(bytes.fromhex(sha))
        return f"{path.stem}-{h.hexdigest()[:10]}"

    # ------------------------------------------------------------------------------ resume
    def _load(self, state: dict) -> None:
        want = {k: v for k, v in state.get("settings", {}).items()}
        for key in CONTENT_SETTINGS:
            value = self.settings[key]
            if key in want and want[key] != value:
                raise EvoError(f"stream state: setting {key} was {want[key]!r}, now {value!r}; "
                               f"use a new state file for new settings")
        try:
            self._seen = set(state["seen"])
            for key, b64 in state["signatures"].items():
                self._index(key, np.frombuffer(base64.b64decode(b64), dtype="<u4"))
            self._shards = [dict(s) for s in state["shards"]]
        except (KeyError, TypeError, ValueError) as err:
            raise EvoError(f"stream state: malformed ({type(err).__name__}: {err})") from None
        self._rebuild_blocks()

    def _rebuild_blocks(self) -> None:
        """Re-derive held-out blocks (all versions) and train blocks (newest) from the shards."""
        with_version = [s for s in self._shards if s["version"]]
        for i, rec in enumerate(with_version):
            path = self.folder / rec["name"]
            seq = self.settings["seq_len"]
            empty = np.zeros((0, seq), dtype=np.int64)
            if not path.is_file():
                log.warning("%s: consumed shard is gone; its blocks are empty on resume", path)
                self._heldout[rec["version"]] = empty
                continue
            raw, docs = self._read_shard(path, ShardReport(rec["name"]))
            if hashlib.sha256(raw).hexdigest() != rec["sha256"]:
                log.warning("%s: shard changed since it was consumed; keeping the documents it had", path)
            wanted = set(rec["kept"])
            texts, seen = [], set()
            for doc in docs:
                text = clean_document(doc)
                key = content_key(text)
                if key in wanted and key not in seen:
                    seen.add(key)
                    texts.append(text)
            train, heldout, _ = self._tokenise(texts)
            self._heldout[rec["version"]] = heldout
            self._keep_train_sample(rec["version"], train)
            if i == len(with_version) - 1:
                self._train = train


def _count(counter: dict, reason: str) -> None:
    counter[reason] = counter.get(reason, 0) + 1


def _tokenizer_id(tokenizer) -> str:
    """A fingerprint of the vocabulary, so a resumed stream refuses a different tokenizer."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary API: fall back to its size
        return f"n{len(tokenizer)}"
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvoError(f"{path}: unreadable stream state ({type(err).__name__})") from None
