"""Streaming per-channel statistics: exact per-batch moments, combined in float64 and reducible across DDP ranks.

The one statistics engine of the library: RESET/REPAIR goals, activation matching, ZipIt/CCA
covariances, TACT and the variance-ratio diagnostics all build on :class:`Moments` and
:func:`stream_moments` / :func:`accumulate_moments`.

Each batch is centred on the activation's device, in its own dtype (half types in float32), on a shift close
to the channel means (the first batch's mean, then kept fixed), so sums and products of the centred values are
exact to their rounding even when ``|mean| ≫ std``. Batches and DDP ranks are combined in float64 with the
parallel-variance update of Chan et al.: count, mean, ``M2 = Σ(x − mean)²`` and the co-moment matrix
``Σ(x − mean)(x − mean)ᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn


def channel_matrix(x: torch.Tensor) -> torch.Tensor:
    """View activations as ``C × M`` (channels × positions) in float64.

    ``N×C`` and ``N×C×H×W`` (channel axis 1) are supported; ``N×L×C`` sequence features use the last axis.
    """
    return channel_rows(x).t().to(torch.float64)


def channel_layout(x: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """``(channel axis, the other axes)`` of an ``N×C``, ``N×C×H×W`` or ``N×L×C`` activation."""
    if x.dim() == 2:
        return 1, (0,)
    if x.dim() == 4:
        return 1, (0, 2, 3)
    if x.dim() == 3:
        return 2, (0, 1)
    raise ValueError(f"cannot take channel statistics of a tensor with shape {tuple(x.shape)}")


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """Activations as ``M × C`` (positions × channels): a view for ``N×C``, ``N×L×C`` and channels-last maps."""
    cd, _ = channel_layout(x)
    return x.movedim(cd, -1).reshape(-1, x.shape[cd])


SHIFT_SAMPLES = 16  # the shift is the channel mean of the first batch's first SHIFT_SAMPLES inputs


def initial_shift(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel shift close to the channel means: the mean over the first :data:`SHIFT_SAMPLES` inputs.

    Any shift within a few standard deviations of the mean keeps the centred sums exact (the batch's own mean
    is recovered in float64); a subsample makes it cheap.
    """
    _, dims = channel_layout(x)
    head = x[:SHIFT_SAMPLES]
    return (head if head.is_floating_point() else head.to(dtype)).mean(dims, dtype=dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-batch moments are computed in: the activation's own (half types and integers: float32)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class CentredBatch:
    """One batch as centred ``M × C`` rows ``x − shift`` (computation dtype) with the shift and row sums."""

    rows: torch.Tensor
    shift: torch.Tensor  # C, float64
    total: torch.Tensor  # C, float64: Σ rows

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    def mean(self) -> torch.Tensor:
        """The batch mean, float64."""
        return self.shift + self.total / max(self.n, 1)

    def m2(self) -> torch.Tensor:
        """``Σ (x − batch mean)²`` per channel, float64."""
        sq = torch.linalg.vecdot(self.rows, self.rows, dim=0).to(torch.float64)
        return (sq - self.total * self.total / max(self.n, 1)).clamp_min(0)

    def comoment(self, other: CentredBatch) -> torch.Tensor:
        """``Σ (x − x̄)(y − ȳ)ᵀ`` of this batch against ``other`` (same positions): one matmul, float64 result."""
        prod = gram(self.rows, other.rows.to(self.rows.dtype))
        return prod - torch.outer(self.total, other.total) / max(self.n, 1)

    @staticmethod
    def cat(parts: Sequence[CentredBatch]) -> CentredBatch:
        """The channels of ``parts`` side by side (same positions)."""
        dt = parts[0].rows.dtype
        return CentredBatch(torch.cat([p.rows.to(dt) for p in parts], 1), torch.cat([p.shift for p in parts]),
                            torch.cat([p.total for p in parts]))


def column_sums(rows: torch.Tensor) -> torch.Tensor:
    """Column sums of a contiguous ``M × C`` matrix, float64 (cascade-summed in its dtype).

    Few channels make a slow column reduction; the rows are viewed ``k`` at a time as ``M/k × kC`` (``kC`` up to
    1024) and the ``k`` partial sums added in float64: 2-3× faster for 16-128 channels, as exact.
    """
    m, c = rows.shape
    k = 1
    while 2 * k * c <= 1024 and m % (2 * k) == 0:
        k *= 2
    if k == 1 or not rows.is_contiguous():
        return rows.sum(0).to(torch.float64)
    return rows.view(m // k, k * c).sum(0).view(k, c).to(torch.float64).sum(0)


GRAM_ROWS = 256  # rows per chunk of gram: each float32 accumulation runs over at most this many rows
GRAM_CHUNK_BUDGET = 1 << 22  # ... while the chunks' partial products hold at most this many numbers


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ b`` of two ``M × C`` row matrices, float64.

    Tall matrices are split into chunks of about :data:`GRAM_ROWS` rows (as many as the partial products' budget
    allows), multiplied as one batch in their dtype and summed in float64: each float32 accumulation is short and
    every core stays busy. Measured on ResNet-20 correlations against float64: ~1e-7 with 256-row chunks, 1e-6 with
    2,048, 3e-6 unchunked (costing ≈ 1.25× the 2,048-row time at 16 channels, the same at 32-512).
    """
    m, ca = a.shape
    cb = b.shape[1]
    k = min(m // GRAM_ROWS, max(GRAM_CHUNK_BUDGET // max(ca * cb, 1), 1))
    if k <= 1:
        return (a.t() @ b).to(torch.float64)
    r = m // k
    out = torch.bmm(a[:k * r].reshape(k, r, ca).transpose(1, 2), b[:k * r].reshape(k, r, cb))
    out = out.sum(0, dtype=torch.float64)
    if m > k * r:
        out += (a[k * r:].t() @ b[k * r:]).to(torch.float64)
    return out


class Scratch:
    """One reusable work buffer (grown on demand): centring into it avoids a fresh allocation per batch and site."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def get(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous uninitialised tensor of ``shape`` viewing the buffer."""
        n = 1
        for d in shape:
            n *= int(d)
        b = self.buf
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self.buf = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(tuple(shape))


def centre(x: torch.Tensor, shift: torch.Tensor | None = None, dtype: torch.dtype | None = None,
           scratch: Scratch | None = None) -> CentredBatch:
    """Centre an activation batch on ``shift`` (default: :func:`initial_shift`) as fresh ``M × C`` rows.

    The rows are a new tensor (``dtype``, default :func:`compute_dtype` of ``x``), so later in-place ops on
    ``x`` cannot alter them; ``scratch`` optionally supplies (and keeps) their buffer.
    """
    dt = dtype or compute_dtype(x.dtype)
    cd, _ = channel_layout(x)
    c = x.shape[cd]
    if shift is None:
        shift = initial_shift(x, dt)
    moved = x.movedim(cd, -1)
    rows = scratch.get(moved.shape, dt, x.device) if scratch else torch.empty(moved.shape, dtype=dt, device=x.device)
    torch.sub(moved, shift.to(dt), out=rows)
    rows = rows.view(-1, c)
    return CentredBatch(rows, shift.to(torch.float64), column_sums(rows))


def is_distributed() -> bool:
    """Whether an initialized process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_flat(parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum ``parts`` over all ranks in one flat all-reduce; the results in their shapes."""
    flat = torch.cat([p.reshape(-1) for p in parts])
    dist.all_reduce(flat)
    out, i = [], 0
    for p in parts:
        out.append(flat[i:i + p.numel()].view(p.shape))
        i += p.numel()
    return out


def chan_pool(count: torch.Tensor, means: Sequence[torch.Tensor],
              second: Sequence[tuple[torch.Tensor, int, int | None]],
              total: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None,
              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Chan et al.'s exact combination of ``K`` groups of float64 (count, means, second moments about the means).

    ``count`` is ``K``, each mean ``K × D``; ``second`` lists ``(M, i, j)``: ``M`` is the groups' ``Σ (x_i − mean_i)²``
    (``j=None``, per channel) or co-moment ``Σ (x_i − mean_i)(x_j − mean_j)ᵀ``, already summed over the ``K``
    groups. Returns the total count, the pooled means ``μ`` and ``M + Σ_k count_k (mean_ik − μ_i)(mean_jk − μ_j)ᵀ``.
    ``total`` sums a list of tensors over DDP ranks (:func:`chan_all_reduce`); by default the groups are all local.
    """
    add_up = total or list
    first = add_up([count.sum().reshape(1)] + [count @ m for m in means])
    n = first[0].reshape(())
    mus = [s / n.clamp_min(1) for s in first[1:]]
    d = [m - mu for m, mu in zip(means, mus)]
    nd = [count[:, None] * x for x in d]
    terms = [m + ((nd[i] * d[i]).sum(0) if j is None else nd[i].t() @ d[j]) for m, i, j in second]
    return n, mus, add_up(terms)


def chan_all_reduce(count: torch.Tensor, means: Sequence[torch.Tensor],
                    second: Sequence[tuple[torch.Tensor, int, int | None]]) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                                    list[torch.Tensor]]:
    """Exact DDP combination of float64 (count, means, second moments about the means) in two all-reduces: each
    rank is one group of :func:`chan_pool`. Round 1 sums ``count`` and ``count·mean``; round 2 sums
    ``M + count·(mean_i − μ_i)(mean_j − μ_j)`` about the global means ``μ``. Every rank gets identical results.
    """
    return chan_pool(count.reshape(1), [m[None] for m in means], second, _all_reduce_flat)


WELL_CONDITIONED = 4.0
"""A batch whose every channel has ``|mean| ≤ WELL_CONDITIONED · std`` takes :func:`fused_partials`: its variance is
two-pass about float32 partial means (exact to ~1e-7 relative whatever the mean), but the mean itself carries the
float32 rounding of ``|mean|`` (measured ≤ 4e-7·std at 4). Beyond it, values are centred on a fixed shift first."""

FUSED_ROWS = 256  # rows per partial of fused_partials: each float32 accumulation runs over at most this many rows
FUSED_MIN_ROWS = 32 * FUSED_ROWS
"""Smaller batches are centred: the float32 rounding of a partial mean (≈ 3e-6·std over 256 rows at |mean| = 3·std)
only averages out over many partials (4e-8·std over 1,024). Small batches are cheap to centre anyway."""


def _column_moments(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and population variance of an ``R × K`` matrix, float32, two-pass: on CPU the fused batch-norm
    statistics kernel (two vectorized reads, nothing written), elsewhere ``var_mean``."""
    if cols.device.type == "cpu":
        mean, var = torch.batch_norm_update_stats(cols, None, None, 1.0)
        return mean, var
    var, mean = torch.var_mean(cols, 0, correction=0)
    return mean, var


@dataclass(frozen=True)
class Partials:
    """Per-channel moments of ``G`` groups of ``count`` rows each: the groups' means and population variances
    (``G × C``, in the computation dtype), pooled exactly in float64 by :func:`pool_partials`."""

    count: int
    means: torch.Tensor
    variances: torch.Tensor


def pool_partials(batches: Sequence[Sequence[Partials]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch's mean and ``M2`` per channel (float64, ``B × C``) from its :class:`Partials`, pooled exactly:
    ``M2 = Σ count·var + Σ count·(mean_g − mean)²`` (Chan et al.). Batches laid out alike take one set of ops."""
    layouts: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for i, parts in enumerate(batches):
        layouts.setdefault(tuple((p.count, p.means.shape[0]) for p in parts), []).append(i)
    first = batches[0][0].means
    c, dev = first.shape[1], first.device
    mean = torch.empty(len(batches), c, dtype=torch.float64, device=dev)
    m2 = torch.empty_like(mean)
    def rows(ts: list[torch.Tensor]) -> torch.Tensor:  # a batch's partials as one G × C matrix
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    for layout, idx in layouts.items():
        means = torch.stack([rows([p.means for p in batches[i]]) for i in idx]).to(torch.float64)
        var = torch.stack([rows([p.variances for p in batches[i]]) for i in idx]).to(torch.float64)
        w = torch.tensor([k for k, g in layout for _ in range(g)], dtype=torch.float64, device=dev)
        mu = (w @ means) / w.sum()
        at = torch.tensor(idx, device=dev) if len(layouts) > 1 else slice(None)
        mean[at] = mu
        m2[at] = w @ var + w @ (means - mu[:, None]).square_()
    return mean, m2


def fused_partials(x: torch.Tensor) -> tuple[Partials, ...] | None:
    """The :class:`Partials` of an activation batch without a centred copy, or ``None`` when it cannot (a layout
    other than ``M × C`` rows or contiguous ``N×C×H×W``) or a channel is not well conditioned
    (:data:`WELL_CONDITIONED`, judged in float32 on the partials; a constant non-zero channel never is): the caller
    then centres it. Pooling them into float64 is left to the caller (:func:`pool_partials`, once for many batches).

    ``M × C`` rows are read as ``FUSED_ROWS × kC`` partials (every ``k``-th row in one column) whose float32 means
    and two-pass variances are exact: two reads of the activation, nothing written, against three reads and two
    writes when centring.
    """
    cd, _ = channel_layout(x)
    c = x.shape[cd]
    moved = x.movedim(cd, -1)
    if moved.is_contiguous():
        rows = moved.reshape(-1, c)
        m = rows.shape[0]
        k = max(m // FUSED_ROWS, 1)
        r = m // k
        mean, var = _column_moments(rows[:k * r].view(r, k * c))
        parts: tuple[Partials, ...] = (Partials(r, mean.view(k, c), var.view(k, c)),)
        if m > k * r:  # the last m − k·r (< k) rows
            mt, vt = _column_moments(rows[k * r:])
            parts += (Partials(m - k * r, mt[None], vt[None]),)
    elif x.dim() == 4 and x.is_contiguous() and x.device.type == "cpu":  # N×C×H×W: one partial per channel
        mean, var = torch.batch_norm_update_stats(x, None, None, 1.0)
        parts = (Partials(x.numel() // max(c, 1), mean[None], var[None]),)
    else:
        return None
    if len(parts) == 1:  # in float32 from the partials: |μ| > w·σ  ⟺  (1 + w²)·μ² > w²·E[var + mean²]
        w2 = WELL_CONDITIONED ** 2
        mu = parts[0].means.mean(0)
        second = torch.addcmul(parts[0].variances, parts[0].means, parts[0].means).mean(0)
        bad = bool(torch.addcmul(second * -w2, mu, mu, value=1 + w2).gt(0).any())
    else:
        mu64, m2 = pool_partials([parts])
        bad = bool((mu64 * mu64 * (x.numel() // c) > WELL_CONDITIONED ** 2 * m2).any())
    return None if bad else parts


POOL_PENDING = 1 << 18
"""Partial means a site keeps before pooling its batches (:class:`Moments`, the activation-matching pass;
:func:`pool_due`): about 32 batches of a 16-channel 32×32 map at batch 128, every batch of ImageNet-sized maps;
≤ 2 MB per site."""
POOL_BATCHES = 64  # ... and at most this many batches


def pool_due(batches: int, partials: int) -> bool:
    """Whether ``batches`` kept batches holding ``partials`` partial means are due to be pooled."""
    return partials >= POOL_PENDING or batches >= POOL_BATCHES


@dataclass(frozen=True)
class BatchMoments:
    """One batch reduced (:meth:`Moments.reduce`): its count, its :class:`Partials` and whether they came from the
    uncentred :func:`fused_partials` path; :attr:`mean` and :attr:`m2` pool them (float64) when first read."""

    n: int
    parts: tuple[Partials, ...]
    fused: bool

    @property
    def size(self) -> int:
        """How many partial means the batch keeps (see :func:`pool_due`)."""
        return sum(p.means.numel() for p in self.parts)

    @cached_property
    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        (p, *rest) = self.parts
        if not rest and p.means.shape[0] == 1 and p.means.dtype == torch.float64:
            return p.means[0], p.variances[0] * p.count
        mean, m2 = pool_partials([self.parts])
        return mean[0], m2[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.pooled[0]

    @property
    def m2(self) -> torch.Tensor:
        return self.pooled[1]


class _Pooled:
    """A running total of :class:`Moments` (count, mean, ``M2``) that includes every added batch: reading or
    replacing it first pools the batches still pending (kept in ``_<name>``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Moments | None, objtype: type | None = None) -> torch.Tensor:
        if obj is None:
            raise AttributeError(f"{self.slot[1:]} is a per-instance running total")
        obj._flush()
        return getattr(obj, self.slot)  # type: ignore[no-any-return]

    def __set__(self, obj: Moments, value: torch.Tensor) -> None:
        obj._flush()
        setattr(obj, self.slot, value)


@dataclass
class Moments:
    """Running count, mean, ``M2`` (and optionally the co-moment matrix) of ``C`` channels, in float64."""

    dim: int
    outer: bool = False
    device: torch.device | str = "cpu"
    comoment: torch.Tensor | None = field(init=False)
    shift: torch.Tensor | None = field(init=False, default=None, repr=False)
    fused: bool | None = field(init=False, default=None, repr=False)  # fused_partials path (None: undecided)
    _count: torch.Tensor = field(init=False, repr=False)
    _mu: torch.Tensor = field(init=False, repr=False)
    _m2: torch.Tensor = field(init=False, repr=False)
    _pending: list[BatchMoments] = field(init=False, default_factory=list, repr=False)  # added, not yet pooled
    _pending_size: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        dt, dev = torch.float64, self.device
        self._count = torch.zeros((), dtype=dt, device=dev)
        self._mu = torch.zeros(self.dim, dtype=dt, device=dev)
        self._m2 = torch.zeros(self.dim, dtype=dt, device=dev)
        self.comoment = torch.zeros(self.dim, self.dim, dtype=dt, device=dev) if self.outer else None

    count = _Pooled()  # observations so far
    mu = _Pooled()  # mean per channel
    m2 = _Pooled()  # Σ (x − mean)² per channel

    def _flush(self) -> None:
        """Pool the pending batches (float64, exact) into the running totals."""
        if not self._pending:
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        means, m2s = pool_partials([b.parts for b in pending])
        n = torch.tensor([b.n for b in pending], dtype=torch.float64, device=means.device)
        total, (mean,), (m2,) = chan_pool(n, [means], [(m2s.sum(0), 0, None)])
        self.combine(int(total), mean, m2)

    def combine(self, n: int, mean: torch.Tensor, m2: torch.Tensor, comoment: torch.Tensor | None = None) -> None:
        """Chan et al.'s parallel update with a batch of ``n`` observations (its mean, ``M2``, co-moment)."""
        if n == 0:
            return
        if mean.shape[0] != self.dim:
            raise ValueError(f"Moments of {self.dim} channels got a batch with {mean.shape[0]} channels")
        new = self.count + n
        delta = mean.to(self.mu) - self.mu
        w = self.count * n / new
        # out of place: a batch reduced under inference mode may be pooled outside it (pending batches)
        self.mu = self.mu + delta * (n / new)
        self.m2 = self.m2 + m2.to(self.m2) + delta * delta * w
        if self.comoment is not None:
            if comoment is None:
                raise ValueError("Moments with outer=True needs the batch co-moment")
            self.comoment = self.comoment + comoment.to(self.comoment) + torch.outer(delta, delta) * w
        self.count = new

    def add_centred(self, batch: CentredBatch) -> None:
        """Add a :class:`CentredBatch` (its co-moment by one matmul when ``outer``)."""
        if self.comoment is not None:
            com = batch.comoment(batch)
            self.combine(batch.n, batch.mean(), com.diagonal().clamp_min(0), com)
        else:
            self.combine(batch.n, batch.mean(), batch.m2())

    def add(self, x: torch.Tensor, dtype: torch.dtype | None = None, scratch: Scratch | None = None) -> None:
        """Add an activation batch (``N×C``, ``N×C×H×W`` or ``N×L×C``), reduced in its own dtype on its device
        (:meth:`reduce`; with ``outer``, centred and multiplied by one matmul).

        ``scratch`` optionally supplies the work buffer centred values are written to.
        """
        if self.comoment is not None:
            b = centre(x, self.shift, dtype)
            if self.shift is None:
                self.shift = b.shift
            self.add_centred(b)
            return
        r = self.reduce(x, dtype, scratch)
        if r.n:  # kept as it is; pooled with the other pending batches when needed (POOL_PENDING, POOL_BATCHES)
            self._pending.append(r)
            self._pending_size += r.size
            if pool_due(len(self._pending), self._pending_size):
                self._flush()

    def reduce(self, x: torch.Tensor, dtype: torch.dtype | None = None, scratch: Scratch | None = None) -> BatchMoments:
        """One activation batch's count, mean and ``M2`` per channel (float64), by this site's path; not combined.

        Batches of :data:`FUSED_MIN_ROWS` rows or more are reduced without a centred copy (:func:`fused_partials`,
        each batch checked); from a site's first batch that is not well conditioned on, its batches are centred on a
        fixed shift (the mean of the first centred batch's first inputs). Smaller batches are always centred.
        """
        dt = dtype or compute_dtype(x.dtype)
        cd, dims = channel_layout(x)
        if x.shape[cd] != self.dim:
            raise ValueError(f"Moments of {self.dim} channels got an activation with {x.shape[cd]} channels")
        n = x.numel() // max(x.shape[cd], 1)
        if n == 0:
            zero = torch.zeros(1, self.dim, dtype=torch.float64, device=x.device)
            return BatchMoments(0, (Partials(0, zero, zero),), False)
        xf = x if x.is_floating_point() else x.to(dt)  # half types are centred straight into the dt buffer
        if n >= FUSED_MIN_ROWS:
            xd = xf if xf.dtype == dt else xf.to(dt)
            if self.fused is not False:
                parts = fused_partials(xd)
                if parts is not None:
                    self.fused = True
                    return BatchMoments(n, parts, True)
                self.fused = False  # this batch (and every later one) is centred
        if self.shift is None:
            self.shift = initial_shift(xf, dt).to(torch.float64)
        shift = self.shift.to(device=x.device, dtype=dt)
        moved = xf.movedim(cd, -1)
        if moved.is_contiguous():  # N×C, N×L×C, channels-last maps: centre the M × C rows view
            rows = moved.reshape(-1, self.dim)
            c = torch.sub(rows, shift, out=scratch.get(rows.shape, dt, x.device)) if scratch else rows - shift
            total = column_sums(c)
            sq = column_sums(c.square_())
        else:
            view = [1] * x.dim()
            view[cd] = self.dim
            sv = shift.view(view)
            c = torch.sub(xf, sv, out=scratch.get(x.shape, dt, x.device)) if scratch else xf - sv
            total = c.sum(dims).to(torch.float64)
            sq = c.square_().sum(dims).to(torch.float64)
        mean = self.shift.to(total) + total / n
        var = (sq - total * total / n).clamp_min(0) / n
        return BatchMoments(n, (Partials(n, mean[None], var[None]),), False)

    def update(self, feats: torch.Tensor) -> None:
        """Add a ``C × M`` matrix of ``M`` observations (see :func:`channel_matrix`), computed in its dtype."""
        if feats.dim() != 2 or feats.shape[0] != self.dim:
            raise ValueError(f"Moments of {self.dim} channels got a feature matrix of shape {tuple(feats.shape)}")
        self.add(feats.t())

    def all_reduce(self) -> Moments:
        """Combine over all DDP ranks exactly (no-op outside an initialized process group)."""
        if is_distributed():
            second: list[tuple[torch.Tensor, int, int | None]] = [(self.m2, 0, None)]
            if self.comoment is not None:
                second.append((self.comoment, 0, 0))
            n, mus, sec = chan_all_reduce(self.count, [self.mu], second)
            self.count, self.mu, self.m2 = n, mus[0], sec[0]
            if self.comoment is not None:
                self.comoment = sec[1]
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.mu

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (exact, not a moving average)."""
        return self.m2 / self.count.clamp_min(1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def cov(self) -> torch.Tensor:
        """Full ``C × C`` population covariance (needs ``outer=True``)."""
        if self.comoment is None:
            raise RuntimeError("Moments was created without outer=True; no covariance was accumulated")
        return self.comoment / self.count.clamp_min(1)

    def corr(self, eps: float = 1e-7) -> torch.Tensor:
        """Pearson correlation matrix from :meth:`cov`, with ``σσᵀ`` clamped at ``eps``."""
        c = self.cov()
        s = c.diagonal().clamp_min(0).sqrt()
        return c / torch.outer(s, s).clamp_min(eps)


def batch_inputs(batch: object) -> torch.Tensor:
    """The input tensor of a loader batch: ``x`` of ``(x, y, ...)`` or the tensor itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping) and "x" in batch:
        return batch["x"]
    raise TypeError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


def iter_inputs(
    loader: Iterable[object], device: torch.device | str, max_samples: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield input batches moved to ``device``, stopping once ``max_samples`` inputs were yielded (truncating)."""
    seen = 0
    for batch in loader:
        x = batch_inputs(batch)
        if max_samples is not None:
            if seen >= max_samples:
                break
            x = x[: max_samples - seen]
        seen += x.shape[0]
        yield x.to(device, non_blocking=True)


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU for parameter-free modules."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode while active; afterwards every submodule gets back its own mode (restoring only the
    root's with ``model.train(was)`` would also set the children a caller had put in another mode)."""
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for saved in modes:
            for m, training in saved:
                m.training = training


@contextmanager
def accumulate_moments(model: nn.Module, names: Sequence[str], pre: bool = False) -> Iterator[dict[str, Moments]]:
    """While active, add the outputs (``pre=True``: first inputs) of the named submodules into per-site Moments.

    Activations are reduced inside the hook, the moment they are produced, so later in-place ops (e.g. a conv
    output overwritten by ``ReLU(inplace=True)``) cannot alter them. Call ``all_reduce`` on the results for DDP.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"module(s) {missing} not found in {type(model).__name__}")
    store: dict[str, Moments] = {}
    scratch = Scratch()  # hooks run one at a time: one work buffer serves every site

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], outp: torch.Tensor | None = None) -> None:
            t = inp[0] if pre else outp
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"site {name!r} produced a {type(t).__name__}, not a tensor")
            t = t.detach()
            if name not in store:
                store[name] = Moments(t.shape[channel_layout(t)[0]], device=t.device)
            store[name].add(t, scratch=scratch)

        return hook

    handles = [
        modules[n].register_forward_pre_hook(make_hook(n)) if pre else modules[n].register_forward_hook(make_hook(n))
        for n in names
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def stream_moments(
    models: Sequence[nn.Module],
    sites: Sequence[Sequence[str]],
    loader: Iterable[object],
    max_samples: int | None = None,
    pre: bool = False,
    forwards: Sequence[Callable[[torch.Tensor], object]] | None = None,
) -> list[dict[str, Moments]]:
    """Per-channel moments of every site of every model from one streamed pass (see :func:`accumulate_moments`).

    ``forwards[i]`` optionally replaces ``models[i]`` as the callable run on each batch (e.g. a truncated
    ``torch.fx`` graph sharing the model's submodules). One pass; reduced across DDP ranks.
    """
    if len(models) != len(sites):
        raise ValueError("stream_moments needs one list of sites per model")
    runners = list(forwards) if forwards is not None else list(models)
    if len(runners) != len(models):
        raise ValueError("stream_moments needs one forward callable per model")
    ctxs = [accumulate_moments(m, s, pre=pre) for m, s in zip(models, sites)]
    stores = [c.__enter__() for c in ctxs]
    try:
        device = model_device(models[0])
        for x in iter_inputs(loader, device, max_samples):
            for run in runners:
                run(x)
    finally:
        for c in ctxs:
            c.__exit__(None, None, None)
    for d in stores:
        for mom in d.values():
            mom.all_reduce()
    return [dict(d) for d in stores]
