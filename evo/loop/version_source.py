"""The interface between the loop and where its data versions come from: :class:`VersionSource`
(what a source implements), :class:`Installed` (what an install hands the loop) and
:class:`LoopView` (the part of the loop a source may use). The sources are
``evo.loop.fixed_data.FixedData`` and ``evo.loop.shard_stream.ShardStream``; ``evo.loop.versions``
picks one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from evo.artifacts.checkpoint import Checkpoint
from evo.core.config import ExperimentConfig
from evo.data.draws import BlockDraws
from evo.loop.generation import RunResult
from evo.search.space import SearchSpace


class LoopView(Protocol):
    """What a version source may use of the loop (``evo.loop.driver.Loop``): its run store,
    evaluator pool, optimizer, current generation step, fitness cache, metrics, checkpoint and
    stop flag, and its checkpointed ``state``. Nothing else; ``tests/test_imports.py`` checks the
    version sources against this list."""

    state: dict
    store: Any            # evo.artifacts.store.RunStore
    pool: Any             # evo.cluster.pool.EvaluatorPool
    optimizer: Any        # evo.search.optim.base.Optimizer
    step: Any             # evo.loop.generation.GenerationStep of the current version
    cache: dict           # recipe key -> result
    metrics: Any          # evo.cluster.metrics.RunMetrics or None
    stop: Any             # evo.loop.signals.StopSignals (``requested``)
    quiet: bool
    data_key: str
    objective_names: list[str]

    def checkpoint(self) -> None: ...


@dataclass
class Installed:
    """What the loop's generations run on for one data version."""

    data_key: str  # the fitness cache's data version (results on other data are not reused)
    set_names: list[str]  # the evaluation sets objectives are measured on
    draws: BlockDraws | None = None  # per-generation block draws of the search pool (fixed data)
    evidence: dict | None = None  # elites' adjusted values per draw, from the checkpoint
    extra: dict = field(default_factory=dict)  # fields added to every candidate record


class VersionSource(ABC):
    """The data versions of a run and each version's release step, for :class:`evo.loop.driver.Loop`.

    The loop keeps its place in ``state`` (a dict checkpointed with the run): ``version``,
    ``phase`` (``reevaluate`` -> ``evolve`` -> ``release`` -> ``done``) and ``gen_in_version``;
    a source may keep more there."""

    release_step = "release"  # what the time split (evo.artifacts.status.time_split) calls the release step

    space: SearchSpace
    generations: int  # generations evolved on each version
    sources: Any  # the evaluator pool's sources: a Sources or a loader called once Ray is up
    poll_s: float = 0.0  # how often a followed source is asked for a new version

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    @abstractmethod
    def open(self, loop: LoopView, ckpt: Checkpoint | None) -> dict:
        """Prepare for ``loop`` (resumed from ``ckpt`` when given); return the loop's state."""

    def describe(self, pool) -> dict:
        """Fields of the ``ray_started`` event."""
        return {}

    def reopen(self, state: dict) -> bool:
        """On resume: move a finished version back to a phase with work left (e.g. more generations
        were configured); True if it did. By default a finished version stays finished."""
        return False

    @abstractmethod
    def exhausted(self, state: dict) -> bool:
        """No version will come (checked when the current one is done)."""

    @abstractmethod
    def next_version(self, loop: LoopView) -> bool:
        """Move ``loop.state`` to the next version (phase ``reevaluate`` or ``evolve``); False when
        there is none yet."""

    def install_key(self, state: dict) -> Any:
        """What, when it changes, needs a new install."""
        return state["version"]

    @abstractmethod
    def install(self, loop: LoopView) -> Installed | None:
        """Ship the version's blocks to ``loop.pool``; None: the version was skipped."""

    def reevaluate(self, loop: LoopView) -> None:
        """Re-measure what the optimizer remembers on the new version."""

    def start_points(self, loop: LoopView) -> dict[str, np.ndarray]:
        """Named genomes a fresh search may start from (the best one, scored first); none: the
        optimizer's own start."""
        return {}

    @abstractmethod
    def release(self, loop: LoopView) -> None:
        """The version's release step, after its generations."""

    def checkpoint_fields(self, loop: LoopView) -> dict:
        """This source's part of the checkpoint."""
        return {}

    @abstractmethod
    def finish(self, loop: LoopView, result: RunResult, stopped: bool) -> None:
        """Complete ``result`` (and the run's events) when the loop ends."""
