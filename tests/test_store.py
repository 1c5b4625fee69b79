"""Run store: atomic checkpoints, torn log lines tolerated, existing runs protected."""
import json
import os

import pytest

from evo.errors import EvoError
from evo.store import RunStore, atomic_write_text


def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    with pytest.raises(EvoError, match="evo resume"):
        RunStore.create(tmp_path / "run", {})
    assert (tmp_path / "run" / "x").read_text() == "keep me"


def test_checkpoint_round_trip_and_no_temp_files_left(tmp_path):
    store = RunStore.create(tmp_path / "run", {"name": "t"})
    store.save_checkpoint({"generation": 3, "x": [1, 2]})
    store.save_checkpoint({"generation": 4, "x": [1, 2]})
    assert store.load_checkpoint()["generation"] == 4
    assert sorted(p.name for p in store.root.iterdir()) == ["checkpoint.json", "config.yaml"]
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
