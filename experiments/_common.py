"""What the scripts in experiments/ set up the same way: paths, the environment, one local Ray,
the tables' cells and rows, and the files they write.

Importing this module is the scripts' set-up, so each imports it before anything from ``evo``: it
puts this checkout first on ``sys.path`` (a script runs from a checkout without ``pip install -e .``,
and a second checkout's scripts use that checkout's evo) and keeps Ray's usage stats off (a Ray a
script starts must not phone home). Nothing else happens on import.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "out"  # where the benchmarks write their tables and raw numbers
LAYERWISE = ROOT / "search_spaces" / "task_arithmetic_layerwise.yaml"  # evo's default search space

sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def one_thread() -> None:
    """One thread per process (OpenMP, MKL, torch): candidates are timed on a shared 2-core
    machine, where a second thread per process only makes the timings noisier. Call it before
    numpy or torch is imported (OpenMP reads its variable once)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def zoo_ready(zoo: str | Path, script: str) -> bool:
    """True when ``zoo`` holds a built zoo; otherwise says on stderr how to build one."""
    if (Path(zoo) / "zoo.json").is_file():
        return True
    print(f"{script}: no zoo at {zoo} (python experiments/make_zoo.py --out zoo)", file=sys.stderr)
    return False


@contextmanager
def local_ray(**options) -> Iterator[None]:
    """A Ray of this machine only for the block (``address="local"`` never joins a cluster left
    running by something else), quiet and without a dashboard; ``options`` go to ``ray.init``.
    Every ``evo.run`` inside the block shares it instead of starting its own."""
    import ray

    ray.init(**{"address": "local", "include_dashboard": False, "log_to_driver": False,
                "configure_logging": False, **options})
    try:
        yield
    finally:
        ray.shutdown()


def mean_logppl(metrics: dict) -> float:
    """The benchmarks' objective: mean log-perplexity over an evaluator result's sets."""
    vals = [v for k, v in metrics.items() if k.startswith("logppl/")]
    return sum(vals) / len(vals)


# ------------------------------------------------------------------------------------ tables
def spread(xs) -> str:
    """``median [min–max]`` of the values that are not None; "–" when none is."""
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):.4f} [{min(xs):.4f}–{max(xs):.4f}]" if xs else "–"


def signed(xs) -> str:
    """``median [min…max]`` with signs (differences); "–" when no value is."""
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):+.4f} [{min(xs):+.4f}…{max(xs):+.4f}]" if xs else "–"


def md_row(*cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def md_head(*columns, align: str = "") -> str:
    """A markdown table's header row and rule (two lines); ``align`` has one letter per column,
    ``r`` for right-aligned numbers (``---:``), anything else left (default: all left)."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(columns), "l")]
    return md_row(*columns) + "\n|" + "|".join(rule) + "|"


# ------------------------------------------------------------------------------------ files
def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path`` whole (a reader never sees half a table), its folder made if missing."""
    from evo.core.fs import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    """``data`` as JSON to ``path`` (see :func:`write_text`)."""
    return write_text(path, json.dumps(data, indent=indent))


def save_runs(path: str | Path, args, runs: list[dict]) -> Path:
    """The runs so far with the arguments that made them, rewritten after each run: a benchmark
    stopped halfway keeps what it measured (``--from-json`` makes its table)."""
    return write_json(path, {"args": dict(vars(args)), "runs": runs})
