"""The ask/tell protocol every optimizer implements, and the registry that names them.

Two ways to drive an optimizer (:class:`Optimizer`):

* generation-synchronous: ``ask()`` returns the genomes of the next generation (unit vectors),
  ``tell(genomes, values)`` gives back one objective tuple per genome (``None`` for a failed
  candidate);
* asynchronous, steady state: ``ask_one(id)`` returns one genome whenever an evaluator is free and
  ``tell_one(genome, values, id)`` hands back each result as it arrives, in any order. A
  generation is then every ``population`` results told, a unit of reporting, not a barrier.

``state()`` and ``from_state()`` round-trip through JSON for checkpoints. The Ray loop, the
benchmark harness and a Tune searcher drive every optimizer the same way.
"""
from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from evo.core.errors import EvoError

OPTIMIZERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls):
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return wrap


def make_optimizer(name: str, dim: int, *, directions: Sequence[str], seed: int, options: dict | None = None):
    """Build a registered optimizer by name; unknown names and options fail with one line."""
    if name not in OPTIMIZERS:
        raise EvoError(f"optimizer.name: unknown optimizer {name!r} (known: {', '.join(sorted(OPTIMIZERS))})")
    cls = OPTIMIZERS[name]
    try:
        return cls(dim, directions=tuple(directions), seed=seed, **(options or {}))
    except TypeError as exc:
        raise EvoError(f"optimizer.options: {exc}") from None


def restore_optimizer(state: dict):
    return OPTIMIZERS[state["name"]].from_state(state)


@dataclass
class Evaluated:
    """A genome with its objective values (``None`` when the candidate failed) and the id the
    caller gave it (a candidate name), so offspring can name their parents."""

    genome: list[float]
    values: list[float] | None
    id: str | None = None

    def to_dict(self):
        values = None if self.values is None else list(map(float, self.values))
        return {"genome": list(map(float, self.genome)), "values": values, "id": self.id}

    @classmethod
    def from_dict(cls, d):
        return cls(list(d["genome"]), d["values"], d.get("id"))


def evaluated(genomes, values, ids=None) -> list[Evaluated]:
    ids = list(ids) if ids is not None else [None] * len(genomes)
    return [
        Evaluated(list(map(float, g)), None if v is None else list(map(float, v)), i)
        for g, v, i in zip(genomes, values, ids)
    ]


def signs(directions: Sequence[str]) -> tuple[float, ...]:
    """DEAP-style weights: +1 to maximise, -1 to minimise."""
    out = []
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise EvoError(f"objective goal must be 'minimize' or 'maximize', got {d!r}")
        out.append(1.0 if d == "maximize" else -1.0)
    return tuple(out)


def worst_values(directions: Sequence[str]) -> list[float]:
    """Objective values that lose to every real candidate (a failed evaluation)."""
    return [math.inf if d == "minimize" else -math.inf for d in directions]


def scalar_score(values: Sequence[float] | None, directions: Sequence[str], weights: Sequence[float] | None = None) -> float:
    """Weighted sum, oriented so that *higher is better*; failed candidates score -inf."""
    if values is None or any(not math.isfinite(v) for v in values):
        return -math.inf
    weights = weights or [1.0] * len(values)
    return float(sum(s * w * v for s, w, v in zip(signs(directions), weights, values)))


@contextmanager
def deap_random(state):
    """Run DEAP operators (which use the module-level ``random``) on our own RNG state.

    The caller's global random state is restored afterwards, so two optimizers in one process
    never disturb each other and a checkpointed state replays exactly.
    """
    outer = random.getstate()
    random.setstate(state.value)
    try:
        yield
    finally:
        state.value = random.getstate()
        random.setstate(outer)


@dataclass
class RandomState:
    """A ``random.Random`` state that survives JSON (tuples become lists on the way)."""

    value: tuple

    @classmethod
    def seeded(cls, seed: int) -> "RandomState":
        return cls(random.Random(seed).getstate())

    def to_json(self):
        version, internal, gauss = self.value
        return [version, list(internal), gauss]

    @classmethod
    def from_json(cls, data) -> "RandomState":
        return cls((data[0], tuple(data[1]), data[2]))


def numpy_state_to_json(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def numpy_rng_from_json(state: dict) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    return rng


class Optimizer(ABC):
    """What every registered optimizer is: the bookkeeping they share (population, hall of fame,
    injected genomes, seeded RNGs, the JSON checkpoint) and the four calls a loop makes.

    Subclasses implement ``ask``/``tell`` (a whole generation) and ``ask_one``/``tell_one`` (one
    candidate at a time), and name their own options (``options()``) and extra checkpoint
    fields (``extra_state()``/``load_extra_state()``). None inherits another optimizer.
    """

    name: str = ""
    elites: int = 0  # population members re-scored on each new block draw (evo.loop.generation)

    def __init__(self, dim: int, *, directions: Sequence[str] = ("minimize",), seed: int = 0, population: int = 16,
                 weights: Sequence[float] | None = None, hall_of_fame: int = 5,
                 initial: Sequence[Sequence[float]] = ()):
        if population < 2:
            raise TypeError(f"population must be >= 2, got {population}")
        self.dim = dim
        self.directions = tuple(directions)
        self.seed = seed
        self.population_size = population
        self.weights = list(weights) if weights else [1.0] * len(self.directions)
        self.hof_size = hall_of_fame
        self.initial = [list(map(float, g)) for g in initial]
        self.generation = 0
        self.population: list[Evaluated] = []
        self.hall_of_fame: list[Evaluated] = []
        self.pending: list[list[float]] = []  # the asked, not yet told generation (synchronous)
        self.pending_parents: list[list[str]] = []  # ids of each pending genome's parents
        self.injected: list[list[float]] = []  # known-good genomes the next asks must include
        self.asked = 0  # asynchronous: genomes handed out by ask_one
        self.told = 0  # asynchronous: results told by tell_one
        self.random = RandomState.seeded(seed)
        self.np_rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ the protocol
    @abstractmethod
    def ask(self) -> list[np.ndarray]:
        """The next generation's genomes (the same ones again until they are told)."""

    @abstractmethod
    def tell(self, genomes: Sequence[Sequence[float]], values: Sequence[Sequence[float] | None], ids=None) -> None:
        """A whole generation's values, in objective order (``None``: failed); ``ids`` name them."""

    @abstractmethod
    def ask_one(self, id: str | None = None) -> tuple[list[float], list[str]]:
        """One genome to evaluate now (to be told under ``id``), and the ids of its parents."""

    @abstractmethod
    def tell_one(self, genome: Sequence[float], values: Sequence[float] | None, id: str | None = None) -> None:
        """One result, as it arrives (any order; ``id`` is the one given when it was asked)."""

    def options(self) -> dict:
        return {"population": self.population_size, "weights": self.weights, "hall_of_fame": self.hof_size,
                "initial": self.initial}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def fronts(self) -> list[Evaluated]:
        """Records kept beside the population and hall of fame (NSGA-II's Pareto front)."""
        return []

    # ------------------------------------------------------------------ shared bookkeeping
    def parents(self) -> list[list[str]]:
        """For each genome of the pending generation, the ids of the parents it was bred from."""
        return [list(p) for p in self.pending_parents] or [[] for _ in self.pending]

    def score(self, e: Evaluated) -> float:
        return scalar_score(e.values, self.directions, self.weights)

    def ranked(self, items: list[Evaluated]) -> list[Evaluated]:
        return sorted(items, key=self.score, reverse=True)

    def best(self) -> Evaluated | None:
        return self.hall_of_fame[0] if self.hall_of_fame else None

    def update_hall_of_fame(self, items: list[Evaluated]) -> None:
        # DEAP's HallOfFame needs creator classes and a similarity callback; a sorted, de-duplicated
        # list of plain records is all we need and serialises as-is.
        seen = {tuple(e.genome) for e in self.hall_of_fame}
        merged = list(self.hall_of_fame) + [e for e in items if tuple(e.genome) not in seen and e.values is not None]
        self.hall_of_fame = self.ranked(merged)[: self.hof_size]

    def count_told(self) -> None:
        """Asynchronous mode: one more result told; a generation is every ``population`` of them."""
        self.told += 1
        self.generation = self.told // self.population_size

    def inject(self, genomes: Sequence[Sequence[float]]) -> None:
        """Make the next generation (or the next asks) include ``genomes``.

        The continual loop injects the current release and the best recipe so far when a new
        data version arrives, so the search restarts from them, not from scratch.
        """
        self.injected = [list(map(float, np.clip(g, 0.0, 1.0))) for g in genomes]

    def with_injected(self, genomes: list[list[float]]) -> list[list[float]]:
        """``genomes`` with its last members replaced by the injected ones (used once)."""
        if not self.injected:
            return genomes
        k = min(len(self.injected), len(genomes))
        out = genomes[: len(genomes) - k] + self.injected[:k]
        if self.pending_parents:
            self.pending_parents = self.pending_parents[: len(genomes) - k] + [[] for _ in range(k)]
        self.injected = []
        return out

    starts_anywhere = True  # start_at moves where the search begins (not so for random search)

    def start_at(self, genome: Sequence[float]) -> None:
        """Start the search from ``genome`` (before the first ask): it leads the initial genomes,
        so the first generation contains it. CMA-ES also centres its distribution there."""
        g = list(map(float, genome))
        self.initial = [g, *(x for x in self.initial if x != g)]

    def next_injected(self) -> list[float] | None:
        """Asynchronous mode: the next injected genome to hand out, if any."""
        return self.injected.pop(0) if self.injected else None

    def first_generation(self) -> list[list[float]]:
        """Synchronous mode: the initial genomes, then uniform draws, ``population`` in all."""
        n_random = self.population_size - len(self.initial[: self.population_size])
        return self.initial[: self.population_size] + self.np_rng.random((n_random, self.dim)).tolist()

    def bred_generation(self, breed: Callable[[], list[list[float]]]) -> list[np.ndarray]:
        """``ask()`` of an optimizer that breeds from its population: the pending generation if
        any, else the first generation or ``breed()``, with the injected genomes in it."""
        if not self.pending:
            genomes = breed() if self.population else self.first_generation()
            self.pending = self.with_injected([list(map(float, g)) for g in genomes])
        return [np.asarray(g) for g in self.pending]

    def first_genome(self) -> list[float] | None:
        """Asynchronous mode: the initial genomes, then uniform draws, for the first
        ``population`` asks (the first generation, as ``ask`` makes it)."""
        if self.asked >= self.population_size:
            return None
        k = self.asked
        return list(self.initial[k]) if k < len(self.initial) else self.np_rng.random(self.dim).tolist()

    def rescore(self, values: dict[tuple, list[float] | None]) -> None:
        """Replace remembered fitness after the data changed: ``values`` maps a genome (as a
        tuple) to its objective values on the new data. Entries not in ``values`` keep theirs."""
        for e in [*self.population, *self.hall_of_fame, *self.fronts()]:
            key = tuple(map(float, e.genome))
            if key in values:
                e.values = None if values[key] is None else list(map(float, values[key]))
        self.population = self.ranked(self.population)
        self.hall_of_fame = self.ranked(self.hall_of_fame)

    def remembered(self) -> list[Evaluated]:
        """Every candidate whose fitness the optimizer still uses (population, hall of fame, front)."""
        seen, out = set(), []
        for e in [*self.population, *self.hall_of_fame, *self.fronts()]:
            key = tuple(map(float, e.genome))
            if key not in seen:
                seen.add(key)
                out.append(e)
        return out

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "directions": list(self.directions),
            "seed": self.seed,
            "options": self.options(),
            "generation": self.generation,
            "asked": self.asked,
            "told": self.told,
            "population": [e.to_dict() for e in self.population],
            "hall_of_fame": [e.to_dict() for e in self.hall_of_fame],
            "pending": self.pending,
            "pending_parents": self.pending_parents,
            "injected": self.injected,
            "random": self.random.to_json(),
            "numpy": numpy_state_to_json(self.np_rng),
            **self.extra_state(),
        }

    @classmethod
    def from_state(cls, state: dict) -> "Optimizer":
        opt = cls(state["dim"], directions=state["directions"], seed=state["seed"], **state["options"])
        opt.generation = state["generation"]
        opt.asked, opt.told = state.get("asked", 0), state.get("told", 0)
        opt.population = [Evaluated.from_dict(d) for d in state["population"]]
        opt.hall_of_fame = [Evaluated.from_dict(d) for d in state["hall_of_fame"]]
        opt.pending = state["pending"]
        opt.pending_parents = state.get("pending_parents", [])
        opt.injected = state.get("injected", [])
        opt.random = RandomState.from_json(state["random"])
        opt.np_rng = numpy_rng_from_json(state["numpy"])
        opt.load_extra_state(state)
        return opt
