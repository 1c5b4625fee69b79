"""Uniform random search: the baseline every other optimizer must beat at equal budget."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from evo.optim.base import register
from evo.optim.ga import GeneticAlgorithm


@register("random")
class RandomSearch(GeneticAlgorithm):
    """Draws every generation uniformly from [0,1]^n; keeps the same hall of fame as the GA."""

    def ask(self) -> list[np.ndarray]:
        if not self.pending:
            n = self.population_size
            genomes = self.np_rng.random((n, self.dim)).tolist()
            if not self.population:
                genomes[: len(self.initial)] = self.initial[:n]
            self.pending = self._with_injected(genomes)
        return [np.asarray(g) for g in self.pending]

    def tell(self, genomes: Sequence, values: Sequence, ids=None) -> None:
        elites, self.elites = self.elites, 0
        try:
            super().tell(genomes, values, ids)
        finally:
            self.elites = elites
