"""Optional bridge to lm-evaluation-harness for its own task YAMLs (``pip install lm-eval``).

evo's tasks (``evo.scoring.tasks.load_task``) are what the search scores; this adapter is for a final
report on standard benchmarks, run on a model already in memory. lm-eval is imported only when
called, so evo works without it. Offline runs need ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``,
set by the entry point, not here, and local task files (``dataset_path: json``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from evo.core.errors import EvoError


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def evaluate_lm_eval(model, tokenizer, tasks: Sequence[str], *, include_path: str | Path | None = None,
                     limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Run lm-eval tasks by name on a loaded Hugging Face causal LM.

    Returns ``{task: {metric: value}}`` with lm-eval's filter suffix dropped (``"acc,none"`` ->
    ``"acc"``); standard errors are left out.
    """
    if not lm_eval_available():
        raise EvoError("lm-eval tasks need lm-evaluation-harness: pip install lm-eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise EvoError(f"{include_path}: lm-eval include_path is not a directory")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path)) if include_path is not None else TaskManager()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                         if "_stderr" not in key and key != "sample_len"  # a count, not a metric
                         and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return results
