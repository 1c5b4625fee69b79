"""What a merge method sees: one output tensor at a time, with its parameters already resolved.

A method is a small object with a name, the parameters it accepts and a ``merge(job)`` that writes
``job.out`` in place. The engine owns buffers, parameter resolution and seeding, so adding a
method is adding a module and a registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from evo.merge.params import ParamSpec


class Scratch:
    """Flat buffers sized for the largest tensor, allocated on first use and reused forever.

    Fresh memory is first touched at <1 GB/s on the target VMs, so per-tensor temporaries would
    dominate a merge; views of these buffers cost nothing.
    """

    def __init__(self, numel: int, device: torch.device | str = "cpu"):
        self.numel = int(numel)
        self.device = torch.device(device)
        self._bufs: dict[tuple, Tensor] = {}

    def get(self, key: str, shape: Sequence[int] | torch.Size, dtype: torch.dtype = torch.float32,
            factor: int = 1) -> Tensor:
        """A reused buffer named ``key`` viewed as ``shape`` (``factor`` × largest numel of room)."""
        n = 1
        for s in shape:
            n *= int(s)
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(self.numel * factor, n), dtype=dtype, device=self.device)
            self._bufs[(key, dtype)] = buf
        return buf[:n].view(tuple(shape))


@dataclass
class TensorJob:
    """Inputs for one output tensor.

    ``deltas[i]`` is θᵢ − θ_base for the i-th participating model entry (None when the entry is
    the base model itself); ``per_model[i]`` its resolved parameters; ``shared`` the resolved
    global parameters. ``generator(i)`` gives the reproducible RNG for entry i on this tensor, ``seed(i)`` the
    integer it is seeded with.
    ``has_base`` is False when the recipe names no base model (``base`` is then only the
    reference the deltas were taken against). ``cached(key, fn)`` memoizes a value that depends
    only on the resident sources (norms, dot products) across merges; ``models[i]`` names entry i
    for such keys.
    """

    name: str
    out: Tensor
    base: Tensor
    deltas: list[Optional[Tensor]]
    shared: dict
    per_model: list[dict]
    scratch: Scratch
    generator: Callable[[int], torch.Generator]
    seed: Callable[[int], int] = lambda i: i  # entry i's integer seed on this tensor (counter-based draws)
    models: list[str] = field(default_factory=list)
    has_base: bool = True
    cache: dict = field(default_factory=dict)
    resident: bool = False  # the sources stay for many merges: per-source statistics pay off
    fused: Optional[Callable] = None  # evo.merge.fused.FusedKernels of a resident merger
    # set when base/deltas arrive 16-bit to a method that ``widens_lazily``: replaces them with
    # float32 copies (in scratch) before a path that needs float32 inputs
    widen: Optional[Callable[[], None]] = None

    def float32_inputs(self) -> None:
        if self.widen is not None:
            self.widen()
            self.widen = None

    def cached(self, key: tuple, fn: Callable[[], object]):
        full = (self.name, *key)
        if full not in self.cache:
            self.cache[full] = fn()
        return self.cache[full]


class MergeMethod(Protocol):
    name: str
    params: tuple[ParamSpec, ...]
    needs_base: bool          # base_model must be set
    base_entries_merge: bool  # entries naming the base take part (linear) instead of being dropped
    min_models: int           # participating entries (after dropping the base when not merged)
    max_models: Optional[int]
    random: bool

    def merge(self, job: TensorJob) -> None: ...
