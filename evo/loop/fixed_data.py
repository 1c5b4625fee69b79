"""Fixed data: one data version, the config's ``eval.sets`` split into search, selection and test
blocks, evolved for ``optimizer.generations`` generations and released by the selection stage
(``evo.loop.selection``); ``evo export`` writes the release."""
from __future__ import annotations

import functools


from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.loop.generation import make_space, search_draws
from evo.loop.selection import Selection, print_selection
from evo.scoring.sources import Sources
from evo.search.recipe import Recipe

from evo.loop.version_source import Installed, LoopView, VersionSource


class FixedData(VersionSource):
    """One data version, the config's evaluation sets; released by the selection stage."""

    release_step = "selection"  # what the time split calls the release step

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.space = make_space(cfg)
        self.generations = cfg.optimizer.generations
        # loaded once Ray is up: each task vector goes into the object store as it is made
        self.sources = functools.partial(Sources.load, cfg)
        self.evidence: dict | None = None
        self.selection: dict | None = None

    def open(self, loop: LoopView, ckpt):
        if ckpt is None:
            return {"version": None, "phase": "done", "gen_in_version": 0}
        self.evidence, self.selection = ckpt.evidence, ckpt.selection
        return {"version": ckpt.data_version, "phase": "done" if ckpt.selection else "evolve",
                "gen_in_version": ckpt.generation}

    def describe(self, pool):
        return {"data_version": pool.sources.data_version}

    def exhausted(self, state):
        return state["version"] is not None

    def reopen(self, state):
        """A finished run resumed with more ``optimizer.generations``: search on from the
        checkpoint, then select again (what the selection stage's advice suggests)."""
        if state["phase"] != "done" or state["version"] is None or state["gen_in_version"] >= self.generations:
            return False
        state["phase"] = "evolve"
        return True

    def next_version(self, loop: LoopView):
        loop.state.update(version=loop.pool.sources.data_version, phase="evolve", gen_in_version=0)
        return True

    def install(self, loop: LoopView):
        sources = loop.pool.sources
        return Installed(sources.data_version, list(self.cfg.eval.sets), draws=search_draws(self.cfg, sources),
                         evidence=self.evidence)

    def start_points(self, loop: LoopView):
        """``optimizer.start: best_lambda``: the uniform average and every source at each weight λ
        of ``eval.selection.lambdas`` (task arithmetic's λ sweep, in a task-arithmetic space), as
        genomes of the search space; the other genes at their centre. Not for a space with LoRA
        genes: each start point would be a LoRA fit at arbitrary settings."""
        genes = self.space.spec.genes
        if self.cfg.optimizer.start == "best_lambda" and self.space.spec.dataflow is not None and "weight" not in genes:
            # a path of single models' layers: each model as it is, the λ sweep's end points
            return {f"{m} (every layer)": self.space.identity_genome(m) for m in self.space.path_choices[1:]}
        if self.cfg.optimizer.start != "best_lambda" or "weight" not in genes or any(g.startswith("lora.") for g in genes):
            return {}
        n = len(self.space.models)
        points = {"uniform average": self.space.uniform_genome(weight=1.0 / n, density=1.0)}
        for lam in self.cfg.eval.selection.lambdas:
            points[f"weight {lam:g}"] = self.space.uniform_genome(weight=lam, density=1.0)
        return points

    def release(self, loop: LoopView):
        """The selection stage (``evo.loop.selection``) on the pool: the hall of fame's top and the
        simple baselines re-scored on the selection split (and the test split, reported)."""
        if loop.optimizer.best() is None:
            return  # every candidate failed: nothing to select
        pool, cfg = loop.pool, self.cfg

        def evaluate(named: dict[str, Recipe], collection: str,
                     blocks: dict[str, list[int]] | None = None) -> dict[str, dict]:
            todo = {label: (f"{collection}-{i:02d}", r) for i, (label, r) in enumerate(named.items())}
            results: dict[str, dict] = {}
            pool.evaluate(todo, lambda k, r: results.__setitem__(k, r), desc=f"{collection} split",
                          collection=collection, blocks=blocks)
            return results

        evolved = []
        for e in loop.optimizer.hall_of_fame:
            try:
                evolved.append((e.id or "?", self.space.decode(e.genome), e.values))
            except EvoError:
                continue
        sizes = {name: len(b) for name, b in pool.sources.eval_sets.get("selection", {}).items()}
        stage = Selection(cfg, evaluate, has_selection=pool.sources.has_selection,
                          has_test=pool.sources.has_report_sets, sizes=sizes)
        self.selection = stage.run(evolved)
        race = self.selection.get("race") or {}
        loop.store.event("selection", release=self.selection["release"], reason=self.selection["reason"],
                         margins=self.selection["margins"], advice=self.selection.get("advice"),
                         race={k: race[k] for k in ("racing", "blocks_scored", "blocks_full", "seconds") if k in race})
        if not loop.quiet:
            print_selection(self.selection, list(cfg.eval.sets))

    def checkpoint_fields(self, loop: LoopView):
        sources = loop.pool.sources if loop.pool is not None else None
        return {"data_inputs": sources.version_inputs if sources else {},
                "evidence": loop.step.evidence if loop.step is not None else (self.evidence or {}),
                "selection": self.selection, "comparison": self.selection["table"] if self.selection else None}

    def finish(self, loop: LoopView, result, stopped):
        result.selection = self.selection
        result.comparison = self.selection["table"] if self.selection else {}
        if stopped:
            return
        if result.best_recipe is None:
            result.outcome, result.reason = "all_failed", loop.store.first_failure()
        if loop.state["phase"] == "done":
            loop.store.event("run_finished", generations=self.generations)
