"""Text -> token blocks: the unit every fitness, selection and test figure is measured on."""
from __future__ import annotations

from typing import Iterable

import torch


def token_blocks(texts: Iterable[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate documents (separated by EOS when the tokenizer has one) and cut into
    non-overlapping blocks of ``seq_len`` tokens; the ragged tail is dropped."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"evaluation text gives fewer than {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
