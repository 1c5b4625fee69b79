"""The shard stream: a folder of data shards, each new complete one turned into a data version.

:class:`DataStream` watches a folder of shards (``*.jsonl`` with a ``text`` field, or ``*.txt``)
and turns each new complete shard into a data version: cleaned, de-duplicated against everything
seen before (exactly and approximately, ``evo.data.dedup``), tokenised, and split into train /
held-out by a hash of each document's content (``evo.data.splits``). Producers write a shard under
a temporary name (``*.tmp``, ``*.part`` or a dot-file) and rename it into place: the stream never
reads those, so a half-written shard is never consumed. Shards are immutable once renamed; a later
change is reported and ignored. Its saved state is ``evo.data.stream_state``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evo.core.errors import EvoError
from evo.data.dedup import DuplicateFilter
from evo.data.splits import split_blocks, tokenizer_id
from evo.data.stream_state import ShardRecord, StreamState
from evo.data.text import clean_document, content_key

log = logging.getLogger("evo.data.stream")

SHARD_SUFFIXES = (".jsonl", ".txt")
PARTIAL_SUFFIXES = (".tmp", ".part")
# settings that change what a shard keeps or how it is cut: part of every version id, and a
# resumed stream must use the same ones (replay size and shard order may change)
CONTENT_SETTINGS = ("seq_len", "heldout_frac", "seed", "min_chars", "near_dup_threshold", "num_perm", "tokenizer")


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
    JSON state (:class:`~evo.data.stream_state.StreamState`): which shards it consumed and its
    de-duplication memory. The token blocks are rebuilt on resume from the shards themselves,
    filtered to the documents kept the first time.
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
            "num_perm": int(num_perm), "order": order, "tokenizer": tokenizer_id(tokenizer),
        }
        self.state_path = Path(state_path) if state_path is not None else None
        self._dedup = DuplicateFilter(near_dup_threshold, num_perm)
        self._shards: list[ShardRecord] = []           # consumed shards, in consumption order
        self._heldout: dict[str, np.ndarray] = {}      # version -> held-out blocks
        self._train: np.ndarray | None = None          # train blocks of the newest version
        # a bounded, seeded sample of every version's training blocks: rehearsal for later LoRA
        # fits (never held-out text), so adapting to new data need not forget the old
        self.replay_train_blocks = int(replay_train_blocks)
        self._train_sample: dict[str, np.ndarray] = {}
        self._changed_warned: set[str] = set()
        if self.state_path is not None and self.state_path.is_file():
            self._load(StreamState.read(self.state_path))

    # ------------------------------------------------------------------------------ public
    @property
    def versions(self) -> list[str]:
        return [s.version for s in self._shards if s.version]

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
            self.snapshot().write(self.state_path)
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

    def snapshot(self) -> StreamState:
        """The state to save: settings, consumed shards, exact and near-duplicate memory."""
        return StreamState(folder=str(self.folder), settings=dict(self.settings), shards=tuple(self._shards),
                           seen=tuple(self._dedup.seen), signatures=dict(self._dedup.signatures))

    def state(self) -> dict:
        """:meth:`snapshot` as JSON-ready data (what the state file holds)."""
        return self.snapshot().to_dict()

    @classmethod
    def from_state(cls, state: dict | StreamState, tokenizer, *, folder=None, state_path=None) -> "DataStream":
        """Resume a stream from :meth:`state` or :meth:`snapshot` (settings come from the state)."""
        if not isinstance(state, StreamState):
            state = StreamState.from_dict(state)
        kw = {k: v for k, v in state.settings.items() if k != "tokenizer"}
        stream = cls(folder if folder is not None else state.folder, tokenizer, **kw)
        stream._load(state)
        stream.state_path = Path(state_path) if state_path is not None else None
        return stream

    # ----------------------------------------------------------------------------- shards
    def _new_shards(self) -> list[Path]:
        if not self.folder.is_dir():
            raise EvoError(f"{self.folder}: stream folder not found")
        done = {s.name: s for s in self._shards}
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

    def _check_unchanged(self, path: Path, record: ShardRecord) -> None:
        if path.stat().st_size != record.size and path.name not in self._changed_warned:
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
        sha = hashlib.sha256(raw).hexdigest()
        if report.skipped is None and not docs:
            report.skipped = "empty (no documents)"
        elif report.skipped is None and not kept:
            report.skipped = "no new text (every document rejected or a duplicate)"
        if report.skipped is not None:
            log.warning("%s: shard skipped: %s", path, report.skipped)
        else:
            prev = self.versions[-1] if self.versions else ""
            report.version = self._version_id(path, sha, prev)
            train, heldout, report.tokens = self._split(kept)
            self._train, self._heldout[report.version] = train, heldout
            self._keep_train_sample(report.version, train)
            report.train_blocks, report.heldout_blocks = len(train), len(heldout)
            if not len(train) or not len(heldout):
                log.warning("%s: version %s has %d train and %d held-out blocks of %d tokens",
                            path, report.version, len(train), len(heldout), self.settings["seq_len"])
        self._shards.append(ShardRecord(path.name, len(raw), sha, version=report.version,
                                        skipped=report.skipped, kept=tuple(keys)))
        report.seconds = time.perf_counter() - t0
        return report

    def _filter(self, docs: list[str], report: ShardReport) -> tuple[list[str], list[str]]:
        """Clean, then drop short texts, exact duplicates and near duplicates (first one wins)."""
        kept, keys = [], []
        for doc in docs:
            text = clean_document(doc)
            if len(text) < self.settings["min_chars"]:
                _count(report.rejected, "too_short")
                continue
            verdict, key = self._dedup.add(text)
            if verdict == "duplicate":
                report.duplicates += 1
            elif verdict == "near_duplicate":
                report.near_duplicates += 1
            else:
                kept.append(text)
                keys.append(key)
        report.kept = len(kept)
        return kept, keys

    def _split(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        s = self.settings
        return split_blocks(texts, self.tokenizer, seq_len=s["seq_len"], seed=s["seed"], heldout_frac=s["heldout_frac"])

    def _version_id(self, path: Path, sha: str, prev: str) -> str:
        # chained over the previous version: what a shard keeps depends on everything before it
        content = {k: self.settings[k] for k in CONTENT_SETTINGS}
        h = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
        h.update(prev.encode())
        h.update(bytes.fromhex(sha))
        return f"{path.stem}-{h.hexdigest()[:10]}"

    # ------------------------------------------------------------------------------ resume
    def _load(self, state: StreamState) -> None:
        for key in CONTENT_SETTINGS:
            value = self.settings[key]
            if key in state.settings and state.settings[key] != value:
                raise EvoError(f"stream state: setting {key} was {state.settings[key]!r}, now {value!r}; "
                               f"use a new state file for new settings")
        self._dedup.restore(state.seen, state.signatures)
        self._shards = list(state.shards)
        self._rebuild_blocks()

    def _rebuild_blocks(self) -> None:
        """Re-derive held-out blocks (all versions) and train blocks (newest) from the shards."""
        with_version = [s for s in self._shards if s.version]
        for i, rec in enumerate(with_version):
            path = self.folder / rec.name
            seq = self.settings["seq_len"]
            empty = np.zeros((0, seq), dtype=np.int64)
            if not path.is_file():
                log.warning("%s: consumed shard is gone; its blocks are empty on resume", path)
                self._heldout[rec.version] = empty
                continue
            raw, docs = self._read_shard(path, ShardReport(rec.name))
            if hashlib.sha256(raw).hexdigest() != rec.sha256:
                log.warning("%s: shard changed since it was consumed; keeping the documents it had", path)
            wanted = set(rec.kept)
            texts, seen = [], set()
            for doc in docs:
                text = clean_document(doc)
                key = content_key(text)
                if key in wanted and key not in seen:
                    seen.add(key)
                    texts.append(text)
            train, heldout, _ = self._split(texts)
            self._heldout[rec.version] = heldout
            self._keep_train_sample(rec.version, train)
            if i == len(with_version) - 1:
                self._train = train


def _count(counter: dict, reason: str) -> None:
    counter[reason] = counter.get(reason, 0) + 1
