"""One generation of the search, for the loop (``evo.loop.driver``) on every data version: ask the optimizer, evaluate candidates on Ray actors, tell.

One synchronous generation (``optimizer.async: false``)::

    genomes = optimizer.ask()
    recipes = [space.decode(g) for g in genomes]
    results = cache hits + pool.evaluate(the rest)       # named Ray tasks gXXXX-cYYY
    optimizer.tell(genomes, objective vectors)

The asynchronous loop (``evo.loop.steady_state``) uses the same pieces one candidate at a time: the
cache key on a generation's draw, the control-adjusted candidate record, the elites' re-scores,
the early-rejection threshold and the generation row. Also what the loop builds its state from
(space, optimizer setup).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from deap import tools

from evo.core.config import ExperimentConfig
from evo.data.draws import BlockDraws, adjust_metrics, paired_difference
from evo.core.errors import EvoError
from evo.core.records import CandidateRecord
from evo.scoring.fitness import objective_values
from evo.search.optim import Evaluated, make_optimizer
from evo.cluster.pool import Sources
from evo.scoring.rejection import Threshold, kth_best
from evo.loop.selection import control_recipe
from evo.search.space import SearchSpace

from evo.search.recipe import Recipe
RELEASE = "release"  # a stream run's name for the current release among the models to merge


@dataclass
class Told:
    """One candidate's result as told to the optimizer (a generation row is built from these)."""

    values: list[float] | None
    se: float | None
    status: str
    fresh: bool  # evaluated now, not taken from the cache
    work: float  # candidates' worth of evaluation done (an early rejection does a fraction)


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
    selection: dict | None = None  # fixed-data runs: the release chosen on the selection split (evo.loop.selection)
    # how the run ended: "finished", "stopped" (a signal or stop_after; `evo resume` continues),
    # "all_failed" (no candidate evaluated; ``reason`` is the first failure) or "no_data" (a
    # stream run that found no data version); ``evo run`` maps each to its exit code
    outcome: str = "finished"
    reason: str | None = None
    release_dir: str | None = None  # stream runs: the current release's folder
    time: dict = field(default_factory=dict)  # where this call's wall time went (evo.artifacts.status.time_split)

    @property
    def release_recipe(self) -> Recipe | None:
        """What ``evo export`` ships: the selection stage's choice (else the search's best)."""
        if self.selection and self.selection.get("release_recipe"):
            return Recipe.from_dict(self.selection["release_recipe"])
        return self.best_recipe


def optimizer_options(cfg: ExperimentConfig, space: SearchSpace) -> dict:
    options = {"population": cfg.optimizer.population, **cfg.optimizer.options}
    options.setdefault("weights", [o.weight for o in cfg.objectives])
    options.setdefault("initial", [g.tolist() for g in initial_genomes(cfg, space)])
    return options


def objective_directions(cfg: ExperimentConfig) -> list[str]:
    return [o.goal for o in cfg.objectives]


def make_space(cfg: ExperimentConfig) -> SearchSpace:
    return load_space(cfg, list(cfg.models.sources))


def load_space(cfg: ExperimentConfig, models: list[str]) -> SearchSpace:
    """The run's search space over ``models`` (a data-flow space also learns the base's depth)."""
    from evo.zoo.gguf import as_model_dir

    return SearchSpace.load(cfg.search_space, models, "base", base_dir=as_model_dir(cfg.models.base),
                            seed=cfg.seed, dtype=cfg.dtype)


def initial_genomes(cfg: ExperimentConfig, space: SearchSpace) -> list[np.ndarray]:
    """Known-good starting points: the uniform average and plain task arithmetic (a path of
    single models' layers: each model as it is)."""
    if cfg.optimizer.seed_baselines and space.spec.dataflow is not None and "weight" not in space.spec.genes:
        return [space.identity_genome(m) for m in space.path_choices[1:]]
    if not cfg.optimizer.seed_baselines or "weight" not in space.spec.genes:
        return []
    n = len(space.models)
    return [space.uniform_genome(weight=1.0 / n, density=1.0), space.uniform_genome(weight=1.0, density=1.0)]


class GenerationStep:
    """One generation: ask, decode, evaluate what the cache lacks, record, tell.

    The loop builds one per data version, with that version's ``data_key`` and evaluation set
    names (``evo.loop.version_source.Installed``).

    With ``draws`` (fixed-data runs), generation ``g`` scores every candidate on draw ``g`` of
    the search pool, after the control recipe (``evo.loop.selection.control_recipe``) and, for an
    optimizer with elites, the surviving elites: values told to the optimizer are adjusted to
    the first draw's scale through the control (``evo.data.draws``), and an elite's value is the mean
    of its adjusted values over every draw it was scored on (``evidence``), so a lucky draw does
    not keep a recipe alive.
    """

    def __init__(self, cfg, space, optimizer, pool, store, cache, metrics, *, data_key: str,
                 set_names: list[str], task_names: list[str], extra: dict | None = None,
                 draws: BlockDraws | None = None, evidence: dict | None = None, quiet: bool = True):
        self.cfg, self.space, self.optimizer, self.pool = cfg, space, optimizer, pool
        self.store, self.cache, self.metrics = store, cache, metrics
        self.data_key, self.set_names, self.task_names = data_key, set_names, task_names
        self.extra = extra or {}  # fields added to every candidate record (e.g. the stream version)
        self.objective_names = [o.name for o in cfg.objectives]
        self.draws = draws
        self.control = control_recipe(cfg) if draws is not None else None
        self.evidence: dict[str, list[list[float]]] = dict(evidence or {})  # recipe key -> adjusted values per draw
        self.quiet = quiet
        self.warned_noise = False
        self._draw_key = data_key

    def on_result(self, key: str, result: dict) -> None:
        self.cache[key] = result
        self.store.cache_put(key, result)  # written at once: a resume never re-evaluates it
        self.metrics.candidate(result["status"])

    def key(self, recipe: Recipe) -> str:
        return f"{recipe.key()}|{self._draw_key}"

    def values(self, result: dict) -> list[float] | None:
        if result["status"] not in ("ok", "rejected"):  # rejected: its partial estimate
            return None
        return objective_values(result["metrics"], self.cfg.objectives, self.set_names, self.task_names)

    def evaluate(self, named: dict[str, Recipe], *, desc: str, should_stop=None,
                 reject_above=None, blocks=None) -> tuple[dict[str, str], set[str]]:
        """Evaluate ``{candidate name: recipe}`` unless cached; returns (name -> cache key, the
        keys evaluated now rather than taken from the cache)."""
        keys, todo = {}, {}
        for name, recipe in named.items():
            key = keys[name] = self.key(recipe)
            if key not in self.cache and key not in todo:
                todo[key] = (name, recipe)
        self.pool.evaluate(todo, self.on_result, desc=desc, reject_above=reject_above, should_stop=should_stop,
                           blocks=blocks)
        return keys, set(todo)

    def start_point(self, genomes: dict[str, np.ndarray], *, should_stop=None) -> tuple[str, dict[str, float | None]]:
        """Score ``{name: genome}`` in full on generation 0's blocks (no early rejection) and
        return the best one's name and every score (higher is better). Cached like any
        evaluation, so a resumed run finds the same start without evaluating again."""
        blocks = self._use_draw(0)
        named = {name: self.space.decode(g) for name, g in genomes.items()}
        keys, _ = self.evaluate(named, desc="start point", should_stop=should_stop, blocks=blocks)
        scores = {name: self.optimizer.score(Evaluated(list(map(float, genomes[name])), self.values(self.cache[key])))
                  for name, key in keys.items()}
        return max(scores, key=scores.get), scores

    # ------------------------------------------------------------------ draws and the control
    def _use_draw(self, gen: int) -> dict[str, list[int]] | None:
        self._draw_key = self._data_at(gen)
        return self.blocks_at(gen)

    def _control(self, gen: int, should_stop) -> dict:
        """The control's result on generation ``gen``'s draw (evaluated once, then cached)."""
        blocks = self._use_draw(gen)
        keys, _ = self.evaluate({f"g{gen:04d}-control": self.control}, desc=f"generation {gen} control",
                                should_stop=should_stop, blocks=blocks)
        result = self.cache[keys[f"g{gen:04d}-control"]]
        if result["status"] != "ok":
            raise EvoError(f"the control recipe (uniform average) failed on generation {gen}'s blocks: "
                           f"{result.get('error')}")
        return result

    def adjusted(self, result: dict, control: dict | None, anchor: dict | None) -> dict:
        if control is None or result["status"] not in ("ok", "rejected"):
            return result.get("metrics") or {}
        return adjust_metrics(result["metrics"], control["metrics"], anchor["metrics"])

    def _rescore_elites(self, gen: int, control, anchor, blocks, should_stop) -> None:
        """Score the optimizer's surviving elites on this draw; their value becomes the mean of
        their adjusted values over every draw so far."""
        elites, named = self.elites_to_rescore(gen)
        if not named:
            return
        keys, _ = self.evaluate(named, desc=f"generation {gen} elites", should_stop=should_stop, blocks=blocks)
        self.apply_elite_results(gen, elites, named, keys, control, anchor)

    def elites_to_rescore(self, gen: int) -> tuple[list, dict[str, Recipe]]:
        """The optimizer's ``elites`` best members and their recipes, named ``gXXXX-eYY``."""
        n = getattr(self.optimizer, "elites", 0)
        if not n or not self.optimizer.population:
            return [], {}
        ranked = sorted((e for e in self.optimizer.population if e.values is not None),
                        key=self.optimizer.score, reverse=True)[:n]
        elites, named = [], {}
        for e in ranked:
            try:
                named[f"g{gen:04d}-e{len(elites):02d}"] = self.space.decode(e.genome)
            except EvoError:
                continue
            elites.append(e)
        return elites, named

    def apply_elite_results(self, gen: int, elites, named: dict, keys: dict, control, anchor) -> None:
        """Each elite's value becomes the mean of its adjusted values over every draw so far."""
        update = {}
        for name, e in zip(named, elites):
            result = self.cache[keys[name]]
            if result["status"] != "ok":
                continue
            vals = objective_values(self.adjusted(result, control, anchor), self.cfg.objectives, self.set_names,
                                    self.task_names)
            rkey = named[name].key()
            history = self.evidence.setdefault(rkey, [list(map(float, e.values))])
            if len(history) < gen + 1 and (not history or history[-1] != vals):
                history.append(vals)
            update[tuple(map(float, e.genome))] = list(np.mean(np.asarray(history), axis=0))
        if update:
            self.optimizer.rescore(update)

    def _data_at(self, gen: int) -> str:
        """The data a generation is scored on: the data version, and its draw when there are draws."""
        return f"{self.data_key}|b{self.draws.draw_id(gen)}" if self.draws is not None else self.data_key

    def key_at(self, recipe: Recipe, gen: int) -> str:
        """The cache key of ``recipe`` scored on generation ``gen``'s draw."""
        return f"{recipe.key()}|{self._data_at(gen)}"

    def mark_invalid(self, name: str, gen: int, exc: EvoError) -> str:
        """A genome that decodes to no valid recipe (e.g. a method gene picked slerp for three
        models) fails without an evaluation; returns the cache key its failure is kept under."""
        key = f"invalid-{name}|{self._data_at(gen)}"
        self.cache[key] = {"status": "failed", "error": f"invalid recipe: {exc}"}
        return key

    def blocks_at(self, gen: int) -> dict[str, list[int]] | None:
        return self.draws.draw(gen) if self.draws is not None else None

    def threshold(self, control, anchor) -> Threshold | None:
        """Early rejection against the k-th best (``evo.scoring.rejection``), on this draw when there
        are draws: its expected per-block NLLs are the control's plus its lead over the control."""
        threshold = kth_best(self.cfg, self.optimizer, self.lookup if control is None else None)
        if control is None or threshold is None:
            return threshold
        value = functools.partial(objective_values, objectives=self.cfg.objectives, set_names=self.set_names,
                                  task_names=self.task_names)
        return threshold.on_draw(value(anchor["metrics"])[0], value(control["metrics"])[0],
                                 control.get("block_nlls"), self.cfg.eval.early_rejection.paired)

    def _noise_check(self, gen: int, values, ses) -> dict | None:
        """Warn once when the differences the search acts on are within one candidate's noise."""
        ok = sorted(v[0] for v in values if v is not None and math.isfinite(v[0]))
        ses = [x for x in ses if x is not None]
        if len(ok) < 4 or not ses or len(self.objective_names) != 1:
            return None
        spread = float(np.median(ok) - ok[0]) if self.cfg.objectives[0].goal == "minimize" else float(ok[-1] - np.median(ok))
        se = float(np.median(ses))
        noisy = spread < 2 * se
        if noisy and not self.warned_noise:
            self.warned_noise = True
            blocks = self.draws.size if self.draws else self.cfg.eval.max_blocks
            msg = (f"evo: warning: generation {gen}: the search acts on differences within noise (best {spread:.4f} "
                   f"nats ahead of the median; one candidate's standard error {se:.4f} with {blocks} blocks per set, "
                   f"{self.space.dim} genes). More blocks per set (eval.max_blocks) or fewer genes (coarser layer "
                   "groups) make its choices meaningful; the release is still chosen on the selection split.")
            self.store.event("noise_warning", generation=gen, spread=spread, se=se, blocks=blocks, genes=self.space.dim)
            if not self.quiet:
                import sys

                print(msg, file=sys.stderr, flush=True)
        return {"spread": round(spread, 5), "se": round(se, 5), "noisy": noisy}

    # ------------------------------------------------------------------ one generation
    def run(self, gen: int, *, should_stop=None) -> dict:
        t0 = time.time()
        optimizer, space = self.optimizer, self.space
        control = anchor = None
        if self.draws is not None:
            anchor = self._control(0, should_stop)
            control = self._control(gen, should_stop)
            self._rescore_elites(gen, control, anchor, self.draws.draw(gen), should_stop)
        blocks = self._use_draw(gen)
        genomes = optimizer.ask()
        parents = optimizer.parents()
        names = [f"g{gen:04d}-c{i:03d}" for i in range(len(genomes))]
        recipes: list[Recipe | None] = []
        valid: dict[str, Recipe] = {}
        invalid: dict[str, str] = {}
        for name, genome in zip(names, genomes):
            try:
                recipe = space.decode(genome)
            except EvoError as exc:
                recipe = None
                invalid[name] = self.mark_invalid(name, gen, exc)
            else:
                valid[name] = recipe
            recipes.append(recipe)
        threshold = self.threshold(control, anchor)
        keys, fresh_keys = self.evaluate(valid, desc=f"generation {gen}", should_stop=should_stop,
                                         reject_above=threshold, blocks=blocks)
        keys.update(invalid)
        told = [self.record(gen, name, genome, recipe, parent_ids, keys[name], keys[name] in fresh_keys, control,
                            anchor)
                for name, recipe, genome, parent_ids in zip(names, recipes, genomes, parents)]
        optimizer.tell(genomes, [t.values for t in told], names)
        return self.row(gen, told, threshold=threshold, control=control, seconds=time.time() - t0)

    def record(self, gen: int, name: str, genome, recipe: Recipe | None, parent_ids, key: str, fresh: bool,
               control: dict | None, anchor: dict | None, extra: dict | None = None) -> "Told":
        """A candidate's result as the optimizer is told it (control-adjusted), written to
        ``candidates.jsonl``."""
        result = self.cache[key]
        raw = self.values(result)
        vals = raw if raw is None or control is None else objective_values(
            self.adjusted(result, control, anchor), self.cfg.objectives, self.set_names, self.task_names)
        se = None
        if control is not None and result.get("block_nlls") and control.get("block_nlls"):
            se = paired_difference(result["block_nlls"], control["block_nlls"], self.set_names)["se"]
        self.store.record_candidate(CandidateRecord(
            generation=gen, candidate=name, parents=parent_ids, key=key, cached=not fresh,
            status=result["status"], error=result.get("error"), values=vals, raw_values=raw, se=se,
            metrics=result.get("metrics"), timings=result.get("timings"), dispatch=result.get("dispatch"),
            genome=list(map(float, genome)), recipe=recipe.to_dict() if recipe else None,
            data_version=self.data_key, draw=self.draws.draw_id(gen) if self.draws else None,
            evaluated_fraction=result.get("evaluated_fraction"), lora=result.get("lora"),
            extra={**self.extra, **(extra or {})}))
        return Told(vals, se, result["status"], fresh, result.get("evaluated_fraction", 1.0) if fresh else 0.0)

    def row(self, gen: int, told: list["Told"], *, threshold, control: dict | None, seconds: float) -> dict:
        """The generation's logbook row from the results told in it."""
        values, ses = [t.values for t in told], [t.se for t in told]
        n_fresh = sum(t.fresh for t in told)
        row = _log_row(gen, values, self.objective_names, n_evals=n_fresh, n_cached=len(told) - n_fresh,
                       n_failed=sum(v is None for v in values), best=self.optimizer.best(), seconds=seconds)
        row["rejected"] = sum(t.status == "rejected" for t in told)
        row["eval_work"] = round(sum(t.work for t in told), 3)  # candidates' worth of evaluation actually done
        row["threshold"] = threshold.value if threshold is not None else None
        row["paired"] = threshold is not None and threshold.paired
        if control is not None:
            row["control"] = objective_values(control["metrics"], self.cfg.objectives, self.set_names, self.task_names)
            row["se"] = float(np.median([x for x in ses if x is not None])) if any(x is not None for x in ses) else None
            row["noise"] = self._noise_check(gen, values, ses)
        return row

    def lookup(self, genome) -> dict | None:
        """The cached result of a genome on the current data, if any."""
        try:
            return self.cache.get(self.key(self.space.decode(genome)))
        except EvoError:
            return None


def search_draws(cfg: ExperimentConfig, sources: Sources) -> BlockDraws | None:
    """The search pool's per-generation draws (fixed-data runs): ``eval.max_blocks`` blocks per
    set (``eval.subset`` of them, stratified by difficulty, when below 1)."""
    pool = sources.eval_sets.get("valid") or {}
    if not pool:
        return None
    size = cfg.eval.max_blocks if cfg.eval.subset >= 1.0 else max(1, round(cfg.eval.subset * cfg.eval.max_blocks))
    return BlockDraws({s: len(b) for s, b in pool.items()}, size, cfg.seed, cfg.eval.redraw, sources.difficulty)


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
    # "se": median standard error of one candidate's (control-adjusted) value on this draw: the
    # noise the search's choices must beat
    book.header = ["gen", "evals", "cached", "failed", "rejected"] + [f"{n}/{s}" for n in names for s in ("min", "mean")] \
        + (["se"] if row.get("se") is not None else []) + ["seconds"]
    book.record(**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in book.header})
    text = book.stream
    print(text if header else text.splitlines()[-1], flush=True)


def new_optimizer(cfg: ExperimentConfig, space: SearchSpace):
    """The configured optimizer over ``space``, seeded with the known-good starting points."""
    return make_optimizer(cfg.optimizer.name, space.dim, directions=objective_directions(cfg), seed=cfg.seed,
                          options=optimizer_options(cfg, space))


def make_stream_space(cfg: ExperimentConfig) -> SearchSpace:
    """A stream run's space: the sources plus the current release as one more model to merge, and
    the models adapted once per version (``stream.adapters``, ``evo.loop.adapt``)."""
    return load_space(cfg, [*cfg.models.sources, RELEASE, *cfg.stream.adapters])
