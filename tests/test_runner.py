"""End to end on a real local Ray: evolve merges of the micro zoo, export, resume, failures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import evo
from evo.config import ExperimentConfig
from evo.data import read_texts
from evo.errors import EvoError
from evo.fitness import mean_nll, token_blocks
from evo.release import verify_manifest
from evo.store import RunStore


@pytest.fixture
def space_file(tmp_path, repo_root):
    data = yaml.safe_load((repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml").read_text())
    data["layer_groups"] = 2
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def micro_config(zoo, space, **over) -> dict:
    cfg = {
        "name": "micro",
        "zoo": str(zoo.root),
        "search_space": str(space),
        "eval": {"seq_len": 32, "max_blocks": 6, "batch_size": 6},
        "optimizer": {"name": "ga", "generations": 3, "population": 6, "options": {"elites": 1}},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5, "candidate_timeout_s": 120},
        "seed": 7,
    }
    cfg.update(over)
    return cfg


def test_run_export_load_and_resume_matches_uninterrupted(micro_zoo, ray_session, space_file, tmp_path):
    cfg = micro_config(micro_zoo, space_file)
    full = evo.run(cfg, tmp_path / "full", quiet=True)

    # the run store holds everything a resume and a report need
    store = RunStore.open(tmp_path / "full")
    ckpt = store.load_checkpoint()
    assert ckpt["generation"] == 3 and len(ckpt["logbook"]) == 3
    cands = store.candidates()
    assert {c["candidate"] for c in cands} >= {"g0000-c000", "g0002-c004"}
    # none failed; paired early rejection (on by default) may stop clearly worse ones early
    assert all(c["status"] in ("ok", "rejected") for c in cands) and any(c["status"] == "ok" for c in cands)
    assert ckpt["logbook"][1]["evals"] + ckpt["logbook"][1]["cached"] == 5  # population - elites

    # best never gets worse across generations (elitism + hall of fame)
    bests = [row["best"][0] for row in ckpt["logbook"]]
    assert bests == sorted(bests, reverse=True)

    # the comparison covers base, each specialist, uniform average, and the evolved best
    comp = full.comparison
    assert {"base", "uniform average", "evolved (best)"} <= set(comp)
    assert {f"specialist:{d}" for d in micro_zoo.domains} <= set(comp)

    # stop after one generation, then resume: same final best recipe and values
    part = evo.run(cfg, tmp_path / "part", quiet=True, stop_after=1)
    assert RunStore.open(tmp_path / "part").load_checkpoint()["generation"] == 1
    resumed = evo.resume(tmp_path / "part", quiet=True)
    assert resumed.best_recipe.key() == full.best_recipe.key()
    assert resumed.best_values == pytest.approx(full.best_values, abs=1e-9)

    # export: a loadable HF model whose perplexity is the recorded fitness
    release = evo.export(tmp_path / "full")
    assert release == tmp_path / "full" / "releases" / "v0001"
    verify_manifest(release)
    model = AutoModelForCausalLM.from_pretrained(release).eval()
    tok = AutoTokenizer.from_pretrained(release)
    config = ExperimentConfig.from_dict(store.config())
    nlls = [
        mean_nll(model, token_blocks(read_texts(path), tok, 32, 6), batch_size=6)
        for path in config.eval.sets.values()
    ]
    assert float(np.mean(nlls)) == pytest.approx(full.best_values[0], abs=1e-4)
    assert not list(release.glob("*.bin"))
    assert json.loads((release / "fitness.json").read_text())["objectives"]["mean_logppl"]["value"] == pytest.approx(full.best_values[0])
    assert yaml.safe_load((release / "mergekit.yaml").read_text())["merge_method"] == "task_arithmetic"

    # releases are never overwritten; the next export is v0002
    with pytest.raises(EvoError, match="already exists"):
        evo.export(tmp_path / "full", release)
    assert evo.export(tmp_path / "full").name == "v0002"


def test_failing_candidate_is_recorded_and_generation_goes_on(micro_zoo, ray_session, tmp_path):
    """A recipe that cannot work for these models (slerp takes exactly two) fails per candidate."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "layer_groups": 1,
        "genes": {"merge_method": {"type": "categorical", "choices": ["slerp", "task_arithmetic"]},
                  "weight": {"type": "float", "low": 0.0, "high": 1.0, "scope": "model"},
                  "t": {"type": "float", "low": 0.0, "high": 1.0}},
    }))
    cfg = micro_config(micro_zoo, space, optimizer={"name": "random", "generations": 1, "population": 8, "seed_baselines": False})
    result = evo.run(cfg, tmp_path / "run", quiet=True)
    cands = RunStore.open(tmp_path / "run").candidates()
    failed = [c for c in cands if c["status"] == "failed"]
    ok = [c for c in cands if c["status"] == "ok"]
    assert failed and ok and len(cands) == 8
    assert all(c["recipe"] is None and "slerp" in c["error"] for c in failed)
    assert all(c["recipe"]["merge"]["merge_method"] == "task_arithmetic" for c in ok)
    assert result.best_recipe.merge.merge_method == "task_arithmetic"


def test_fitness_cache_skips_repeated_recipes(micro_zoo, ray_session, space_file, tmp_path):
    cfg = micro_config(micro_zoo, space_file, optimizer={"name": "ga", "generations": 2, "population": 4,
                                                          "options": {"elites": 0, "mutpb": 0.0, "cxpb": 0.0}})
    evo.run(cfg, tmp_path / "run", quiet=True)
    cands = RunStore.open(tmp_path / "run").candidates()
    # without variation, generation 1 re-asks recipes already evaluated in generation 0
    gen1 = [c for c in cands if c["generation"] == 1]
    assert gen1 and all(c["cached"] for c in gen1)
    cache = RunStore.open(tmp_path / "run").cache_load()
    assert len(cache) == len({c["key"] for c in cands})


def test_export_refuses_unfinished_run(tmp_path):
    RunStore.create(tmp_path / "run", {"name": "x"})
    with pytest.raises(EvoError, match="no complete generation"):
        evo.export(tmp_path / "run")
