"""Exact match of greedy generations against a target string.

Generation is a batched greedy loop (left padding, explicit position ids, the model's KV cache
when it returns one), so any causal LM whose output has ``.logits`` can be scored. The text is
cut at EOS and at the first stop sequence (``until``), optionally reduced to a regex match
(``regex``; its first group if it has one) and compared, stripped, with the target
(``ignore_case`` folds case).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from evo.core.errors import EvoError
from evo.scoring.tasks.base import Task, chunks, encode, logits_of, max_positions, prefix_token
from evo.scoring.tasks.spec import Template, TaskFile, read_jsonl


@dataclass
class ExactMatchTask(Task):
    name: str
    metric: str
    prompts: list[list[int]]
    targets: list[str]
    until: list[str]
    max_gen_toks: int
    ignore_case: bool
    regex: str | None
    tokenizer: Any            # decodes generations; fast tokenizers pickle
    eos_id: int | None
    pad_id: int

    kind = "exact_match"
    goal = "maximize"
    metrics = ("exact_match",)
    keys = frozenset({"doc_to_text", "doc_to_target", "until", "max_gen_toks", "generation_kwargs",
                      "ignore_case", "regex"})

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def from_file(cls, task_file: TaskFile, tokenizer, limit: int | None) -> "ExactMatchTask":
        tf = task_file
        tf.check_keys(cls.keys, cls.kind)
        gen = tf.get("generation_kwargs", {}, dict) or {}
        for key in gen:
            if key not in ("until", "max_gen_toks", "do_sample", "temperature"):
                raise EvoError(f"{tf.where('generation_kwargs')}: unsupported generation_kwargs key {key!r} "
                               "(generation is greedy; give until and max_gen_toks)")
        until = tf.get("until", gen.get("until", ["\n\n"]), (list, str))
        until = [until] if isinstance(until, str) else until
        if not all(isinstance(s, str) and s for s in until):
            raise EvoError(f"{tf.where('until')}: until must be a list of non-empty stop strings, got {until!r}")
        max_gen = tf.get("max_gen_toks", gen.get("max_gen_toks", 16), int)
        if max_gen < 1:
            raise EvoError(f"{tf.where('max_gen_toks')}: max_gen_toks must be >= 1, got {max_gen}")
        regex = tf.get("regex", None, str)
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as err:
                raise EvoError(f"{tf.where('regex')}: invalid regex {regex!r} ({err})") from None
        text = Template(tf.require("doc_to_text"), "doc_to_text", tf)
        target = Template(tf.require("doc_to_target"), "doc_to_target", tf)
        description = tf.get("description", "", str)

        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        task = cls(tf.name, tf.metric(cls.metrics), [], [], list(until), int(max_gen),
                   bool(tf.get("ignore_case", False, bool)), regex, tokenizer,
                   None if eos is None else int(eos), int(pad if pad is not None else (eos or 0)))
        for record in read_jsonl(tf.dataset(), limit):
            task.prompts.append(encode(tokenizer, description + text.text(record)) or [prefix_token(tokenizer)])
            task.targets.append(target.text(record))
        return task

    def answer(self, text: str) -> str:
        """The comparable part of a generation or target: regex match, stripped, case-folded."""
        if self.regex is not None:
            found = re.search(self.regex, text)
            text = "" if found is None else (found.group(1) if found.groups() else found.group(0))
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def cut(self, text: str) -> str:
        """A generation up to (not including) its first stop sequence."""
        ends = [i for i in (text.find(s) for s in self.until) if i >= 0]
        return text[: min(ends)] if ends else text

    def generate(self, model, *, batch_size: int = 8, device="cpu", items: Sequence[int] | None = None) -> list[str]:
        """Greedy generations for ``items``, cut at EOS and stop sequences."""
        chosen = self._select(items)
        out: dict[int, str] = {}
        # Longest prompt first, as in multiple choice: little padding per batch.
        order = sorted(chosen, key=lambda i: -len(self.prompts[i]))
        for batch in chunks(order, batch_size):
            for i, text in zip(batch, self._generate_batch(model, batch, device)):
                out[i] = text
        return [out[i] for i in chosen]

    @torch.inference_mode()
    def score(self, model, *, batch_size: int = 8, device="cpu", items: Sequence[int] | None = None) -> dict:
        chosen = self._select(items)
        texts = self.generate(model, batch_size=batch_size, device=device, items=chosen)
        per_item = [1.0 if self.answer(t) == self.answer(self.targets[i]) else 0.0 for i, t in zip(chosen, texts)]
        return self._result(per_item)

    @torch.inference_mode()
    def _generate_batch(self, model, batch: list[int], device) -> list[str]:
        limit = max_positions(model)
        keep = None if limit is None else max(1, limit - self.max_gen_toks)
        prompts = [self.prompts[i][-keep:] if keep else self.prompts[i] for i in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            # Left padding: every row's last token sits in the last column, where the next
            # token is read; position ids count real tokens only.
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        generated: list[list[int]] = [[] for _ in batch]
        texts = [""] * len(batch)
        done = [False] * len(batch)
        out = logits_of(model, ids, mask, positions, task=self.name, use_cache=True)
        for _ in range(self.max_gen_toks):
            step = out.logits[:, -1].argmax(-1)
            for b in range(len(batch)):
                if done[b]:
                    continue
                token = int(step[b])
                if token == self.eos_id:
                    done[b] = True
                    continue
                generated[b].append(token)
                texts[b] = self.tokenizer.decode(generated[b], skip_special_tokens=True)
                done[b] = self.cut(texts[b]) != texts[b]
            if all(done):
                break
            step = torch.where(torch.tensor(done, device=step.device), torch.full_like(step, self.pad_id), step)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            next_pos = positions[:, -1:] + 1
            cache = _cache_of(out)
            if cache is not None:
                out = logits_of(model, step[:, None], mask, next_pos, task=self.name, **cache, use_cache=True)
                positions = torch.cat([positions, next_pos], dim=1)
            else:   # a model without a cache: run the whole sequence again
                ids = torch.cat([ids, step[:, None]], dim=1)
                positions = torch.cat([positions, next_pos], dim=1)
                out = logits_of(model, ids, mask, positions, task=self.name, use_cache=True)
        return [self.cut(t) for t in texts]


def _cache_of(out) -> dict | None:
    """The KV cache as the keyword the model takes it back under: ``cache`` (transformers >= 5.2x)
    or ``past_key_values`` (older releases, and models that follow them)."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return {name: value}
    return None
