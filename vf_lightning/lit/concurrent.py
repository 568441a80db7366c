"""Independent networks trained concurrently on the CPU: each network's forward and backward run in a worker thread
with its own share of the intra-op threads.

Small convolutional networks use two CPU cores poorly inside one kernel (oneDNN's weight gradients of small maps,
elementwise passes of a few MB); two networks that share nothing but the optimizer step run faster side by side,
one core each: the demo's VGG pair trains an epoch in 77-92 s instead of 100-105 s on 2 cores
(``benchmarks/train_throughput.py`` prints the ratio).

:func:`concurrent_losses` is an autograd function, so Lightning's automatic optimization (closure, gradient
clipping and accumulation, the backward hooks, the optimizer step) runs unchanged: its forward runs every
network's loss in a worker, its backward hands each worker its own graph and returns the parameters' gradients
to the autograd engine, which accumulates them (and runs any parameter hooks) as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

Step = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # → (loss with its graph, detached extras)

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def worker_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, each running torch ops on ``threads`` intra-op threads."""
    key = (workers, threads)
    with _LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"vf-concurrent-{threads}",
                                             initializer=torch.set_num_threads, initargs=(threads,))  # fmt: skip
        return _POOLS[key]


class _ConcurrentLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pool: ThreadPoolExecutor, steps: Sequence[Step], sizes: Sequence[int],
                extras: list[dict[str, torch.Tensor]], *params: torch.Tensor) -> Any:  # fmt: skip
        results = [job.result() for job in [pool.submit(_with_grad, step) for step in steps]]
        ctx.pool, ctx.sizes, ctx.params = pool, list(sizes), params
        ctx.losses = [loss for loss, _ in results]
        extras.extend(extra for _, extra in results)
        return tuple(loss.detach() for loss in ctx.losses)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        groups, start = [], 0
        for n in ctx.sizes:
            groups.append(ctx.params[start:start + n])
            start += n
        jobs = [ctx.pool.submit(_gradients, loss, group, g) for loss, group, g in zip(ctx.losses, groups, grads)]
        out = [g for job in jobs for g in job.result()]
        ctx.losses = None  # free the graphs
        return (None, None, None, None, *out)


def _with_grad(step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.enable_grad():
        loss, extra = step()
    return loss, {k: v.detach() for k, v in extra.items()}


def _gradients(loss: torch.Tensor, params: Sequence[torch.Tensor], grad: torch.Tensor) -> tuple[Any, ...]:
    if not loss.requires_grad:
        return (None,) * len(params)
    return torch.autograd.grad(loss, list(params), grad, allow_unused=True)


def concurrent_losses(networks: Sequence[nn.Module], steps: Sequence[Step],
                      threads: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:  # fmt: skip
    """Run ``steps[i]`` (the loss of ``networks[i]``, which must share no parameters) in worker threads of
    ``threads`` intra-op threads each; returns the losses, differentiable with respect to every network's trainable
    parameters (their backward also runs in the workers), and each step's extras (detached)."""
    if len(networks) != len(steps):
        raise ValueError(f"concurrent training needs one step per network, got {len(steps)} for {len(networks)}")
    groups = [[p for p in net.parameters() if p.requires_grad] for net in networks]
    seen: set[int] = set()
    for group in groups:
        ids = {id(p) for p in group}
        if ids & seen:
            raise ValueError("concurrent training needs networks that share no parameters")
        seen |= ids
    pool = worker_pool(len(steps), threads)
    params = [p for group in groups for p in group]
    extras: list[dict[str, torch.Tensor]] = []
    losses = _ConcurrentLosses.apply(pool, list(steps), [len(g) for g in groups], extras, *params)
    return list(losses), extras
