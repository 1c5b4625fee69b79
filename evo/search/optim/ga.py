"""Genetic algorithm with elitism over the unit-vector genome, built from DEAP's operators.

Synchronous (``ask``/``tell``): one generation is tournament selection from the population,
simulated binary crossover and polynomial mutation bounded to [0, 1] (``evo.search.optim.variation``),
evaluation of the offspring, then the ``elites`` best parents carry over unevaluated (their
fitness is known) and the offspring fill the rest.

Asynchronous (``ask_one``/``tell_one``): steady state. Each ask breeds one child from two
tournament-selected members of the current population; each result joins the population as it
arrives and the worst member leaves (the elites are never the worst, so elitism holds). Several
objectives are scalarised by their declared weights (use ``nsga2`` to keep the Pareto front).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from deap import base, tools

from evo.search.optim.base import Optimizer, deap_random, evaluated, register
from evo.search.optim.variation import Individual, Variation


@register("ga")
class GeneticAlgorithm(Optimizer):
    def __init__(self, dim: int, *, elites: int = 2, tournament: int = 3, cxpb: float = 0.9, mutpb: float = 1.0,
                 eta_crossover: float = 15.0, eta_mutation: float = 20.0, indpb: float | None = None, **common):
        super().__init__(dim, **common)
        if not 0 <= elites < self.population_size:
            raise TypeError(f"elites must be in [0, population), got {elites}")
        self.elites = elites
        self.tournament = tournament
        self.variation = Variation(cxpb, mutpb, eta_crossover, eta_mutation,
                                   indpb if indpb is not None else 1.0 / max(dim, 1))

    def options(self) -> dict:
        v = self.variation
        return {**super().options(), "elites": self.elites, "tournament": self.tournament, "cxpb": v.cxpb,
                "mutpb": v.mutpb, "eta_crossover": v.eta_crossover, "eta_mutation": v.eta_mutation, "indpb": v.indpb}

    # ------------------------------------------------------------------ synchronous
    def ask(self) -> list[np.ndarray]:
        return self.bred_generation(lambda: self._breed(self.population_size - self.elites))

    def tell(self, genomes: Sequence[Sequence[float]], values: Sequence[Sequence[float] | None], ids=None) -> None:
        new = evaluated(genomes, values, ids)
        pool = self.ranked(self.population)[: self.elites] + new if self.population else new
        self.population = self.ranked(pool)[: self.population_size]
        self.update_hall_of_fame(new)
        self.pending, self.pending_parents = [], []
        self.generation += 1

    # ------------------------------------------------------------------ asynchronous (steady state)
    def ask_one(self, id: str | None = None) -> tuple[list[float], list[str]]:
        genome = self.next_injected() or self.first_genome()
        parents: list[str] = []
        if genome is None and len(self.population) < 2:  # the first results are not in yet
            genome = self.np_rng.random(self.dim).tolist()
        elif genome is None:
            (genome,), (parents,) = self._breed(1, keep_parents=False)
        self.asked += 1
        return genome, parents

    def tell_one(self, genome, values, id=None) -> None:
        new = evaluated([genome], [values], [id])
        self.population = self.ranked(self.population + new)[: self.population_size]
        self.update_hall_of_fame(new)
        self.count_told()

    # ------------------------------------------------------------------ breeding
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

    def _breed(self, n: int, keep_parents: bool = True):
        """``n`` children: tournament selection, then SBX in pairs and polynomial mutation."""
        with deap_random(self.random):
            picked = self._select(n + (n % 2))
            children, lineage = self.variation.offspring([self.population[i].genome for i in picked])
        ids = [[self.population[i].id for i in sorted({picked[j] for j in parents}) if self.population[i].id]
               for parents in lineage[:n]]
        if keep_parents:
            self.pending_parents = ids
            return children[:n]
        return children[:n], ids
