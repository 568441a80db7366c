"""Subprocess integration tests run their processes in the background, beside the in-process tests.

A test that checks what fresh ``vf`` / DDP processes did (a DDP merge, a DDP fit, a W&B run written by a new
process) spends most of its time waiting: each process imports torch and Lightning on one core (~7 s here) and
two-rank DDP runs start one rank after the other. Such a test is marked
``@pytest.mark.background(factory=f)``:

- when collection ends, ``f(dir)`` runs once per session in the main process (under a forked torch RNG, so
  it leaves the tests' random state alone) and returns the job's *stages*, each a list of :class:`Command` that
  run at once; a stage starts when the one before it ended with every command successful;
- one runner thread runs the jobs one after another, longest first (``@job(seconds=...)`` on the factory);
- the tests that wait on a job run after all the others, and get the finished :class:`Job` from the
  ``background`` fixture (several tests may share one factory: its processes run once).

Each command's output goes to ``<name>.out`` / ``<name>.err`` in the job's directory; :meth:`Job.check` fails
naming the command and showing the end of its stderr. Processes still running when the session ends are killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# the jobs run at a lower priority: they fill the cores the in-process tests leave idle (imports and Python-bound
# steps use one core) rather than slow those tests down; while they run, the tests use one thread fewer
# (conftest.py: two OpenMP threads sharing two cores with a job made small-kernel tests 3-10x slower)
NICE = ["nice", "-n", "10"] if shutil.which("nice") else []


@dataclass
class Command:
    """One process: ``python ARGV`` (the test interpreter) in ``cwd`` (default: the job's directory), expected to
    exit with ``returncode`` (``-signal.SIGKILL`` for a process that kills itself at a fault point)."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    timeout: float = 400.0
    returncode: int = 0


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a test process: this one's, the repository importable, one thread, offline W&B."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


@dataclass
class Job:
    """A factory's processes and, once :attr:`done` is set, their return codes."""

    name: str
    dir: Path
    stages: list[list[Command]]
    returncodes: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def stderr(self, name: str) -> str:
        path = self.dir / f"{name}.err"
        return path.read_text(errors="replace") if path.is_file() else ""

    def check(self) -> None:
        """Fail unless every command of every stage ran and exited with its expected return code."""
        assert self.error is None, f"background job {self.name}: {self.error}"
        for stage in self.stages:
            for cmd in stage:
                rc = self.returncodes.get(cmd.name, "not run")
                assert rc == cmd.returncode, (f"{self.name}/{cmd.name} exited {rc}, not {cmd.returncode}:\n"
                                              f"{self.stderr(cmd.name)[-3000:]}")


Factory = Callable[[Path], list[list[Command]]]


def job(seconds: float) -> Callable[[Factory], Factory]:
    """Declare a job factory and about how long its processes take alone (the runner starts the longest first)."""

    def mark(factory: Factory) -> Factory:
        factory.seconds = seconds  # type: ignore[attr-defined]
        return factory

    return mark


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process of its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


class Runner:
    """Runs the session's jobs in one background thread; :meth:`wait` blocks until a job has finished."""

    def __init__(self, factories: Sequence[Factory]) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="vf-background-"))
        self.jobs: dict[Factory, Job] = {}
        self._running: list[subprocess.Popen[bytes]] = []
        self._closed = threading.Event()
        order = sorted(factories, key=lambda f: -float(getattr(f, "seconds", 0.0)))
        for factory in order:
            name = factory.__name__
            path = self.base / name
            path.mkdir()
            try:
                with torch.random.fork_rng():
                    self.jobs[factory] = Job(name, path, factory(path))
            except Exception as e:  # noqa: BLE001 - the tests waiting on this job fail with it, the others run
                self.jobs[factory] = Job(name, path, [], error=f"its factory failed: {type(e).__name__}: {e}")
        self._thread = threading.Thread(target=self._run_all, name="vf-background", daemon=True)
        self._thread.start()

    def _run_all(self) -> None:
        for job in self.jobs.values():
            start = time.monotonic()
            try:
                for stage in job.stages:
                    if self._closed.is_set() or not self._run_stage(job, stage):
                        break
            except Exception as e:  # noqa: BLE001 - reported by the test that waits on the job
                job.error = f"{type(e).__name__}: {e}"
            finally:
                job.seconds = time.monotonic() - start
                job.done.set()

    def _run_stage(self, job: Job, stage: list[Command]) -> bool:
        procs = []
        for cmd in stage:
            with open(job.dir / f"{cmd.name}.out", "wb") as out, open(job.dir / f"{cmd.name}.err", "wb") as err:
                # a session of its own: a kill takes the processes it started too (a DDP launcher's other rank)
                proc = subprocess.Popen([*NICE, sys.executable, *cmd.argv], cwd=cmd.cwd or job.dir,
                                        env=cmd.env or python_env(), stdout=out, stderr=err,
                                        start_new_session=True)  # fmt: skip
            self._running.append(proc)
            procs.append((cmd, proc))
        for cmd, proc in procs:
            try:
                job.returncodes[cmd.name] = proc.wait(timeout=cmd.timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                proc.wait()
                job.error = f"{cmd.name} did not finish in {cmd.timeout:.0f} s (killed)"
            self._running.remove(proc)
        return job.error is None and all(job.returncodes[c.name] == c.returncode for c in stage)

    @property
    def busy(self) -> bool:
        """Whether a job still runs (or waits to run)."""
        return not all(j.done.is_set() for j in self.jobs.values())

    def wait(self, factory: Factory) -> Job:
        job = self.jobs[factory]
        job.done.wait()
        return job

    def summary(self) -> list[str]:
        return [f"{j.name}: {j.seconds:.1f} s" + ("" if j.done.is_set() else " (not finished)")
                for j in self.jobs.values()]  # fmt: skip

    def close(self) -> None:
        """Kill what still runs and remove the jobs' directories."""
        self._closed.set()
        for proc in list(self._running):
            _kill(proc)
        self._thread.join(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)
