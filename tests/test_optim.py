"""Optimizers: seeded reproducibility, JSON state round trip, progress on a toy problem."""
import json
import random

import numpy as np
import pytest

from evo.core.errors import EvoError
from evo.search.optim import OPTIMIZERS, make_optimizer, restore_optimizer


def sphere(g):
    return [float(np.sum((np.asarray(g) - 0.3) ** 2))]


def zdt(g):
    """f1 = x0, f2 = 1 - sqrt(x0 / h) * h with h = 1 + 9*mean(x[1:]): ZDT1-like, two objectives."""
    g = np.asarray(g)
    h = 1 + 9 * g[1:].mean()
    return [float(g[0]), float(h * (1 - np.sqrt(g[0] / h)))]


def drive(opt, generations, fail_every=0):
    history = []
    for _ in range(generations):
        genomes = opt.ask()
        values = [None if fail_every and i % fail_every == 0 else sphere(g) for i, g in enumerate(genomes)]
        opt.tell(genomes, values)
        history.append([list(g) for g in genomes])
    return history


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_same_seed_same_search(name):
    a = make_optimizer(name, 6, directions=["minimize"], seed=3, options={"population": 8})
    b = make_optimizer(name, 6, directions=["minimize"], seed=3, options={"population": 8})
    random.seed(123)  # the caller's global random state must not matter ...
    ha = drive(a, 4)
    random.seed(999)
    hb = drive(b, 4)
    assert ha == hb
    c = make_optimizer(name, 6, directions=["minimize"], seed=4, options={"population": 8})
    assert drive(c, 1) != ha[:1]


def test_optimizer_leaves_global_random_untouched():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    drive(make_optimizer("ga", 4, directions=["minimize"], seed=0, options={"population": 6}), 3)
    assert random.random() == expected


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_round_trip_replays_exactly(name):
    opt = make_optimizer(name, 5, directions=["minimize"], seed=1, options={"population": 8})
    drive(opt, 3)
    clone = restore_optimizer(json.loads(json.dumps(opt.state())))
    assert drive(opt, 3) == drive(clone, 3)
    assert opt.best().values == clone.best().values


def test_pending_generation_is_asked_again_after_restore():
    opt = make_optimizer("ga", 5, directions=["minimize"], seed=1, options={"population": 8})
    drive(opt, 2)
    asked = [list(g) for g in opt.ask()]
    clone = restore_optimizer(json.loads(json.dumps(opt.state())))
    assert [list(g) for g in clone.ask()] == asked


def test_ga_genomes_stay_in_unit_cube_and_improve():
    opt = make_optimizer("ga", 8, directions=["minimize"], seed=0, options={"population": 16})
    history = drive(opt, 15)
    flat = np.array([g for gen in history for g in gen])
    assert flat.min() >= 0.0 and flat.max() <= 1.0
    first_best = min(sphere(g)[0] for g in history[0])
    assert opt.best().values[0] < first_best * 0.5


def test_ga_beats_random_search_on_a_toy_at_equal_budget():
    wins = 0
    for seed in range(5):
        ga = make_optimizer("ga", 8, directions=["minimize"], seed=seed, options={"population": 16})
        rs = make_optimizer("random", 8, directions=["minimize"], seed=seed, options={"population": 16})
        drive(ga, 12)
        drive(rs, 12)
        wins += ga.best().values[0] < rs.best().values[0]
    assert wins >= 4


def test_failed_candidates_never_become_best_and_elites_survive():
    opt = make_optimizer("ga", 4, directions=["minimize"], seed=0, options={"population": 6, "elites": 2})
    drive(opt, 5, fail_every=3)
    assert opt.best().values is not None
    ranked = [e.values[0] for e in opt.population if e.values]
    assert ranked == sorted(ranked)
    # a generation of offspring that all fail or are worse: the two elites carry over unchanged
    elites = [(list(e.genome), e.values) for e in opt.population[:2]]
    offspring = opt.ask()
    assert len(offspring) == 4  # population - elites: the elites are not re-evaluated
    opt.tell(offspring, [None if i % 2 else [100.0 + i] for i in range(len(offspring))])
    assert [(list(e.genome), e.values) for e in opt.population[:2]] == elites
    assert opt.best().values == elites[0][1]


def test_maximize_direction():
    opt = make_optimizer("ga", 3, directions=["maximize"], seed=0, options={"population": 8})
    for _ in range(8):
        gs = opt.ask()
        opt.tell(gs, [[float(np.sum(g))] for g in gs])
    assert opt.best().values[0] > 2.4


def test_initial_genomes_are_evaluated_first():
    init = [[0.3] * 4, [0.9] * 4]
    opt = make_optimizer("ga", 4, directions=["minimize"], seed=0, options={"population": 6, "initial": init})
    assert [list(g) for g in opt.ask()[:2]] == init


def test_start_at_centres_cmaes_with_its_shorter_step_and_leads_the_ga():
    start = [0.3, 0.7, 0.2, 0.9]
    cma = make_optimizer("cmaes", 4, directions=["minimize"], seed=0,
                         options={"population": 200, "initial": [[0.5] * 4], "start_sigma": 0.05})
    cma.start_at(start)
    samples = np.array(cma.ask())
    # centred on the start with the start step (not the default 1/6 around the uniform genome)
    assert np.abs(samples.mean(axis=0) - start).max() < 0.02
    assert 0.04 < samples.std(axis=0).mean() < 0.06
    again = restore_optimizer(json.loads(json.dumps(cma.state())))  # the new centre is checkpointed
    assert np.allclose(again.strategy.centroid, start) and again.options()["start_sigma"] == 0.05
    ga = make_optimizer("ga", 4, directions=["minimize"], seed=0, options={"population": 6, "initial": [[0.5] * 4]})
    ga.start_at(start)
    assert [list(g) for g in ga.ask()[:2]] == [start, [0.5] * 4]


def test_unknown_optimizer_and_option():
    with pytest.raises(EvoError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", 3, directions=["minimize"], seed=0)
    with pytest.raises(EvoError, match="optimizer.options"):
        make_optimizer("ga", 3, directions=["minimize"], seed=0, options={"popsize": 3})


def test_cmaes_converges_on_sphere_inside_the_cube():
    opt = make_optimizer("cmaes", 6, directions=["minimize"], seed=0, options={"population": 10})
    history = drive(opt, 30)
    assert opt.best().values[0] < 1e-3
    assert np.array(history).min() >= 0 and np.array(history).max() <= 1


def test_nsga2_front_on_a_known_two_objective_toy():
    """The true front of zdt (below) has x[1:] = 0."""
    opt = make_optimizer("nsga2", 4, directions=["minimize", "minimize"], seed=0, options={"population": 24})
    for _ in range(40):
        gs = opt.ask()
        opt.tell(gs, [zdt(g) for g in gs])
    front = np.array([e.values for e in opt.front])
    assert len(front) >= 8
    # non-dominated: no member is at least as good on both and better on one
    for a in front:
        dominated = np.any(np.all(front <= a, axis=1) & np.any(front < a, axis=1))
        assert not dominated
    # close to the true front f2 = 1 - sqrt(f1)
    gap = front[:, 1] - (1 - np.sqrt(front[:, 0]))
    assert np.median(gap) < 0.15
    assert front[:, 0].max() - front[:, 0].min() > 0.5  # spread along the front


@pytest.mark.parametrize("name", ["ga", "nsga2"])
def test_offspring_name_their_parents(name):
    opt = make_optimizer(name, 4, directions=["minimize"], seed=0, options={"population": 8})
    gs = opt.ask()
    ids = [f"g0-c{i}" for i in range(len(gs))]
    opt.tell(gs, [sphere(g) for g in gs], ids)
    children = opt.ask()
    parents = opt.parents()
    assert len(parents) == len(children)
    assert all(1 <= len(p) <= 2 and set(p) <= set(ids) for p in parents)
    # a child with one parent and no crossover stays near it (mutation only)
    assert any(len(p) == 2 for p in parents)


# ---------------------------------------------------------------------- asynchronous (steady state)
def drive_async(opt, results, workers=4, order_seed=0, fn=sphere, fail_every=0):
    """Keep ``workers`` candidates outstanding; results arrive in an order drawn from
    ``order_seed`` (out of ask order, as evaluators of uneven speed deliver them). Returns the
    asked genomes in ask order and the told ids in arrival order."""
    rng = random.Random(order_seed)
    outstanding, asked, arrivals = [], [], []
    while len(arrivals) < results:
        while len(outstanding) < workers and len(asked) < results:
            cid = f"c{len(asked)}"
            genome, _ = opt.ask_one(cid)
            asked.append(list(genome))
            outstanding.append((cid, genome))
        cid, genome = outstanding.pop(rng.randrange(len(outstanding)))
        fail = fail_every and int(cid[1:]) % fail_every == 0
        opt.tell_one(genome, None if fail else fn(genome), cid)
        arrivals.append(cid)
    return asked, arrivals


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_async_is_a_function_of_seed_and_arrival_order(name):
    runs = [drive_async(make_optimizer(name, 5, directions=["minimize"], seed=2, options={"population": 8}), 40,
                        order_seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[2][1]  # another arrival order ...
    if name != "random":  # ... changes what an adaptive optimizer asks next
        assert runs[0][0] != runs[2][0]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_async_state_round_trip_with_candidates_outstanding(name):
    opt = make_optimizer(name, 5, directions=["minimize"], seed=1, options={"population": 8})
    drive_async(opt, 20)
    genome, _ = opt.ask_one("late")  # asked before the checkpoint, told after it
    clone = restore_optimizer(json.loads(json.dumps(opt.state())))
    for o in (opt, clone):
        o.tell_one(genome, sphere(genome), "late")
    assert drive_async(opt, 24, order_seed=3) == drive_async(clone, 24, order_seed=3)
    assert opt.best().values == clone.best().values and opt.generation == clone.generation


@pytest.mark.parametrize("name", ["ga", "cmaes", "nsga2"])
def test_async_search_improves_and_counts_generations(name):
    opt = make_optimizer(name, 6, directions=["minimize"], seed=0, options={"population": 10})
    asked, _ = drive_async(opt, 200, workers=5, fail_every=9)
    assert opt.generation == 20 and opt.told == 200 and opt.asked == 200
    first = min(sphere(g)[0] for g in asked[:10])
    assert opt.best().values[0] < first * 0.3
    flat = np.array(asked)
    assert flat.min() >= 0.0 and flat.max() <= 1.0
    assert len(opt.population) <= 10


def test_async_cmaes_updates_every_lambda_results_including_stale_ones():
    opt = make_optimizer("cmaes", 4, directions=["minimize"], seed=0, options={"population": 6})
    centroid = list(opt.strategy.centroid)
    stale = [(f"s{i}", opt.ask_one(f"s{i}")[0]) for i in range(3)]  # sampled before the first update
    drive_async(opt, 6)  # six more results: one update
    assert list(opt.strategy.centroid) != centroid
    centroid = list(opt.strategy.centroid)
    for cid, g in stale:  # late results still count: 3 + 3 fresh = the next update
        opt.tell_one(g, sphere(g), cid)
    assert list(opt.strategy.centroid) == centroid and len(opt.arrived) == 3
    drive_async(opt, 3)
    assert list(opt.strategy.centroid) != centroid and opt.arrived == []


def test_async_ga_keeps_its_best_and_injected_genomes_come_first():
    opt = make_optimizer("ga", 4, directions=["minimize"], seed=0, options={"population": 6, "elites": 2})
    drive_async(opt, 30, fail_every=4)
    best = opt.best()
    assert best.genome in [e.genome for e in opt.population]  # elitism: the best never leaves
    opt.inject([[0.3] * 4])
    assert opt.ask_one("x")[0] == [0.3] * 4
    # parents are named by the ids they were told under
    _, parents = opt.ask_one("y")
    assert parents and set(parents) <= {e.id for e in opt.population}


def test_async_nsga2_front_on_the_two_objective_toy():
    opt = make_optimizer("nsga2", 4, directions=["minimize", "minimize"], seed=0, options={"population": 24})
    drive_async(opt, 960, workers=6, fn=zdt)
    front = np.array([e.values for e in opt.front])
    assert len(front) >= 8
    gap = front[:, 1] - (1 - np.sqrt(front[:, 0]))
    assert np.median(gap) < 0.15
    assert front[:, 0].max() - front[:, 0].min() > 0.5
