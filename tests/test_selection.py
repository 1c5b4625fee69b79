"""Held-out selection: document-hash splits, fresh draws on one scale, the release chosen on the
selection split (with the baseline fallback) and paired intervals."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from evo.core.config import ExperimentConfig
from evo.loop.experiment import load_config
from evo.data.splits import selection_split
from evo.data.text import canonical
from evo.data.draws import BlockDraws, adjust_metrics, paired_difference
from evo.core.errors import EvoError
from evo.scoring.evaluator import Evaluator
from evo.loop.racing import race_z, round_counts
from evo.loop.selection import Selection, baseline_recipes, control_recipe, print_selection, weights_recipe
from evo.scoring.sources import Sources


def test_selection_split_is_by_content_not_order():
    docs = [f"document number {i} " * 5 for i in range(40)]
    search, held = selection_split(docs, 0.25)
    assert len(held) == 10 and len(search) == 30 and not set(search) & set(held)
    # the same documents in another order (and other whitespace) land on the same side
    shuffled = [d.replace(" ", "  ") for d in reversed(docs)]
    _, held2 = selection_split(shuffled, 0.25)
    assert {canonical(d) for d in held2} == {canonical(d) for d in held}
    assert selection_split(docs, 0.0) == (docs, [])
    assert selection_split(docs[:1], 0.5) == (docs[:1], [])  # one document: split by blocks instead
    s, h = selection_split(docs[:2], 0.9)
    assert len(s) == len(h) == 1  # never everything on one side


def test_draws_are_fresh_deterministic_and_fixed_without_redraw():
    draws = BlockDraws({"a": 50, "b": 7}, size=8, seed=3)
    d0, d1 = draws.draw(0), draws.draw(1)
    assert d0 == BlockDraws({"a": 50, "b": 7}, size=8, seed=3).draw(0)  # same seed, same blocks (resume)
    assert d0["a"] != d1["a"] and len(d0["a"]) == 8 and len(set(d0["a"])) == 8
    assert d0["b"] == list(range(7))  # a small set gives all it has
    fixed = BlockDraws({"a": 50}, size=8, seed=3, redraw=False)
    assert fixed.draw(5) == fixed.draw(0) and fixed.draw_id(5) == 0


def test_paired_difference_and_adjustment():
    rng = np.random.default_rng(0)
    base = {"x": rng.normal(4, 1, 200), "y": rng.normal(5, 1, 100)}
    better = {k: v - 0.05 + rng.normal(0, 0.01, len(v)) for k, v in base.items()}
    m = paired_difference(better, base)
    # block difficulty cancels: the interval is far narrower than the spread of the blocks
    assert m["lo"] < -0.05 < m["hi"] and m["hi"] < 0 and m["se"] < 0.002 and m["blocks"] == 300
    adj = adjust_metrics({"logppl/x": 4.2, "task/t": 0.5}, {"logppl/x": 4.5}, {"logppl/x": 4.0})
    assert adj == pytest.approx({"logppl/x": 3.7, "task/t": 0.5})


@pytest.fixture(scope="module")
def resident(micro_zoo, repo_root):
    cfg = load_config({
        "zoo": str(micro_zoo.root), "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml"),
        "eval": {"seq_len": 32, "max_blocks": 6, "batch_size": 8, "selection": {"blocks": 24, "lambdas": [0.3, 0.6, 1.0]},
                 "test_blocks": 24},
    })
    sources = Sources.load(cfg)
    ev = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, batch_size=8)
    return cfg, sources, ev


def test_sources_hold_a_search_pool_a_selection_split_and_a_test_split(resident, micro_zoo):
    cfg, sources, _ = resident
    pool, sel, test = (sources.eval_sets[c] for c in ("valid", "selection", "test"))
    for name in cfg.eval.sets:
        assert len(sel[name]) <= 24 and len(test[name]) <= 24 and len(pool[name]) <= 8 * 6
        # no selection block is in the search pool (different documents)
        assert not {tuple(r) for r in sel[name].tolist()} & {tuple(r) for r in pool[name].tolist()}


def _evaluate(ev):
    return lambda named, coll, blocks=None: {k: ev.evaluate(r.to_dict(), collection=coll, blocks=blocks)
                                             for k, r in named.items()}


def test_release_is_chosen_on_selection_and_falls_back_to_the_best_baseline(resident):
    cfg, sources, ev = resident
    names = list(cfg.models.sources)
    cfg = _racing(cfg, False)  # the full rule: every candidate on every block (racing: below)
    stage = Selection(cfg, _evaluate(ev), has_selection=True, has_test=True)
    # an evolved recipe far worse than every simple baseline: the release is the best baseline
    bad = weights_recipe(cfg, {m: 2.0 for m in names})
    record = stage.run([("g0001-c000", bad, [0.0])])
    assert record["release_kind"] == "simple baseline" and "no evolved recipe beat" in record["reason"]
    sel = {k: v["selection"]["mean"] for k, v in record["table"].items() if "selection" in v}
    assert record["release"] == record["best_baseline"]
    simple = [k for k in sel if k == "uniform average" or k.startswith(("task arithmetic", "ties", "dare_ties"))]
    assert sel[record["release"]] == min(sel[k] for k in simple)
    # the lambda sweep is chosen on selection: the best scale's row is the one shown
    sweep = {k: v["mean"] for k, v in record["lambda_sweep"].items()}
    assert len(sweep) == 3 and record["best_lambda"] == min(sweep, key=sweep.get)
    assert record["margins"]["release_vs_best_baseline/test"]["mean"] == 0.0

    # an evolved recipe equal to the best baseline's merge but better on selection wins; here:
    # a slightly perturbed best-lambda merge is released only if it beats every baseline there
    lam = float(record["best_lambda"].split("=")[1].rstrip(")"))
    near = weights_recipe(cfg, {m: lam * (1.05 if i == 0 else 1.0) for i, m in enumerate(names)})
    again = stage.run([("g0002-c001", near, [0.0])])
    evolved_sel = again["table"][next(k for k in again["table"] if k.startswith("evolved"))]["selection"]["mean"]
    best_base_sel = again["table"][again["best_baseline"]]["selection"]["mean"]
    assert (again["release_kind"] == "evolved") == (evolved_sel < best_base_sel)
    m = again["margins"]["best_evolved_vs_best_baseline/test"]
    assert m["lo"] <= m["mean"] <= m["hi"] and m["blocks"] == sum(len(b) for b in sources.eval_sets["test"].values())


def test_control_is_the_uniform_average(resident):
    cfg, _, _ = resident
    assert control_recipe(cfg).key() == baseline_recipes(cfg)["uniform average"].key()


def test_selection_config_errors_are_one_line(micro_zoo, repo_root, tmp_path):
    raw = {"zoo": str(micro_zoo.root), "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml")}
    for bad, match in (({"fraction": 1.0}, "eval.selection.fraction"), ({"blocks": 0}, "eval.selection"),
                       ({"lambdas": [0.0]}, "eval.selection.lambdas"),
                       ({"racing_rounds": 0}, "eval.selection.racing_rounds"),
                       ({"racing": "yes"}, "eval.selection.racing"),
                       ({"sets": {"nope": str(tmp_path)}}, "eval.selection.sets.nope")):
        with pytest.raises(EvoError, match=match):
            load_config({**raw, "eval": {"selection": bad}})
    with pytest.raises(EvoError, match="eval.pool_blocks"):
        load_config({**raw, "eval": {"max_blocks": 8, "pool_blocks": 4}})


def test_single_document_files_are_split_by_position(micro_zoo, repo_root, tmp_path):
    text = "\n\n".join(micro_zoo.texts("code", "valid"))
    one = tmp_path / "one.txt"
    one.write_text(text)
    cfg = load_config({
        "models": {"base": str(micro_zoo.base_dir), "sources": {d: str(p) for d, p in micro_zoo.specialist_dirs.items()}},
        "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml"),
        "eval": {"sets": {"code": str(one)}, "seq_len": 32, "max_blocks": 4, "selection": {"fraction": 0.25}},
    })
    sources = Sources.load(cfg)
    pool, sel = sources.eval_sets["valid"]["code"], sources.eval_sets["selection"]["code"]
    assert len(sel) >= 1 and not {tuple(r) for r in sel.tolist()} & {tuple(r) for r in pool.tolist()}
    json.dumps(sources.version_inputs)  # recorded for verify, JSON-clean


# ---------------------------------------------------------------- racing (evo.loop.racing)
def _racing(cfg: ExperimentConfig, on: bool, rounds: int = 4) -> ExperimentConfig:
    """``cfg`` with ``eval.selection.racing`` set (configs are frozen: a replaced copy)."""
    sel = dataclasses.replace(cfg.eval.selection, racing=on, racing_rounds=rounds)
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, selection=sel))


RACE_SIZES = {"code": 64, "c": 96, "doc": 64}  # blocks per set of a synthetic selection split
RACE_OFFSETS = {  # each candidate's true mean NLL offset (nats); the per-block noise is 0.01
    "evolved #1 (best)": -0.05, "evolved #2 (close)": -0.0497, "evolved #3 (worse)": 0.10,
    "uniform average": 0.05, "task arithmetic (lambda=0.3)": 0.0, "task arithmetic (lambda=0.5)": 0.0003,
    "task arithmetic (lambda=1)": 0.20, "ties (w=1, density=0.5)": 0.30, "dare_ties (w=1, density=0.5)": 0.60,
}


class FakeEvaluate:
    """An ``evaluate`` callback that looks per-block NLLs up instead of running a model, and
    counts the selection blocks each candidate was scored on."""

    def __init__(self, nlls: dict[str, dict[str, np.ndarray]]):
        self.nlls = nlls
        self.scored: dict[str, int] = {}

    def __call__(self, named, collection, blocks=None):
        assert collection == "selection"
        out = {}
        for label in named:
            rows = blocks or {s: range(len(v)) for s, v in self.nlls[label].items()}
            per = {s: [float(self.nlls[label][s][i]) for i in rows[s]] for s in rows}
            self.scored[label] = self.scored.get(label, 0) + sum(len(v) for v in per.values())
            out[label] = {"status": "ok", "metrics": {f"logppl/{s}": float(np.mean(v)) for s, v in per.items()},
                          "block_nlls": per}
        return out


@pytest.fixture(scope="module")
def race_setup(micro_zoo, repo_root):
    """A config whose sets and λ sweep match ``RACE_OFFSETS``, the hall of fame's three
    entries, and synthetic NLLs: a block difficulty shared by every candidate (sd 0.5, what
    pairing cancels) plus each candidate's offset and its own noise."""
    cfg = load_config({
        "zoo": str(micro_zoo.root), "search_space": str(repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml"),
        "eval": {"selection": {"lambdas": [0.3, 0.5, 1.0]}}, "seed": 3,
    })
    assert sorted(cfg.eval.sets) == sorted(RACE_SIZES)
    rng = np.random.default_rng(0)
    difficulty = {s: rng.normal(4.0, 0.5, n) for s, n in RACE_SIZES.items()}
    nlls = {label: {s: d + off + rng.normal(0.0, 0.01, len(d)) for s, d in difficulty.items()}
            for label, off in RACE_OFFSETS.items()}
    names = list(cfg.models.sources)
    evolved = [(cid, weights_recipe(cfg, {m: 0.1 * (i + 1) for m in names}), [0.0])
               for i, cid in enumerate(("best", "close", "worse"))]
    return cfg, nlls, evolved


def _race(cfg, nlls, evolved, on: bool):
    fake = FakeEvaluate(nlls)
    stage = Selection(_racing(cfg, on), fake, has_selection=True, has_test=False, sizes=RACE_SIZES)
    return stage.run(evolved), fake.scored


def test_race_drops_clearly_worse_candidates_early_and_keeps_close_ones(race_setup, capsys):
    cfg, nlls, evolved = race_setup
    raced, scored = _race(cfg, nlls, evolved, True)
    full, full_scored = _race(cfg, nlls, evolved, False)
    total, first_look = sum(RACE_SIZES.values()), 8 + 12 + 8  # 1/8 of each set
    race = raced["race"]
    assert race["racing"] and race["rounds"] == [first_look, 2 * first_look, 4 * first_look, total]
    assert race["z"] == pytest.approx(race_z(3, len(RACE_OFFSETS)))  # Bonferroni: 3 looks x 8 rivals
    # the clearly worse leave after the first look; the close ones and the leaders run to the end
    worse = {"evolved #3 (worse)", "uniform average", "task arithmetic (lambda=1)", "ties (w=1, density=0.5)",
             "dare_ties (w=1, density=0.5)"}
    assert set(race["dropped"]) == worse
    assert all(race["dropped"][k]["after_blocks"] == first_look == scored[k] for k in worse)
    assert all(scored[k] == total for k in set(RACE_OFFSETS) - worse)
    assert race["dropped"]["evolved #3 (worse)"]["vs"] == "evolved #1 (best)"
    assert race["dropped"]["task arithmetic (lambda=1)"]["vs"] == raced["best_lambda"]
    assert race["blocks_scored"] == sum(scored.values()) < race["blocks_full"] == sum(full_scored.values())
    assert full["race"] == {**full["race"], "racing": False, "why_not": "eval.selection.racing: false",
                            "dropped": {}, "blocks_scored": len(RACE_OFFSETS) * total}

    # the same choice as scoring everything, and the release and best baseline on every block
    for key in ("release", "best_baseline", "best_lambda", "best_evolved", "release_kind"):
        assert raced[key] == full[key], key
    assert raced["release"] == "evolved #1 (best)" and scored[raced["best_baseline"]] == total
    # the printed interval is paired_difference on the whole split, as without racing
    sets = list(cfg.eval.sets)
    expect = paired_difference(nlls[raced["release"]], nlls[raced["best_baseline"]], sets)
    assert raced["margins"]["release_vs_best_baseline/selection"] == expect
    assert full["margins"]["release_vs_best_baseline/selection"] == pytest.approx(expect)
    for label, row in raced["table"].items():  # a row's selection values are whole-split values
        if "selection" in row:
            assert row["selection"]["mean"] == pytest.approx(full["table"][label]["selection"]["mean"])
    ties = raced["table"]["ties (w=1, density=0.5)"]
    assert "selection" not in ties and ties["dropped"]["of_blocks"] == total
    assert "release_vs_uniform/selection" not in raced["margins"]  # the uniform average was dropped

    print_selection(raced, sets)
    out = capsys.readouterr().out
    assert f"drop@{first_look}" in out and f"dropped after {first_look} of {total} blocks" in out

    # deterministic: the same race again, the same record (but for its wall time)
    again, _ = _race(cfg, nlls, evolved, True)
    assert {**again, "race": {**again["race"], "seconds": 0}} == {**raced, "race": {**race, "seconds": 0}}


def test_a_margin_that_reaches_zero_gets_the_advice_to_search_longer(race_setup, capsys):
    """A clear margin over the best λ: no advice. The search's best within noise of the best λ
    (its interval reaches zero): the record and the printed table say to raise the generations
    and resume, whichever of the two was released."""
    cfg, nlls, evolved = race_setup
    clear, _ = _race(cfg, nlls, evolved, False)
    assert clear["margins"]["release_vs_best_baseline/selection"]["hi"] < 0 and clear["advice"] is None
    rng = np.random.default_rng(1)
    lam = nlls["task arithmetic (lambda=0.3)"]
    close = {**nlls, **{label: {s: v - 0.0002 + rng.normal(0.0, 0.01, len(v)) for s, v in lam.items()}
                        for label in ("evolved #1 (best)", "evolved #2 (close)")}}
    noisy, _ = _race(cfg, close, evolved, False)
    key = ("release_vs_best_baseline/selection" if noisy["release_kind"] == "evolved"
           else "best_evolved_vs_best_baseline/selection")
    m = noisy["margins"][key]
    assert m["lo"] < 0 <= m["hi"]
    assert noisy["best_baseline"] == "task arithmetic (lambda=0.3)"
    assert "not clearly better than task arithmetic (lambda=0.3)" in noisy["advice"]
    assert "optimizer.generations" in noisy["advice"] and "evo resume" in noisy["advice"]
    print_selection(noisy, list(cfg.eval.sets))
    assert "note: " + noisy["advice"] in capsys.readouterr().out


def test_race_rounds_double_and_wait_for_enough_blocks():
    assert round_counts({"a": 64, "b": 30}, 4) == [{"a": 16, "b": 8}, {"a": 32, "b": 15}, {"a": 64, "b": 30}]
    assert round_counts({"a": 7}, 4) == [{"a": 7}]  # too few blocks to look: scored in one round
    assert round_counts({"a": 64}, 1) == [{"a": 64}]
    assert race_z(1, 2) == pytest.approx(1.959964, abs=1e-5) and race_z(3, 19) > 3.3


def test_racing_picks_the_release_full_selection_picks_on_fewer_blocks(micro_zoo, ray_session, space_file, tmp_path):
    """End to end through the loop: the same (synchronous, reproducible) search, then selection
    raced and not: the same release with the same whole-split values, fewer blocks scored."""
    import evo

    cfg = {
        "name": "race", "zoo": str(micro_zoo.root), "search_space": str(space_file),
        "eval": {"seq_len": 32, "max_blocks": 6, "batch_size": 6},
        "optimizer": {"name": "ga", "generations": 2, "population": 6, "options": {"elites": 1}, "async": False},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5, "candidate_timeout_s": 120},
        "seed": 7,
    }
    raced = evo.run(cfg, tmp_path / "raced", quiet=True)
    off = {**cfg, "eval": {**cfg["eval"], "selection": {"racing": False}}}
    full = evo.run(off, tmp_path / "full", quiet=True)
    assert raced.best_recipe.key() == full.best_recipe.key()  # the same search
    r, f = raced.selection, full.selection
    assert r["release"] == f["release"] and r["best_baseline"] == f["best_baseline"]
    assert raced.release_recipe.key() == full.release_recipe.key()
    assert r["race"]["racing"] and not f["race"]["racing"] and r["race"]["dropped"]
    assert r["race"]["blocks_scored"] < f["race"]["blocks_scored"] == r["race"]["blocks_full"]
    for label in (r["release"], r["best_baseline"]):
        assert raced.comparison[label]["selection"]["mean"] == pytest.approx(
            full.comparison[label]["selection"]["mean"], abs=1e-6)
    for key, m in f["margins"].items():
        if key.startswith("release_vs_best_baseline"):
            assert r["margins"][key]["mean"] == pytest.approx(m["mean"], abs=1e-6)
            assert r["margins"][key]["blocks"] == m["blocks"]
