"""CMA-ES over the unit cube, on DEAP's ``deap.cma.Strategy`` (its state is plain arrays, so a
checkpoint is JSON, unlike pickling a ``cma.CMAEvolutionStrategy``).

Bounds: samples outside [0,1] are evaluated at their projection onto the cube and told to the
strategy with a quadratic penalty on the distance (a standard boundary repair), so the search
distribution learns to stay inside. Several objectives are scalarised by their weights.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from deap import base, cma

from evo.optim.base import evaluated as make_evaluated
from evo.optim.base import register
from evo.optim.ga import GeneticAlgorithm

PENALTY = 1e3


@register("cmaes")
class CMAES(GeneticAlgorithm):
    def __init__(self, dim: int, *, sigma: float = 1 / 6, **kw):
        kw.setdefault("elites", 0)
        super().__init__(dim, **kw)
        self.sigma = sigma
        centroid = np.asarray(self.initial[0]) if self.initial else np.full(dim, 0.5)
        self.strategy = cma.Strategy(centroid=centroid.tolist(), sigma=sigma, lambda_=self.population_size)
        self.raw: list[list[float]] = []  # unclipped samples of the pending generation

    def ask(self) -> list[np.ndarray]:
        if not self.pending:
            # deap.cma samples from numpy's global RNG: swap ours in and out
            outer = np.random.get_state()
            np.random.seed(self.np_rng.integers(2**32 - 1))
            try:
                samples = self.strategy.generate(list)
            finally:
                np.random.set_state(outer)
            self.raw = self._with_injected([list(map(float, s)) for s in samples])  # injected: inside the cube
            self.pending = [np.clip(s, 0.0, 1.0).tolist() for s in self.raw]
        return [np.asarray(g) for g in self.pending]

    def tell(self, genomes: Sequence, values: Sequence, ids=None) -> None:
        evaluated = make_evaluated(genomes, values, ids)

        class _Sample(list):
            pass

        individuals = []
        fitness_cls = type("Fitness", (base.Fitness,), {"weights": (-1.0,)})
        worst = max((-self.score(e) for e in evaluated if np.isfinite(self.score(e))), default=0.0) + 1.0
        for raw, e in zip(self.raw or [e.genome for e in evaluated], evaluated):
            ind = _Sample(raw)
            loss = -self.score(e)
            if not np.isfinite(loss):
                loss = worst
            loss += PENALTY * float(np.sum((np.asarray(raw) - np.asarray(e.genome)) ** 2))
            ind.fitness = fitness_cls((loss,))
            individuals.append(ind)
        self.strategy.update(individuals)
        # eigh returns Fortran-ordered arrays; JSON restores C order, and BLAS sums in a different
        # order per layout. Normalise now so a resumed run replays bit for bit.
        for k, v in vars(self.strategy).items():
            if isinstance(v, np.ndarray):
                setattr(self.strategy, k, np.ascontiguousarray(v))
        self.population = sorted(evaluated, key=self.score, reverse=True)
        self._update_hall_of_fame(evaluated)
        self.pending, self.raw, self.pending_parents = [], [], []
        self.generation += 1

    def state(self) -> dict:
        st = super().state()
        st["options"]["sigma"] = self.sigma
        st["raw"] = self.raw
        st["strategy"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self.strategy).items()}
        return st

    @classmethod
    def from_state(cls, state: dict) -> "CMAES":
        opt = super().from_state(state)
        opt.raw = state["raw"]
        for k, v in state["strategy"].items():
            setattr(opt.strategy, k, np.asarray(v) if isinstance(v, list) else v)
        return opt
