"""fitness.json as one typed record: its keys in the order releases have always written them,
a kind's absent fields left out; and the card rendered from it by the packaged template."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from evo.artifacts.card import render_card
from evo.artifacts.fitness import FitnessRecord, fitness_record
from evo.search.recipe import Recipe

EVAL = SimpleNamespace(sets={"code": "/data/code.jsonl"}, tasks={}, task_limit=None, task_subset=None, seq_len=32,
                       max_blocks=4, batch_size=4)
SPECS = [{"name": "mean_logppl", "goal": "minimize"}]


def stub_store(tmp_path: Path):
    cands = [{"candidate": "g1", "generation": 1, "parents": ["g0"], "values": [2.5]},
             {"candidate": "g0", "generation": 0, "values": None}]
    return SimpleNamespace(root=tmp_path / "run", candidates=lambda: cands)


def test_a_stream_record_keeps_its_keys_in_order_and_leaves_out_the_fixed_data_fields(tmp_path):
    record = fitness_record(SimpleNamespace(eval=EVAL), stub_store(tmp_path), SPECS, [2.5], data_version="d-1",
                            generation=3, comparison={}, lineage_of="g1", eval_sets=False,
                            stream={"folder": "s"}, current_release_same_data={"name": "base", "objectives": {}},
                            comparison_sets=["code"])
    data = record.to_dict()
    assert list(data) == ["objectives", "data_version", "generation", "run", "eval", "objective_specs", "stream",
                          "current_release_same_data", "comparison_sets", "comparison", "lineage"]
    assert data["objectives"] == {"mean_logppl": {"value": 2.5, "goal": "minimize"}}
    assert data["eval"]["sets"] == {} and sorted(c["candidate"] for c in data["lineage"]) == ["g0", "g1"]
    assert FitnessRecord(**json.loads(json.dumps(data))) == record  # the JSON reads back as the record


def test_a_baseline_has_no_lineage_and_the_record_needs_its_shared_fields(tmp_path):
    record = fitness_record(SimpleNamespace(eval=EVAL), stub_store(tmp_path), SPECS, [2.5], data_version="d-1",
                            generation=3, comparison={}, lineage_of=None, measured_on="selection", data_inputs={})
    assert record.lineage == [] and record.to_dict()["data_inputs"] == {}
    with pytest.raises(TypeError, match="data_version"):
        FitnessRecord(objectives={}, generation=0, run="r", eval={}, objective_specs=[], comparison={}, lineage=[])


def test_the_card_renders_from_the_packaged_template():
    recipe = Recipe.from_dict({"merge": {"merge_method": "task_arithmetic", "base_model": "base",
                                         "models": [{"model": "code", "parameters": {"weight": 0.5}}]}})
    fitness = {"objectives": {"mean_logppl": {"value": 2.0, "goal": "minimize"}}, "data_version": "d-1",
               "generation": 2, "lineage": [{"candidate": "g1", "generation": 1, "parents": [], "values": None}]}
    cfg = SimpleNamespace(name="exp", zoo=None, eval=EVAL)
    card = render_card(recipe, {"base": "/m/base", "code": "/m/code"}, fitness, cfg)
    assert card.startswith("# exp: evolved merge\n\nA `task_arithmetic` merge of 1 models over a common base")
    assert "- code: `code`\n" in card and "| mean_logppl | minimize | 2.0000 |\n" in card
    assert "| 1 | g1 | - | failed |\n" in card and card.endswith("(sha256 of every file in `MANIFEST.sha256`).\n")
    del fitness["generation"]
    with pytest.raises(Exception, match="generation"):  # StrictUndefined: a missing field is an error, not blank
        render_card(recipe, {"base": "/m/base", "code": "/m/code"}, fitness, cfg)
