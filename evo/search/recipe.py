"""A candidate as plain data: a mergekit-style merge, optional LoRA genes, an optional layer path
and the seed of every random choice. Hashable, cached by content, written as mergekit YAML;
never tensors. The search decodes genomes into recipes; scoring, selection and releases read them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from evo.core.errors import EvoError
from evo.merge.config import MergeConfig
from evo.search.dataflow import LayerPath, path_slices


@dataclass(frozen=True)
class Recipe:
    """What a candidate is: a mergekit-style merge plus an optional LoRA adaptation.

    ``seed`` drives every random choice in materialising it (DARE masks, LoRA init), so a recipe
    always produces the same model and can be cached by :meth:`key`.
    """

    merge: MergeConfig
    lora: dict | None = None
    seed: int = 0
    # the data-flow part (``evo.search.dataflow``): the layers a token passes through; None: the
    # merge's own layers in order
    path: LayerPath | None = None

    def to_dict(self) -> dict:
        out = {"merge": self.merge.to_dict(), "seed": int(self.seed)}
        if self.lora:
            out["lora"] = dict(self.lora)
        if self.path is not None:
            out["path"] = self.path.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "<recipe>") -> "Recipe":
        if "merge" not in data:
            raise EvoError(f"{source}: recipe has no 'merge' field")
        path = LayerPath.from_dict(data["path"], source) if data.get("path") is not None else None
        return cls(MergeConfig.from_dict(data["merge"], source=source), data.get("lora") or None,
                   int(data.get("seed", 0)), path)

    def mergekit(self) -> MergeConfig:
        """The config that builds this candidate: the merge, or the path as mergekit ``slices``."""
        return self.merge if self.path is None else path_slices(self.path, self.merge)

    def key(self) -> str:
        """Stable content hash: equal recipes give equal keys across processes and runs."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=_json_default)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
