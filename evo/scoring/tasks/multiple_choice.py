"""Multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Each choice is a continuation (``target_delimiter`` + choice text) of the item's context; its
score is the summed log-probability of the continuation's tokens (``acc``) or that sum divided
by the choice's length in UTF-8 bytes (``acc_norm``, which stops long choices losing merely for
being long). An item scores 1.0 when the best choice is the gold one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from evo.core.errors import EvoError
from evo.scoring.tasks.base import Task, chunks, encode, logits_of, max_positions, prefix_token
from evo.scoring.tasks.spec import Record, Template, TaskFile, read_jsonl


@dataclass
class MultipleChoiceTask(Task):
    name: str
    metric: str                       # "acc" or "acc_norm"
    contexts: list[list[int]]         # per item: context token ids
    continuations: list[list[list[int]]]  # per item, per choice: continuation token ids
    choice_bytes: list[list[int]]     # per item, per choice: UTF-8 length of the choice text
    golds: list[int]

    kind = "multiple_choice"
    goal = "maximize"
    metrics = ("acc", "acc_norm")
    keys = frozenset({"doc_to_text", "doc_to_target", "doc_to_choice", "choices", "target_delimiter"})

    def __len__(self) -> int:
        return len(self.golds)

    @classmethod
    def from_file(cls, task_file: TaskFile, tokenizer, limit: int | None) -> "MultipleChoiceTask":
        tf = task_file
        tf.check_keys(cls.keys, cls.kind)
        metric = tf.metric(cls.metrics)
        text = Template(tf.require("doc_to_text"), "doc_to_text", tf)
        target = Template(tf.require("doc_to_target"), "doc_to_target", tf)
        choices = _choice_templates(tf)
        delimiter = tf.get("target_delimiter", " ", str)
        description = tf.get("description", "", str)

        task = cls(tf.name, metric, [], [], [], [])
        for record in read_jsonl(tf.dataset(), limit):
            options = [t.text(record) for t in choices] if isinstance(choices, list) else _choice_list(choices, record)
            gold = _gold(target, record, options)
            context = description + text.text(record)
            # Trailing whitespace belongs to the continuation, so "Answer: " + "4" and
            # "Answer:" + " 4" tokenise alike (lm-eval does the same).
            stripped = context.rstrip()
            moved = context[len(stripped):]
            task.contexts.append(encode(tokenizer, stripped) or [prefix_token(tokenizer)])
            conts = [encode(tokenizer, moved + delimiter + option) for option in options]
            if not all(conts):
                raise EvoError(f"{record.where}: a choice tokenises to nothing; give every choice some text")
            task.continuations.append(conts)
            task.choice_bytes.append([max(1, len(option.encode("utf-8"))) for option in options])
            task.golds.append(gold)
        return task

    @torch.inference_mode()
    def score(self, model, *, batch_size: int = 8, device="cpu", items: Sequence[int] | None = None) -> dict:
        chosen = self._select(items)
        loglik = self.loglikelihoods(model, batch_size=batch_size, device=device, items=chosen)
        per_item = []
        for scores, i in zip(loglik, chosen):
            if self.metric == "acc_norm":
                scores = [s / nb for s, nb in zip(scores, self.choice_bytes[i])]
            best = max(range(len(scores)), key=lambda j: (scores[j], -j))  # first best on ties
            per_item.append(1.0 if best == self.golds[i] else 0.0)
        return self._result(per_item)

    @torch.inference_mode()
    def loglikelihoods(self, model, *, batch_size: int = 8, device="cpu",
                       items: Sequence[int] | None = None) -> list[list[float]]:
        """Per item, per choice: the summed log-probability of the continuation's tokens."""
        chosen = self._select(items)
        limit = max_positions(model)
        requests = [(k, j) for k, i in enumerate(chosen) for j in range(len(self.continuations[i]))]
        seqs = {}
        for k, j in requests:
            ctx, cont = self.contexts[chosen[k]], self.continuations[chosen[k]][j]
            full = ctx + cont
            if limit is not None and len(full) - 1 > limit:
                # Drop the oldest tokens, as lm-eval does; a continuation longer than the model's
                # window is scored on its last ``limit`` tokens only.
                full = full[-(limit + 1):]
            seqs[k, j] = (full, min(len(cont), len(full) - 1))
        # Longest first: batches of similar length waste little on padding.
        requests.sort(key=lambda r: -len(seqs[r][0]))

        loglik = [[0.0] * len(self.continuations[i]) for i in chosen]
        for batch in chunks(requests, batch_size):
            width = max(len(seqs[r][0]) for r in batch) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for b, r in enumerate(batch):
                full = seqs[r][0]
                # Right padding: real tokens keep positions 0..n-1 and never attend to padding.
                ids[b, : len(full) - 1] = torch.tensor(full[:-1])
                mask[b, : len(full) - 1] = 1
            logits = logits_of(model, ids.to(device), mask.to(device), task=self.name).logits
            for b, (k, j) in enumerate(batch):
                full, n = seqs[k, j]
                end = len(full) - 1
                rows = logits[b, end - n : end].float().log_softmax(-1)
                target = torch.tensor(full[end - n + 1 :], device=rows.device)
                loglik[k][j] = float(rows.gather(-1, target[:, None]).sum())

        return loglik


def _choice_templates(tf: TaskFile) -> Template | list[Template]:
    key = "doc_to_choice" if "doc_to_choice" in tf.data else "choices"
    value = tf.require(key, (str, list))
    if isinstance(value, list):
        if len(value) < 2:
            raise EvoError(f"{tf.where(key)}: {key} needs at least two choices")
        return [Template(v, key, tf) for v in value]
    return Template(value, key, tf)


def _choice_list(template: Template, record: Record) -> list[str]:
    value = template.render(record)
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise EvoError(f"{record.where}: {template.key} ({template.value!r}) must give a list of choices, got {value!r}")
    if len(value) < 2:
        raise EvoError(f"{record.where}: {template.key} gives {len(value)} choice(s); need at least two")
    return [str(v) for v in value]


def _gold(target: Template, record: Record, options: list[str]) -> int:
    """The gold index: an int (or digit string) is an index; other text must equal one choice."""
    value = target.render(record)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and value not in options:
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EvoError(f"{record.where}: doc_to_target gives {value!r}; expected an index or a choice's text")
    if isinstance(value, str):
        if value not in options:
            raise EvoError(f"{record.where}: target {value!r} is not one of the choices {options!r}")
        return options.index(value)
    if not 0 <= value < len(options):
        raise EvoError(f"{record.where}: answer index {value} out of range for {len(options)} choices")
    return value
