"""NSGA-II (DEAP's ``selNSGA2``) for several objectives, with a Pareto front kept across
generations. Parents are chosen by binary tournament on (rank, crowding distance), offspring
come from bounded SBX crossover and polynomial mutation (``evo.search.optim.variation``).

Synchronous: survivors are the best ``population`` of parents + offspring by non-dominated
sorting. Asynchronous (steady state): each ask breeds one child from the current population;
each result joins it as it arrives and non-dominated sorting with crowding distance decides
which one member leaves.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from deap import base, tools

from evo.search.optim.base import Evaluated, Optimizer, deap_random, evaluated, register, signs
from evo.search.optim.variation import Individual, Variation

_WORST = 1e300  # DEAP's crowding distance arithmetic needs finite values


@register("nsga2")
class NSGA2(Optimizer):
    def __init__(self, dim: int, *, front_size: int = 64, cxpb: float = 0.9, mutpb: float = 1.0,
                 eta_crossover: float = 15.0, eta_mutation: float = 20.0, indpb: float | None = None, **common):
        super().__init__(dim, **common)
        self.front_size = front_size
        self.front: list[Evaluated] = []
        self.variation = Variation(cxpb, mutpb, eta_crossover, eta_mutation,
                                   indpb if indpb is not None else 1.0 / max(dim, 1))

    def options(self) -> dict:
        v = self.variation
        return {**super().options(), "front_size": self.front_size, "cxpb": v.cxpb, "mutpb": v.mutpb,
                "eta_crossover": v.eta_crossover, "eta_mutation": v.eta_mutation, "indpb": v.indpb}

    def fronts(self) -> list[Evaluated]:
        return self.front

    # ------------------------------------------------------------------ synchronous
    def ask(self) -> list[np.ndarray]:
        def breed() -> list[list[float]]:
            genomes, self.pending_parents = self._breed(self.population_size)
            return genomes

        return self.bred_generation(breed)

    def tell(self, genomes, values, ids=None) -> None:
        self._survive(evaluated(genomes, values, ids))
        self.pending, self.pending_parents = [], []
        self.generation += 1

    # ------------------------------------------------------------------ asynchronous (steady state)
    def ask_one(self, id: str | None = None) -> tuple[list[float], list[str]]:
        genome = self.next_injected() or self.first_genome()
        parents: list[str] = []
        if genome is None and len(self.population) < 2:
            genome = self.np_rng.random(self.dim).tolist()
        elif genome is None:
            (genome, *_), (parents, *_) = self._breed(1)
        self.asked += 1
        return genome, parents

    def tell_one(self, genome, values, id=None) -> None:
        self._survive(evaluated([genome], [values], [id]))
        self.count_told()

    # ------------------------------------------------------------------ DEAP glue
    def _survive(self, new: list[Evaluated]) -> None:
        pool = self._individuals(self.population + new)
        survivors = tools.selNSGA2(pool, min(self.population_size, len(pool)))
        self.population = [ind.record for ind in survivors]
        self._update_front(new)
        self.update_hall_of_fame(new)

    def _individuals(self, items: Sequence[Evaluated]) -> list:
        fitness_cls = type("Fitness", (base.Fitness,), {"weights": signs(self.directions)})
        out = []
        for e in items:
            ind = Individual(e.genome)
            ind.fitness = fitness_cls()
            if e.values is None or not all(math.isfinite(v) for v in e.values):
                ind.fitness.values = tuple(-s * _WORST for s in signs(self.directions))
            else:
                ind.fitness.values = tuple(e.values)
            ind.record = e
            out.append(ind)
        return out

    def _update_front(self, items: list[Evaluated]) -> None:
        candidates = self._individuals([e for e in self.front + items if e.values is not None])
        if not candidates:
            return
        first = tools.sortNondominated(candidates, len(candidates), first_front_only=True)[0]
        unique = {tuple(ind.record.genome): ind for ind in first}
        front = list(unique.values())
        if len(front) > self.front_size:
            front = tools.selNSGA2(front, self.front_size)
        self.front = sorted((ind.record for ind in front), key=lambda e: e.values)

    def rescore(self, values) -> None:
        super().rescore(values)
        # the old front was non-dominated on the old data: sort it again on the new values
        front, self.front = self.front, []
        self._update_front(front)

    def _breed(self, n: int) -> tuple[list[list[float]], list[list[str]]]:
        """``n`` children of parents picked by binary tournament on (Pareto rank, crowding
        distance), DEAP's selTournamentDCD, and the ids of each child's parents."""
        with deap_random(self.random):
            parents = self._individuals(self.population)
            for i, ind in enumerate(parents):
                ind.index = i
            # selNSGA2 over all parents assigns each its crowding distance (front by front)
            parents = tools.selNSGA2(parents, len(parents))
            pool = parents if len(parents) >= 4 else parents * 4
            k = n + (n % 2)
            picked = [p.index for p in _tournament_dcd(pool, k + (-k % 4))][:k]
            children, lineage = self.variation.offspring([self.population[i].genome for i in picked])
        ids = [[self.population[i].id for i in sorted({picked[j] for j in par}) if self.population[i].id]
               for par in lineage[:n]]
        return children[:n], ids

    # ------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict:
        return {"front": [e.to_dict() for e in self.front]}

    def load_extra_state(self, state: dict) -> None:
        self.front = [Evaluated.from_dict(d) for d in state["front"]]


def _tournament_dcd(individuals: list, k: int) -> list:
    """DEAP's selTournamentDCD needs len(individuals) >= k; sample in rounds when it is not."""
    out = []
    while len(out) < k:
        need = min(k - len(out), len(individuals) - len(individuals) % 4) or 4
        out.extend(tools.selTournamentDCD(individuals, need))
    return out[:k]
