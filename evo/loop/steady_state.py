"""Asynchronous, steady-state search: no evaluator waits for a generation's stragglers.

Whenever an evaluator is free the optimizer is asked for one candidate (``ask_one``), and each
result is told as it arrives (``tell_one``). A generation is every ``population`` results told:
the unit of the logbook row and the checkpoint, not a barrier. Candidate ``i`` (in ask order)
belongs to generation ``i // population``, is named ``gXXXX-cYYY`` and is scored on that
generation's block draw; the draw's control (the uniform average) and the surviving elites'
re-scores run as the first jobs of the generation, and a result is told once its draw's control
is known (values are control-adjusted, as in the synchronous loop, ``evo.loop.generation``).

Exact resume: every ask, tell and elite re-score is appended to ``search_log.jsonl`` in the
order it happened. A checkpoint records how much of the log it includes; ``evo resume`` restores
it, replays the rest of the log (results from the fitness cache), and sends the candidates that
were still out to the evaluators again, so the resumed run goes on from exactly where the killed
one stopped. The run is a function of its seed and its arrival order: with one evaluator (or
``optimizer.async: false``) that order is fixed, and a killed-and-resumed run matches an
undisturbed one bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from evo.core.errors import EvoError
from evo.loop.generation import GenerationStep, Told
from evo.search.optim import Evaluated
from evo.cluster.pool import Job
from evo.search.recipe import Recipe


@dataclass
class Asked:
    """A candidate handed out and not yet told."""

    name: str
    gen: int
    genome: list[float]
    parents: list[str]
    key: str


@dataclass
class EliteSet:
    """Elites chosen for re-scoring on generation ``gen``'s draw (``evo.loop.generation``)."""

    gen: int
    elites: list[dict]  # Evaluated.to_dict() as chosen
    named: dict[str, dict]  # gXXXX-eYY -> recipe dict
    keys: dict[str, str]  # gXXXX-eYY -> cache key


@dataclass
class SteadyStateState:
    """What the checkpoint keeps besides the optimizer: the log position it includes and the
    work that was out at that moment."""

    log_position: int = 0
    started: int = -1  # the last generation whose control and elite jobs were queued
    outstanding: list[dict] = field(default_factory=list)  # Asked, in ask order
    elite_sets: list[dict] = field(default_factory=list)  # EliteSet

    @classmethod
    def from_dict(cls, d: dict | None) -> "SteadyStateState":
        return cls(**(d or {}))


class SteadyStateSearch:
    """Drive ``step.optimizer`` asynchronously until ``end`` generations' worth of results are
    told; ``on_generation(row)`` runs at each generation boundary (the loop checkpoints there,
    with :meth:`snapshot`)."""

    def __init__(self, step: GenerationStep, *, end: int, on_generation: Callable[[dict], None],
                 state: SteadyStateState | None = None):
        self.step, self.opt = step, step.optimizer
        self.lam = self.opt.population_size
        self.end_asks = end * self.lam
        self.on_generation = on_generation
        state = state or SteadyStateState()
        self.log_position = state.log_position
        self.started = state.started
        self.outstanding: dict[str, Asked] = {d["name"]: Asked(**d) for d in state.outstanding}
        self.elite_sets: dict[int, EliteSet] = {d["gen"]: EliteSet(**d) for d in state.elite_sets}
        self.recipes: dict[str, Recipe | None] = {}
        self.side: list[Job] = []  # controls and elite re-scores: run before the next candidate
        self.resubmit: list[str] = []  # candidates that were out when the run was stopped
        self.running: dict[str, list[str]] = {}  # cache key being evaluated -> candidates waiting on it
        self.ready: list[str] = []  # results in, waiting for their draw's control
        self.fresh: set[str] = set()  # keys evaluated by this driver (not taken from the cache)
        self.window: list[Told] = []
        self.window_start = time.time()
        self.threshold = None
        for name, asked in self.outstanding.items():
            self.recipes[name], _ = self._decode(name, asked.gen, asked.genome)
        # the controls of generations with work still out (killed before they finished)
        for gen in sorted({a.gen for a in self.outstanding.values()} | set(self.elite_sets) | {self.started} - {-1}):
            self._queue_control(gen)
        for es in self.elite_sets.values():
            self._queue_elites(es)

    # ------------------------------------------------------------------ the run
    def run(self, should_stop=None) -> None:
        """Replay the log past the checkpoint, then evaluate until the budget is told."""
        self._replay()
        self.resubmit = [n for n in self.outstanding if n not in self.ready]
        # the bar counts every job: candidates, and each generation's control and elite re-scores
        self.step.pool.stream(self._feed, self._on_result, desc="steady-state search (jobs)", total=None,
                              should_stop=should_stop)
        self._flush()
        if self.opt.told < self.end_asks:
            raise EvoError(f"steady-state search stalled with {self.opt.told} of {self.end_asks} results told "
                           f"({len(self.ready)} waiting for a control result)")

    def snapshot(self) -> dict:
        return asdict(SteadyStateState(
            log_position=self.log_position, started=self.started,
            outstanding=[asdict(a) for a in self.outstanding.values()],
            elite_sets=[asdict(e) for e in self.elite_sets.values()]))

    # ------------------------------------------------------------------ what runs next
    def _feed(self) -> Job | None:
        while True:
            if self.resubmit:
                job = self._candidate_job(self.resubmit.pop(0))
            elif self.side:
                job = self.side.pop(0)
                if job.key in self.step.cache or job.key in self.running:
                    continue
                self.running[job.key] = []
            elif self.opt.asked < self.end_asks:
                gen = self.opt.asked // self.lam
                if gen > self.started:
                    self._start_generation(gen)
                    self._log({"step": "start", "gen": gen})
                    continue
                job = self._candidate_job(self._ask(gen))
            else:
                return None
            if job is not None:
                return job

    def _ask(self, gen: int) -> str:
        name = f"g{gen:04d}-c{self.opt.asked % self.lam:03d}"
        genome, parents = self.opt.ask_one(name)
        genome = list(map(float, genome))
        self._log({"step": "ask", "name": name, "genome": genome})
        self._register(name, gen, genome, parents)
        return name

    def _register(self, name: str, gen: int, genome: list[float], parents: list[str]) -> Asked:
        self.recipes[name], key = self._decode(name, gen, genome)
        asked = self.outstanding[name] = Asked(name, gen, genome, list(parents), key)
        return asked

    def _decode(self, name: str, gen: int, genome: list[float]) -> tuple[Recipe | None, str]:
        """The candidate's recipe and cache key (None and its failure's key when it has no valid recipe)."""
        try:
            recipe = self.step.space.decode(genome)
        except EvoError as exc:
            return None, self.step.mark_invalid(name, gen, exc)
        return recipe, self.step.key_at(recipe, gen)

    def _candidate_job(self, name: str) -> Job | None:
        """The job that evaluates candidate ``name``, or None when its result is already known
        (cached, invalid) or being computed for an identical recipe."""
        asked = self.outstanding[name]
        if asked.key in self.step.cache:
            self._arrive(name)
            self._flush()
            return None
        if asked.key in self.running:
            self.running[asked.key].append(name)
            return None
        self.running[asked.key] = [name]
        self.threshold = self._threshold(asked.gen)
        return Job(asked.key, name, self.recipes[name].to_dict(), self.threshold, self.step.blocks_at(asked.gen))

    def _start_generation(self, gen: int) -> None:
        """Queue generation ``gen``'s control (its draw's reference) and the elites' re-scores."""
        self.started = gen
        step = self.step
        if step.draws is None:
            return
        self._queue_control(gen)
        if gen == 0 or not getattr(self.opt, "elites", 0):
            return
        elites, named = step.elites_to_rescore(gen)
        if named:
            es = EliteSet(gen, [e.to_dict() for e in elites], {n: r.to_dict() for n, r in named.items()},
                          {n: step.key_at(r, gen) for n, r in named.items()})
            self.elite_sets[gen] = es
            self._queue_elites(es)

    def _queue_control(self, gen: int) -> None:
        if self.step.draws is not None:
            self.side.append(Job(self._control_key(gen), f"g{gen:04d}-control", self.step.control.to_dict(), None,
                                 self.step.blocks_at(gen)))

    def _queue_elites(self, es: EliteSet) -> None:
        for n, r in es.named.items():
            self.side.append(Job(es.keys[n], n, r, None, self.step.blocks_at(es.gen)))

    # ------------------------------------------------------------------ controls and thresholds
    def _control_key(self, gen: int) -> str:
        return self.step.key_at(self.step.control, gen)

    def _control(self, gen: int) -> dict | None:
        """Generation ``gen``'s control result once known (None while it runs; fixed-data runs
        without draws have none and need none)."""
        result = self.step.cache.get(self._control_key(gen))
        if result is not None and result["status"] != "ok":
            raise EvoError(f"the control recipe (uniform average) failed on generation {gen}'s blocks: "
                           f"{result.get('error')}")
        return result

    def _has_control(self, gen: int) -> bool:
        return self.step.draws is None or (self._control(gen) is not None and self._control(0) is not None)

    def _threshold(self, gen: int):
        if self.step.draws is None:
            return self.step.threshold(None, None)
        if not self._has_control(gen):
            return None  # its control is still running: no early rejection for this one
        return self.step.threshold(self._control(gen), self._control(0))

    # ------------------------------------------------------------------ results
    def _on_result(self, key: str, result: dict) -> None:
        self.step.on_result(key, result)
        self.fresh.add(key)
        for name in self.running.pop(key, []):
            self._arrive(name)
        self._flush()

    def _arrive(self, name: str) -> None:
        if name not in self.ready:
            self.ready.append(name)

    def _flush(self) -> None:
        """Tell every result whose control is known (in arrival order); apply re-scores whose
        results are all in."""
        for name in list(self.ready):
            if self._has_control(self.outstanding[name].gen):
                self.ready.remove(name)
                self._tell(name)
        for gen in sorted(self.elite_sets):
            es = self.elite_sets[gen]
            if self._has_control(gen) and all(k in self.step.cache for k in es.keys.values()):
                self._rescore(gen)

    def _tell(self, name: str, replaying: bool = False) -> None:
        asked = self.outstanding.pop(name)
        if asked.key not in self.step.cache:
            raise EvoError(f"search log replay: no cached result for {name} ({asked.key}); the run's cache.jsonl "
                           "does not match its search_log.jsonl")
        control = self._control(asked.gen) if self.step.draws is not None else None
        anchor = self._control(0) if self.step.draws is not None else None
        told = self.step.record(asked.gen, name, asked.genome, self.recipes.get(name), asked.parents, asked.key,
                                asked.key in self.fresh, control, anchor)
        self.opt.tell_one(asked.genome, told.values, name)
        if not replaying:
            self._log({"step": "tell", "name": name})
        self.window.append(told)
        if self.opt.told % self.lam == 0:
            gen = self.opt.told // self.lam - 1
            row = self.step.row(gen, self.window, threshold=self.threshold,
                                control=self._control(gen) if self.step.draws is not None else None,
                                seconds=time.time() - self.window_start)
            self.window, self.window_start = [], time.time()
            self.on_generation(row)

    def _rescore(self, gen: int, replaying: bool = False) -> None:
        es = self.elite_sets.pop(gen)
        elites = [Evaluated.from_dict(d) for d in es.elites]
        named = {n: Recipe.from_dict(r) for n, r in es.named.items()}
        self.step.apply_elite_results(gen, elites, named, es.keys, self._control(gen), self._control(0))
        if not replaying:
            self._log({"step": "rescore", "gen": gen})

    # ------------------------------------------------------------------ the search log
    def _log(self, entry: dict) -> None:
        self.step.store.log_step(entry)
        self.log_position += 1

    def _replay(self) -> None:
        """Redo what the killed driver did after the checkpoint, in the order it did it."""
        entries = self.step.store.search_log()[self.log_position:]
        for entry in entries:
            self.log_position += 1
            if entry["step"] == "start":
                self._start_generation(entry["gen"])
            elif entry["step"] == "ask":
                gen = self.opt.asked // self.lam
                genome, parents = self.opt.ask_one(entry["name"])
                if list(map(float, genome)) != entry["genome"]:
                    raise EvoError(f"search log replay diverged at {entry['name']}: the optimizer asked another "
                                   "genome than the log records (was the run's config or evo changed?)")
                self._register(entry["name"], gen, entry["genome"], parents)
            elif entry["step"] == "tell":
                self._tell(entry["name"], replaying=True)
            elif entry["step"] == "rescore":
                self._rescore(entry["gen"], replaying=True)


def evolve(step: GenerationStep, *, end: int, on_generation: Callable[[dict, dict | None], None],
           steady_state: dict | None = None, should_stop: Callable[[], bool] | None = None) -> bool:
    """Run generations until the optimizer has completed ``end``, in the configured mode:
    steady state (``optimizer.async``, the default) or one synchronous generation at a time.
    ``on_generation(row, steady)`` runs at every generation boundary (``steady``: this search's
    part of the checkpoint; None when synchronous). The loop (``evo.loop.driver``) evolves every
    data version through here. Returns False when ``should_stop`` turned true between two synchronous
    generations (nothing was running); a stop while candidates run raises ``Interrupted``."""
    if step.cfg.optimizer.asynchronous:
        search = SteadyStateSearch(step, end=end, state=SteadyStateState.from_dict(steady_state),
                                   on_generation=lambda row: on_generation(row, search.snapshot()))
        search.run(should_stop=should_stop)
        return True
    while step.optimizer.generation < end:
        if should_stop is not None and should_stop():
            return False
        on_generation(step.run(step.optimizer.generation, should_stop=should_stop), None)
    return True
