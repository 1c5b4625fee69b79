"""End to end on a real local Ray: evolve merges of the micro zoo, export, resume, failures."""
from __future__ import annotations

import os

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import evo
from evo.loop.experiment import load_config
from evo.core.errors import EvoError
from evo.scoring.fitness import mean_nll
from evo.artifacts.manifest import verify_manifest
from evo.scoring.sources import search_and_selection
from evo.artifacts.store import RunStore


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


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_run_export_load_and_resume_matches_uninterrupted(micro_zoo, ray_session, space_file, tmp_path, mode):
    cfg = micro_config(micro_zoo, space_file)
    if mode == "sync":
        cfg["optimizer"]["async"] = False
    else:  # steady state; one evaluator fixes the arrival order, so a resume can match exactly
        cfg["ray"]["evaluators"] = 1
    full = evo.run(cfg, tmp_path / "full", quiet=True)

    # the run store holds everything a resume and a report need
    store = RunStore.open(tmp_path / "full")
    ckpt = store.load_checkpoint()
    assert ckpt.generation == 3 and len(ckpt.logbook) == 3
    cands = store.candidates()
    assert {c["candidate"] for c in cands} >= {"g0000-c000", "g0002-c004"}
    if mode == "async":  # a generation is every 6 results told, all of them new candidates
        assert sorted(c["candidate"] for c in cands) == [f"g{g:04d}-c{i:03d}" for g in range(3) for i in range(6)]
    # none failed; paired early rejection (on by default) may stop clearly worse ones early
    assert all(c["status"] in ("ok", "rejected") for c in cands) and any(c["status"] == "ok" for c in cands)
    # synchronous: population - elites (they carry over); steady state: every result counts
    assert ckpt.logbook[1]["evals"] + ckpt.logbook[1]["cached"] == (5 if mode == "sync" else 6)

    # every generation scored the control on its own draw, and re-scored the surviving elite on it
    draws = {c["generation"]: c["draw"] for c in cands}
    assert draws == {0: 0, 1: 1, 2: 2}
    elites = [c for c in cands if c["candidate"].startswith("g0001-e")]
    assert not elites  # elites are not candidates: their re-scores live in the cache, keyed by draw
    cache = store.cache_load()
    assert sum(k.endswith("|b1") for k in cache) > ckpt.logbook[1]["evals"]  # candidates + control + elite
    ses = [c["se"] for c in cands if c["se"] is not None]  # paired to the control: 0 for the control itself
    assert ses and all(x >= 0 for x in ses) and sum(x > 0 for x in ses) >= len(ses) - 1

    # the comparison: base, each specialist, the simple baselines and the evolved best, with
    # selection and test values; the release is chosen on the selection split
    comp = full.comparison
    assert {"base", "uniform average", "ties (w=1, density=0.5)", "dare_ties (w=1, density=0.5)"} <= set(comp)
    assert {f"specialist:{d}" for d in micro_zoo.domains} <= set(comp)
    assert any(k.startswith("evolved #1") for k in comp) and any(k.startswith("task arithmetic (lambda=") for k in comp)
    sel = full.selection
    assert sum(row["released"] for row in comp.values()) == 1 and comp[sel["release"]]["released"]
    scores = {k: v["selection"]["mean"] for k, v in comp.items() if "selection" in v}
    simple = [k for k in scores if k == "uniform average" or k.startswith(("task arithmetic", "ties", "dare_ties"))]
    assert scores[sel["release"]] == min(scores[k] for k in simple + [k for k in scores if k.startswith("evolved")])
    assert all("test" in row for row in comp.values())
    assert sel["margins"]["release_vs_uniform/test"]["blocks"] > 0
    # the report counts failures and early rejections apart (a rejection is not a failure)
    page = evo.report(tmp_path / "full").read_text()
    n_failed = sum(c["status"] == "failed" for c in cands)
    n_rejected = sum(c["status"] == "rejected" for c in cands)
    assert f"{len(cands)} candidates ({n_failed} failed, {n_rejected} stopped early by rejection)" in page

    # stop after one generation, then resume: same final best recipe and values
    evo.run(cfg, tmp_path / "part", quiet=True, stop_after=1)
    assert RunStore.open(tmp_path / "part").load_checkpoint().generation == 1
    resumed = evo.resume(tmp_path / "part", quiet=True)
    assert resumed.best_recipe.key() == full.best_recipe.key()
    assert resumed.best_values == pytest.approx(full.best_values, abs=1e-9)
    assert resumed.release_recipe.key() == full.release_recipe.key()

    # the run's one data version is done: resuming the finished run evaluates nothing and
    # reports the selection it made
    seen = len(store.events())
    again = evo.resume(tmp_path / "full", quiet=True)
    assert again.selection == full.selection and again.comparison == full.comparison
    after = [e["event"] for e in store.events()[seen:]]
    assert not {"generation_done", "selection"} & set(after) and after[-1] == "run_finished", after

    # export: a loadable HF model whose perplexity is the recorded fitness
    release = evo.export(tmp_path / "full")
    assert release == tmp_path / "full" / "releases" / "v0001"
    verify_manifest(release)
    model = AutoModelForCausalLM.from_pretrained(release).eval()
    tok = AutoTokenizer.from_pretrained(release)
    config = load_config(store.config())
    _, selection_blocks = search_and_selection(config, tok)
    nlls = [mean_nll(model, torch.from_numpy(b), batch_size=6) for b in selection_blocks.values()]
    recorded = comp[sel["release"]]["selection"]["mean"]
    assert float(np.mean(nlls)) == pytest.approx(recorded, abs=1e-4)  # the selection split, not the search's
    assert not list(release.glob("*.bin"))
    fitness = json.loads((release / "fitness.json").read_text())
    assert fitness["objectives"]["mean_logppl"]["value"] == pytest.approx(recorded)
    assert fitness["measured_on"] == "selection" and set(fitness["values_by_split"]) >= {"selection", "test"}
    assert fitness["release"]["label"] == sel["release"]
    assert "95% interval" in (release / "README.md").read_text()
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
                                                          "options": {"elites": 0, "mutpb": 0.0, "cxpb": 0.0},
                                                          "async": False, "start": "uniform"})  # gen 1 copies gen 0
    cfg["eval"] = {**cfg["eval"], "redraw": False}  # the same blocks every generation
    evo.run(cfg, tmp_path / "run", quiet=True)
    cands = RunStore.open(tmp_path / "run").candidates()
    # without variation, generation 1 re-asks recipes already evaluated in generation 0
    gen1 = [c for c in cands if c["generation"] == 1]
    assert gen1 and all(c["cached"] for c in gen1)
    cache = RunStore.open(tmp_path / "run").cache_load()
    assert len(cache) == len({c["key"] for c in cands}) + 1  # and the control, on the one draw


def test_fresh_draws_re_score_repeated_recipes_on_new_blocks(micro_zoo, ray_session, space_file, tmp_path):
    """With redraw (the default) a recipe asked again in the next generation is scored on that
    generation's blocks, and values stay comparable through the control (evo.data.draws)."""
    cfg = micro_config(micro_zoo, space_file, optimizer={"name": "ga", "generations": 2, "population": 4,
                                                          "options": {"elites": 0, "mutpb": 0.0, "cxpb": 0.0},
                                                          "async": False})  # generation 1 copies generation 0
    evo.run(cfg, tmp_path / "run", quiet=True)
    cands = RunStore.open(tmp_path / "run").candidates()
    gen0 = {c["recipe"]["key"] if "key" in (c["recipe"] or {}) else json.dumps(c["recipe"], sort_keys=True): c
            for c in cands if c["generation"] == 0}
    gen1 = [c for c in cands if c["generation"] == 1]
    assert gen1 and not any(c["cached"] for c in gen1)
    for c in gen1:
        before = gen0[json.dumps(c["recipe"], sort_keys=True)]
        assert before["key"] != c["key"] and c["key"].endswith("|b1")
        if c["status"] == before["status"] == "ok":  # same recipe, other blocks: raw values differ ...
            assert c["raw_values"] != before["raw_values"]
            # ... but adjusted by the control they agree to within a few standard errors
            assert abs(c["values"][0] - before["values"][0]) < 4 * (c["se"] + before["se"]) + 1e-3


def test_steady_state_run_replays_its_recorded_arrival_order(micro_zoo, ray_session, space_file, tmp_path):
    """Two evaluators deliver results in the machine's order; the search log records it, and a
    resume replays it: from no checkpoint at all, the whole run (its start point included) is
    rebuilt from the log and the fitness cache, evaluating nothing, to the same optimizer state."""
    import shutil

    cfg = micro_config(micro_zoo, space_file, optimizer={"name": "cmaes", "generations": 3, "population": 6,
                                                          "start": "best_lambda"})
    cfg["eval"] = {**cfg["eval"], "selection": {"lambdas": [0.3, 1.0]}}
    run = evo.run(cfg, tmp_path / "run", quiet=True)
    store = RunStore.open(tmp_path / "run")
    log = store.search_log()
    # optimizer.start: best_lambda scored the uniform average and each λ on generation 0's blocks
    # and centred CMA-ES on the best of them
    start = next(e for e in store.events() if e["event"] == "search_start")
    assert set(start["scores"]) == {"uniform average", "weight 0.3", "weight 1"}
    assert start["start"] == max(start["scores"], key=start["scores"].get)
    from evo.loop.generation import make_space

    space = make_space(load_config(store.config()))
    lam = {"uniform average": 1 / len(space.models), "weight 0.3": 0.3, "weight 1": 1.0}[start["start"]]
    centre = space.uniform_genome(weight=lam, density=1.0).tolist()
    assert store.load_checkpoint().optimizer["options"]["initial"][0] == pytest.approx(centre)
    assert [e["step"] for e in log].count("tell") == 18 and [e["step"] for e in log].count("ask") == 18
    assert [e["gen"] for e in log if e["step"] == "start"] == [0, 1, 2]
    # values told in arrival order; each generation row counts 6 results
    assert [row["evals"] + row["cached"] for row in store.load_checkpoint().logbook] == [6, 6, 6]
    final = store.load_checkpoint().optimizer

    shutil.copytree(tmp_path / "run", tmp_path / "replay")
    (tmp_path / "replay" / "checkpoint.json").unlink()
    cached = (tmp_path / "replay" / "cache.jsonl").read_text()
    replayed = evo.resume(tmp_path / "replay", quiet=True)
    assert (tmp_path / "replay" / "cache.jsonl").read_text() == cached  # nothing evaluated again
    again = RunStore.open(tmp_path / "replay")
    assert again.search_log() == log  # replayed, not appended to
    state = again.load_checkpoint().optimizer
    assert state["strategy"] == final["strategy"] and state["hall_of_fame"] == final["hall_of_fame"]
    assert replayed.best_recipe.key() == run.best_recipe.key() and replayed.best_values == run.best_values

    # a log that no longer matches the optimizer (another seed) is refused in one line
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    (tmp_path / "other" / "checkpoint.json").unlink()
    conf = yaml.safe_load((tmp_path / "other" / "config.yaml").read_text())
    seed = conf["seed"]
    conf["seed"] = 8
    (tmp_path / "other" / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    # the resume policy refuses the edit first, naming the field (the seed is not a resumable field)
    with pytest.raises(EvoError, match=f"config.yaml: seed changed from {seed} to 8 since the run started"):
        evo.resume(tmp_path / "other", quiet=True)
    # and a run directory whose recorded config was changed too still cannot replay another search
    (tmp_path / "other" / "config.applied.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    with pytest.raises(EvoError, match="search log replay diverged at g0000-c0"):
        evo.resume(tmp_path / "other", quiet=True)


def test_run_starts_its_evaluators_as_the_given_class(micro_zoo, ray_session, space_file, tmp_path):
    """``evo.run(..., evaluator_class=)``: the actors are that subclass (a benchmark's emulated slow
    device), defined in a function so Ray ships it by value; the default run uses Evaluator."""
    from evo.scoring.evaluator import Evaluator

    class Tagging(Evaluator):
        def evaluate(self, recipe, *args, **kwargs):
            out = super().evaluate(recipe, *args, **kwargs)
            out["timings"]["tagged_pid"] = os.getpid()
            return out

    cfg = micro_config(micro_zoo, space_file, optimizer={"name": "random", "generations": 1, "population": 3,
                                                          "async": False, "start": "uniform"})
    evo.run(cfg, tmp_path / "tagged", quiet=True, evaluator_class=Tagging)
    fresh = [c for c in RunStore.open(tmp_path / "tagged").candidates() if not c["cached"]]
    assert fresh and all(c["timings"].get("tagged_pid") not in (None, os.getpid()) for c in fresh)


def test_export_refuses_unfinished_run(tmp_path):
    RunStore.create(tmp_path / "run", {"name": "x"})
    with pytest.raises(EvoError, match="no complete generation"):
        evo.export(tmp_path / "run")
