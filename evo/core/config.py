"""Experiment configuration: validated data classes, loaded from YAML or a dict.

Every mistake fails at load time, before Ray starts or a model is read, with one line that
names the file and the field (``quickstart.yaml: optimizer.population: expected int``).
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


from evo.core.errors import EvoError
from evo.core.fs import read_yaml
from evo.core.paths import is_gguf_spec, names_package
from evo.core.schema import build
from evo.core.validate import validate



def default_dtype(*, gpu: bool) -> str:
    """``dtype: auto``: bfloat16 on GPUs (tensor cores), float32 on CPUs. On a CPU with native
    bf16 (AVX512-BF16/AMX, ``evo.core.hardware.native_bf16``) bench_runner measured bf16 at 2.5x the
    candidates per minute for a mean 0.005-nat change; it becomes that CPU's default once the
    held-out benchmark shows the test-split result unchanged (not yet measured on such a CPU)."""
    return "bfloat16" if gpu else "float32"




@dataclass(frozen=True)
class Objective:
    """One declared objective: ``metric`` ``logppl`` reduces held-out log-perplexity over the
    evaluation ``sets``; ``task`` reduces task scores (accuracy, exact match) over ``sets``
    naming tasks. ``sets: null`` means all of them."""

    name: str
    metric: str = "logppl"
    sets: list[str] | None = None
    reduce: str = "mean"
    goal: str = "minimize"
    weight: float = 1.0


@dataclass(frozen=True)
class EarlyRejection:
    """Stop scoring a candidate once it is clearly worse than the current k-th best.

    Perplexity is measured in ``chunks`` (prefixes of every set). With ``paired`` (default),
    after each chunk the candidate's per-block NLLs are compared with the k-th best's on the
    same blocks: it is rejected when the lower confidence bound of the mean difference (``z``
    standard errors of the paired differences) exceeds ``margin`` nats. Block difficulty cancels
    in the difference, so the bound is far tighter than one from the spread over blocks, which
    is the fallback when the k-th best has no per-block scores. Only for a single ``logppl``
    objective.
    """

    enabled: bool = True
    k: int = 4
    margin: float = 0.0
    z: float = 3.0
    chunks: int = 4
    paired: bool = True


@dataclass(frozen=True)
class SelectionConfig:
    """Choosing the release on data the search never optimised on (see docs/heldout.md).

    Each evaluation set's documents are split by a hash of their content: ``fraction`` of them
    become the *selection* split, the rest the pool the search draws its blocks from (or give
    ``sets``: one selection file per evaluation set). After the search, the ``top_k`` best
    recipes of the hall of fame and the simple baselines (uniform average, task arithmetic at
    every ``lambdas`` value, TIES and DARE-TIES defaults) are scored on ``blocks`` blocks of
    every selection set; the release is the best of them there, a baseline when no evolved
    recipe beats it.

    ``racing`` (default): the selection split is scored in ``racing_rounds`` rounds over
    doubling shares of its blocks, and a candidate clearly worse than the leader of its kind,
    paired per block, is dropped (``evo.loop.racing``); the release and its interval still come
    from the whole split. false: every candidate on every block, as before.
    """

    fraction: float = 0.5
    sets: dict[str, str] = field(default_factory=dict)
    blocks: int = 64
    top_k: int = 8
    lambdas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    racing: bool = True
    racing_rounds: int = 4


@dataclass(frozen=True)
class ModelsConfig:
    base: str = ""
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalConfig:
    sets: dict[str, str] = field(default_factory=dict)  # name -> JSONL ({"text": ...}) or .txt
    tokenizer: str | None = None  # default: the base model directory
    seq_len: int = 128
    max_blocks: int = 16  # blocks per set each candidate is scored on (one draw per generation)
    batch_size: int = 8
    # draw the search blocks afresh each generation from a pool of the search split, so no
    # recipe is fitted to a fixed handful of blocks; false: the same blocks every generation
    redraw: bool = True
    pool_blocks: int | None = None  # blocks per set in the search pool (default 8 x max_blocks)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    test_blocks: int = 64  # blocks per set of the test split (a zoo's test.jsonl), report only
    tasks: dict[str, str] = field(default_factory=dict)  # name -> task YAML (evo.scoring.tasks)
    train_sets: dict[str, str] = field(default_factory=dict)  # LoRA genes train on these (default: zoo train split)
    train_blocks: int = 256
    task_limit: int | None = None  # score only the first N items of each task
    # search fitness on this fraction of each set's blocks, picked at difficulty quantiles of the
    # source models (evo.scoring.subset); the final comparison and releases use every block
    subset: float = 1.0
    # search fitness on this many items of each task (evenly spaced over the item order, which
    # the task files shuffle); the final comparison, releases and `evo verify` score every item
    task_subset: int | None = None
    early_rejection: EarlyRejection = field(default_factory=EarlyRejection)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "cmaes"  # bench_search: CMA-ES reached a lower median best than the GA at equal budget
    generations: int = 8
    population: int = 16
    options: dict[str, Any] = field(default_factory=dict)
    seed_baselines: bool = True  # start the population with the uniform merge among random genomes
    # where the search starts: "best_lambda" (the uniform average and every weight of
    # eval.selection.lambdas on all sources, scored on the first generation's blocks; the search
    # starts at the best, CMA-ES with its shorter start_sigma step) or "uniform" (CMA-ES centred on
    # the uniform average). bench_heldout: best_lambda won on test on both zoos (docs/heldout.md, docs/smollm2.md)
    start: str = "best_lambda"
    # asynchronous steady-state search (evo.loop.steady_state): a candidate is asked whenever an evaluator
    # is free and told as it arrives; a generation is every `population` results. false (YAML
    # `async: false`, `evo run --sync`): generation-synchronous, bit-for-bit reproducible
    asynchronous: bool = True


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: an embedded local Ray; "auto" or ray://...: a cluster
    evaluators: int = 2
    cpus_per_evaluator: float = 1.0
    gpus_per_evaluator: float = 0.0
    threads_per_evaluator: int = 1
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    metrics_export_port: int | None = None  # Prometheus scrape port of the embedded Ray (None: Ray picks)
    object_store_mb: int | None = None
    candidate_timeout_s: float = 600.0
    retries: int = 2
    # an evaluator whose process died is restarted by Ray (up to retries + 1 times): wait this
    # long for it to answer again before going on without it
    restart_timeout_s: float = 120.0
    temp_dir: str | None = None
    connect_timeout_s: float = 30.0  # ray.address: give up (one line) when nothing answers by then
    # a cluster (ray.address) short of what the evaluators need: wait this long for nodes to join
    # (an autoscaler), saying what for, then refuse; an embedded Ray never grows, so it refuses at once
    resources_timeout_s: float = 300.0
    # refuse a run whose memory plan (evo.cluster.memory, printed by `evo plan`) does not fit the node or GPU
    memory_check: bool = True
    node_memory_gb: float | None = None  # plan against this much memory per node (default: what it has free)


@dataclass(frozen=True)
class StreamConfig:
    """A folder of data shards the run follows (``evo.data.stream.DataStream``); see docs/stream.md.

    With a stream, the evaluation sets are ``newest`` (held-out split of the newest version)
    and ``replay`` (a bounded sample of everything older: earlier versions' held-out text and
    the static ``eval.sets``); LoRA genes train on the newest version's training split.
    """

    folder: str | None = None
    generations: int = 4            # generations per data version
    heldout_frac: float = 0.1
    replay_blocks: int = 64
    min_chars: int = 32
    near_dup_threshold: float = 0.8
    order: str = "name"             # or "mtime"
    poll_s: float = 5.0             # how often --follow looks for new shards
    max_versions: int | None = None  # stop after this many versions (benchmarks, tests)
    # share of each LoRA batch drawn from older versions' training splits (and the zoo's train
    # split): rehearsal against forgetting, for recipes without a ``lora.rehearsal`` gene (which
    # wins where the search space has one); 0 trains on the newest version only
    train_replay: float = 0.25
    replay_train_blocks: int = 256  # rehearsal pool: blocks per older version (and from the zoo)
    # adapters fitted once per version from the current release (name -> LoRA settings: rank,
    # alpha, target_modules, lr, steps, batch_size, rehearsal), merged by the search as source
    # models (evo.loop.adapt); empty: LoRA genes in the search space fit one per candidate
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the static evaluation sets in the replay: one stratum together ("joint"), or one stratum
    # per set ("per_set": the release rule then guards each, e.g. general text the base was good at)
    prior: str = "joint"
    # seed of the held-out split (by content hash): None is the run's seed. Fix it to vary the
    # search seed over the same splits (benchmarks over seeds; a pipeline whose split is given)
    split_seed: int | None = None


@dataclass(frozen=True)
class ReleaseConfig:
    """When the continual loop writes a release (``releases/vNNNN``) after a data version.

    The candidate with the best ``objective`` among those evaluated on the version is released
    if it beats the current release (re-measured on the same data) by more than
    ``min_improvement`` and its ``retention`` objective is no worse than the current release's
    by more than ``tolerance`` (same units as the objective: nats of log-perplexity; in a stream
    run, on every older data version separately). The first release is guarded against the base
    (``first``, below).

    ``guard: anchored`` (default) holds each older version to ``tolerance`` against its
    *anchor*, the release that was current when that version was first guarded, rather than
    against the current release alone: the drift of every release since is summed (each step
    paired on the same blocks), so many small losses cannot add up to forgetting. ``current``
    compares with the current release only.

    ``first: guarded`` (default) holds the first release to the same rule against the base;
    ``weighted`` releases the best weighted sum of the objectives if it beats the base's.
    """

    auto: bool = True
    objective: str | None = None    # default: the first objective
    retention: str | None = None    # default: an objective named "retention", if declared
    tolerance: float = 0.05          # nats (~5% perplexity) per older stratum
    min_improvement: float = 0.0
    lora: str = "merged"            # or "adapter"
    guard: str = "anchored"         # or "current"
    # the first release: "guarded" by the same rule as later ones against the base (the base is
    # the anchor of the static sets: what the model knew before the stream may not decay by more
    # than the tolerance), or "weighted": the best weighted sum of the objectives
    first: str = "guarded"



# What `evo resume` applies from an edited RUN_DIR/config.yaml: how long the run goes on and where
# and how it runs. Anything else (population, search space, data, seed, objectives, dtype) would
# make the checkpoint, the search log and the fitness cache describe another experiment, so a
# resume that finds it changed is refused, naming the field. A prefix ending in "." covers a section.
RESUMABLE = ("optimizer.generations", "stream.generations", "stream.max_versions", "stream.poll_s", "name", "ray.",
             # the selection stage runs after the search and keeps no state a resume replays
             "eval.selection.racing", "eval.selection.racing_rounds")


def config_changes(applied: dict, edited: dict, *, where: str) -> dict[str, tuple]:
    """``{dotted field: (applied value, edited value)}`` for the fields a resume may change;
    raises EvoError naming the first other field that differs."""
    old, new = _flatten(applied), _flatten(edited)
    changes = {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if not any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
            raise EvoError(f"{where}: {key} changed from {old.get(key)!r} to {new.get(key)!r} since the run started; "
                           f"a resume may change only {', '.join(r.rstrip('.') + ('.*' if r.endswith('.') else '') for r in RESUMABLE)} "
                           "(put the old value back, or start a new run)")
        changes[key] = (old.get(key), new.get(key))
    return changes


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            # the order of a mapping the user names (models.sources, eval.sets) is part of the
            # experiment: the genome's genes follow it (schema sections come out in schema order)
            out[f"{prefix}{k} (order)"] = list(v)
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    search_space: str = ""
    zoo: str | None = None  # a zoo built by experiments/make_zoo.py: fills models and eval sets
    zoo_split: str = "valid"
    models: ModelsConfig = field(default_factory=ModelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objectives: list[Objective] = field(default_factory=lambda: [Objective("mean_logppl")])
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    seed: int = 0
    # the stored sources, resident models and release: "auto" is bfloat16 on GPUs, float32 on CPUs
    dtype: str = "auto"
    source: str = field(default="<config>", repr=False)
    # why ``dtype`` is what it is when the config said ``auto`` (the memory plan prints it)
    dtype_note: str = field(default="", repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path, *, complete: Callable[["ExperimentConfig"], "ExperimentConfig"] | None = None,
                  ) -> "ExperimentConfig":
        path = Path(path)
        data = read_yaml(path, "experiment config")
        return cls.from_dict(data or {}, source=str(path), base_dir=path.parent, complete=complete)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>", base_dir: str | Path | None = None, *,
                  complete: Callable[["ExperimentConfig"], "ExperimentConfig"] | None = None) -> "ExperimentConfig":
        """The schema: fields built and coerced, paths resolved against ``base_dir``, ``dtype: auto``
        resolved, then validated. ``complete`` fills, before validation, what only the layers
        above the ground know (a zoo's models and sets: ``evo.loop.experiment.load_config``); a
        stored run config is already complete."""
        if isinstance(data, dict) and isinstance(data.get("stream"), dict) and data["stream"].get("folder") \
                and "objectives" not in data:
            # the continual loop's two objectives: adapt to the newest data, keep the old
            data = {**data, "objectives": [{"name": "adaptation", "sets": ["newest"]},
                                           {"name": "retention", "sets": ["replay"]}]}
        cfg = build(cls, data, source, aliases=FIELD_ALIASES)
        # frozen from here: the resolved paths and the zoo's defaults make new records
        cfg = dataclasses.replace(cfg, source=source)
        cfg = cfg._with_paths_resolved(Path(base_dir) if base_dir is not None else Path.cwd())
        if complete is not None:
            cfg = complete(cfg)
        if cfg.dtype == "auto":  # resolved once here, so config.yaml (and a resume) keeps what ran
            from evo.core.hardware import dtype_reason

            gpu = cfg.ray.gpus_per_evaluator > 0
            cfg = replace(cfg, dtype=default_dtype(gpu=gpu), dtype_note=dtype_reason(gpu=gpu))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        out.pop("dtype_note")
        return out

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Every field checked against the others (``evo.core.validate``); one EvoError line."""
        validate(self)

    @property
    def streaming(self) -> bool:
        return bool(self.stream.folder)

    def release_objectives(self) -> tuple[str, str | None]:
        """(objective to improve, retention objective guarded by the tolerance, or None)."""
        names = [o.name for o in self.objectives]
        objective = self.release.objective or names[0]
        retention = self.release.retention or ("retention" if "retention" in names and objective != "retention" else None)
        return objective, retention

    def _with_paths_resolved(self, base: Path) -> "ExperimentConfig":
        """Relative paths made absolute against the config's folder. A GGUF model entry stays a
        GGUF entry: it is de-quantised where the sources load (``evo.zoo.gguf.model_dirs``), not here."""
        def fix(p):
            return p if p is None or Path(p).is_absolute() else str((base / p).resolve())

        def model(p):
            return p if not p or (is_gguf_spec(p) and names_package(str(p))) else fix(p)

        models = replace(self.models, base=model(self.models.base),
                         sources={k: model(v) for k, v in self.models.sources.items()})
        ev = self.eval
        ev = replace(ev, sets={k: fix(v) for k, v in ev.sets.items()}, tasks={k: fix(v) for k, v in ev.tasks.items()},
                     train_sets={k: fix(v) for k, v in ev.train_sets.items()}, tokenizer=fix(ev.tokenizer),
                     selection=replace(ev.selection, sets={k: fix(v) for k, v in ev.selection.sets.items()}))
        return replace(self, search_space=fix(self.search_space) if self.search_space else "", zoo=fix(self.zoo),
                       models=models, eval=ev, stream=replace(self.stream, folder=fix(self.stream.folder)))


# YAML keys that are Python keywords: `optimizer.async` is the field `asynchronous`
FIELD_ALIASES = {("OptimizerConfig", "async"): "asynchronous"}
