"""Generational GA with elitism over the unit-vector genome, built from DEAP's operators.

One generation: tournament selection from the population, simulated binary crossover and
polynomial mutation bounded to [0, 1] (``deap.tools``), evaluation of the offspring, then the
``elites`` best parents carry over unevaluated (their fitness is known) and the offspring fill
the rest. Several objectives are scalarised by their declared weights (use ``nsga2`` to keep
the Pareto front instead).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from deap import base, tools

from evo.optim.base import (
    Evaluated,
    RandomState,
    evaluated,
    deap_random,
    numpy_rng_from_json,
    numpy_state_to_json,
    register,
    scalar_score,
)


@register("ga")
class GeneticAlgorithm:
    def __init__(
        self,
        dim: int,
        *,
        directions: Sequence[str] = ("minimize",),
        seed: int = 0,
        population: int = 16,
        elites: int = 2,
        tournament: int = 3,
        cxpb: float = 0.9,
        mutpb: float = 1.0,
        eta_crossover: float = 15.0,
        eta_mutation: float = 20.0,
        indpb: float | None = None,
        weights: Sequence[float] | None = None,
        hall_of_fame: int = 5,
        initial: Sequence[Sequence[float]] = (),
    ):
        if population < 2:
            raise TypeError(f"population must be >= 2, got {population}")
        if not 0 <= elites < population:
            raise TypeError(f"elites must be in [0, population), got {elites}")
        self.dim = dim
        self.directions = tuple(directions)
        self.seed = seed
        self.population_size = population
        self.elites = elites
        self.tournament = tournament
        self.cxpb, self.mutpb = cxpb, mutpb
        self.eta_crossover, self.eta_mutation = eta_crossover, eta_mutation
        self.indpb = indpb if indpb is not None else 1.0 / max(dim, 1)
        self.weights = list(weights) if weights else [1.0] * len(self.directions)
        self.hof_size = hall_of_fame
        self.initial = [list(map(float, g)) for g in initial]
        self.generation = 0
        self.population: list[Evaluated] = []
        self.hall_of_fame: list[Evaluated] = []
        self.pending: list[list[float]] = []
        self.pending_parents: list[list[str]] = []  # ids of each pending genome's parents
        self.injected: list[list[float]] = []  # known-good genomes the next generation must include
        self.random = RandomState.seeded(seed)
        self.np_rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> list[np.ndarray]:
        if self.pending:
            return [np.asarray(g) for g in self.pending]
        if not self.population:
            n_random = self.population_size - len(self.initial[: self.population_size])
            genomes = self.initial[: self.population_size] + self.np_rng.random((n_random, self.dim)).tolist()
        else:
            genomes = self._breed(self.population_size - self.elites)
        self.pending = self._with_injected([list(map(float, g)) for g in genomes])
        return [np.asarray(g) for g in self.pending]

    # ------------------------------------------------------------------ a changing objective
    def inject(self, genomes: Sequence[Sequence[float]]) -> None:
        """Make the next generation include ``genomes`` (they replace its last members).

        The continual loop injects the current release and the best recipe so far when a new
        data version arrives, so the search restarts from them, not from scratch.
        """
        self.injected = [list(map(float, np.clip(g, 0.0, 1.0))) for g in genomes]

    def _with_injected(self, genomes: list[list[float]]) -> list[list[float]]:
        if not self.injected:
            return genomes
        k = min(len(self.injected), len(genomes))
        out = genomes[: len(genomes) - k] + self.injected[:k]
        if self.pending_parents:
            self.pending_parents = self.pending_parents[: len(genomes) - k] + [[] for _ in range(k)]
        self.injected = []
        return out

    def rescore(self, values: dict[tuple, list[float] | None]) -> None:
        """Replace remembered fitness after the data changed: ``values`` maps a genome (as a
        tuple) to its objective values on the new data. Entries not in ``values`` keep theirs."""
        for e in [*self.population, *self.hall_of_fame, *getattr(self, "front", [])]:
            key = tuple(map(float, e.genome))
            if key in values:
                e.values = None if values[key] is None else list(map(float, values[key]))
        self.population = self._ranked(self.population)
        self.hall_of_fame = self._ranked(self.hall_of_fame)

    def remembered(self) -> list[Evaluated]:
        """Every candidate whose fitness the optimizer still uses (population, hall of fame, front)."""
        seen, out = set(), []
        for e in [*self.population, *self.hall_of_fame, *getattr(self, "front", [])]:
            key = tuple(map(float, e.genome))
            if key not in seen:
                seen.add(key)
                out.append(e)
        return out

    def tell(self, genomes: Sequence[Sequence[float]], values: Sequence[Sequence[float] | None], ids=None) -> None:
        """Values in objective order, ``None`` for a failed candidate; ``ids`` name the candidates."""
        new = evaluated(genomes, values, ids)
        pool = self._ranked(self.population)[: self.elites] + new if self.population else new
        self.population = self._ranked(pool)[: self.population_size]
        self._update_hall_of_fame(new)
        self.pending, self.pending_parents = [], []
        self.generation += 1

    def parents(self) -> list[list[str]]:
        """For each genome of the pending generation, the ids of the parents it was bred from."""
        return [list(p) for p in self.pending_parents] or [[] for _ in self.pending]

    # ------------------------------------------------------------------ helpers
    def score(self, e: Evaluated) -> float:
        return scalar_score(e.values, self.directions, self.weights)

    def _ranked(self, items: list[Evaluated]) -> list[Evaluated]:
        return sorted(items, key=self.score, reverse=True)

    def best(self) -> Evaluated | None:
        return self.hall_of_fame[0] if self.hall_of_fame else None

    def _update_hall_of_fame(self, items: list[Evaluated]) -> None:
        # DEAP's HallOfFame needs creator classes and a similarity callback; a sorted, de-duplicated
        # list of plain records is all we need and serialises as-is.
        seen = {tuple(e.genome) for e in self.hall_of_fame}
        merged = list(self.hall_of_fame) + [e for e in items if tuple(e.genome) not in seen and e.values is not None]
        self.hall_of_fame = self._ranked(merged)[: self.hof_size]

    def _select(self, k: int) -> list[int]:
        """Indices into the population of ``k`` parents (tournament on the scalarised fitness)."""
        fitness_cls = type("Fitness", (base.Fitness,), {"weights": (1.0,)})
        parents = []
        for i, e in enumerate(self.population):
            ind = Individual(e.genome)
            ind.fitness = fitness_cls()
            score = self.score(e)
            ind.fitness.values = (score if math.isfinite(score) else -1e300,)
            ind.index = i
            parents.append(ind)
        return [p.index for p in tools.selTournament(parents, k, self.tournament)]

    def _breed(self, n: int) -> list[list[float]]:
        """Select, then SBX crossover in pairs and polynomial mutation, all bounded to [0, 1]."""
        with deap_random(self.random):
            picked = self._select(n + (n % 2))
            chosen = [Individual(self.population[i].genome) for i in picked]
            lineage = [[i] for i in picked]
            for j in range(0, len(chosen) - 1, 2):
                if _rand() < self.cxpb:
                    tools.cxSimulatedBinaryBounded(chosen[j], chosen[j + 1], self.eta_crossover, 0.0, 1.0)
                    lineage[j] = lineage[j + 1] = sorted({picked[j], picked[j + 1]})
            for ind in chosen:
                if _rand() < self.mutpb:
                    tools.mutPolynomialBounded(ind, self.eta_mutation, 0.0, 1.0, self.indpb)
        ids = [[self.population[i].id for i in parents if self.population[i].id] for parents in lineage[:n]]
        self.pending_parents = ids
        return [list(map(float, ind)) for ind in chosen[:n]]

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "directions": list(self.directions),
            "seed": self.seed,
            "options": {
                "population": self.population_size, "elites": self.elites, "tournament": self.tournament,
                "cxpb": self.cxpb, "mutpb": self.mutpb, "eta_crossover": self.eta_crossover,
                "eta_mutation": self.eta_mutation, "indpb": self.indpb, "weights": self.weights,
                "hall_of_fame": self.hof_size, "initial": self.initial,
            },
            "generation": self.generation,
            "population": [e.to_dict() for e in self.population],
            "hall_of_fame": [e.to_dict() for e in self.hall_of_fame],
            "pending": self.pending,
            "pending_parents": self.pending_parents,
            "injected": self.injected,
            "random": self.random.to_json(),
            "numpy": numpy_state_to_json(self.np_rng),
        }

    @classmethod
    def from_state(cls, state: dict) -> "GeneticAlgorithm":
        opt = cls(state["dim"], directions=state["directions"], seed=state["seed"], **state["options"])
        opt.generation = state["generation"]
        opt.population = [Evaluated.from_dict(d) for d in state["population"]]
        opt.hall_of_fame = [Evaluated.from_dict(d) for d in state["hall_of_fame"]]
        opt.pending = state["pending"]
        opt.pending_parents = state.get("pending_parents", [])
        opt.injected = state.get("injected", [])
        opt.random = RandomState.from_json(state["random"])
        opt.np_rng = numpy_rng_from_json(state["numpy"])
        return opt


class Individual(list):
    """A plain list with a ``fitness`` slot, local to this module (no ``deap.creator`` globals)."""


def _rand() -> float:
    import random

    return random.random()
