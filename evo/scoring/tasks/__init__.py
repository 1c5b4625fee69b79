"""Task scoring: multiple choice, exact match and perplexity tasks read from small YAML files.

    task = load_task("tasks/arithmetic/arithmetic_mc.yaml", tokenizer)
    task.score(model, items=range(50))   # {"value": 0.62, "per_item": [...], "n": 50}

A task kind is a module and a line in ``TASKS``; see docs/tasks.md for the file format.
"""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from evo.core.errors import EvoError
from evo.scoring.tasks.base import Task
from evo.scoring.tasks.exact_match import ExactMatchTask
from evo.scoring.tasks.multiple_choice import MultipleChoiceTask
from evo.scoring.tasks.perplexity import PerplexityTask
from evo.scoring.tasks.spec import TaskFile

TASKS = MappingProxyType({t.kind: t for t in (MultipleChoiceTask, ExactMatchTask, PerplexityTask)})

__all__ = ["TASKS", "Task", "load_task", "task_files", "MultipleChoiceTask", "ExactMatchTask", "PerplexityTask"]


def load_task(path: str | Path, tokenizer, *, limit: int | None = None) -> Task:
    """Read a task YAML and its data file and pre-tokenise every item (the first ``limit``
    records when given). Raises EvoError naming the file and line on any bad input."""
    if limit is not None and limit < 1:
        raise EvoError(f"{path}: limit must be >= 1, got {limit}")
    task_file = TaskFile.read(path)
    kind = task_file.kind
    if kind not in TASKS:
        key = "type" if "type" in task_file.data else "output_type"
        raise EvoError(f"{task_file.where(key)}: unknown task type {kind!r}; choose from {', '.join(TASKS)}")
    return TASKS[kind].from_file(task_file, tokenizer, limit)


def task_files(root: str | Path) -> list[Path]:
    """Every task YAML under ``root``, recursively, in sorted order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
