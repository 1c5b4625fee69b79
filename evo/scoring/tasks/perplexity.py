"""Log-perplexity over fixed-length token blocks of a text file (JSONL records or plain .txt).

Blocks are cut once by ``evo.data.tokens.token_blocks``, so a task scores exactly what the search's
held-out fitness scores; each block is one item (its mean next-token NLL), and the value over
any subset is the mean NLL of those blocks, i.e. ``evo.scoring.fitness.mean_nll`` on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from evo.core.errors import EvoError
from evo.data.tokens import token_blocks
from evo.scoring.tasks.base import Task, chunks, logits_of
from evo.scoring.tasks.spec import Template, TaskFile, read_jsonl


@dataclass
class PerplexityTask(Task):
    name: str
    metric: str
    blocks: torch.Tensor      # int64 [n, seq_len]

    kind = "perplexity"
    goal = "minimize"
    metrics = ("logppl",)
    keys = frozenset({"doc_to_text", "seq_len", "max_blocks"})

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    @classmethod
    def from_file(cls, task_file: TaskFile, tokenizer, limit: int | None) -> "PerplexityTask":
        tf = task_file
        tf.check_keys(cls.keys, cls.kind)
        seq_len = tf.get("seq_len", 128, int)
        if seq_len < 2:
            raise EvoError(f"{tf.where('seq_len')}: seq_len must be >= 2, got {seq_len}")
        max_blocks = tf.get("max_blocks", None, int)
        if limit is not None:
            max_blocks = limit if max_blocks is None else min(limit, max_blocks)
        path = tf.dataset()
        if path.suffix == ".txt":
            texts = [path.read_text(encoding="utf-8")]
        else:
            text = Template(tf.get("doc_to_text", "text"), "doc_to_text", tf)
            texts = [text.text(r) for r in read_jsonl(path)]
        try:
            blocks = token_blocks(texts, tokenizer, seq_len, max_blocks)
        except ValueError:
            raise EvoError(f"{path}:1: empty task: the text gives fewer than seq_len={seq_len} tokens") from None
        return cls(tf.name, tf.metric(cls.metrics), blocks)

    @torch.inference_mode()
    def score(self, model, *, batch_size: int = 8, device="cpu", items: Sequence[int] | None = None) -> dict:
        chosen = self._select(items)
        per_item: list[float] = []
        for batch in chunks(chosen, batch_size):
            ids = self.blocks[batch].to(device)
            logits = logits_of(model, ids, task=self.name).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
            per_item.extend(float(v) for v in nll)
        return self._result(per_item)
