"""Process-level speed settings for CPU runs.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap``
and returns it on ``free``: each large activation of a forward pass then costs a round of page faults, 10-30 %
of a CPU forward pass of the zoo's conv nets at batch sizes of a few hundred (measured on 2 cores: ResNet-20
eval 0.69 s → 0.47 s; the demo's evaluation of 5,000 Fashion-MNIST images 0.84 s → 0.63 s). Raising the
threshold keeps freed blocks in the heap for the next batch. The ``vf`` command and ``benchmarks/merge.py`` /
``benchmarks/matching.py`` call :func:`tune_allocator` once at start-up (the test suite's small tensors gain
nothing from it);
``VF_MALLOC_TUNING=0`` leaves the allocator alone.

At exit, the interpreter runs a full garbage collection over every object the imports created (torch, Lightning,
torchmetrics, torchvision, scipy, wandb: ~2 s of a ``vf`` process on 2 slow cores). :func:`skip_final_collection`
moves those objects to the collector's permanent generation first (``gc.freeze``), so that the exit takes
≈0.5 s; the ``vf`` command calls it when its work is done, as does the test session.

Import order matters too: :func:`import_wandb_first` (the ``vf`` command and the test session, before anything
else) imports W&B while few modules are loaded — 2 s less of start-up per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DONE: list[bool] = []


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Keep blocks up to ``threshold`` bytes in the heap (glibc only; a no-op elsewhere); True if applied."""
    if _DONE:
        return _DONE[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("VF_MALLOC_TUNING", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                       2 * threshold))
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            ok = False
    _DONE.append(ok)
    return ok


def skip_final_collection() -> None:
    """Leave the objects alive now out of the garbage collections still to come (``gc.freeze``), the one at
    interpreter exit included; for a process whose work is done (finalizers still run as modules are torn down)."""
    gc.freeze()


def import_wandb_first() -> None:
    """Import W&B, and the launch package every ``wandb.init`` imports, before torch and Lightning are loaded.

    W&B's settings and launch classes are pydantic models with attribute docstrings: defining each one walks the
    call stack through ``inspect.getmodule``, which scans all of ``sys.modules`` for every frame of the import
    machinery it meets. With W&B imported first that is a few hundred modules instead of ≈ 4,000: the process's
    imports take ≈ 7.6 s instead of ≈ 9.5 s on 2 slow cores (W&B alone 2.2 s → 1.3 s), whether or not the run
    logs to W&B. Call it before importing anything else.
    """
    import wandb  # noqa: F401
    import wandb.sdk.launch.inputs.internal  # noqa: F401
