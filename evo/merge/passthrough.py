"""``passthrough`` (mergekit 0.1.5): one input per tensor, copied, times its ``scale`` when set.

On its own it copies (or scales) a model; with ``slices:`` it is how mergekit stacks layer
ranges of several models into a deeper or shallower one.
"""

from __future__ import annotations

import torch

from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


class Passthrough:
    name = "passthrough"
    params = (ParamSpec("scale", float, True, None),)
    needs_base = False
    forbids_base = True  # mergekit's contract: one input in all, so no base beside the model
    base_entries_merge = False
    min_models = 1
    max_models = 1
    random = False

    def merge(self, job: TensorJob) -> None:
        torch.add(job.base, job.deltas[0], out=job.out)
        scale = job.per_model[0]["scale"]
        if scale is not None:
            job.out.mul_(scale)
