"""The generation loop: ask the optimizer, evaluate candidates on Ray actors, tell, checkpoint.

One generation::

    genomes = optimizer.ask()
    recipes = [space.decode(g) for g in genomes]
    results = cache hits + pool.evaluate(the rest)       # named Ray tasks gXXXX-cYYY
    optimizer.tell(genomes, objective vectors)
    store.save_checkpoint(...)                            # resume restarts from here

Resume replays exactly: the optimizer state (with its RNG states) is checkpointed after each
complete generation, and every result of a half-finished generation is already in the fitness
cache, so it is not evaluated again.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from deap import tools

from evo.config import ExperimentConfig, early_rejection_active
from evo.errors import EvoError
from evo.fitness import objective_values
from evo.metrics import RunMetrics
from evo.optim import make_optimizer, restore_optimizer
from evo.pool import EvaluatorPool, Interrupted, Sources
from evo.signals import StopSignals
from evo.space import Recipe, SearchSpace
from evo.store import RunStore


@dataclass
class RunResult:
    run_dir: Path
    best_recipe: Recipe | None
    best_values: list[float] | None
    objectives: list[str]
    logbook: list[dict]
    comparison: dict[str, dict] = field(default_factory=dict)
    dashboard_url: str | None = None
    releases: list[str] = field(default_factory=list)   # stream runs: releases written so far
    versions: list[dict] = field(default_factory=list)   # stream runs: one entry per data version


def _as_config(config) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return ExperimentConfig.from_dict(config)
    return ExperimentConfig.from_yaml(config)


def run(config, run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None,
        follow: bool = False) -> RunResult:
    """Start a new run in ``run_dir`` (which must not exist or be empty).

    ``stop_after``: stop (cleanly, checkpointed) after this many generations of this call,
    as if the driver had been stopped; ``resume`` continues it. A config with ``stream.folder``
    runs the continual loop (``evo.continual``) over the shards present; ``follow=True`` keeps
    it waiting for new shards until SIGINT/SIGTERM (or ``stream.max_versions``).
    """
    cfg = _as_config(config)
    _check_follow(cfg, follow)
    store = RunStore.create(run_dir, cfg.to_dict())
    store.event("run_started", name=cfg.name, pid=os.getpid(), follow=follow)
    return _dispatch(cfg, store, quiet=quiet, stop_after=stop_after, follow=follow)


def resume(run_dir: str | Path, *, quiet: bool = False, stop_after: int | None = None, follow: bool = False) -> RunResult:
    """Continue a stopped or killed run from its last complete generation (or loop step)."""
    store = RunStore.open(run_dir)
    cfg = ExperimentConfig.from_dict(store.config(), source=str(store.root / RunStore.CONFIG))
    _check_follow(cfg, follow)
    store.event("run_resumed", pid=os.getpid(), follow=follow)
    return _dispatch(cfg, store, quiet=quiet, stop_after=stop_after, follow=follow)


def _check_follow(cfg: ExperimentConfig, follow: bool) -> None:
    if follow and not cfg.streaming:
        raise EvoError(f"{cfg.source}: --follow needs a data stream to follow: set stream.folder")


def _dispatch(cfg, store, *, quiet, stop_after, follow) -> RunResult:
    if cfg.streaming:
        if stop_after is not None:
            raise EvoError("stop_after applies to fixed-data runs; a stream run stops with stream.max_versions or a signal")
        from evo.continual import run_stream

        return run_stream(cfg, store, quiet=quiet, follow=follow)
    return _loop(cfg, store, quiet=quiet, stop_after=stop_after)


def objective_directions(cfg: ExperimentConfig) -> list[str]:
    return [o.goal for o in cfg.objectives]


def make_space(cfg: ExperimentConfig) -> SearchSpace:
    return SearchSpace.load(cfg.search_space, list(cfg.models.sources), "base", seed=cfg.seed, dtype=cfg.dtype)


def initial_genomes(cfg: ExperimentConfig, space: SearchSpace) -> list[np.ndarray]:
    """Known-good starting points: the uniform average and plain task arithmetic."""
    if not cfg.optimizer.seed_baselines or "weight" not in space.spec.genes:
        return []
    n = len(space.models)
    return [space.uniform_genome(weight=1.0 / n, density=1.0), space.uniform_genome(weight=1.0, density=1.0)]


def weights_recipe(cfg: ExperimentConfig, weights: dict[str, float], method: str = "task_arithmetic",
                   extra: dict | None = None) -> Recipe:
    """A fixed recipe over the base: ``weights[model]`` per source model, no LoRA."""
    from evo.merge import MergeConfig

    merge = MergeConfig.from_dict({
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": m, "parameters": {"weight": w, **(extra or {})}} for m, w in weights.items()],
        "parameters": {},
        "dtype": cfg.dtype,
    })
    return Recipe(merge, None, cfg.seed)


def baseline_recipes(cfg: ExperimentConfig) -> dict[str, Recipe]:
    """Fixed comparison points: the base, each source alone, the uniform average, default TIES."""
    names = list(cfg.models.sources)

    def ta(weights, method="task_arithmetic", extra=None):
        return weights_recipe(cfg, dict(zip(names, weights)), method, extra)

    out = {"base": ta([0.0] * len(names))}
    for i, m in enumerate(names):
        out[f"specialist:{m}"] = ta([1.0 if j == i else 0.0 for j in range(len(names))])
    out["uniform average"] = ta([1.0 / len(names)] * len(names))
    out["ties (w=1, density=0.5)"] = ta([1.0] * len(names), "ties", {"density": 0.5})
    return out


def _loop(cfg: ExperimentConfig, store: RunStore, *, quiet: bool, stop_after: int | None) -> RunResult:
    space = make_space(cfg)
    directions = objective_directions(cfg)
    ckpt = store.load_checkpoint()
    if ckpt is None:
        options = {"population": cfg.optimizer.population, **cfg.optimizer.options}
        options.setdefault("weights", [o.weight for o in cfg.objectives])
        options.setdefault("initial", [g.tolist() for g in initial_genomes(cfg, space)])
        optimizer = make_optimizer(cfg.optimizer.name, space.dim, directions=directions, seed=cfg.seed, options=options)
        logbook: list[dict] = []
    else:
        optimizer = restore_optimizer(ckpt["optimizer"])
        logbook = ckpt["logbook"]
    start = optimizer.generation
    done = start >= cfg.optimizer.generations
    sources = Sources.load(cfg)
    cache = store.cache_load()
    objective_names = [o.name for o in cfg.objectives]
    set_names = list(cfg.eval.sets)
    task_names = list(cfg.eval.tasks)

    comparison: dict = {}
    best = optimizer.best()
    with EvaluatorPool(cfg, sources, run_name=store.root.name, quiet=quiet) as pool, StopSignals() as stop:
        if not quiet and pool.dashboard_url:
            print(f"Ray dashboard: {pool.dashboard_url}  (token auth: see README)")
        store.event("ray_started", dashboard=pool.dashboard_url, evaluators=pool.size, data_version=sources.data_version)
        metrics = RunMetrics(store.root.name, objective_names)
        step = GenerationStep(cfg, space, optimizer, pool, store, cache, metrics, data_key=sources.data_version,
                              set_names=set_names, task_names=task_names)
        stopped = False
        try:
            for gen in range(start, cfg.optimizer.generations):
                if (stop_after is not None and gen - start >= stop_after) or stop.requested():
                    stopped = True
                    break
                row = step.run(gen, should_stop=stop.requested)
                logbook.append(row)
                store.save_checkpoint({**checkpoint_state(cfg, optimizer, logbook, space, sources.data_version),
                                       "data_inputs": sources.version_inputs})
                store.event("generation_done", **row)
                metrics.generation_done(row, sources.data_version)
                if not quiet:
                    print_generation_row(row, objective_names, header=(gen == start))
        except Interrupted as exc:  # SIGINT/SIGTERM mid-generation: finished candidates are cached
            stopped = True
            store.event("run_stopped", reason=str(exc))
        best = optimizer.best()
        if not stopped and best is not None:
            done = True
            comparison = _compare(cfg, pool, space, best, store, quiet)
        elif stopped and not quiet:
            print(f"stopped after generation {optimizer.generation - 1}; continue with `evo resume {store.root}`")
    if done:
        store.event("run_finished", generations=cfg.optimizer.generations)
    return RunResult(
        store.root,
        space.decode(best.genome) if best else None,
        best.values if best else None,
        objective_names,
        logbook,
        comparison,
        pool.dashboard_url,
    )


class GenerationStep:
    """One generation: ask, decode, evaluate what the cache lacks, record, tell.

    Shared by the fixed-data loop here and the continual loop (``evo.continual``), which passes
    its own ``data_key`` (data version and current release) and evaluation set names.
    """

    def __init__(self, cfg, space, optimizer, pool, store, cache, metrics, *, data_key: str,
                 set_names: list[str], task_names: list[str], extra: dict | None = None):
        self.cfg, self.space, self.optimizer, self.pool = cfg, space, optimizer, pool
        self.store, self.cache, self.metrics = store, cache, metrics
        self.data_key, self.set_names, self.task_names = data_key, set_names, task_names
        self.extra = extra or {}  # fields added to every candidate record (e.g. the stream version)
        self.objective_names = [o.name for o in cfg.objectives]

    def on_result(self, key: str, result: dict) -> None:
        self.cache[key] = result
        self.store.cache_put(key, result)  # written at once: a resume never re-evaluates it
        self.metrics.candidate(result["status"])

    def key(self, recipe: Recipe) -> str:
        return f"{recipe.key()}|{self.data_key}"

    def values(self, result: dict) -> list[float] | None:
        if result["status"] not in ("ok", "rejected"):  # rejected: its partial estimate
            return None
        return objective_values(result["metrics"], self.cfg.objectives, self.set_names, self.task_names)

    def evaluate(self, named: dict[str, Recipe], *, desc: str, should_stop=None,
                 reject_above=None) -> tuple[dict[str, str], set[str]]:
        """Evaluate ``{candidate name: recipe}`` unless cached; returns (name -> cache key, the
        keys evaluated now rather than taken from the cache)."""
        keys, todo = {}, {}
        for name, recipe in named.items():
            key = keys[name] = self.key(recipe)
            if key not in self.cache and key not in todo:
                todo[key] = (name, recipe)
        self.pool.evaluate(todo, self.on_result, desc=desc, reject_above=reject_above, should_stop=should_stop)
        return keys, set(todo)

    def run(self, gen: int, *, should_stop=None) -> dict:
        t0 = time.time()
        optimizer, space, cfg = self.optimizer, self.space, self.cfg
        genomes = optimizer.ask()
        parents = optimizer.parents()
        names = [f"g{gen:04d}-c{i:03d}" for i in range(len(genomes))]
        recipes: list[Recipe | None] = []
        valid: dict[str, Recipe] = {}
        invalid: dict[str, str] = {}
        for name, genome in zip(names, genomes):
            try:
                recipe = space.decode(genome)
            except EvoError as exc:  # e.g. a method gene picked slerp for three models
                recipe = None
                key = invalid[name] = f"invalid-{name}|{self.data_key}"
                self.cache[key] = {"status": "failed", "error": f"invalid recipe: {exc}"}
            else:
                valid[name] = recipe
            recipes.append(recipe)
        threshold = rejection_threshold(cfg, optimizer, self.lookup)
        keys, fresh_keys = self.evaluate(valid, desc=f"generation {gen}", should_stop=should_stop,
                                         reject_above=threshold)
        keys.update(invalid)
        values, n_failed, n_rejected, work = [], 0, 0, 0.0
        for name, recipe, genome, parent_ids in zip(names, recipes, genomes, parents):
            key = keys[name]
            result = self.cache[key]
            vals = self.values(result)
            n_failed += vals is None
            n_rejected += result["status"] == "rejected"
            fresh = key in fresh_keys
            if fresh:
                work += result.get("evaluated_fraction", 1.0)
            values.append(vals)
            self.store.record_candidate(
                {
                    "generation": gen, "candidate": name, "parents": parent_ids, "key": key,
                    "cached": not fresh, "status": result["status"], "error": result.get("error"),
                    "values": vals, "metrics": result.get("metrics"), "timings": result.get("timings"),
                    "genome": list(map(float, genome)), "recipe": recipe.to_dict() if recipe else None,
                    "data_version": self.data_key, "evaluated_fraction": result.get("evaluated_fraction"),
                    "lora": result.get("lora"), **self.extra,
                }
            )
        optimizer.tell(genomes, values, names)
        n_fresh = len(fresh_keys)
        row = _log_row(gen, values, self.objective_names, n_evals=n_fresh, n_cached=len(genomes) - n_fresh,
                       n_failed=n_failed, best=optimizer.best(), seconds=time.time() - t0)
        row["rejected"] = n_rejected
        row["eval_work"] = round(work, 3)  # candidates' worth of evaluation actually done
        row["threshold"] = threshold["value"] if isinstance(threshold, dict) else threshold
        row["paired"] = isinstance(threshold, dict)
        return row

    def lookup(self, genome) -> dict | None:
        """The cached result of a genome on the current data, if any."""
        try:
            return self.cache.get(self.key(self.space.decode(genome)))
        except EvoError:
            return None


def rejection_threshold(cfg: ExperimentConfig, optimizer, lookup=None):
    """The current k-th best of the population, when early rejection applies: its per-block
    scores for a paired test (``lookup(genome)`` finds its cached result), else its value."""
    if not early_rejection_active(cfg):
        return None
    ranked = sorted((e for e in optimizer.population if e.values is not None and math.isfinite(e.values[0])),
                    key=lambda e: e.values[0])
    k = cfg.eval.early_rejection.k
    if len(ranked) < k:
        return None
    kth = ranked[k - 1]
    result = lookup(kth.genome) if lookup is not None else None
    if cfg.eval.early_rejection.paired and result and result.get("status") == "ok" and result.get("block_nlls"):
        return {"value": kth.values[0], "blocks": result["block_nlls"]}
    return kth.values[0]


def _compare(cfg, pool, space, best, store, quiet) -> dict[str, dict]:
    """Evaluate the baselines and the best recipe on the report sets; store and print the table."""
    recipes = {**baseline_recipes(cfg), "evolved (best)": space.decode(best.genome)}
    collections = ["valid"] + (["test"] if pool.sources.has_report_sets else [])
    table: dict[str, dict] = {label: {} for label in recipes}
    for coll in collections:
        todo = {label: (f"compare-{coll}-{i:02d}", r) for i, (label, r) in enumerate(recipes.items())}
        results = {}
        # a subset run searched on part of the valid blocks: compare on all of them
        source = "full" if coll == "valid" and "full" in pool.sources.eval_sets else coll
        pool.evaluate(todo, lambda k, r: results.__setitem__(k, r), desc=f"comparison ({coll})", collection=source)
        for label, result in results.items():
            if result["status"] != "ok":
                table[label][coll] = {"error": result.get("error")}
                continue
            metrics = dict(result["metrics"])
            names = list(cfg.eval.sets)
            metrics["mean"] = float(np.mean([metrics[f"logppl/{s}"] for s in names]))
            metrics["objectives"] = dict(zip([o.name for o in cfg.objectives],
                                             objective_values(metrics, cfg.objectives, names, list(cfg.eval.tasks))))
            table[label][coll] = metrics
    store.save_checkpoint({**store.load_checkpoint(), "comparison": table})
    store.event("comparison", table=table)
    if not quiet:
        print_comparison(table, list(cfg.eval.sets))
    return table


def print_comparison(table: dict, set_names: list[str]) -> None:
    """Log-perplexity per set (lower is better), then task scores (higher is better) if any."""
    coll = "test" if any("test" in v for v in table.values()) else "valid"
    rows = {label: colls.get(coll, {}) for label, colls in table.items()}
    tasks = sorted({k[5:] for m in rows.values() for k in m if k.startswith("task/")})
    print(f"\nHeld-out log-perplexity ({coll} split; lower is better)" + (" and task scores" if tasks else ""))
    header = f"{'model':<28}" + "".join(f"{s:>10}" for s in set_names) + f"{'mean':>10}" + "".join(f"{t[:14]:>16}" for t in tasks)
    print(header)
    print("-" * len(header))
    for label, m in rows.items():
        if "error" in m or not m:
            print(f"{label:<28}  failed: {m.get('error')}")
            continue
        print(f"{label:<28}" + "".join(f"{m[f'logppl/{s}']:>10.4f}" for s in set_names) + f"{m['mean']:>10.4f}"
              + "".join(f"{m[f'task/{t}']:>16.4f}" for t in tasks))


def checkpoint_state(cfg, optimizer, logbook, space, data_version) -> dict:
    best = optimizer.best()
    return {
        "version": 1,
        "generation": optimizer.generation,
        "generations": cfg.optimizer.generations,
        "optimizer": optimizer.state(),
        "logbook": logbook,
        "data_version": data_version,
        "objectives": [o.__dict__ for o in cfg.objectives],
        "space": {"name": space.spec.name, "labels": space.labels},
        "best": None if best is None else {
            "id": best.id, "genome": best.genome, "values": best.values, "recipe": space.decode(best.genome).to_dict(),
        },
        "hall_of_fame": [
            {"id": e.id, "genome": e.genome, "values": e.values, "recipe": space.decode(e.genome).to_dict()}
            for e in optimizer.hall_of_fame
        ],
    }


def _log_row(gen, values, names, *, n_evals, n_cached, n_failed, best, seconds) -> dict:
    row: dict[str, Any] = {"gen": gen, "evals": n_evals, "cached": n_cached, "failed": n_failed, "seconds": round(seconds, 2)}
    ok = [v for v in values if v is not None and all(math.isfinite(x) for x in v)]
    for j, name in enumerate(names):
        col = [v[j] for v in ok]
        row[f"{name}/min"] = min(col) if col else None
        row[f"{name}/mean"] = float(np.mean(col)) if col else None
        row[f"{name}/max"] = max(col) if col else None
    row["best"] = best.values if best else None
    return row


def print_generation_row(row: dict, names: list[str], header: bool) -> None:
    # DEAP's Logbook formats the same columns; we keep rows as plain dicts for JSON checkpoints.
    book = tools.Logbook()
    book.header = ["gen", "evals", "cached", "failed", "rejected"] + [f"{n}/{s}" for n in names for s in ("min", "mean")] + ["seconds"]
    book.record(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in book.header})
    text = book.stream
    print(text if header else text.splitlines()[-1], flush=True)
