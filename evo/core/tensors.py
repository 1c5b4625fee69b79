"""The dtypes evo stores and computes in, and tensors as numpy arrays for Ray's object store.

Every layer names a dtype by the string the config and mergekit use ("float32", "bfloat16",
"float16"); this is the one table from those names to torch's.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)


def to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors -> numpy arrays for the object store (Ray shares numpy zero-copy, not torch).

    numpy has no bfloat16: a bf16 tensor travels as its bit pattern in ``uint16`` (no float
    tensor of a model is ever uint16, so :func:`from_numpy` can tell)."""
    return {k: _to_array(v) for k, v in state.items()}


def _to_array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_numpy(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_numpy`, without copies."""
    # Object-store arrays are read-only; torch warns about that but we never write into them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {k: from_array(v) for k, v in arrays.items()}


def from_array(a: np.ndarray) -> torch.Tensor:
    """One array of :func:`to_numpy` as a tensor (uint16 bits back to bfloat16)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


def float32_array(a: np.ndarray) -> np.ndarray:
    """A stored source array (float32, float16 or bf16 bits) as float32, for driver-side arithmetic."""
    return from_array(a).float().numpy() if a.dtype in (np.uint16, np.float16) else a
