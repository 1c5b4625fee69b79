"""What every task shares: the scoring face, item selection and guarded forward passes."""
from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch

from evo.scoring.tasks.spec import TaskFile


class Task:
    """A pre-tokenised evaluation set. Plain data (ints, lists, tensors), so it pickles to Ray
    actors; ``score`` runs a model over all items or over the subset ``items``."""

    kind: ClassVar[str]
    goal: ClassVar[str]             # "maximize" or "minimize"
    metrics: ClassVar[tuple[str, ...]]
    keys: ClassVar[frozenset[str]]  # YAML keys this kind reads, besides spec.COMMON_KEYS

    name: str
    metric: str

    @classmethod
    def from_file(cls, task_file: TaskFile, tokenizer, limit: int | None) -> "Task":
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def score(self, model, *, batch_size: int = 8, device="cpu", items: Sequence[int] | None = None) -> dict:
        """``{"value": float, "per_item": [float], "n": int}`` over ``items`` (default: all).
        ``value`` is the mean of ``per_item``. Raises FloatingPointError on NaN logits."""
        raise NotImplementedError

    def _select(self, items: Sequence[int] | None) -> list[int]:
        n = len(self)
        if items is None:
            return list(range(n))
        chosen = [int(i) for i in items]
        if not chosen:
            raise ValueError(f"task {self.name!r}: items is empty")
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise IndexError(f"task {self.name!r} has {n} items; item {bad[0]} is out of range")
        return chosen

    def _result(self, per_item: list[float]) -> dict:
        value = math.fsum(per_item) / len(per_item) if per_item else math.nan
        return {"value": value, "per_item": per_item, "n": len(per_item)}


def logits_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, task: str = "", **kwargs):
    """The model's output, with ``.logits`` checked for NaN (a broken merge must not score)."""
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if torch.isnan(out.logits).any():
        raise FloatingPointError(f"task {task!r}: the model produced NaN logits")
    return out


def max_positions(model) -> int | None:
    """The longest sequence the model was configured for, when it says (HF config)."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def chunks(seq: Sequence, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def prefix_token(tokenizer) -> int:
    """A token to stand before an empty context (BOS, else EOS, as lm-eval does)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
