"""The evaluator without Ray: task metrics, early rejection, NaN candidates, objective vectors."""
from __future__ import annotations


import numpy as np
import pytest

from evo.loop.experiment import load_config
from evo.core.errors import EvoError
from evo.scoring.rejection import RejectionTest, Threshold
from evo.scoring.evaluator import Evaluator
from evo.scoring.fitness import objective_values
from evo.loop.generation import search_draws
from evo.loop.selection import baseline_recipes
from evo.scoring.sources import Sources


@pytest.fixture(scope="module")
def setup(micro_zoo, repo_root):
    cfg = load_config({
        "zoo": str(micro_zoo.root),
        "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml"),
        "eval": {"seq_len": 32, "max_blocks": 16, "batch_size": 8, "task_limit": 12,
                 "tasks": {"arith": str(repo_root / "tasks" / "arithmetic" / "arithmetic_mc.yaml")}},
        "objectives": [{"name": "ppl", "metric": "logppl"},
                       {"name": "arith", "metric": "task", "goal": "maximize"}],
    })
    sources = Sources.load(cfg)
    ev = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, tasks=sources.tasks,
                   rejection=RejectionTest(chunks=4, z=2.0, margin=0.0))
    return cfg, ev, baseline_recipes(cfg)


def test_task_metrics_and_objective_vector(setup):
    cfg, ev, recipes = setup
    result = ev.evaluate(recipes["base"].to_dict())
    assert result["status"] == "ok"
    assert 0.0 <= result["metrics"]["task/arith"] <= 1.0
    values = objective_values(result["metrics"], cfg.objectives, list(cfg.eval.sets), ["arith"])
    ppl = sum(result["metrics"][f"logppl/{s}"] for s in cfg.eval.sets) / len(cfg.eval.sets)
    assert values == [pytest.approx(ppl), result["metrics"]["task/arith"]]


def test_early_rejection_stops_a_bad_candidate_never_a_good_one(setup):
    cfg, ev, recipes = setup
    full_base = ev.evaluate(recipes["base"].to_dict())
    base_mean = sum(v for k, v in full_base["metrics"].items() if k.startswith("logppl/")) / 3
    # a clearly bad candidate: every task vector added four times over
    bad = recipes["base"].to_dict()
    for entry in bad["merge"]["models"]:
        entry["parameters"]["weight"] = 4.0
    bad_full = ev.evaluate(bad)
    bad_mean = sum(v for k, v in bad_full["metrics"].items() if k.startswith("logppl/")) / 3
    assert bad_mean > base_mean + 0.2
    rejected = ev.evaluate(bad, reject_above=Threshold(base_mean))
    assert rejected["status"] == "rejected" and rejected["evaluated_fraction"] < 0.6
    assert "task/arith" not in rejected["metrics"]  # rejected before task scoring: work saved
    # a good candidate (at or better than the threshold) is never rejected
    for recipe in (recipes["base"], recipes["uniform average"]):
        full = ev.evaluate(recipe.to_dict())
        mean = sum(v for k, v in full["metrics"].items() if k.startswith("logppl/")) / 3
        kept = ev.evaluate(recipe.to_dict(), reject_above=Threshold(mean))
        assert kept["status"] == "ok" and kept["evaluated_fraction"] == 1.0
        assert kept["metrics"] == pytest.approx(full["metrics"])


def test_nan_candidate_is_failed_not_a_crash(setup):
    cfg, ev, recipes = setup
    bad = recipes["base"].to_dict()
    bad["merge"]["parameters"] = {"lambda": float("inf")}
    bad["merge"]["models"][0]["parameters"]["weight"] = 1.0
    result = ev.evaluate(bad)
    assert result["status"] == "failed" and ("non-finite" in result["error"] or "nan" in result["error"].lower())
    # the evaluator stays usable after a failure
    assert ev.evaluate(recipes["base"].to_dict())["status"] == "ok"


def test_paired_rejection_uses_the_reference_blocks(setup):
    """Paired on the k-th best's per-block scores, a consistently worse candidate is rejected
    early with an estimate close to its full score; the reference itself and better candidates
    never are; a reference measured on other blocks falls back to the unpaired bound."""
    cfg, ev, recipes = setup
    ref = ev.evaluate(recipes["uniform average"].to_dict())
    assert ref["status"] == "ok" and set(ref["block_nlls"]) == set(cfg.eval.sets)
    ref_mean = sum(v for k, v in ref["metrics"].items() if k.startswith("logppl/")) / 3
    threshold = Threshold(ref_mean, ref["block_nlls"])
    same = ev.evaluate(recipes["uniform average"].to_dict(), reject_above=threshold)
    assert same["status"] == "ok" and same["evaluated_fraction"] == 1.0
    worse = recipes["base"].to_dict()
    for entry in worse["merge"]["models"]:
        entry["parameters"]["weight"] = 1.5
    full = ev.evaluate(worse)
    full_mean = sum(v for k, v in full["metrics"].items() if k.startswith("logppl/")) / 3
    assert full_mean > ref_mean
    paired = ev.evaluate(worse, reject_above=threshold)
    assert paired["status"] == "rejected" and paired["evaluated_fraction"] <= 0.5
    est = sum(paired["metrics"].values()) / 3
    assert abs(est - full_mean) < abs(full_mean - ref_mean)  # a useful estimate, not just "worse"
    # the unpaired bound needs more blocks (or never gets there) for the same candidate
    bound = ev.evaluate(worse, reject_above=Threshold(ref_mean))
    assert bound["evaluated_fraction"] >= paired["evaluated_fraction"]
    # a better candidate than the reference is kept, with its exact full metrics
    better = ev.evaluate(recipes["uniform average"].to_dict(), reject_above=Threshold(full_mean, full["block_nlls"]))
    assert better["status"] == "ok" and better["metrics"] == pytest.approx(ref["metrics"])
    # a reference of the wrong length is not used for pairing
    short = Threshold(ref_mean, {k: v[:3] for k, v in ref["block_nlls"].items()})
    assert ev.evaluate(worse, reject_above=short)["evaluated_fraction"] == bound["evaluated_fraction"]


def test_subset_fitness_picks_blocks_across_difficulty(micro_zoo, repo_root):
    from evo.scoring.subset import quantile_pick

    assert quantile_pick(np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 6.0, 7.0]), 0.25) == [3, 6]
    assert quantile_pick(np.arange(4.0), 1.0) == [0, 1, 2, 3]
    cfg = load_config({
        "zoo": str(micro_zoo.root), "eval": {"seq_len": 32, "max_blocks": 16, "batch_size": 8, "subset": 0.25},
        "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml"),
    })
    sources = Sources.load(cfg)
    draws = search_draws(cfg, sources)
    pool = sources.eval_sets["valid"]
    assert draws.size == 4 and sources.difficulty is not None
    for gen in range(3):
        drawn = draws.draw(gen)
        for name in cfg.eval.sets:
            n, order = len(pool[name]), np.argsort(sources.difficulty[name], kind="stable")
            rank = {int(b): i for i, b in enumerate(order)}
            # one block from each difficulty quartile of the pool
            edges = np.linspace(0, n, 5).astype(int)
            assert sorted(int(np.searchsorted(edges, rank[i], side="right")) - 1 for i in drawn[name]) == [0, 1, 2, 3]
    assert draws.draw(1) != draws.draw(2)  # a fresh draw every generation
    plain = Sources.load(load_config({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "subset": 1.0}}))
    assert plain.data_version != sources.data_version  # cached fitness never mixes the two
    with pytest.raises(EvoError, match=r"eval.subset: a fraction in \(0, 1\]"):
        load_config({**cfg.to_dict(), "eval": {"subset": 0.0}})


def test_task_subset_scores_part_of_the_items_in_search_and_all_in_the_comparison(micro_zoo, repo_root):
    from evo.scoring.sources import subset_items

    assert subset_items(10, 4) == [0, 3, 6, 9] and subset_items(3, 5) == [0, 1, 2]
    arith = str(repo_root / "tasks" / "arithmetic" / "arithmetic_mc.yaml")
    raw = {"zoo": str(micro_zoo.root), "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml"),
           "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 8, "task_limit": 40, "task_subset": 8,
                    "tasks": {"arith": arith}},
           "objectives": [{"name": "ppl", "metric": "logppl"}, {"name": "arith", "metric": "task", "goal": "maximize"}]}
    cfg = load_config(raw)
    sources = Sources.load(cfg)
    assert sources.task_items == {"arith": subset_items(40, 8)} and len(sources.tasks["arith"]) == 40
    assert "selection" in sources.eval_sets  # where the release is chosen: every item
    ev = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, tasks=sources.tasks,
                   task_items=sources.task_items)
    recipe = baseline_recipes(cfg)["uniform average"].to_dict()
    search, full = ev.evaluate(recipe), ev.evaluate(recipe, collection="selection")
    import torch

    ev.evaluate(recipe)  # the resident model now holds this merge
    with torch.no_grad():
        direct = sources.tasks["arith"].score(ev.model, items=sources.task_items["arith"])["value"]
        every = sources.tasks["arith"].score(ev.model)["value"]
    assert search["metrics"]["task/arith"] == pytest.approx(direct)
    assert full["metrics"]["task/arith"] == pytest.approx(every)
    plain = Sources.load(load_config({**raw, "eval": {**raw["eval"], "task_subset": None}}))
    assert plain.data_version != sources.data_version and plain.task_items == {}
    with pytest.raises(EvoError, match="eval.task_subset: a number of items >= 1"):
        load_config({**raw, "eval": {**raw["eval"], "task_subset": 0}})


def test_an_evaluator_without_sources_answers_stale_until_its_first_update(setup, micro_zoo, repo_root):
    """The pool's actors (and any Ray restarts) are built empty and loaded by update(): the
    result must equal that of an evaluator built with its sources."""
    cfg, ev, recipes = setup
    sources = Sources.load(cfg)
    empty = Evaluator(None, None, sources.model_config, rejection=ev.rejection)
    recipe = recipes["uniform average"].to_dict()
    assert empty.evaluate(recipe, epoch=1) == {"status": "stale", "epoch": 0}
    assert empty.evaluate(recipe) == {"status": "stale", "epoch": 0}  # no sources, whatever the epoch
    with pytest.raises(EvoError, match="first update must carry the base model"):
        empty.update(1, eval_sets=sources.eval_sets)
    empty.update(1, eval_sets=sources.eval_sets, base=sources.base, sources=sources.deltas, tasks=sources.tasks)
    loaded = empty.evaluate(recipe, epoch=1)
    assert loaded["status"] == "ok"
    assert loaded["metrics"] == pytest.approx(ev.evaluate(recipe)["metrics"], abs=1e-6)
    # a later update leaves the loaded sources alone (base is ignored once loaded)
    empty.update(2, base={})
    assert empty.evaluate(recipe, epoch=2)["metrics"] == pytest.approx(loaded["metrics"], abs=1e-6)


def test_a_bfloat16_evaluator_holds_the_float32_merge_rounded_once(setup):
    """dtype: bfloat16 is a bf16 resident model whose weights are the float32 merge rounded once
    (what the release ships), measured with bf16 forward passes: close to, not equal to, float32."""
    import torch

    cfg, ev, recipes = setup
    sources = Sources.load(cfg)
    bf = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, dtype="bfloat16")
    recipe = recipes["uniform average"].to_dict()
    fp_result, bf_result = ev.evaluate(recipe), bf.evaluate(recipe)
    fp_params = dict(ev.model.named_parameters())
    for name, p in bf.model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, fp_params[name].to(torch.bfloat16)), name  # one rounding, from the fp32 merge
    fp = [fp_result["metrics"][f"logppl/{s}"] for s in cfg.eval.sets]
    bfv = [bf_result["metrics"][f"logppl/{s}"] for s in cfg.eval.sets]
    assert fp != bfv and max(abs(a - b) for a, b in zip(fp, bfv)) < 0.05


@pytest.mark.parametrize("stream", [False, True], ids=["sources-on-gpu", "sources-streamed"])
def test_cuda_evaluator_matches_the_cpu_one(setup, stream):
    """The CUDA path (``ray.gpus_per_evaluator``): the same recipe merged on the GPU, with the
    sources resident there or streamed per tensor from host memory, scores as on the CPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg, ev, recipes = setup
    sources = Sources.load(cfg)
    gpu = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, device="cuda",
                    stream_sources=stream)
    for label in ("uniform average", "ties (w=1, density=0.5)"):
        recipe = recipes[label].to_dict()
        want, got = ev.evaluate(recipe)["metrics"], gpu.evaluate(recipe)["metrics"]
        assert got == pytest.approx(want, abs=2e-3), label
    assert next(gpu.model.parameters()).is_cuda
