"""Aligning N models (method-spec Appendix A): to a reference, sequentially, or iteratively to the average."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vf_lightning.align.api import align, example_from_loader, matcher_options
from vf_lightning.align.permute import Perms, apply_permutation, check_compatible, identity_perms
from vf_lightning.align.spec import PermutationSpec, build_permutation_spec
from vf_lightning.statedict import average_models
from vf_lightning.stats import model_device

Mode = Literal["reference", "sequential", "iterative"]


@dataclass(frozen=True)
class MultiAlignment:
    """Aligned copies of N models and, per model, the permutations taking the original into the common basis."""

    models: tuple[nn.Module, ...]
    perms: tuple[Perms, ...]
    spec: PermutationSpec
    mode: str
    rounds: int


def _compose(total: Perms, step: Perms) -> Perms:
    """Permutation of the original units after applying ``step`` to a model already permuted by ``total``."""
    return {k: total[k][step[k]] for k in total}


def align_many(
    models: Sequence[nn.Module],
    mode: Mode = "reference",
    method: str = "weight",
    example_input: torch.Tensor | None = None,
    loader: Iterable[object] | None = None,
    reference: int = 0,
    max_rounds: int = 10,
    seed: int = 0,
    max_sweeps: int | None = None,
    **options: Any,
) -> MultiAlignment:
    """Bring N models into one basis with a permutation ``method`` (``seed``, ``max_sweeps``, ``options`` as in align).

    ``reference``: every model to model ``reference``; ``sequential``: model i to the aligned model i−1;
    ``iterative``: rounds in random order matching model i to the average of the others, until a round changes no
    permutation (or ``max_rounds``); ``seed`` also orders those rounds.
    """
    matcher_options(method, options, "align_many")
    if len(models) < 2:
        raise ValueError("align_many needs at least two models")
    for m in models[1:]:
        check_compatible(models[0], m)
    if example_input is None:
        if loader is None:
            raise ValueError("align_many needs example_input (or a loader) to trace the permutation spec")
        example_input = example_from_loader(loader, model_device(models[0]))
    spec = build_permutation_spec(models[0], example_input)

    def match(target: nn.Module, m: nn.Module) -> Perms:
        r = align(target, m, method, loader=loader, spec=spec, seed=seed, max_sweeps=max_sweeps, **options)
        if r.perms is None:
            raise ValueError(f"align_many needs a permutation method (identity, weight, activation), got {method!r}")
        return r.perms

    aligned = list(models)
    total = [identity_perms(spec) for _ in models]
    rounds = 1
    if mode == "reference":
        for i, m in enumerate(models):
            if i != reference:
                total[i] = match(models[reference], m)
                aligned[i] = apply_permutation(m, spec, total[i])
    elif mode == "sequential":
        for i in range(1, len(models)):
            total[i] = match(aligned[i - 1], models[i])
            aligned[i] = apply_permutation(models[i], spec, total[i])
    elif mode == "iterative":
        gen = torch.Generator().manual_seed(seed)
        rounds = 0
        for _ in range(max_rounds):
            rounds += 1
            changed = False
            for i in torch.randperm(len(models), generator=gen).tolist():
                target = average_models([aligned[j] for j in range(len(models)) if j != i])
                step = match(target, aligned[i])
                if any(not torch.equal(p, torch.arange(p.numel())) for p in step.values()):
                    changed = True
                    aligned[i] = apply_permutation(aligned[i], spec, step)
                    total[i] = _compose(total[i], step)
            if not changed:
                break
    else:
        raise ValueError(f"unknown N-model mode {mode!r}; choose reference, sequential or iterative")
    return MultiAlignment(tuple(aligned), tuple(total), spec, mode, rounds)
