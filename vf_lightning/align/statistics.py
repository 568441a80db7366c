"""Paired activation statistics of two models at every group's sites, from one streamed pass.

Built on :class:`vf_lightning.stats.Moments` (per batch centred in the activations' dtype, combined in
float64, exact DDP reduction). Features are read inside forward hooks (centred into a fresh ``M × C`` copy at
once, so later in-place ops cannot corrupt them); modules called several times per forward (torchvision's
bottleneck ``relu``) are told apart by call index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vf_lightning.align.spec import PermutationSpec, Site
from vf_lightning.stats import (
    CentredBatch,
    Moments,
    centre,
    chan_all_reduce,
    channel_matrix,
    is_distributed,
    iter_inputs,
    model_device,
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

    def add_centred(self, ba: CentredBatch, bb: CentredBatch) -> None:
        """Add paired centred batches: one matmul in their dtype, combined in float64 (Chan et al.)."""
        if ba.n != bb.n:
            raise ValueError(f"paired batches need the same positions, got {ba.n} and {bb.n}")
        if ba.n == 0:
            return
        count = self.a.count
        w = count * ba.n / (count + ba.n)
        da = ba.mean().to(self.comoment) - self.a.mu
        db = bb.mean().to(self.comoment) - self.b.mu
        self.comoment += ba.comoment(bb).to(self.comoment) + torch.outer(da, db) * w
        self.a.add_centred(ba)
        self.b.add_centred(bb)

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
def _hook_sites(model: nn.Module, sites: Sequence[SiteKey],
                take: Callable[[SiteKey, torch.Tensor], None]) -> Iterator[None]:
    """Call ``take(site, tensor)`` on every ``(module, call, port)`` site during each forward of ``model``."""
    modules = dict(model.named_modules())
    wanted: dict[tuple[str, str], set[int]] = {}
    for name, call, port in sites:
        if name not in modules:
            raise KeyError(f"site module {name!r} not found in {type(model).__name__}")
        wanted.setdefault((name, port), set()).add(call)
    counts: dict[tuple[str, str], int] = {}
    handles = [model.register_forward_pre_hook(lambda _m, _i: counts.clear())]

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


@contextmanager
def _record_centred(model: nn.Module, sites: Sequence[SiteKey],
                    dtype: torch.dtype | None) -> Iterator[dict[SiteKey, CentredBatch]]:
    """Capture each site's batch centred on a per-site shift fixed at its first batch's mean (a fresh copy)."""
    store: dict[SiteKey, CentredBatch] = {}
    shifts: dict[SiteKey, torch.Tensor] = {}

    def take(k: SiteKey, t: torch.Tensor) -> None:
        b = centre(t, shifts.get(k), dtype)
        shifts.setdefault(k, b.shift)
        store[k] = b

    with _hook_sites(model, sites, take):
        yield store


def _key(s: Site) -> SiteKey:
    return (s.module, s.call, s.port)


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
    site_groups: dict[SiteKey, list[str]] = {}
    for g in spec.groups:
        sites = g.activation_sites
        if not sites:
            raise ValueError(f"group {g.name!r} has no site whose output can be recorded; activation matching "
                             "needs a module output (e.g. an nn.ReLU) in each group")
        for s in sites:
            site_groups.setdefault(_key(s), []).append(g.name)
    device = model_device(model_a)
    stats: GroupStats = {
        g.name: Moments(2 * g.size, outer=True, device=device) if full else CrossMoments(g.size, g.size, device)
        for g in spec.groups
    }
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    keys = list(site_groups)
    try:
        with _record_centred(model_a, keys, dtype) as store_a, _record_centred(model_b, keys, dtype) as store_b:
            for x in iter_inputs(loader, device, max_samples):
                model_a(x)
                model_b(x)
                for k, names in site_groups.items():
                    ba, bb = store_a[k], store_b[k]
                    for name in names:
                        st = stats[name]
                        if isinstance(st, CrossMoments):
                            st.add_centred(ba, bb)
                        else:
                            st.add_centred(CentredBatch.cat([ba, bb]))
                store_a.clear()
                store_b.clear()
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
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
