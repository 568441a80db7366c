"""Streaming per-channel statistics, accumulated in float64 and reducible across DDP ranks.

The one statistics engine of the library: RESET/REPAIR goals, activation matching, ZipIt/CCA
covariances, TACT and the variance-ratio diagnostics all build on :class:`Moments` and
:func:`stream_moments` / :func:`accumulate_moments`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


def channel_matrix(x: torch.Tensor) -> torch.Tensor:
    """View activations as ``C × M`` (channels × positions) in float64.

    ``N×C`` and ``N×C×H×W`` (channel axis 1) are supported; ``N×L×C`` sequence features use the last axis.
    """
    if x.dim() == 2:
        return x.t().to(torch.float64)
    if x.dim() == 4:
        return x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
    if x.dim() == 3:
        return x.reshape(-1, x.shape[-1]).t().to(torch.float64)
    raise ValueError(f"cannot take channel statistics of a tensor with shape {tuple(x.shape)}")


@dataclass
class Moments:
    """Running count, sum, sum of squares (and optionally the full outer product) of ``C`` channels."""

    dim: int
    outer: bool = False
    device: torch.device | str = "cpu"
    count: torch.Tensor = field(init=False)
    sum: torch.Tensor = field(init=False)
    sumsq: torch.Tensor = field(init=False)
    prod: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        dt, dev = torch.float64, self.device
        self.count = torch.zeros((), dtype=dt, device=dev)
        self.sum = torch.zeros(self.dim, dtype=dt, device=dev)
        self.sumsq = torch.zeros(self.dim, dtype=dt, device=dev)
        self.prod = torch.zeros(self.dim, self.dim, dtype=dt, device=dev) if self.outer else None

    def update(self, feats: torch.Tensor) -> None:
        """Add a ``C × M`` float matrix of ``M`` observations (see :func:`channel_matrix`)."""
        if feats.shape[0] != self.dim:
            raise ValueError(f"Moments of {self.dim} channels got a feature matrix with {feats.shape[0]} rows")
        f = feats.to(device=self.sum.device, dtype=torch.float64)
        self.count += f.shape[1]
        self.sum += f.sum(1)
        self.sumsq += (f * f).sum(1)
        if self.prod is not None:
            self.prod += f @ f.t()

    def all_reduce(self) -> Moments:
        """Sum the accumulators over all DDP ranks (no-op outside an initialized process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensors = [self.count, self.sum, self.sumsq] + ([self.prod] if self.prod is not None else [])
            for t in tensors:
                dist.all_reduce(t)
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (exact, not a moving average)."""
        m = self.mean
        return (self.sumsq / self.count.clamp_min(1) - m * m).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def cov(self) -> torch.Tensor:
        """Full ``C × C`` population covariance (needs ``outer=True``)."""
        if self.prod is None:
            raise RuntimeError("Moments was created without outer=True; no covariance was accumulated")
        m = self.mean
        return self.prod / self.count.clamp_min(1) - torch.outer(m, m)

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
def accumulate_moments(model: nn.Module, names: Sequence[str], pre: bool = False) -> Iterator[dict[str, Moments]]:
    """While active, add the outputs (``pre=True``: first inputs) of the named submodules into per-site Moments.

    Activations are read inside the hook, the moment they are produced, so later in-place ops (e.g. a conv
    output overwritten by ``ReLU(inplace=True)``) cannot alter them. Call ``all_reduce`` on the results for DDP.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"module(s) {missing} not found in {type(model).__name__}")
    store: dict[str, Moments] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], outp: torch.Tensor | None = None) -> None:
            t = inp[0] if pre else outp
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"site {name!r} produced a {type(t).__name__}, not a tensor")
            f = channel_matrix(t.detach())
            if name not in store:
                store[name] = Moments(f.shape[0], device=f.device)
            store[name].update(f)

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
