"""Interleaved best-of timing shared by the benchmarks (not a test).

A ratio of two timings on a shared, noisy machine is read best from the best of each side, the two sides timed
alternately; a short measurement gets more repeats than a long one, so both get about as many chances at a quiet
moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(baseline: Callable[[], object], measured: Callable[[], object], device: torch.device,
                repeats: int = 5, min_seconds: float = 0.0) -> tuple[list[float], list[float]]:
    """Seconds of ``baseline()`` and of ``measured()``, timed alternately: at least ``repeats`` of each, and more
    until both together ran ``min_seconds``."""
    base: list[float] = []
    meas: list[float] = []
    started = time.perf_counter()
    while len(meas) < repeats or time.perf_counter() - started < min_seconds:
        for fn, out in ((baseline, base), (measured, meas)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return base, meas
