"""The task-arithmetic family (mergekit's generalized task arithmetic): task_arithmetic, ties,
dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear.

    out = base + λ · Σᵢ mᵢ · wᵢ · δ'ᵢ / D

δ'ᵢ is δᵢ sparsified (and L1-rescaled when ``rescale``); mᵢ the sign-consensus mask; D the
normalizer. Differences from peft's ``ties``/``dare_*``: peft divides by the count of agreeing
models, mergekit (and this module) by Σ wᵢ mᵢ, and rescales by L1 norm rather than 1/p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evo.core.errors import EvoError
from evo.merge import sparsify
from evo.merge.fused import NO_LIMIT
from evo.merge.method import TensorJob
from evo.merge.params import ParamSpec


def majority_sign(weighted: list[Tensor], out: Tensor) -> Tensor:
    """±1 per entry: the sign of Σ wᵢδᵢ, ties counted as + (TIES "sum" election)."""
    torch.add(weighted[0], weighted[1], out=out) if len(weighted) > 1 else out.copy_(weighted[0])
    for w in weighted[2:]:
        out.add_(w)
    torch.ge(out, 0, out=out)
    return out.mul_(2).sub_(1)


def disjoint_merge(weighted: list[Tensor], weights: list[float], sign: Tensor, acc: Tensor,
                   divisor: Optional[Tensor], tmp: Tensor) -> Tensor:
    """Σᵢ mᵢ·(wᵢδᵢ) into ``acc`` and Σᵢ mᵢ·wᵢ into ``divisor`` (when given), mᵢ = [sign(wᵢδᵢ) = sign].

    mᵢ·x = sign·relu(sign·x): agreeing entries survive the relu, zeros and dissenters drop out
    of both sums, with no boolean masks materialised.
    """
    acc.zero_()
    if divisor is not None:
        divisor.zero_()
    for x, w in zip(weighted, weights):
        torch.mul(x, sign, out=tmp).clamp_(min=0)
        acc.add_(tmp)
        if divisor is not None:
            divisor.add_(torch.sign(tmp, out=tmp), alpha=w)
    return acc.mul_(sign)


@dataclass(frozen=True)
class TaskArithmetic:
    """One member of the family; docs/merge.md lists each with its mergekit semantics."""

    name: str
    consensus: Optional[str]       # "sum" or None
    sparsification: Optional[str]  # "magnitude" | "random" | "outliers" | "della" | None
    default_normalize: bool
    default_rescale: bool
    needs_base = True
    base_entries_merge = False
    min_models = 1
    max_models = None

    # 16-bit sources arrive as stored (evo.merge.engine): the fused kernels read them into float32
    # themselves, plain task arithmetic adds them into its float32 output (in-place type promotion
    # computes in float32); any other eager path first takes float32 copies (job.float32_inputs)
    widens_lazily = True

    @property
    def random(self) -> bool:
        return self.sparsification in ("random", "della")

    @property
    def inert(self) -> tuple[str, ...]:
        """Parameters this method accepts (as mergekit does) that cannot change its result:
        without sparsification nothing is pruned, so neither density nor rescale acts."""
        return ("density", "rescale") if self.sparsification is None else ()

    @property
    def params(self) -> tuple[ParamSpec, ...]:
        specs = [
            ParamSpec("int8_mask", bool, False, False),
            ParamSpec("normalize", bool, False, self.default_normalize),
            ParamSpec("rescale", bool, False, self.default_rescale),
            ParamSpec("lambda", float, False, 1.0),
            ParamSpec("weight", float, True),
            ParamSpec("density", float, True, 1.0),
        ]
        if self.sparsification == "outliers":
            specs.append(ParamSpec("gamma", float, True, 0.01))
        if self.sparsification == "della":
            specs.append(ParamSpec("epsilon", float, True, 0.15))
        return tuple(specs)

    def _sparse(self, job: TensorJob, i: int, out: Tensor) -> tuple[Tensor, float]:
        """δ'ᵢ (δᵢ itself when nothing is pruned, to save a copy) and its L1 rescale factor."""
        delta, p = job.deltas[i], job.per_model[i]
        density = p["density"]
        if self.sparsification is None or density >= 1:
            return delta, 1.0
        s, shape = job.scratch, delta.shape
        flags = s.get("flags", (2 * delta.numel(),), torch.bool, 2)
        table = self._table(job, i)
        if self.sparsification == "magnitude":
            sparsify.magnitude_prune(delta, density, out, s.get("abs", shape), flags, table)
        elif self.sparsification == "outliers":
            sparsify.outlier_prune(delta, density, p["gamma"], out, s.get("abs", shape), flags, table)
        elif self.sparsification == "random":
            try:
                sparsify.random_prune(delta, density, out, job.seed(i))
            except ValueError as err:
                raise EvoError(f"{self.name}: tensor {job.name}: {err}") from None
        else:
            try:
                sparsify.della_prune(delta, density, p["epsilon"], out, job.seed(i), self._della_ranks(job, i))
            except ValueError as err:
                raise EvoError(f"{self.name}: tensor {job.name}: {err}") from None
        factor = 1.0
        if job.shared["rescale"]:
            # ‖δ‖₁ depends only on the resident source: one pass saved per merge
            before = job.cached(("l1", job.models[i]), lambda: torch.linalg.vector_norm(delta, 1).item())
            factor = sparsify.l1_rescale(delta, out, before=before)
        return out, factor

    def _table(self, job: TensorJob, i: int):
        """The resident source's magnitude table (built once), for magnitude-based pruning."""
        if not job.resident or self.sparsification not in ("magnitude", "outliers") or job.deltas[i].numel() < 4096:
            return None
        return job.cached(("magnitude-table", job.models[i]), lambda: sparsify.MagnitudeTable(job.deltas[i]))

    def _della_ranks(self, job: TensorJob, i: int):
        """A resident source's per-row magnitude ranks: fixed, so sorted once (else None)."""
        if not job.resident:
            return None
        return job.cached(("della-ranks", job.models[i]), lambda: sparsify.della_ranks(job.deltas[i]))

    def _fused(self, job: TensorJob, weights: list[float], lam: float, normalize: bool) -> bool:
        """The whole merge in one compiled pass (resident mergers; see ``evo.merge.fused``).
        Magnitude and outlier pruning become a band per task vector, DARE and DELLA a
        counter-hash mask computed in the pass (DELLA's against each source's cached ranks;
        their L1 rescale one compiled reduction first); rescaled magnitude pruning still
        materialises the pruned vector first."""
        if job.fused is None or any(d is None for d in job.deltas):
            return False
        if not job.fused.usable(job.base, job.out, *job.deltas):
            return False
        xs, lows, highs, scales, keys = [], [], [], [], []
        s, shape = job.scratch, job.base.shape
        dare = {}  # entry -> its mask key: DARE (a, b, cut), DELLA (a, b, c0m, e, m, ranks)
        if self.sparsification == "random":
            dare = {i: (*sparsify.dare_key(job.seed(i)), sparsify.keep_cut(p["density"]))
                    for i, p in enumerate(job.per_model) if 0 < p["density"] < 1}
        elif self.sparsification == "della":
            cols = sparsify.della_cols(job.base)
            if not sparsify.della_fits_int32(cols):
                return False  # the eager path computes the same mask in int64
            for i, p in enumerate(job.per_model):
                if 0 < p["density"] < 1:
                    try:
                        sparsify.check_della(p["density"], p["epsilon"])
                    except ValueError as err:
                        raise EvoError(f"{self.name}: tensor {job.name}: {err}") from None
                    dare[i] = (*sparsify.dare_key(job.seed(i)), *sparsify.della_key(p["density"], p["epsilon"], cols),
                               self._della_ranks(job, i))
        banded = self.sparsification in ("magnitude", "outliers") and not job.shared["rescale"]
        if self.consensus is None and not dare and not banded:
            return False  # a plain weighted sum (e.g. della_linear): decided before any pruning
        factors = {}
        if dare and job.shared["rescale"]:
            kept = job.fused.kept_l1([job.deltas[i] for i in dare], list(dare.values()))
            if kept is None:
                return False
            for i, after in zip(dare, kept):
                before = job.cached(("l1", job.models[i]),
                                    lambda i=i: torch.linalg.vector_norm(job.deltas[i].float(), 1).item())
                factors[i] = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        for i, w in enumerate(weights):
            delta, density = job.deltas[i], job.per_model[i]["density"]
            band, key = None, None
            if self.sparsification is None or density >= 1:
                band = (0.0, math.inf)
            elif i in dare:
                key = dare[i]
                band = (0.0, math.inf)
                w = w * factors.get(i, 1.0)
            elif self.sparsification in ("magnitude", "outliers") and not job.shared["rescale"]:
                # nothing kept (magnitude pruning keeps max(1, int(d·n)) entries once d > 0)
                if density <= 0 or (self.sparsification == "outliers" and int(density * delta.numel()) <= 0):
                    band = (math.inf, math.inf)
                else:
                    flags = s.get("flags", (2 * delta.numel(),), torch.bool, 2)
                    if self.sparsification == "magnitude":
                        band = (sparsify.magnitude_threshold(delta, density, s.get("abs", shape), flags,
                                                             self._table(job, i)), math.inf)
                    else:
                        band = sparsify.outlier_bounds(delta, density, job.per_model[i]["gamma"],
                                                       s.get("abs", shape), flags, self._table(job, i))
            if band is not None:
                xs.append(delta)
                scales.append(w)
            else:
                x, factor = self._sparse(job, i, s.get(f"weighted{i}", shape))
                xs.append(x)
                band = (0.0, math.inf)
                scales.append(w * factor)
            lows.append(min(band[0], NO_LIMIT))
            highs.append(min(band[1], NO_LIMIT))
            keys.append(key)
        if self.consensus is not None:
            return job.fused(job.base, xs, lows, highs, scales, keys, weights, lam, normalize, job.out)
        if all(k is None for k in keys) and all(lo == 0.0 and hi == NO_LIMIT for lo, hi in zip(lows, highs)):
            return False  # a plain weighted sum: the eager adds already stream (no compile worth paying)
        total = sum(weights) if normalize else 1.0
        div = 1.0 if abs(total) < 1e-8 else total
        return job.fused.weighted_sum(job.base, xs, lows, highs, [lam * c / div for c in scales], keys, job.out)

    def merge(self, job: TensorJob) -> None:
        lam, normalize = job.shared["lambda"], job.shared["normalize"]
        weights = [p["weight"] for p in job.per_model]
        shape, s = job.base.shape, job.scratch
        if self._fused(job, weights, lam, normalize):
            return
        if self.sparsification is not None or self.consensus is not None:
            job.float32_inputs()
        if self.consensus is None:
            total = sum(weights) if normalize else 1.0
            div = 1.0 if abs(total) < 1e-8 else total
            job.out.copy_(job.base)
            for i, w in enumerate(weights):
                x, factor = self._sparse(job, i, s.get("sparse", shape)) if self.sparsification else (job.deltas[i], 1.0)
                if w != 0:
                    job.out.add_(x, alpha=lam * w * factor / div)
            return
        weighted = []
        for i, w in enumerate(weights):
            buf = s.get(f"weighted{i}", shape)
            x, factor = self._sparse(job, i, buf)
            torch.mul(x, w * factor, out=buf) if x is not buf else buf.mul_(w * factor)
            weighted.append(buf)
        sign = majority_sign(weighted, s.get("sign", shape))
        acc = s.get("acc", shape)
        divisor = s.get("divisor", shape) if normalize else None
        disjoint_merge(weighted, weights, sign, acc, divisor, s.get("tmp", shape))
        if divisor is None:
            torch.add(job.base, acc, alpha=lam, out=job.out)
        else:
            flags = s.get("flags", (2 * acc.numel(),), torch.bool, 2)[: acc.numel()].view(shape)
            divisor.masked_fill_(torch.eq(divisor, 0, out=flags), 1.0)
            torch.addcdiv(job.base, acc, divisor, value=lam, out=job.out)


FAMILY = (
    TaskArithmetic("task_arithmetic", None, None, False, False),
    TaskArithmetic("ties", "sum", "magnitude", True, False),
    TaskArithmetic("dare_ties", "sum", "random", False, True),
    TaskArithmetic("dare_linear", None, "random", False, True),
    TaskArithmetic("breadcrumbs", None, "outliers", False, False),
    TaskArithmetic("breadcrumbs_ties", "sum", "outliers", False, False),
    TaskArithmetic("della", "sum", "della", True, True),
    TaskArithmetic("della_linear", None, "della", False, True),
)
