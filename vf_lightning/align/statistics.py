"""Paired activation statistics of two models at every group's sites, from one streamed pass.

Built on :class:`vf_lightning.stats.Moments` (float64, DDP all-reduce). Features are read inside forward
hooks (converted to a float64 ``C × M`` copy at once, so later in-place ops cannot corrupt them); modules
called several times per forward (torchvision's bottleneck ``relu``) are told apart by call index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from vf_lightning.align.spec import PermutationSpec, Site
from vf_lightning.stats import Moments, channel_matrix, iter_inputs, model_device

SiteKey = tuple[str, int, str]  # (module, call index, port)


@dataclass
class CrossMoments:
    """Moments of two feature sets plus their cross product ``Σ f_a f_bᵀ`` (the A×B block only)."""

    dim_a: int
    dim_b: int
    device: torch.device | str = "cpu"
    a: Moments = field(init=False)
    b: Moments = field(init=False)
    prod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.a = Moments(self.dim_a, device=self.device)
        self.b = Moments(self.dim_b, device=self.device)
        self.prod = torch.zeros(self.dim_a, self.dim_b, dtype=torch.float64, device=self.device)

    def update(self, fa: torch.Tensor, fb: torch.Tensor) -> None:
        """Add paired ``C × M`` observations of A and B (the batch product in their dtype, summed in float64)."""
        self.a.update(fa)
        self.b.update(fb)
        self.prod += (fa @ fb.t()).to(self.prod)

    def all_reduce(self) -> CrossMoments:
        """Sum over DDP ranks (no-op without a process group)."""
        self.a.all_reduce()
        self.b.all_reduce()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.prod)
        return self

    def cov(self) -> torch.Tensor:
        """Cross-covariance ``E[f_a f_bᵀ] − μ_a μ_bᵀ``."""
        return self.prod / self.a.count.clamp_min(1) - torch.outer(self.a.mean, self.b.mean)

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
def record_sites(model: nn.Module, sites: Sequence[SiteKey],
                 dtype: torch.dtype = torch.float64) -> Iterator[dict[SiteKey, torch.Tensor]]:
    """Capture ``C × M`` features (a ``dtype`` copy) at ``(module, call, port)`` sites during each forward."""
    modules = dict(model.named_modules())
    wanted: dict[tuple[str, str], set[int]] = {}
    for name, call, port in sites:
        if name not in modules:
            raise KeyError(f"site module {name!r} not found in {type(model).__name__}")
        wanted.setdefault((name, port), set()).add(call)
    store: dict[SiteKey, torch.Tensor] = {}
    counts: dict[tuple[str, str], int] = {}
    handles = [model.register_forward_pre_hook(lambda _m, _i: counts.clear())]

    def take(name: str, port: str, t: torch.Tensor) -> None:
        call = counts.get((name, port), 0)
        counts[(name, port)] = call + 1
        if call in wanted[(name, port)]:
            store[(name, call, port)] = _rows(t.detach(), dtype)

    for (name, port) in wanted:
        m = modules[name]
        if port == "out":
            handles.append(m.register_forward_hook(lambda _m, _i, out, n=name: take(n, "out", out)))
        else:
            handles.append(m.register_forward_pre_hook(lambda _m, inp, n=name: take(n, "in", inp[0])))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _key(s: Site) -> SiteKey:
    return (s.module, s.call, s.port)


@torch.no_grad()
def activation_statistics(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    loader: Iterable[object],
    full: bool = False,
    max_samples: int | None = None,
    precision: str = "float64",
) -> GroupStats:
    """One pass over ``loader`` (both models in eval mode): per group, statistics pooled over its activation sites.

    ``full=False`` keeps the A×B cross block (:class:`CrossMoments`, enough for activation matching);
    ``full=True`` keeps the ``2C × 2C`` moments of ``[f_A; f_B]`` (ZipIt, CCA). All-reduced under DDP.
    ``precision="float32"`` computes each batch's products in float32 (accumulated across batches in float64).
    """
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    dtype = torch.float64 if precision == "float64" else torch.float32
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
        with record_sites(model_a, keys, dtype) as store_a, record_sites(model_b, keys, dtype) as store_b:
            for x in iter_inputs(loader, device, max_samples):
                model_a(x)
                model_b(x)
                for k, names in site_groups.items():
                    fa, fb = store_a[k], store_b[k]
                    for name in names:
                        st = stats[name]
                        if isinstance(st, CrossMoments):
                            st.update(fa, fb)
                        else:
                            st.update(torch.cat([fa, fb], 0))
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
