"""The memory plan: what a run will hold, per node and per GPU, read from the models' safetensors
headers before anything is loaded, so a run that cannot fit is refused in one line instead of
being killed by the OOM killer an hour in.

Where the bytes go (``evo.scoring.sources``, ``evo.cluster.pool``, ``evo.scoring.evaluator``, ``evo.merge.engine``):

* **sources**: the base and one task vector per source, in ``cfg.dtype``, once per node in
  Ray's object store (evaluators on a node map the same pages);
* **per evaluator**: the resident model (``cfg.dtype``), the merge scratch (reused float32
  buffers of the largest tensor's size, plus ``sources + 1`` widening buffers when the sources
  are stored in 16 bits), forward-pass activations (dominated by float32 logits: batch × seq ×
  vocab), LoRA training activations when the space has LoRA genes, and the worker's runtime;
  an evaluator on a GPU also moves the sources onto its GPU;
* **driver**: its runtime, and while loading, the base and one source model as stored on disk;
* **Ray's daemons** (GCS, raylet, dashboard and its agents).

The runtime figures are measured constants (``RUNTIME``) of this stack (torch 2.13,
transformers, Ray 2.60) on Linux; ``tests/test_memory.py`` checks the whole plan against the
proportional set size (PSS) of a real run's processes on two model sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from evo.core.errors import EvoError

GiB = 1024**3
MiB = 1024**2

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Measured on this stack (PSS, Linux): a Python process with torch + transformers + a Ray core
# worker, idle (evaluator) or with evo's driver imports; Ray's daemons with and without the dashboard.
RUNTIME = {"evaluator": 450 * MiB, "driver": 380 * MiB, "ray": 420 * MiB, "ray_dashboard": 230 * MiB,
           # host memory of a CUDA context and its libraries: an estimate, not yet measured here (no GPU)
           "cuda_host": 1024 * MiB,
           # the compiled merge kernels' import and compile cost in an evaluator that uses them
           # (models of evo.merge.fused.FUSED_MIN_ENTRIES+ entries, with a C++ compiler on CPU)
           "inductor": 300 * MiB}


def fused_kernels(shape: "ModelShape", gpu: bool = False) -> bool:
    """Whether evaluators will merge with the compiled kernels: large enough models, and a C++
    compiler for Inductor on CPU (without one they fall back to the eager path)."""
    import shutil

    from evo.merge.fused import fused_by_default

    return fused_by_default(shape.params) and (gpu or any(shutil.which(c) for c in ("g++", "c++", "clang++")))


def merge_scratch(n_src: int, shape: "ModelShape", per: int, gpu: bool = False) -> float:
    """An evaluator's merge buffers in float32 units of the largest tensor (evo.merge.method.Scratch,
    reused for every tensor), at their most: TIES, which the selection stage always merges.
    Measured by merging with every registered method: with the compiled kernels (large models) a
    band buffer, a flag buffer and the magnitude table's sort copy, plus a float32 result when
    the model is 16-bit (the kernels read 16-bit sources directly); eagerly (small models) a
    weighted copy per source and five more buffers, and float32 copies of 16-bit inputs."""
    low = per != 4
    if fused_kernels(shape, gpu):
        return 1.5 + 1 + (1 if low else 0)
    return n_src + 5.5 + 1 + ((n_src + 2) if low else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model directory: read from its safetensors headers and config.json."""

    params: int          # floating-point entries
    largest: int         # entries of the largest tensor
    file_bytes: int      # bytes of the weights as stored
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int

    @classmethod
    def read(cls, path: str | Path) -> "ModelShape":
        from evo.merge.io import open_model, read_config

        path = Path(path)
        tensors = open_model(path)
        floats = [info for _, info in tensors.values() if info.dtype.is_floating_point]
        cfg = read_config(path)
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
        return cls(
            params=sum(i.numel for i in floats),
            largest=max((i.numel for i in floats), default=1),
            file_bytes=sum(i.end - i.start for _, i in tensors.values()),
            hidden=hidden,
            layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1),
            vocab=int(cfg.get("vocab_size") or 0),
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            heads=int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1),
        )


@dataclass
class Item:
    what: str
    bytes: int
    where: str  # "node" (host memory) or "gpu"
    phase: str = "all"  # "load": only while the driver loads the sources, before any evaluator starts


@dataclass
class MemoryPlan:
    """Bytes a run needs on its largest node and on each GPU, against what they have."""

    items: list[Item]
    evaluators_per_node: int
    node_available: int | None          # bytes, None when unknown (a remote cluster)
    gpu_total: int | None = None        # bytes of one GPU, None without one
    evaluators_per_gpu: int = 0
    object_store: int = 0               # bytes the sources need in the object store
    stream_sources: bool = False        # GPU evaluators keep the sources in host memory (evo.merge.Merger)
    notes: list[str] = field(default_factory=list)

    @property
    def node_bytes(self) -> int:
        """The node's peak: what stays for the whole run, plus the larger of the loading phase
        (the driver's transient copies) and the evaluation phase (the evaluators)."""
        node = [i for i in self.items if i.where == "node"]
        load = sum(i.bytes for i in node if i.phase == "load")
        run = sum(i.bytes for i in node if i.phase == "run")
        return sum(i.bytes for i in node if i.phase == "all") + max(load, run)

    @property
    def gpu_bytes(self) -> int:
        return sum(i.bytes for i in self.items if i.where == "gpu")

    def problem(self) -> str | None:
        """Why this plan cannot fit, or None."""
        if self.node_available is not None and self.node_bytes > self.node_available:
            return (f"needs {self.node_bytes / GiB:.1f} GiB on this node, {self.node_available / GiB:.1f} GiB "
                    f"available")
        if self.gpu_total is not None and self.evaluators_per_gpu and self.gpu_bytes > self.gpu_total:
            return f"needs {self.gpu_bytes / GiB:.1f} GiB per GPU, a GPU has {self.gpu_total / GiB:.1f} GiB"
        return None

    def table(self) -> str:
        rows = [f"memory plan ({self.evaluators_per_node} evaluator(s) on the largest node):"]
        for i in self.items:
            tag = {"gpu": "  (GPU)"}.get(i.where, "") + {"load": "  (loading only)"}.get(i.phase, "")
            rows.append(f"  {i.what:<66} {i.bytes / GiB:8.2f} GiB{tag}")
        have = f" of {self.node_available / GiB:.1f} GiB available" if self.node_available is not None else ""
        rows.append(f"  {'node total':<66} {self.node_bytes / GiB:8.2f} GiB{have}")
        if self.evaluators_per_gpu:
            have = f" of {self.gpu_total / GiB:.1f} GiB" if self.gpu_total is not None else " (GPU size unknown here)"
            rows.append(f"  {'per GPU':<66} {self.gpu_bytes / GiB:8.2f} GiB{have}")
        rows.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(rows)


def plan_for(cfg, *, evaluators_per_node: int | None = None, node_available: int | None = -1,
             gpu_total: int | None = -1) -> MemoryPlan:
    """The plan of ``cfg`` (an :class:`evo.core.config.ExperimentConfig`). ``evaluators_per_node``:
    default all (an embedded Ray); ``node_available``/``gpu_total``: default this machine's."""
    from evo.search.space import SearchSpaceSpec

    rc, ev = cfg.ray, cfg.eval
    from evo.zoo.gguf import as_model_dir

    base = ModelShape.read(as_model_dir(cfg.models.base))
    n_src = len(cfg.models.sources)
    per = BYTES[cfg.dtype]
    k = rc.evaluators if evaluators_per_node is None else evaluators_per_node
    on_gpu = rc.gpus_per_evaluator > 0
    spec = SearchSpaceSpec.from_yaml(cfg.search_space)
    lora = any(g.startswith("lora.") for g in spec.genes)
    # a path of single models' layers runs the sources' own layers: each evaluator holds them whole
    paths = spec.dataflow is not None and spec.dataflow.layers_from == "models"

    sources = (1 + n_src) * base.params * per
    model = base.params * per
    scratch = merge_scratch(n_src, base, per, on_gpu) * base.largest * 4
    act_bytes = 4 if cfg.dtype == "float32" else 2
    tokens = ev.batch_size * ev.seq_len
    # logits in the model's dtype, their float32 copy and the cross-entropy's log-softmax, plus
    # one layer's hidden states and MLP (inference keeps no earlier layer) and the attention scores
    activations = (tokens * base.vocab * (act_bytes + 8)
                   + tokens * (6 * base.hidden + 3 * base.intermediate) * act_bytes
                   + ev.batch_size * base.heads * ev.seq_len**2 * 4)
    if lora:  # backward keeps every layer's activations and float32 logits and their gradient
        activations += (tokens * base.layers * (10 * base.hidden + 3 * base.intermediate) * act_bytes
                        + tokens * base.vocab * 8)
    items = [Item(f"sources: base + {n_src} task vectors in {cfg.dtype} (object store, shared)", sources, "node")]
    per_eval = [("resident model", model), ("merge scratch (float32)", scratch),
                (f"activations (batch {ev.batch_size} x seq {ev.seq_len}{', LoRA training' if lora else ''})",
                 activations)]
    if paths:
        per_eval.append((f"base + {n_src} source models whole, for data-flow paths", (1 + n_src) * model))
    if gpu_total == -1:
        gpu_total = _gpu_total() if on_gpu else None
    stream = False
    if on_gpu:
        per_gpu = max(1, math.floor(1 / rc.gpus_per_evaluator + 1e-9))
        rest = per_gpu * sum(b for _, b in per_eval)
        # the sources live on the GPU when they fit beside the model (10 % headroom for CUDA's own
        # context and allocator slack); otherwise they stay in host memory and stream per tensor
        stream = gpu_total is not None and per_gpu * sources + rest > 0.9 * gpu_total
        if stream:
            items.append(Item(f"{per_gpu} evaluator(s) per GPU x per-tensor buffers for streamed sources",
                              per_gpu * (n_src + 1) * base.largest * per, "gpu"))
        else:
            items.append(Item(f"{per_gpu} evaluator(s) per GPU x sources on the GPU", per_gpu * sources, "gpu"))
        items.extend(Item(f"{per_gpu} evaluator(s) per GPU x {what}", per_gpu * b, "gpu") for what, b in per_eval)
    else:
        per_gpu = 0
        items.extend(Item(f"{k} evaluator(s) x {what}", k * b, "node", "run") for what, b in per_eval)
    runtime = (RUNTIME["evaluator"] + (RUNTIME["cuda_host"] if on_gpu else 0)
               + (RUNTIME["inductor"] if fused_kernels(base, on_gpu) else 0))
    items.append(Item(f"{k} evaluator(s) x runtime (torch, transformers, Ray worker{', CUDA' if on_gpu else ''})",
                      k * runtime, "node", "run"))
    items.append(Item("driver: runtime (holds only views of the sources)", RUNTIME["driver"], "node"))
    # before the evaluators start, the driver reads the base and one source at a time as stored
    # (plus float32 temporaries of one tensor); the task vectors go to the object store as made
    items.append(Item("driver: base and one source as stored, while loading", 2 * base.file_bytes + 3 * base.largest * 4,
                      "node", "load"))
    ray = RUNTIME["ray"] + (RUNTIME["ray_dashboard"] if rc.dashboard else 0)
    items.append(Item("Ray daemons (GCS, raylet" + (", dashboard)" if rc.dashboard else ")"), ray, "node"))
    if rc.node_memory_gb:
        node_available = int(rc.node_memory_gb * GiB)
    elif node_available == -1:
        node_available = available_memory()
    plan = MemoryPlan(items, k, node_available, gpu_total, per_gpu, object_store=sources, stream_sources=stream)
    plan.notes.append(f"dtype {cfg.dtype} ({cfg.dtype_note or 'as the config gives it'})")
    if spec.dataflow is not None:
        plan.notes.append(f"data-flow paths of up to {spec.dataflow.repeats} x {base.layers} layers: activations are "
                          "one layer's (inference keeps no earlier layer); a deeper path costs time, not memory")
    if on_gpu and gpu_total is None:
        plan.notes.append("no GPU visible to the driver: the per-GPU figure is not checked; sources live on the GPU")
    elif on_gpu:
        plan.notes.append("task vectors stream to the GPU per tensor from host memory (they do not fit beside the "
                          "model)" if stream else "task vectors live on the GPU")
    return plan


def object_store_bytes(plan: MemoryPlan) -> int:
    """An embedded object store that holds the sources with room for the evaluation data and a
    continual run's release delta: Ray's default (30 % of available memory) spills a large
    model's sources to disk. The store costs only the pages it uses, so it is never made smaller
    than that default."""
    need = int(plan.object_store * 1.25) + 256 * MiB
    default = int(0.3 * (plan.node_available or 0))
    return max(need, default)


def suggestions(cfg) -> str:
    tips = []
    if cfg.dtype == "float32":
        tips.append("dtype: bfloat16 (halves sources and models)")
    if cfg.ray.evaluators > 1:
        tips.append(f"ray.evaluators: {cfg.ray.evaluators - 1}")
    if cfg.eval.batch_size > 1:
        tips.append(f"eval.batch_size: {max(1, cfg.eval.batch_size // 2)}")
    if cfg.ray.dashboard:
        tips.append("ray.dashboard: false")
    return "; try " + ", ".join(tips) if tips else ""


def check_plan(cfg, plan: MemoryPlan) -> None:
    """Refuse in one line when the plan does not fit (``ray.memory_check: false`` skips this)."""
    problem = plan.problem()
    if problem is not None and cfg.ray.memory_check:
        raise EvoError(f"memory plan: {problem}{suggestions(cfg)} (see the plan with evo plan CONFIG; "
                       "ray.memory_check: false to run anyway)")


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), capped by a cgroup limit if lower."""
    import psutil

    avail = psutil.virtual_memory().available
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            if lim.isdigit() and int(lim) < 1 << 60:
                avail = min(avail, int(lim) - int(Path(usage).read_text().strip()))
        except OSError:
            continue
    return avail


def _gpu_total() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # a broken CUDA install: the plan simply cannot check the GPU
        return None
    return None


class PeakSampler:
    """The peak PSS of a process tree (a child ``evo run``: driver, Ray daemons, evaluators)
    while it lives, and each process's own peak, sampled from a thread of the caller."""

    def __init__(self, pid: int, period_s: float = 0.5):
        import threading

        self.pid, self.period_s = pid, period_s
        self.peak = 0
        self.per_pid: dict[int, int] = {}
        # each process's peak anonymous memory (resident, neither file-backed nor shared memory:
        # what it allocated itself, without the object store pages it maps)
        self.anon: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += info.pss
                self.per_pid[p.pid] = max(self.per_pid.get(p.pid, 0), info.pss)
                self.anon[p.pid] = max(self.anon.get(p.pid, 0), info.rss - info.shared)
            self.peak = max(self.peak, total)
            self._done.wait(self.period_s)  # a sampling period; the end is the caller's stop()

    def stop(self) -> "PeakSampler":
        self._done.set()
        self._thread.join()
        return self
