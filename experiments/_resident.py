"""One resident evaluator on the tiny zoo, in this process, no Ray and no run store: what
bench_search.py and bench_async.py score their candidates with (a module of its own, so neither
script imports the other for it)."""
from __future__ import annotations

import time

from _common import LAYERWISE

# 12 blocks per domain (the quickstart evaluates 48): 4x cheaper, so 3 optimizers x 5 seeds x 160
# evaluations fit in ~20 min on one core; --max-blocks 48 matches the quickstart exactly.
# redraw off: these benchmarks compare optimizers on one fixed set of blocks (bench_heldout.py
# measures what the fresh draws and the selection split give on held-out text)
EVAL = {"seq_len": 128, "max_blocks": 12, "batch_size": 12, "redraw": False}


def make_config(zoo: str):
    """The benchmarks' experiment: ``EVAL`` as it stands when called (a script's flags update it)."""
    from evo.loop.experiment import load_config

    return load_config({
        "name": "bench-search",
        "zoo": zoo,
        "search_space": str(LAYERWISE),
        "eval": dict(EVAL),
        "objectives": [{"name": "mean_logppl", "metric": "logppl", "reduce": "mean", "goal": "minimize"}],
        "seed": 0,
    })


class Bench:
    """The resident evaluator, the search space and a memo of full evaluations."""

    def __init__(self, zoo: str):
        import torch

        from evo.loop.generation import initial_genomes, make_space
        from evo.scoring.evaluator import Evaluator
        from evo.scoring.rejection import RejectionTest
        from evo.scoring.sources import Sources

        self.cfg = make_config(zoo)
        self.sources = Sources.load(self.cfg)
        er = self.cfg.eval.early_rejection
        self.er = er
        self.ev = Evaluator(self.sources.base, self.sources.deltas, self.sources.model_config, self.sources.eval_sets,
                            threads=1, batch_size=self.cfg.eval.batch_size,
                            rejection=RejectionTest.of(er))
        torch.set_num_threads(1)
        self.space = make_space(self.cfg)
        self.initial = [g.tolist() for g in initial_genomes(self.cfg, self.space)]
        self.domains = list(self.cfg.eval.sets)
        self.memo: dict[str, dict] = {}  # recipe key -> full result (valid split)
        self.eval_seconds = 0.0
        self.n_computed = 0

    def full(self, recipe) -> dict:
        key = recipe.key()
        if key not in self.memo:
            t0 = time.perf_counter()
            res = self.ev.evaluate(recipe.to_dict())
            self.eval_seconds += time.perf_counter() - t0
            self.n_computed += 1
            self.memo[key] = res
        return self.memo[key]

    def with_rejection(self, recipe, threshold) -> dict:
        if threshold is None:
            return self.full(recipe)
        t0 = time.perf_counter()
        res = self.ev.evaluate(recipe.to_dict(), reject_above=threshold)
        self.eval_seconds += time.perf_counter() - t0
        self.n_computed += 1
        if res["status"] == "ok":
            self.memo.setdefault(recipe.key(), res)
        return res
