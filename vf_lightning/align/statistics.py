"""Paired activation statistics of two models at every group's sites, from one streamed pass.

Built on :class:`vf_lightning.stats.Moments` (per batch centred in the activations' dtype, combined in
float64, exact DDP reduction). Features are read inside forward hooks (centred into a fresh ``M × C`` copy at
once, so later in-place ops cannot corrupt them); modules called several times per forward (torchvision's
bottleneck ``relu``) are told apart by call index. Two models that trace alike run in lockstep
(:meth:`~vf_lightning.align.graph.ModelGraph.lockstep`): each site's A activation meets B's while both are fresh,
instead of being kept through the rest of A's forward (ResNet-20 at batch 128 on 2 cores: the pass 1.43-1.49× the
plain forwards → 1.27-1.28×).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from vf_lightning.align.graph import ModelGraph
from vf_lightning.align.spec import PermutationSpec, Site, UnsupportedOpError
from vf_lightning.stats import (
    BatchMoments,
    CentredBatch,
    Moments,
    Scratch,
    centre,
    chan_all_reduce,
    chan_pool,
    channel_layout,
    channel_matrix,
    channel_rows,
    compute_dtype,
    eval_mode,
    gram,
    is_distributed,
    iter_inputs,
    model_device,
    pool_due,
    pool_partials,
)

SiteKey = tuple[str, int, str]  # (module, call index, port)


@dataclass
class CrossMoments:
    """Moments of two feature sets plus their cross co-moment ``Σ (f_a − μ_a)(f_b − μ_b)ᵀ`` (the A×B block)."""

    dim_a: int
    dim_b: int
    device: torch.device | str = "cpu"
    a: Moments = field(init=False)
    b: Moments = field(init=False)
    comoment: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.a = Moments(self.dim_a, device=self.device)
        self.b = Moments(self.dim_b, device=self.device)
        self.comoment = torch.zeros(self.dim_a, self.dim_b, dtype=torch.float64, device=self.device)

    def combine(self, n: int, mean_a: torch.Tensor, m2_a: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor,
                cross: torch.Tensor) -> None:
        """Chan et al.'s update with a batch of ``n`` paired observations: means, ``M2`` and cross co-moment."""
        if n == 0:
            return
        count = self.a.count
        w = count * n / (count + n)
        da = mean_a.to(self.comoment) - self.a.mu
        db = mean_b.to(self.comoment) - self.b.mu
        self.comoment += cross.to(self.comoment) + torch.outer(da, db) * w
        self.a.combine(n, mean_a, m2_a)
        self.b.combine(n, mean_b, m2_b)

    def add_centred(self, ba: CentredBatch, bb: CentredBatch) -> None:
        """Add paired centred batches: one matmul in their dtype, combined in float64."""
        if ba.n != bb.n:
            raise ValueError(f"paired batches need the same positions, got {ba.n} and {bb.n}")
        self.combine(ba.n, ba.mean(), ba.m2(), bb.mean(), bb.m2(), ba.comoment(bb))

    def update(self, fa: torch.Tensor, fb: torch.Tensor) -> None:
        """Add paired ``C × M`` observations of A and B (centred and multiplied in their dtype)."""
        ba, bb = centre(fa.t(), self.a.shift), centre(fb.t(), self.b.shift)
        if self.a.shift is None:
            self.a.shift, self.b.shift = ba.shift, bb.shift
        self.add_centred(ba, bb)

    def all_reduce(self) -> CrossMoments:
        """Combine over DDP ranks exactly (no-op without a process group)."""
        if is_distributed():
            a, b = self.a, self.b
            n, (mu_a, mu_b), (m2_a, m2_b, com) = chan_all_reduce(
                a.count, [a.mu, b.mu], [(a.m2, 0, None), (b.m2, 1, None), (self.comoment, 0, 1)])
            a.count, a.mu, a.m2 = n, mu_a, m2_a
            b.count, b.mu, b.m2 = n.clone(), mu_b, m2_b
            self.comoment = com
        return self

    def cov(self) -> torch.Tensor:
        """Cross-covariance ``E[(f_a − μ_a)(f_b − μ_b)ᵀ]``."""
        return self.comoment / self.a.count.clamp_min(1)

    def corr(self, eps: float = 1e-7) -> torch.Tensor:
        """Pearson cross-correlation, ``σ_a σ_bᵀ`` clamped at ``eps``."""
        return self.cov() / torch.outer(self.a.std, self.b.std).clamp_min(eps)


GroupStats = dict[str, CrossMoments | Moments]


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`vf_lightning.stats.channel_matrix` in ``dtype`` (a copy, safe from later in-place ops)."""
    if dtype == torch.float64:
        return channel_matrix(t)
    if t.dim() == 4:
        return t.transpose(0, 1).reshape(t.shape[1], -1).to(dtype, copy=True)
    return channel_matrix(t).to(dtype)


@contextmanager
def _hook_sites(model: nn.Module, sites: Sequence[SiteKey], take: Callable[[SiteKey, torch.Tensor], None],
                root: nn.Module | None = None) -> Iterator[None]:
    """Call ``take(site, tensor)`` on every ``(module, call, port)`` site during each forward of ``model`` (or of
    ``root``, a module that runs ``model``'s leaf modules: calls are counted from the start of its forward)."""
    modules = dict(model.named_modules())
    wanted: dict[tuple[str, str], set[int]] = {}
    for name, call, port in sites:
        if name not in modules:
            raise KeyError(f"site module {name!r} not found in {type(model).__name__}")
        wanted.setdefault((name, port), set()).add(call)
    counts: dict[tuple[str, str], int] = {}
    handles = [(root or model).register_forward_pre_hook(lambda _m, _i: counts.clear())]

    def seen(name: str, port: str, t: torch.Tensor) -> None:
        call = counts.get((name, port), 0)
        counts[(name, port)] = call + 1
        if call in wanted[(name, port)]:
            take((name, call, port), t.detach())

    for (name, port) in wanted:
        m = modules[name]
        if port == "out":
            handles.append(m.register_forward_hook(lambda _m, _i, out, n=name: seen(n, "out", out)))
        else:
            handles.append(m.register_forward_pre_hook(lambda _m, inp, n=name: seen(n, "in", inp[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_sites(model: nn.Module, sites: Sequence[SiteKey],
                 dtype: torch.dtype = torch.float64) -> Iterator[dict[SiteKey, torch.Tensor]]:
    """Capture ``C × M`` features (a ``dtype`` copy) at ``(module, call, port)`` sites during each forward."""
    store: dict[SiteKey, torch.Tensor] = {}
    with _hook_sites(model, sites, lambda k, t: store.__setitem__(k, _rows(t, dtype))):
        yield store


@dataclass(frozen=True)
class _PairBatch:
    """One site's batch of A and B: each side's :class:`BatchMoments` and the co-moment block(s) as multiplied —
    about each side's batch mean, except a block whose sides both took the fused path: uncentred (``Σ a bᵀ``)."""

    a: BatchMoments
    b: BatchMoments
    com: torch.Tensor  # 2C × 2C (full), or the C × C cross block


class _SiteTotal:
    """One site's batches, pooled exactly into its groups' statistics every
    :data:`~vf_lightning.stats.POOL_PENDING` partials (or :data:`~vf_lightning.stats.POOL_BATCHES` batches) and at
    the end of the pass, instead of batch by batch: per batch only the co-moment is added up (one op) and the
    batches' :class:`Partials` kept, so the float64 work costs a few ops per site and flush, not per batch.

    With per-batch means ``ā``, ``b̄`` and counts ``n``: the uncentred blocks lose ``Σ n ā b̄ᵀ``, then Chan et al. over
    the batches adds ``Σ n (ā − μ_a)(b̄ − μ_b)ᵀ`` about the pooled means (:func:`vf_lightning.stats.chan_pool`).
    """

    def __init__(self, targets: Sequence[CrossMoments | Moments], full: bool) -> None:
        self.targets, self.full = targets, full
        self.batches: list[tuple[BatchMoments, BatchMoments]] = []  # kept until the next flush
        self.pending = 0
        self.com: torch.Tensor | None = None

    def add(self, b: _PairBatch) -> None:
        if b.a.n == 0:
            return
        self.batches.append((b.a, b.b))
        self.com = b.com.clone() if self.com is None else self.com.add_(b.com)
        self.pending += b.a.size
        if pool_due(len(self.batches), self.pending):
            self.flush()

    def flush(self) -> None:
        """Pool the kept batches into every target (float64, exact) and start afresh."""
        if self.com is None:
            return
        batches, com = self.batches, self.com
        self.batches, self.com, self.pending = [], None, 0
        nb = len(batches)  # both sides' batches pooled by one call (same channels; mostly one layout)
        means, m2s = pool_partials([a.parts for a, _ in batches] + [b.parts for _, b in batches])
        mean_a, mean_b, m2_a, m2_b = means[:nb], means[nb:], m2s[:nb], m2s[nb:]
        n = torch.tensor([a.n for a, _ in batches], dtype=torch.float64, device=mean_a.device)
        fused = torch.tensor([[a.fused, b.fused] for a, b in batches], device=mean_a.device)
        raw_a, raw_b = mean_a * fused[:, :1], mean_b * fused[:, 1:]  # zero where that side was centred
        if self.full:  # the 2C × 2C co-moment of [A; B]
            raw = torch.cat([raw_a, raw_b], 1)
            total, (mean,), (m2, co) = chan_pool(n, [torch.cat([mean_a, mean_b], 1)], [
                (torch.cat([m2_a, m2_b], 1).sum(0), 0, None), (com - (n[:, None] * raw).t() @ raw, 0, 0)])
            for st in self.targets:
                assert isinstance(st, Moments)
                st.combine(int(total), mean, m2, co)
            return
        total, (ma, mb), (m2a, m2b, co) = chan_pool(n, [mean_a, mean_b], [
            (m2_a.sum(0), 0, None), (m2_b.sum(0), 1, None), (com - (n[:, None] * raw_a).t() @ raw_b, 0, 1)])
        for st in self.targets:
            assert isinstance(st, CrossMoments)
            st.combine(int(total), ma, m2a, mb, m2b, co)


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter of ``t`` (``None`` for inference-mode tensors, which keep none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


@dataclass
class _Held:
    """A's side of one site's batch, waiting for B: its moments, its ``M × C`` rows, and, when the rows view the
    live activation rather than a copy, that activation and its version at the hook."""

    moments: BatchMoments
    rows: torch.Tensor
    live: torch.Tensor | None
    version: int | None
    own: torch.Tensor | None = None  # full mode: A's own co-moment ``Σ (a − ā)(a − ā)ᵀ``, taken at its hook


class _PairRecorder:
    """Reduces each site's batch of A (side 0) and B (side 1) as it is produced.

    Cross mode (activation matching): each side's moments come from :meth:`Moments.reduce` at its hook (fused,
    without a copy, when well conditioned); A's activation is kept as it is until B's hook multiplies it with B's
    (a copy only where the model modifies it in place afterwards: :meth:`modified`). Two well-conditioned sides
    are multiplied uncentred (``Σ a bᵀ − n ā b̄ᵀ``), others centred. Full mode (ZipIt / CCA) adds each side's
    own co-moment, taken the same way at its hook while its activation is fresh: the ``2C × 2C`` co-moment is
    three ``C × C`` products (A×A, B×B, A×B) instead of one product of a centred ``[A | B | 1]`` copy (4× the
    multiply-adds, and two writes).
    """

    def __init__(self, dtype: torch.dtype | None, full: bool) -> None:
        self.dtype, self.full = dtype, full
        self.paths: dict[tuple[int, SiteKey], Moments] = {}  # per side and site: the reduction path and its shift
        self.held: dict[SiteKey, _Held] = {}
        self.done: dict[SiteKey, _PairBatch] = {}
        self.copied: set[SiteKey] = set()  # sites whose A activation is modified in place after its hook
        self.stale: set[SiteKey] = set()  # sites of this batch whose A activation was modified before B's hook
        self.scratch = Scratch()

    def _path(self, side: int, k: SiteKey, t: torch.Tensor, c: int) -> Moments:
        path = self.paths.get((side, k))
        if path is None:
            path = self.paths[(side, k)] = Moments(c, device=t.device)
        return path

    def take(self, side: int, k: SiteKey, t: torch.Tensor) -> None:
        dt = self.dtype or compute_dtype(t.dtype)
        cd, _ = channel_layout(t)
        c = t.shape[cd]
        xt = t if t.dtype == dt else t.to(dt)  # a conversion is a copy: nothing can modify it later
        mom = self._path(side, k, xt, c).reduce(xt, dt, self.scratch)
        rows = channel_rows(xt)
        if side == 0:
            live = xt if xt is t and rows.data_ptr() == t.data_ptr() else None
            version = _version(t) if live is not None else None
            if live is not None and (version is None or k in self.copied):
                rows, live = rows.clone(), None
            own = self._comoment(k, (0, mom, rows), None, dt) if self.full else None
            self.held[k] = _Held(mom, rows, live, version, own)
            return
        held = self.held.pop(k)
        if held.live is not None and _version(held.live) != held.version:
            self.stale.add(k)  # changed in place before B got here (lockstep forward): this batch runs again
        if held.moments.n != mom.n:
            raise ValueError(f"site {k} has {held.moments.n} positions in A but {mom.n} in B")
        cross = self._comoment(k, (0, held.moments, held.rows), (1, mom, rows), dt)
        if held.own is not None:  # full mode
            c = cross.shape[0]
            com = cross.new_empty(2 * c, 2 * c)
            com[:c, :c], com[:c, c:], com[c:, :c] = held.own, cross, cross.t()
            com[c:, c:] = self._comoment(k, (1, mom, rows), None, dt)
            cross = com
        self.done[k] = _PairBatch(held.moments, mom, cross)

    def _comoment(self, k: SiteKey, x: tuple[int, BatchMoments, torch.Tensor],
                  y: tuple[int, BatchMoments, torch.Tensor] | None, dt: torch.dtype) -> torch.Tensor:
        """``Σ (x − x̄)(y − ȳ)ᵀ`` of one batch of ``(side, moments, rows)`` pairs (``y=None``: ``x`` with itself),
        float64, centred on each side's shift — or ``Σ x yᵀ`` when both took the fused path (well conditioned): the
        ``n x̄ ȳᵀ`` is taken off when the site's batches are pooled (:class:`_SiteTotal`)."""
        (sx, mx, rx), (sy, my, ry) = x, y or x
        if mx.fused and my.fused:
            return gram(rx, ry)
        shift_x, shift_y = self.paths[(sx, k)].shift, self.paths[(sy, k)].shift
        cx = centre(rx, mx.mean if shift_x is None else shift_x, dt, self.scratch)
        if y is None:
            return cx.comoment(cx)
        return cx.comoment(centre(ry, my.mean if shift_y is None else shift_y, dt))

    def modified(self) -> list[SiteKey]:
        """Sites whose kept A activation was modified in place after its hook (the model's forward changed it),
        before or after B's hook used it: from now on they are copied at the hook, and the batch's forward of A
        (lockstep: of both) must run again."""
        bad = [k for k, h in self.held.items() if h.live is not None and _version(h.live) != h.version]
        bad += self.stale
        self.stale = set()
        self.copied.update(bad)
        return bad

    def batch(self, k: SiteKey) -> _PairBatch:
        """The reduced batch of site ``k`` after both forwards."""
        return self.done.pop(k)


def _key(s: Site) -> SiteKey:
    return (s.module, s.call, s.port)


SliceKey = tuple[str, int, str, int, int]  # a site and the channel span [offset, offset + length) of its features


def _slice_key(s: Site) -> SliceKey:
    return (s.module, s.call, s.port, s.offset, s.length)


def _channels(t: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Channels ``[offset, offset + length)`` of an activation (all of them when ``length`` is 0)."""
    if not length:
        return t
    return t.narrow(channel_layout(t)[0], offset, length)


def _lockstep(model_a: nn.Module, model_b: nn.Module, keys: Sequence[SiteKey]) -> nn.Module | None:
    """Both models' traces run node by node (:meth:`ModelGraph.lockstep`) when both trace alike and every site is
    a leaf module call of the traces: each site's A activation meets B's while fresh, and is not kept through the
    rest of A's forward. ``None`` (two plain forwards) otherwise."""
    if model_a is model_b:
        return None
    try:
        ga, gb = ModelGraph.of(model_a), ModelGraph.of(model_b)
    except UnsupportedOpError:
        return None
    if any(len(g.calls(name)) <= call for g in (ga, gb) for name, call, _ in keys):
        return None
    return ga.lockstep(gb)


_PRECISIONS = {None: None, "native": None, "float32": torch.float32, "float64": torch.float64}


@torch.no_grad()
def activation_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    loader: Iterable[object],
    full: bool = False,
    max_samples: int | None = None,
    precision: str | None = None,
) -> GroupStats:
    """One pass over ``loader`` (both models in eval mode): per group, statistics pooled over its activation sites.

    ``full=False`` keeps the A×B cross block (:class:`CrossMoments`, enough for activation matching);
    ``full=True`` keeps the ``2C × 2C`` moments of ``[f_A; f_B]`` (ZipIt, CCA). All-reduced under DDP.
    Each batch is centred and multiplied on the activations' device in ``precision`` (default ``None``: the
    activations' own dtype; ``"float32"`` / ``"float64"`` force one) and combined across batches in float64.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be None, 'native', 'float64' or 'float32', got {precision!r}")
    dtype = _PRECISIONS[precision]
    site_groups: dict[SliceKey, list[str]] = {}
    for g in spec.groups:
        sites = g.activation_sites
        if not sites:
            raise ValueError(f"group {g.name!r} has no site whose output can be recorded; activation matching "
                             "needs a module output (e.g. an nn.ReLU) in each group")
        for s in sites:
            site_groups.setdefault(_slice_key(s), []).append(g.name)
    slices: dict[SiteKey, list[SliceKey]] = {}
    for sk in site_groups:
        slices.setdefault(sk[:3], []).append(sk)  # type: ignore[arg-type]
    device = model_device(model_a)
    stats: GroupStats = {
        g.name: Moments(2 * g.size, outer=True, device=device) if full else CrossMoments(g.size, g.size, device)
        for g in spec.groups
    }
    totals = {k: _SiteTotal([stats[name] for name in names], full) for k, names in site_groups.items()}
    with eval_mode(model_a, model_b):
        rec = _PairRecorder(dtype, full)

        def take(side: int, k: SiteKey, t: torch.Tensor) -> None:
            for sk in slices[k]:
                rec.take(side, sk, _channels(t, sk[3], sk[4]))  # type: ignore[arg-type]

        keys = list(slices)
        pair = _lockstep(model_a, model_b, keys)
        with _hook_sites(model_a, keys, partial(take, 0), pair), _hook_sites(model_b, keys, partial(take, 1), pair):
            for x in iter_inputs(loader, device, max_samples):
                if pair is not None:
                    pair(x)
                    if rec.modified():  # an activation of A was changed in place before B's hook: again, copying it
                        pair(x)
                else:
                    model_a(x)
                    if rec.modified():  # an activation of A was changed in place after its hook: A again, copying it
                        model_a(x)
                    model_b(x)
                    rec.modified()  # B changed a kept A activation (a shared tensor): copied from the next batch on
                for k in site_groups:
                    totals[k].add(rec.batch(k))  # type: ignore[arg-type]
    for total in totals.values():
        total.flush()
    for st in stats.values():
        st.all_reduce()
    return stats


def cross_correlation(st: CrossMoments | Moments) -> torch.Tensor:
    """The ``C × C`` A-vs-B correlation from either kind of group statistics (NaN → 0)."""
    if isinstance(st, CrossMoments):
        c = st.corr()
    else:
        n = st.dim // 2
        c = st.corr()[:n, n:]
    return torch.nan_to_num(c, nan=0.0)
