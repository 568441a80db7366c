"""One-shot unstructured pruning of Conv/Linear weights on top of ``torch.nn.utils.prune`` (method-spec §8).

Pruners are registered by name (``global_magnitude``, ``layerwise_magnitude``, ``diag_fisher``) as
``fn(model, modules, sparsity, loader, *, <typed options>)``; biases are never pruned; ``prune.remove`` is
applied afterwards so the result is a plain model whose pruned weights are 0.
Pruned counts are ``round(s·N)`` (global: over all selected weights, so within one element of the target;
layer-wise: per layer).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import prune

from vf_lightning.progress import status
from vf_lightning.registry import Registry
from vf_lightning.stats import eval_mode, model_device

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Modules = list[tuple[str, nn.Module]]


def prunable_modules(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> Modules:
    """``(name, module)`` of the layers to prune: ``include`` (names) or every Conv/Linear, minus ``exclude``."""
    mods = dict(model.named_modules())
    if include is not None:
        missing = [n for n in include if n not in mods]
        if missing:
            raise KeyError(f"module(s) {missing} to prune not found in {type(model).__name__}")
        chosen = [(n, mods[n]) for n in include]
    else:
        chosen = [(n, m) for n, m in mods.items() if isinstance(m, PRUNABLE_TYPES)]
    bad = [n for n, m in chosen if not isinstance(getattr(m, "weight", None), torch.Tensor)]
    if bad:
        raise TypeError(f"module(s) {bad} have no weight tensor to prune")
    return [(n, m) for n, m in chosen if n not in set(exclude)]


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


class Pruner(Protocol):
    """A pruner: ``fn(model, modules, sparsity, loader, *, <typed options>)`` attaches masks to ``modules``."""

    def __call__(self, model: nn.Module, modules: Modules, sparsity: float, loader: Iterable[object] | None) -> None:
        ...


PRUNERS: Registry[Pruner] = Registry("pruner")


def register_pruner(name: str) -> Callable[[Pruner], Pruner]:
    """Register ``fn(model, modules, sparsity, loader, *, <options>)`` that attaches pruning masks to ``modules``."""
    return PRUNERS.register(name)


def get_pruner(name: str) -> Pruner:
    """The pruner registered as ``name``; unknown names fail listing the valid ones."""
    return PRUNERS.get_or_fail(name)


@register_pruner("global_magnitude")
def _global_magnitude(model: nn.Module, modules: Modules, sparsity: float, loader: Iterable[object] | None) -> None:
    total = sum(_weight(m).numel() for _, m in modules)
    prune.global_unstructured(
        [(m, "weight") for _, m in modules], pruning_method=prune.L1Unstructured, amount=round(sparsity * total)
    )


@register_pruner("layerwise_magnitude")
def _layerwise_magnitude(model: nn.Module, modules: Modules, sparsity: float,
                         loader: Iterable[object] | None) -> None:
    for _, m in modules:
        prune.l1_unstructured(m, "weight", amount=round(sparsity * _weight(m).numel()))


def diag_fisher(model: nn.Module, modules: Modules, loader: Iterable[object] | None, fisher_samples: int = 1000,
                fisher_chunk: int = 32) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher ``E[(∂ℓ/∂w)²]`` of each module's weight from exact per-sample gradients.

    Per-sample gradients via ``torch.func.vmap(grad(...))`` in chunks of ``fisher_chunk`` samples, true labels,
    eval mode (BatchNorm uses running statistics), over the first ``fisher_samples`` samples of ``loader``.
    """
    if loader is None:
        raise ValueError("diag_fisher needs a labelled loader (loader=...)")
    device = model_device(model)
    names = {id(m): n for n, m in model.named_modules()}
    keys = [f"{names[id(m)]}.weight" for _, m in modules]
    params = dict(model.named_parameters())
    state = {k: v.detach() for k, v in {**params, **dict(model.named_buffers())}.items()}
    targets = {k: state.pop(k) for k in keys}

    def loss(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**state, **w}, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in targets.items()}
    n = 0
    with eval_mode(model):
        for batch in loader:
            if n >= fisher_samples:
                break
            if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
                raise TypeError("diag_fisher needs (x, y) batches with labels")
            x, y = batch[0][: fisher_samples - n].to(device), batch[1][: fisher_samples - n].to(device)
            for xs, ys in zip(x.split(fisher_chunk), y.split(fisher_chunk)):
                grads = per_sample(targets, xs, ys)
                for k, g in grads.items():
                    fisher[k] += g.double().pow(2).sum(0)
            n += x.shape[0]
            status(f"Fisher {min(n, fisher_samples)}/{fisher_samples} samples")
    if n == 0:
        raise ValueError("diag_fisher got an empty loader")
    return {k.rsplit(".", 1)[0]: (v / n).to(targets[k].dtype) for k, v in fisher.items()}


@register_pruner("diag_fisher")
def _diag_fisher(model: nn.Module, modules: Modules, sparsity: float, loader: Iterable[object] | None, *,
                 fisher_samples: int = 1000, fisher_chunk: int = 32) -> None:
    """Layer-wise threshold on the saliency ``w²·F_ii`` (diagonal empirical Fisher)."""
    fisher = diag_fisher(model, modules, loader, fisher_samples, fisher_chunk)
    for name, m in modules:
        w = _weight(m).detach()
        scores = w.pow(2) * fisher[name]
        prune.l1_unstructured(m, "weight", amount=round(sparsity * w.numel()), importance_scores=scores)


def prune_model(
    model: nn.Module,
    pruner: str = "global_magnitude",
    sparsity: float = 0.5,
    loader: Iterable[object] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    fisher_samples: int | None = None,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Prune ``sparsity`` of the selected weights with ``pruner``; returns a plain model (masks removed, zeros kept).

    ``options`` are the pruner's own (``PRUNERS.options(pruner)``); one it does not declare fails before any work.
    ``fisher_samples`` is run-wide: passed on only to pruners that declare it, ``None`` keeps their default.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    fn = get_pruner(pruner)
    PRUNERS.check_options(pruner, options, "prune_model")
    if fisher_samples is not None and "fisher_samples" in PRUNERS.options(pruner):
        options = {"fisher_samples": fisher_samples, **options}
    out = model if inplace else copy.deepcopy(model)
    modules = prunable_modules(out, include, exclude)
    if not modules:
        raise ValueError(f"no layers selected for pruning in {type(out).__name__}")
    weights = [w for _, m in modules if isinstance(w := m.weight, torch.Tensor) and w.dim() == 4]
    channels_last = any(not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
                        for w in weights)  # fmt: skip
    if channels_last:  # torch.nn.utils.prune flattens weights with view(): prune in the contiguous layout
        out.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    status(f"pruning {sparsity:g} ({pruner})")
    fn(out, modules, sparsity, loader, **options)
    for _, m in modules:
        if prune.is_pruned(m):
            prune.remove(m, "weight")
    if channels_last:
        out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return out


def sparsity_report(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[str, object]:
    """Achieved sparsity: ``{"global", "zeros", "total", "layers": {name: fraction}}`` over the selected weights."""
    layers, zeros, total = {}, 0, 0
    for name, m in prunable_modules(model, include, exclude):
        w = _weight(m)
        z = int((w == 0).sum().item())
        layers[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return {"global": zeros / max(total, 1), "zeros": zeros, "total": total, "layers": layers}
