"""Run store: atomic checkpoints, torn log lines tolerated, existing runs protected."""
import json
import os

import pytest

from evo.core.errors import EvoError
from evo.artifacts.checkpoint import Checkpoint
from evo.artifacts.store import RunStore


from evo.core.fs import atomic_write_text
def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    with pytest.raises(EvoError, match="evo resume"):
        RunStore.create(tmp_path / "run", {})
    assert (tmp_path / "run" / "x").read_text() == "keep me"


def _checkpoint(generation: int) -> Checkpoint:
    return Checkpoint(generation=generation, generations=8, optimizer={"name": "ga"}, logbook=[{"gen": 0}],
                      data_version="v", objectives=[{"name": "m", "goal": "minimize"}], space={"labels": []},
                      steady_state={"log_position": 3})


def test_checkpoint_round_trip_and_no_temp_files_left(tmp_path):
    store = RunStore.create(tmp_path / "run", {"name": "t"})
    store.save_checkpoint(_checkpoint(3))
    store.save_checkpoint(_checkpoint(4))
    assert store.load_checkpoint() == _checkpoint(4)  # typed, every field round-trips
    assert sorted(p.name for p in store.root.iterdir()) == ["checkpoint.json", "config.applied.yaml", "config.yaml"]
    assert RunStore.open(tmp_path / "run").config() == {"name": "t"}


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_torn_last_line_is_ignored(tmp_path):
    store = RunStore.create(tmp_path / "run", {})
    store.cache_put("k1", {"status": "ok"})
    with open(store.root / "cache.jsonl", "a") as fh:
        fh.write('{"key": "k2", "resu')  # driver killed mid-write
    assert store.cache_load() == {"k1": {"status": "ok"}}
    store.event("x", n=1)
    assert store.events()[0]["event"] == "x"


def test_open_non_run(tmp_path):
    with pytest.raises(EvoError, match="not a run directory"):
        RunStore.open(tmp_path)


def test_a_checkpoint_from_a_newer_evo_or_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    store = RunStore.create(tmp_path / "run", {"name": "t"})
    (store.root / "checkpoint.json").write_text(json.dumps({**_checkpoint(1).to_dict(), "version": 99}))
    with pytest.raises(EvoError, match=r"checkpoint.json: written by a newer evo \(checkpoint version 99\)"):
        store.load_checkpoint()
    (store.root / "checkpoint.json").write_text(json.dumps({"generation": 1}))
    with pytest.raises(EvoError, match="checkpoint.json: not a checkpoint of this evo"):
        store.load_checkpoint()


def test_a_record_appended_after_a_torn_line_is_not_lost(tmp_path):
    """A killed driver leaves half a line; the resumed driver's next record starts a new line."""
    store = RunStore.create(tmp_path / "run", {"name": "t"})
    store.log_step({"step": "ask", "name": "g0000-c000"})
    with open(store.root / RunStore.SEARCH_LOG, "a") as fh:
        fh.write('{"step": "tell", "na')  # the kill
    store.log_step({"step": "tell", "name": "g0000-c000"})
    assert store.search_log() == [{"step": "ask", "name": "g0000-c000"}, {"step": "tell", "name": "g0000-c000"}]


def test_time_split_busy_fraction_is_per_evaluator_that_worked():
    """Two evaluators each busy half the wall time: 50 % busy, whether the pool still holds both
    actors at the end or only one (a lost evaluator's work still counts against its own time)."""
    from evo.artifacts.status import format_time_split, time_split

    results = [{"dispatch": {"evaluator": a, "start": 0.0, "end": 5.0}, "block_nlls": {"x": [1.0] * 4}} for a in (0, 1)]
    for pool_size in (2, 1):
        t = time_split({"evolve": 8.0}, 10.0, results, 32, pool_size)
        assert t["busy"] == 0.5 and {v["busy"] for v in t["per_evaluator"].values()} == {0.5}
        assert t["steps_s"] == {"search": 8.0, "start-up and other": 2.0}
        assert t["tokens_per_s"] == 4 * 32 / 5.0
    assert "evaluators busy 50% (0: 50%, 1: 50%)" in format_time_split(t)


def test_live_split_covers_the_running_call_only():
    """`evo status` on a running driver: seconds since this call's Ray started, candidates scored
    since, busy fraction per evaluator; nothing once the call wrote its own time split."""
    from evo.artifacts.status import live_split

    events = [{"event": "ray_started", "time": 0.0, "evaluators": 2}, {"event": "time_split", "time": 50.0},
              {"event": "ray_started", "time": 100.0, "evaluators": 2}]
    cands = [{"dispatch": {"evaluator": 0, "start": 10.0, "end": 40.0}},           # the earlier call
             {"dispatch": {"evaluator": 0, "start": 110.0, "end": 130.0}},
             {"dispatch": {"evaluator": 1, "start": 110.0, "end": 120.0}},
             {"dispatch": {"evaluator": 1, "start": 120.0, "end": 125.0}, "cached": True}]
    line = live_split(events, cands, now=140.0)
    assert line == "40 s since Ray started, 2 candidates scored; evaluators busy 38% (0: 50%, 1: 25%)"
    assert live_split(events + [{"event": "time_split", "time": 150.0}], cands, now=160.0) is None
    assert live_split([], cands) is None
