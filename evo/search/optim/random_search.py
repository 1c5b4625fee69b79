"""Uniform random search: the baseline every other optimizer must beat at equal budget."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from evo.search.optim.base import Evaluated, Optimizer, evaluated, register


@register("random")
class RandomSearch(Optimizer):
    """Draws every genome uniformly from [0,1]^n (the initial genomes first); the population is
    the latest generation (asynchronous: the latest ``population`` results), the hall of fame as
    for every optimizer."""

    starts_anywhere = False  # uniform draws have no start: optimizer.start scores nothing for it

    def ask(self) -> list[np.ndarray]:
        if not self.pending:
            n = self.population_size
            genomes = self.np_rng.random((n, self.dim)).tolist()
            if not self.population:
                genomes[: len(self.initial)] = self.initial[:n]
            self.pending = self.with_injected(genomes)
        return [np.asarray(g) for g in self.pending]

    def tell(self, genomes: Sequence, values: Sequence, ids=None) -> None:
        new = evaluated(genomes, values, ids)
        self.population = self.ranked(new)[: self.population_size]
        self.update_hall_of_fame(new)
        self.pending, self.pending_parents = [], []
        self.generation += 1

    def ask_one(self, id: str | None = None) -> tuple[list[float], list[str]]:
        genome = self.next_injected() or self.first_genome() or self.np_rng.random(self.dim).tolist()
        self.asked += 1
        return genome, []

    def tell_one(self, genome, values, id=None) -> None:
        new = evaluated([genome], [values], [id])
        self.recent = (self.recent + new)[-self.population_size:]
        self.population = self.ranked(self.recent)
        self.update_hall_of_fame(new)
        self.count_told()

    def __init__(self, dim: int, **common):
        super().__init__(dim, **common)
        self.recent: list[Evaluated] = []  # asynchronous: the latest results, in arrival order

    def extra_state(self) -> dict:
        return {"recent": [e.to_dict() for e in self.recent]}

    def load_extra_state(self, state: dict) -> None:
        self.recent = [Evaluated.from_dict(d) for d in state.get("recent", [])]
