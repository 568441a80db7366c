"""Shared fixtures: offline W&B, small thread counts, the Fashion-MNIST location."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vf_lightning.runtime import import_wandb_first, skip_final_collection

import_wandb_first()  # before torch, as the vf command does

import pytest  # noqa: E402
import torch  # noqa: E402
from background import REPO, Job, Runner  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
CORES = min(2, os.cpu_count() or 1)
torch.set_num_threads(CORES)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fmnist_available() -> bool:
    return (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file() or bool(os.environ.get("VF_DATA_DIR"))


_RUNS_CREATED = [0]  # W&B Run objects created in this process since the counter was installed


def _wandb_runs_created() -> int | None:
    """How many W&B runs this process has created; None until wandb is imported (the counter is installed then)."""
    if "wandb" not in sys.modules:
        return None
    from wandb.sdk import wandb_run

    cls: Any = wandb_run.Run
    if not getattr(cls, "_vf_counted", False):
        init = cls.__init__

        def counted(self: Any, *args: Any, **kwargs: Any) -> None:
            _RUNS_CREATED[0] += 1
            init(self, *args, **kwargs)

        cls.__init__ = counted
        cls._vf_counted = True
        return None
    return _RUNS_CREATED[0]


@pytest.fixture(autouse=True)
def no_wandb_run_left_open() -> Iterator[None]:
    """Finish any W&B run a test leaves open: Lightning's WandbLogger would otherwise reuse it in the next test."""
    before = _wandb_runs_created()
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if getattr(wandb, "run", None) is not None:
            wandb.finish()
        if before is None or _wandb_runs_created() != before:
            # collect this test's finished runs now: collected later, they finish whatever run is active then (a
            # full collection takes ~0.4 s here, so only after tests that made a run)
            gc.collect()


@pytest.fixture
def fmnist() -> Path:
    if not fmnist_available():
        pytest.fail("Fashion-MNIST is missing: run `make data` (installs Debian's dataset-fashion-mnist)")
    return FMNIST_DIR


@pytest.fixture
def repo() -> Path:
    return REPO


def wait_for_wandb_record(wandb_dir: Path, keys: Sequence[str], timeout: float = 30.0) -> list[str]:
    """Keys still missing from the offline run's record file after waiting up to ``timeout`` seconds.

    The W&B service creates and flushes ``offline-run-*/run-*.wandb`` asynchronously, even after ``finish()``.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(wandb_dir.glob("offline-run-*/run-*.wandb"))
        data = files[0].read_bytes() if files else b""
        missing = [k for k in keys if k.encode() not in data]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)


_RUNNER = pytest.StashKey[Runner]()


def _background_factory(item: pytest.Item) -> Any:
    marker = item.get_closest_marker("background")
    return marker.kwargs["factory"] if marker is not None else None


def _order(item: pytest.Item) -> int:
    if _background_factory(item) is not None:
        return 2
    return 1 if item.get_closest_marker("kernels") is not None else 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests bound by Python set-up (Lightning, W&B, subprocesses) run first, on one core beside the background
    jobs (tests/background.py); then the ``kernels`` tests, whose torch kernels use both cores once the jobs are
    done; last the tests that wait on a background job. The order is otherwise kept (the sort is stable)."""
    items.sort(key=_order)


def pytest_configure(config: pytest.Config) -> None:
    """Collecting imports Lightning, W&B and the package: the garbage collector pauses until it is done (its full
    collections over the ≈ 740,000 tracked objects those imports create cost seconds, as in ``vf``'s start-up)."""
    gc.disable()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the background jobs of the selected tests; then move everything imported while collecting (torch,
    Lightning, W&B, the test modules) out of the garbage collector's view and let it run again: later full
    collections then scan only what the tests create."""
    factories = list(dict.fromkeys(f for f in map(_background_factory, session.items) if f is not None))
    if factories and not session.config.option.collectonly:
        session.config.stash[_RUNNER] = Runner(factories)
    gc.collect()
    gc.freeze()
    gc.enable()


def pytest_sessionfinish(session: pytest.Session) -> None:
    runner = session.config.stash.get(_RUNNER, None)
    if runner is not None:
        runner.close()
    skip_final_collection()  # what the tests left alive is not scanned again at exit


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    runner = config.stash.get(_RUNNER, None)
    if runner is not None:
        terminalreporter.write_line("background jobs: " + ", ".join(runner.summary()))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test (and the fixtures it sets up) starts with :data:`CORES` threads, one fewer while background jobs
    run: a job holds a core, and OpenMP threads waiting on each other across a shared core made small-kernel tests
    3-10x slower."""
    runner = item.config.stash.get(_RUNNER, None)
    torch.set_num_threads(max(1, CORES - 1) if runner is not None and runner.busy else CORES)


@pytest.fixture
def background(request: pytest.FixtureRequest) -> Job:
    """The finished background job of a test marked ``@pytest.mark.background(factory=...)`` (waits for it)."""
    factory = _background_factory(request.node)
    assert factory is not None, "the background fixture needs @pytest.mark.background(factory)"
    return request.config.stash[_RUNNER].wait(factory)
