"""DDP helpers shared by every multi-process step: rank queries, sums and broadcasts (identity in one process)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from vf_lightning.evaluate import evaluate, evaluate_heads


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    """True outside DDP or on global rank 0 (only rank 0 writes files and logs)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce_sum(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Sum a vector of floats over the ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_tensor(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Rank 0's value of ``t`` (same shape and dtype on every rank), returned on ``t``'s device."""
    if not is_distributed():
        return t
    x = t.to(device).contiguous()
    dist.broadcast(x, 0)
    return x.to(t.device)


def broadcast_module(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Rank 0's parameters and buffers on every rank (in place)."""
    if is_distributed():
        for t in [*model.parameters(), *model.buffers()]:
            t.data.copy_(broadcast_tensor(t.data, device))
    return model


def evaluate_reduced(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device | str) -> dict[str, float]:  # fmt: skip
    """``{"acc", "loss"}`` over this rank's ``(x, y)`` batches, with correct counts and loss sums summed over ranks."""
    return _reduced(model, list(batches), device, None)[0]


def evaluate_heads_reduced(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device | str, heads: int) -> list[dict[str, float]]:  # fmt: skip
    """:func:`evaluate_reduced` for a model returning a list of ``heads`` logits tensors
    (:func:`vf_lightning.evaluate.evaluate_heads`): one result per output."""
    return _reduced(model, list(batches), device, heads)


def _reduced(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str,
             heads: int | None) -> list[dict[str, float]]:  # fmt: skip
    n = sum(int(y.shape[0]) for _, y in data)
    k = 1 if heads is None else heads
    sums = [0.0] * (2 * k)  # correct counts and loss sums per output; zero on a rank without data
    if n:
        results = [evaluate(model, data, device)] if heads is None else evaluate_heads(model, data, device)
        if len(results) != k:
            raise ValueError(f"the model returned {len(results)} outputs, expected {k}")
        sums = [v for r in results for v in (float(round(r["acc"] * n)), r["loss"] * n)]
    total, *sums = all_reduce_sum([n, *sums], device)
    if total == 0:
        raise RuntimeError("the evaluation data is empty on every rank (eval_samples=0 or an empty split)")
    return [{"acc": sums[2 * i] / total, "loss": sums[2 * i + 1] / total} for i in range(k)]


def all_reduce_max(value: float, device: torch.device | str) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
