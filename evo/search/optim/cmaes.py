"""CMA-ES over the unit cube, on DEAP's ``deap.cma.Strategy`` (its state is plain arrays, so a
checkpoint is JSON, unlike pickling a ``cma.CMAEvolutionStrategy``).

Bounds: samples outside [0,1] are evaluated at their projection onto the cube and told to the
strategy with a quadratic penalty on the distance (a standard boundary repair), so the search
distribution learns to stay inside. Several objectives are scalarised by their weights.

Asynchronous mode: ``ask_one`` samples from the distribution as it is now; the strategy is
updated each time ``population`` (λ) results have arrived since the last update, whichever
distribution sampled them, so no evaluator waits for a generation's stragglers and a late result
still counts in the next update. This follows the asynchronous evolution strategies of
Glasmachers, "A Natural Evolution Strategy with Asynchronous Strategy Updates" (GECCO 2013),
which update from the most recent results rather than from a synchronised batch; the CMA update
itself is DEAP's, unchanged (steps are taken relative to the mean at update time).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from deap import base, cma

from evo.search.optim.base import Evaluated, Optimizer, evaluated, register

PENALTY = 1e3


class _Sample(list):
    pass


@register("cmaes")
class CMAES(Optimizer):
    def __init__(self, dim: int, *, sigma: float = 1 / 6, start_sigma: float = 1 / 12, **common):
        super().__init__(dim, **common)
        self.sigma = sigma
        self.start_sigma = start_sigma  # the step after start_at: a known-good start needs a shorter one
        centroid = np.asarray(self.initial[0]) if self.initial else np.full(dim, 0.5)
        self.strategy = cma.Strategy(centroid=centroid.tolist(), sigma=sigma, lambda_=self.population_size)
        self.raw: list[list[float]] = []  # unclipped samples of the pending generation
        self.raw_by_id: dict[str, list[float]] = {}  # asynchronous: unclipped sample of each asked id
        self.arrived: list[dict] = []  # asynchronous: results since the last update
        self.recent: list[Evaluated] = []  # asynchronous: the latest λ results, in arrival order

    def options(self) -> dict:
        return {**super().options(), "sigma": self.sigma, "start_sigma": self.start_sigma}

    def start_at(self, genome) -> None:
        super().start_at(genome)
        self.strategy = cma.Strategy(centroid=list(self.initial[0]), sigma=self.start_sigma,
                                     lambda_=self.population_size)

    # ------------------------------------------------------------------ synchronous
    def ask(self) -> list[np.ndarray]:
        if not self.pending:
            # deap.cma samples from numpy's global RNG: swap ours in and out
            outer = np.random.get_state()
            np.random.seed(self.np_rng.integers(2**32 - 1))
            try:
                samples = self.strategy.generate(list)
            finally:
                np.random.set_state(outer)
            self.raw = self.with_injected([list(map(float, s)) for s in samples])  # injected: inside the cube
            self.pending = [np.clip(s, 0.0, 1.0).tolist() for s in self.raw]
        return [np.asarray(g) for g in self.pending]

    def tell(self, genomes: Sequence, values: Sequence, ids=None) -> None:
        new = evaluated(genomes, values, ids)
        self._update(list(zip(self.raw or [e.genome for e in new], new)))
        self.population = self.ranked(new)
        self.update_hall_of_fame(new)
        self.pending, self.raw, self.pending_parents = [], [], []
        self.generation += 1

    # ------------------------------------------------------------------ asynchronous
    def ask_one(self, id: str | None = None) -> tuple[list[float], list[str]]:
        raw = self.next_injected()
        if raw is None:
            # one draw of deap.cma.Strategy.generate: centroid + sigma * B D z
            z = self.np_rng.standard_normal(self.dim)
            raw = (np.asarray(self.strategy.centroid) + self.strategy.sigma * (self.strategy.BD @ z)).tolist()
        self.asked += 1
        if id is not None:  # told later under this id: the strategy learns from the unclipped sample
            self.raw_by_id[id] = list(map(float, raw))
        return np.clip(raw, 0.0, 1.0).tolist(), []

    def tell_one(self, genome, values, id=None) -> None:
        (e,) = evaluated([genome], [values], [id])
        raw = self.raw_by_id.pop(id, None) if id is not None else None
        self.arrived.append({"raw": raw if raw is not None else list(e.genome), **e.to_dict()})
        # the population is the latest λ results, as a synchronous generation is (not the best
        # ever: early rejection compares against its k-th best)
        self.recent = (self.recent + [e])[-self.population_size:]
        self.population = self.ranked(self.recent)
        self.update_hall_of_fame([e])
        if len(self.arrived) >= self.population_size:
            batch, self.arrived = self.arrived[: self.population_size], self.arrived[self.population_size:]
            self._update([(r["raw"], Evaluated.from_dict(r)) for r in batch])
        self.count_told()

    # ------------------------------------------------------------------ the strategy update
    def _update(self, samples: list[tuple[list[float], Evaluated]]) -> None:
        fitness_cls = type("Fitness", (base.Fitness,), {"weights": (-1.0,)})
        worst = max((-self.score(e) for _, e in samples if np.isfinite(self.score(e))), default=0.0) + 1.0
        individuals = []
        for raw, e in samples:
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

    # ------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict:
        return {"raw": self.raw, "raw_by_id": self.raw_by_id, "arrived": self.arrived,
                "recent": [e.to_dict() for e in self.recent],
                "strategy": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(self.strategy).items()}}

    def load_extra_state(self, state: dict) -> None:
        self.raw = state["raw"]
        self.raw_by_id = state.get("raw_by_id", {})
        self.arrived = state.get("arrived", [])
        self.recent = [Evaluated.from_dict(d) for d in state.get("recent", [])]
        for k, v in state["strategy"].items():
            setattr(self.strategy, k, np.asarray(v) if isinstance(v, list) else v)
