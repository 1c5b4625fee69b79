"""Offspring from parents with DEAP's bounded operators: simulated binary crossover in pairs and
polynomial mutation, both kept inside [0, 1]. Shared by ``ga`` and ``nsga2``, which differ only
in how they pick parents and who survives."""
from __future__ import annotations

import random
from dataclasses import dataclass

from deap import tools


class Individual(list):
    """A plain list with a ``fitness`` slot (no ``deap.creator`` globals)."""


@dataclass(frozen=True)
class Variation:
    cxpb: float = 0.9
    mutpb: float = 1.0
    eta_crossover: float = 15.0
    eta_mutation: float = 20.0
    indpb: float = 0.1

    def offspring(self, parents: list[list[float]]) -> tuple[list[list[float]], list[list[int]]]:
        """Children of ``parents`` (taken in pairs) and, for each child, the indices into
        ``parents`` it came from. Draws from the module-level ``random`` (DEAP's source): call
        inside :func:`evo.search.optim.base.deap_random`."""
        chosen = [Individual(p) for p in parents]
        lineage = [[i] for i in range(len(chosen))]
        for j in range(0, len(chosen) - 1, 2):
            if random.random() < self.cxpb:
                tools.cxSimulatedBinaryBounded(chosen[j], chosen[j + 1], self.eta_crossover, 0.0, 1.0)
                lineage[j] = lineage[j + 1] = [j, j + 1]
        for ind in chosen:
            if random.random() < self.mutpb:
                tools.mutPolynomialBounded(ind, self.eta_mutation, 0.0, 1.0, self.indpb)
        return [list(map(float, ind)) for ind in chosen], lineage
