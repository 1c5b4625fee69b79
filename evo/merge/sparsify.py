"""Sparsifiers for task vectors, as small pure tensor functions in the style of
``peft.utils.merge_utils``.

peft's ``magnitude_based_pruning``/``random_pruning`` are not used directly because they differ
from mergekit, whose tensors users expect: peft rescales DARE by 1/p where mergekit matches the L1
norm, peft ranks with ``topk`` (allocates, ~1.4x slower than a selection here), and every peft
helper allocates its result, while the engine writes into reused buffers (first touch of fresh
memory runs at <1 GB/s on the target VMs). Each function therefore takes ``out`` and scratch
buffers of the delta's shape and never writes into ``delta``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_EXACT_BELOW = 1 << 17   # below this many elements a plain kthvalue is already fast


def _below(x: float, dtype: torch.dtype) -> float:
    """Largest value of ``dtype`` strictly below x, so hardshrink(·, it) keeps |v| >= x."""
    t = torch.tensor(x, dtype=dtype)
    return torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)).item()


def kth_largest(values: Tensor, k: int, flags: Tensor) -> float:
    """Exact k-th largest entry of a flat tensor (1 <= k <= numel).

    A full sort is the slow path and ``kthvalue`` over 25M entries costs ~0.4 s on these CPUs, so
    large tensors get a sampled bracket around the answer, one counting pass, and an exact
    ``kthvalue`` over the few entries inside the bracket; a wrong bracket (vanishingly rare) falls
    back to the full ``kthvalue``. ``flags`` is a reused bool buffer of the same length.
    """
    n = values.numel()
    if n <= _EXACT_BELOW:
        return values.kthvalue(n - k + 1).values.item()
    # The sample only places the bracket; the answer is exact whatever it draws.
    m = min(1 << 16, max(1 << 12, n // 32))
    gen = torch.Generator(device=values.device).manual_seed(n)
    idx = torch.randint(0, n, (m,), generator=gen, device=values.device)
    sample = values[idx]
    q = 1.0 - k / n
    pos = q * (m - 1)
    margin = int(6 * math.sqrt(m * max(q * (1 - q), 1e-6))) + 64
    lo_i, hi_i = int(pos) - margin, int(pos) + margin
    # two selections on the sample: a 64k-entry CPU sort costs ~30 ms here, kthvalue ~1 ms
    lo = sample.kthvalue(lo_i + 1).values.item() if lo_i > 0 else -math.inf
    hi = sample.kthvalue(hi_i + 1).values.item() if hi_i < m - 1 else math.inf
    above, inside = flags[:n], flags[n : 2 * n]
    torch.gt(values, hi, out=above)
    n_above = int(torch.count_nonzero(above))
    if n_above < k:
        torch.ge(values, lo, out=inside)
        torch.logical_xor(inside, above, out=inside)  # lo <= v <= hi
        n_inside = int(torch.count_nonzero(inside))
        if n_above + n_inside >= k:
            band = values[inside]
            j = k - n_above  # j-th largest inside the band
            return band.kthvalue(band.numel() - j + 1).values.item()
    return values.kthvalue(n - k + 1).values.item()


class MagnitudeTable:
    """Exact k-th largest |δ| of one *fixed* tensor without a selection pass per merge.

    An evaluator merges thousands of candidates over the same task vectors, and choosing the
    magnitude threshold (a selection over every entry) cost several times the merge itself. One
    sort at first use keeps ``q + 1`` knots: the value at ranks ``max(1, int(j/q · n))`` (the
    ``k`` mergekit's magnitude pruning uses for density ``j/q``) and how many entries are
    strictly larger. A density on that grid is then a lookup; any other rank needs one pass to
    pull out the ~n/q entries between two knots and a small ``kthvalue``. Memory: 16 bytes per
    knot; the sort's temporaries are freed at once. Off-grid ranks, once answered, are
    remembered (at most ``MEMO``), so a repeated cut such as breadcrumbs' gamma costs one pass.
    """

    MEMO = 1 << 16  # off-grid ranks remembered (16 bytes each)

    def __init__(self, delta: Tensor, q: int = 4096):
        flat = delta.detach().reshape(-1).float().abs()  # a private float32 copy, 4 bytes per entry
        self.n = n = flat.numel()
        self.q = q
        if flat.device.type == "cpu":
            # numpy sorts in place: torch.sort would add a values copy and int64 indices (12 more
            # bytes per entry, 0.8 GB for a 1B model's embedding) at an evaluator's memory peak
            flat.numpy().sort()
            asc = flat
        else:
            asc = torch.sort(flat).values
        ranks = torch.tensor(sorted({max(1, int(j / q * n)) for j in range(0, q + 1)} | {n}), dtype=torch.int64)
        self.ranks = ranks                                   # k (1 = largest), ascending
        self.values = asc[n - ranks].clone()                 # k-th largest, descending
        above = n - torch.searchsorted(asc, self.values, right=True)  # entries strictly larger
        self.above = above.to(torch.int64)
        self._index = {int(r): i for i, r in enumerate(ranks.tolist())}
        self._memo: dict[int, float] = {}  # off-grid ranks already answered
        del asc

    def kth_largest(self, k: int, delta: Tensor) -> float:
        """The k-th largest |δ| (1 <= k <= n); ``delta`` is the tensor the table was built from."""
        i = self._index.get(k)
        if i is not None:
            return self.values[i].item()
        if k in self._memo:
            return self._memo[k]
        j = int(torch.searchsorted(self.ranks, torch.tensor(k)))  # ranks[j-1] < k < ranks[j]
        hi, lo = self.values[j - 1].item(), self.values[j].item()
        above = int(self.above[j - 1])                            # entries > hi
        flat = delta.reshape(-1)
        band = flat[(flat.abs() >= lo) & (flat.abs() <= hi)].abs()
        m = k - above                                             # m-th largest inside [lo, hi]
        value = band.kthvalue(band.numel() - m + 1).values.item()
        if len(self._memo) < self.MEMO:
            self._memo[k] = value  # e.g. breadcrumbs' fixed gamma cut: one band pass, then a lookup
        return value


def magnitude_prune(delta: Tensor, density: float, out: Tensor, absbuf: Tensor, flags: Tensor,
                    table: MagnitudeTable | None = None) -> Tensor:
    """Keep the k = max(1, int(density·numel)) largest-magnitude entries of ``delta`` (mergekit
    ``magnitude``); density <= 0 gives zeros, >= 1 a copy.

    Entries tied exactly at the threshold are all kept (mergekit's argsort keeps an arbitrary
    subset of them); with continuous weights this touches a handful of entries out of millions.
    """
    n = delta.numel()
    if density >= 1:
        return out.copy_(delta)
    if density <= 0 or n == 0:
        return out.zero_()
    return torch.hardshrink(delta, _below(magnitude_threshold(delta, density, absbuf, flags, table), delta.dtype), out=out)


def magnitude_threshold(delta: Tensor, density: float, absbuf: Tensor, flags: Tensor,
                        table: MagnitudeTable | None = None) -> float:
    """The smallest magnitude ``magnitude_prune`` keeps (0 < density < 1)."""
    k = max(1, int(density * delta.numel()))
    if table is not None:
        return table.kth_largest(k, delta)
    absbuf.copy_(delta).abs_()  # any stored dtype into the float32 buffer
    return kth_largest(absbuf.view(-1), k, flags.view(-1))


def outlier_bounds(delta: Tensor, density: float, gamma: float, absbuf: Tensor, flags: Tensor,
                   table: MagnitudeTable | None = None) -> tuple[float, float]:
    """The magnitude band ``lo <= |δ| <= hi`` Model Breadcrumbs keeps (0 < density < 1): above
    the int(gamma·n) largest magnitudes are cut, below the smallest, int(density·n) kept.
    ``lo`` is 0 when nothing small is dropped, ``hi`` inf when nothing large is."""
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    if table is not None:
        def kth(k):
            return table.kth_largest(k, delta)
    else:
        absbuf.copy_(delta).abs_()  # any stored dtype into the float32 buffer
        flat, fl = absbuf.view(-1), flags.view(-1)

        def kth(k):
            return kth_largest(flat, k, fl)
    lo = kth(n - n_bot) if n_bot > 0 else 0.0
    hi = kth(n - n_bot - target + 1) if n_bot + target < n else math.inf
    return lo, hi


def outlier_prune(delta: Tensor, density: float, gamma: float, out: Tensor, absbuf: Tensor,
                  flags: Tensor, table: MagnitudeTable | None = None) -> Tensor:
    """Model Breadcrumbs (mergekit ``magnitude_outliers``): drop the int(gamma·n) largest
    magnitudes, then the smallest, keeping int(density·n) entries."""
    if density >= 1:
        return out.copy_(delta)
    if int(density * delta.numel()) <= 0:
        return out.zero_()
    lo, hi = outlier_bounds(delta, density, gamma, absbuf, flags, table)
    torch.hardshrink(delta, _below(lo, delta.dtype) if lo > 0 else -1.0, out=out)
    if hi < math.inf:
        out.sub_(torch.hardshrink(delta, hi, out=absbuf))  # absbuf no longer needed
    return out


_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B
KEEP_BITS = 24          # keep probabilities are multiples of 2**-24
_CHUNK = 1 << 16        # eager hashing works on cache-sized slices


def _int32(v: int) -> int:
    """The signed int32 with the same 32 bits as ``v mod 2**32``."""
    v &= _M32
    return v - (1 << 32) if v >= 1 << 31 else v


def dare_key(seed: int) -> tuple[int, int]:
    """The counter hash's (multiplier, offset) for one (tensor, model) seed, as int32 values; the
    multiplier is odd, so ``i -> i * a + b (mod 2**32)`` is a permutation of the entry indices."""
    return (seed & 0x3FFFFFFF) | 1, _int32(seed >> 30)


def keep_hash(idx: Tensor, a, b) -> Tensor:
    """A 24-bit hash of each int32 entry index: two multiply-xorshift rounds mod 2**32.

    Counter-based instead of a generator's stream: entry i's draw depends only on (seed, i), so
    the compiled kernel (``evo.merge.fused``) computes the very mask this eager path does, inside
    its one pass, and every device draws the same. int32 arithmetic wraps mod 2**32 (the shifts
    are masked to act as logical shifts), which SIMD units do natively: Inductor vectorises it,
    where an int64 version compiled to scalar code 2.3x slower. ``a``/``b`` are ints or 0-dim
    int32 tensors (the compiled kernel takes tensors, so a new seed never recompiles).
    """
    x = idx * a + b
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MUL
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MUL
    x = x ^ ((x >> 16) & 0xFFFF)
    return (x >> (32 - KEEP_BITS)) & ((1 << KEEP_BITS) - 1)


def keep_cut(density: float) -> int:
    """Entry i is kept when ``keep_hash(i) < keep_cut(density)``."""
    return round(min(max(density, 0.0), 1.0) * (1 << KEEP_BITS))


def random_prune(delta: Tensor, density: float, out: Tensor, seed: int) -> Tensor:
    """DARE: keep each entry with probability ``density`` (no 1/p factor; see ``l1_rescale``),
    drawn by ``keep_hash`` from ``seed``: reproducible, independent of tensor order, and
    identical in the fused kernel. Hashes cache-sized slices so no index tensor is allocated."""
    n = delta.numel()
    if density >= 1:
        return out.copy_(delta)
    if density <= 0:
        return out.zero_()
    if n >= 1 << 31:
        raise ValueError(f"DARE's counter hash covers tensors up to 2**31 entries, got {n}")
    a, b = (torch.tensor(v, dtype=torch.int32) for v in dare_key(seed))
    cut = keep_cut(density)
    src, dst = delta.reshape(-1), out.view(-1)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        keep = keep_hash(torch.arange(start, stop, dtype=torch.int32, device=delta.device), a, b) < cut
        torch.mul(src[start:stop], keep, out=dst[start:stop])
    return out


def _della_rows(delta: Tensor) -> Tensor:
    """DELLA ranks within the last dimension (a vector is one row)."""
    return delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(-1, delta.shape[-1])


def della_cols(delta: Tensor) -> int:
    """The length of the rows DELLA ranks within."""
    return _della_rows(delta).shape[1]


def della_ranks(delta: Tensor) -> Tensor:
    """Each entry's magnitude rank within its row (0 = smallest), the part of DELLA that depends
    only on the task vector: a resident merger computes it once per source instead of sorting
    every row on every merge (the sort was ~80% of a DELLA merge). int32, the size of the task
    vector: Inductor's CPU loop read int16 ranks scalar-wise (2.3 s per 25M merge against 0.39 s)."""
    rows = _della_rows(delta)
    cols = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=delta.device)
    return ranks.scatter_(1, order, torch.arange(cols, dtype=torch.int32, device=delta.device).expand_as(ranks))


DELLA_BITS = 15  # DELLA's keep probabilities are resolved to 2**-15 (int32 products, see della_key)


def della_key(density: float, epsilon: float, cols: int) -> tuple[int, int, int]:
    """DELLA's keep rule in integers: entry i of rank r (within a row of ``cols``) is kept when
    ``(keep_hash(i) >> (KEEP_BITS - DELLA_BITS)) * m < c0m + r * e``, i.e. with probability
    density − ε + r · 2ε / (cols − 1) to 2⁻¹⁵. Returns (c0m, e, m). Integer arithmetic makes the
    mask exactly the same eagerly, in the fused kernel and on any device; for rows of up to
    2¹⁵ + 1 entries every product stays below 2³⁰ (int32)."""
    m = max(cols - 1, 1)
    c0 = round((density - epsilon) * (1 << DELLA_BITS))
    e = 0 if cols == 1 else round(2 * epsilon * (1 << DELLA_BITS))  # one column: no spread (mergekit: 0/0)
    return c0 * m, e, m


def della_fits_int32(cols: int) -> bool:
    return max(cols - 1, 1) <= 1 << DELLA_BITS


def della_keep(h: Tensor, ranks: Tensor, c0m, e, m, wide: bool = False) -> Tensor:
    """The keep mask from 24-bit hashes ``h`` and ranks (see :func:`della_key`); ``wide``
    computes in int64 (rows longer than 2¹⁵ + 1)."""
    dtype = torch.int64 if wide else torch.int32
    return (h >> (KEEP_BITS - DELLA_BITS)).to(dtype) * m < c0m + ranks.to(dtype) * e


def check_della(density: float, epsilon: float) -> None:
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"density {density} ± epsilon {epsilon} must stay inside (0, 1)")


def della_prune(delta: Tensor, density: float, epsilon: float, out: Tensor, seed: int,
                ranks: Tensor | None = None) -> Tensor:
    """DELLA MagPrune (mergekit ``della_magprune``): per row, keep probability rises linearly with
    magnitude rank from density−ε (smallest) to density+ε (largest), then a Bernoulli draw.

    The draw is DARE's counter hash (``keep_hash``) of (seed, entry index), compared with the
    entry's probability in integers (:func:`della_key`), so the fused kernel and every device
    draw the same mask. ``ranks``: :func:`della_ranks` of ``delta`` if known (a resident merger
    caches them), else sorted here. Raises ValueError when density ± ε leaves (0, 1); the
    engine turns it into an EvoError.
    """
    if density >= 1:
        return out.copy_(delta)
    if density <= 0:
        return out.zero_()
    check_della(density, epsilon)
    n = delta.numel()
    if n >= 1 << 31:
        raise ValueError(f"DELLA's counter hash covers tensors up to 2**31 entries, got {n}")
    cols = della_cols(delta)
    if ranks is None:
        ranks = della_ranks(delta)
    c0m, e, m = della_key(density, epsilon, cols)
    wide = not della_fits_int32(cols)
    a, b = (torch.tensor(v, dtype=torch.int32) for v in dare_key(seed))
    src, dst, rk = delta.reshape(-1), out.view(-1), ranks.reshape(-1)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        h = keep_hash(torch.arange(start, stop, dtype=torch.int32, device=delta.device), a, b)
        torch.mul(src[start:stop], della_keep(h, rk[start:stop], c0m, e, m, wide), out=dst[start:stop])
    return out


def l1_rescale(delta: Tensor, pruned: Tensor, eps: float = 1e-7, before: float | None = None) -> float:
    """Factor ‖delta‖₁ / ‖pruned‖₁ that restores the task vector's L1 norm after pruning
    (mergekit's ``rescale``); 1 when either norm is below ``eps``. ``before`` = ‖delta‖₁ if known."""
    if before is None:
        before = torch.linalg.vector_norm(delta, 1).item()
    after = torch.linalg.vector_norm(pruned, 1).item()
    if before < eps or after < eps:
        return 1.0
    return before / after
