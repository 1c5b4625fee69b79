"""An experiment config as a run uses it: the schema (``evo.core.config``) completed with what
the layers above the ground know — the zoo's models and evaluation sets, the optimizers' names.

The schema imports nothing above ``evo.core``; this module is where the layers meet, so every
entry point (``evo run``, ``evo.run``, benchmarks, tests) loads configs through
:func:`load_config`. A stored run config (``RUN_DIR/config.yaml``) is already complete and is
read with ``ExperimentConfig.from_dict`` by the layers below.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.search.optim import OPTIMIZERS
from evo.zoo.build import Zoo


def load_config(config: ExperimentConfig | dict | str | Path, *, source: str = "<config>",
                base_dir: str | Path | None = None) -> ExperimentConfig:
    """A validated, complete config from a YAML path, a dict or a config object; every mistake
    is one :class:`EvoError` line naming the file and field."""
    if isinstance(config, ExperimentConfig):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = ExperimentConfig.from_yaml(config, complete=with_zoo_defaults)
    else:
        cfg = ExperimentConfig.from_dict(config, source=source, base_dir=base_dir, complete=with_zoo_defaults)
    check_optimizer(cfg)
    return cfg


def with_zoo_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    """Models and evaluation sets the config leaves out, from the zoo's ``zoo.json``."""
    if not cfg.zoo:
        return cfg
    try:
        zoo = Zoo.load(cfg.zoo)
    except EvoError as exc:
        raise EvoError(f"{cfg.source}: zoo: {exc}") from None
    models = replace(cfg.models, base=cfg.models.base or str(zoo.base_dir),
                     sources=cfg.models.sources or {d: str(p) for d, p in zoo.specialist_dirs.items()})
    ev = replace(cfg.eval,
                 sets=cfg.eval.sets or {d: str(zoo.data_dir(d, cfg.zoo_split)) for d in zoo.domains},
                 train_sets=cfg.eval.train_sets or {d: str(zoo.data_dir(d, "train")) for d in zoo.domains})
    return replace(cfg, models=models, eval=ev)


def check_optimizer(cfg: ExperimentConfig) -> None:
    """``optimizer.name`` names a registered optimizer."""
    if cfg.optimizer.name not in OPTIMIZERS:
        raise EvoError(f"{cfg.source}: optimizer.name: unknown optimizer {cfg.optimizer.name!r} "
                       f"(known: {', '.join(sorted(OPTIMIZERS))})")
