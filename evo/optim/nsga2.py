"""NSGA-II (DEAP's ``selNSGA2``) for several objectives, with a Pareto front kept across
generations. Parents are chosen by binary tournament on (rank, crowding distance), offspring
come from bounded SBX crossover and polynomial mutation; survivors are the best ``population``
of parents + offspring by non-dominated sorting.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from deap import base, tools

from evo.optim.base import Evaluated, evaluated, register, signs
from evo.optim.ga import GeneticAlgorithm, Individual

_WORST = 1e300  # DEAP's crowding distance arithmetic needs finite values


@register("nsga2")
class NSGA2(GeneticAlgorithm):
    def __init__(self, dim: int, *, front_size: int = 64, **kw):
        kw.setdefault("elites", 0)
        super().__init__(dim, **kw)
        self.front_size = front_size
        self.front: list[Evaluated] = []

    # ------------------------------------------------------------------ DEAP glue
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

    def tell(self, genomes, values, ids=None) -> None:
        new = evaluated(genomes, values, ids)
        pool = self._individuals(self.population + new)
        survivors = tools.selNSGA2(pool, min(self.population_size, len(pool)))
        self.population = [ind.record for ind in survivors]
        self._update_front(new)
        self._update_hall_of_fame(new)
        self.pending, self.pending_parents = [], []
        self.generation += 1

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

    def _select(self, k: int) -> list[int]:
        """Binary tournament on (Pareto rank, crowding distance), DEAP's selTournamentDCD."""
        parents = self._individuals(self.population)
        for i, ind in enumerate(parents):
            ind.index = i
        # selNSGA2 over all parents assigns each its crowding distance (front by front)
        parents = tools.selNSGA2(parents, len(parents))
        pool = parents if len(parents) >= 4 else parents * 4
        return [p.index for p in _tournament_dcd(pool, k + (-k % 4))][:k]

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> dict:
        st = super().state()
        st["options"]["front_size"] = self.front_size
        st["front"] = [e.to_dict() for e in self.front]
        return st

    @classmethod
    def from_state(cls, state: dict) -> "NSGA2":
        opt = super().from_state(state)
        opt.front = [Evaluated.from_dict(d) for d in state["front"]]
        return opt


def _tournament_dcd(individuals: list, k: int) -> list:
    """DEAP's selTournamentDCD needs len(individuals) >= k; sample in rounds when it is not."""
    out = []
    while len(out) < k:
        need = min(k - len(out), len(individuals) - len(individuals) % 4) or 4
        out.extend(tools.selTournamentDCD(individuals, need))
    return out[:k]
