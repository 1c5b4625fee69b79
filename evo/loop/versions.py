"""Where a run's data versions come from, and how each one ends (the data side of ``evo.loop.driver``).

The loop runs the same steps for every data version; a version source says what the versions
are, what is installed for each, and what its release step does:

* :class:`FixedData` — one data version: the config's ``eval.sets`` split into search,
  selection and test blocks (``evo.scoring.sources``), evolved for ``optimizer.generations``
  generations and released by the selection stage (``evo.loop.selection``); ``evo export`` writes it.
* :class:`ShardStream` — one data version per shard of ``stream.folder`` (``evo.data.stream``):

  1. **install**: the newest version's held-out split becomes the evaluation set ``newest``; a
     bounded, seeded sample of everything older (earlier versions' held-out text and the static
     ``eval.sets``) becomes ``replay``; LoRA genes train on the newest training split. The
     current release joins the merge as the source model ``release`` (its weights minus the
     base; zero before the first release), so a candidate can build on what was shipped.
  2. **re-evaluate**: the current release and every candidate the optimizer remembers
     (population, hall of fame, Pareto front) are measured on the new data and the optimizer's
     fitness is replaced (old values stay in ``candidates.jsonl``, tagged with their version);
     the next generation is seeded with "release + LoRA on the newest data" and the best so far.
  3. **evolve** ``stream.generations`` generations.
  4. **release** by the rule of :class:`evo.core.config.ReleaseConfig`; the release records its data
     versions, parent release and lineage.

This is the only module outside the data layer (``evo.scoring.sources``, ``evo.data.stream``) and the config
that asks whether a run follows a stream: :func:`version_source` picks the source once.
"""
from __future__ import annotations

from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.loop.fixed_data import FixedData
from evo.loop.shard_stream import ShardStream
from evo.loop.version_source import VersionSource


def version_source(cfg: ExperimentConfig, *, follow: bool = False) -> VersionSource:
    """The config's data versions: a stream of shards with ``stream.folder``, else fixed data."""
    if cfg.streaming:
        return ShardStream(cfg)
    if follow:
        raise EvoError(f"{cfg.source}: --follow needs a data stream to follow: set stream.folder")
    return FixedData(cfg)
