"""Progress of long steps: a tqdm bar per step and one log line per finished variant, under the ``vf_lightning``
logger.

Every long loop (variants of a merge, α points, PFM depths, sparsities, multi-task variants) runs inside
:func:`steps`; the work inside it reports what it is doing with :func:`status` (the merge session names its
phases: statistics, matching, normalization, evaluation) and each finished item with :meth:`Steps.advance`.

Settings, from the lowest to the highest priority:

- the ``vf_lightning`` logger's level: below INFO (``VF_QUIET=1``, ``vf --quiet``, or
  ``logging.getLogger("vf_lightning").setLevel(logging.WARNING)``) there are neither lines nor bars;
- :func:`configured` (the callbacks pass Lightning's settings: bars only with ``enable_progress_bar``, nothing on
  ranks other than 0);
- bars are drawn on a terminal only (a log file of a cluster job gets the lines, not carriage-return noise).

Log lines go through ``tqdm.write`` so they never tear a bar, Lightning's included.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Any

from tqdm.auto import tqdm

LOGGER_NAME = "vf_lightning"
log = logging.getLogger(LOGGER_NAME)


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes around active tqdm bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _install_handler() -> None:
    """One stderr handler on the ``vf_lightning`` logger, unless the application configured logging itself (as
    Lightning does for ``lightning.pytorch``)."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[vf] %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


_install_handler()
if os.environ.get("VF_QUIET", "").lower() in ("1", "true", "yes"):
    log.setLevel(logging.WARNING)


def set_quiet(quiet: bool = True) -> None:
    """No progress bars and no INFO lines (``quiet``), or both back (INFO)."""
    log.setLevel(logging.WARNING if quiet else logging.INFO)


@dataclass(frozen=True)
class _Settings:
    enabled: bool = True  # lines and bars at all (False on DDP ranks other than 0)
    bars: bool = True  # bars (Lightning's enable_progress_bar)
    stream: IO[str] | None = None  # where bars go (None: stderr)
    prefix: str = ""  # put before every line and bar title (e.g. "epoch 3")


_DEFAULT = _Settings()
_SETTINGS: ContextVar[_Settings | None] = ContextVar("vf_progress_settings", default=None)
_ACTIVE: ContextVar[tuple[Steps, ...]] = ContextVar("vf_progress_active", default=())


def _settings() -> _Settings:
    return _SETTINGS.get() or _DEFAULT


@contextmanager
def configured(enabled: bool | None = None, bars: bool | None = None, stream: IO[str] | None = None,
               prefix: str | None = None) -> Iterator[None]:  # fmt: skip
    """Progress settings for the work inside (unset arguments keep the enclosing settings)."""
    cur = _settings()
    new = _Settings(cur.enabled if enabled is None else enabled, cur.bars if bars is None else bars,
                    cur.stream if stream is None else stream, cur.prefix if prefix is None else prefix)  # fmt: skip
    token = _SETTINGS.set(new)
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Steps:
    """A running step: a bar over ``total`` items (when bars are on) and log lines for finished items."""

    def __init__(self, desc: str, total: int | None, unit: str) -> None:
        s = _settings()
        self.desc = f"{s.prefix} {desc}".strip() if s.prefix else desc
        self.total = total
        self.done = 0
        self.lines = s.enabled and log.isEnabledFor(logging.INFO)
        self.bar: Any = None
        if self.lines and s.bars:
            stream = s.stream if s.stream is not None else sys.stderr
            # disable=None: no bar on a stream that is not a terminal
            self.bar = tqdm(total=total, desc=self.desc, unit=unit, leave=False, file=stream, disable=None,
                            dynamic_ncols=True)  # fmt: skip

    def advance(self, label: str | None = None, n: int = 1, **metrics: Any) -> None:
        """``n`` more items done; with ``label``, one log line naming the item and its ``metrics``."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if label is not None:
            self.log(label, **metrics)

    def log(self, label: str, **metrics: Any) -> None:
        """One line ``<desc>: <label> k v ... (done/total)``, without advancing."""
        if not self.lines:
            return
        values = "".join(f"  {k} {_fmt(v)}" for k, v in metrics.items())
        count = f" ({self.done}/{self.total})" if self.total else ""
        log.info("%s: %s%s%s", self.desc, label, values, count)

    def status(self, text: str) -> None:
        """What the step is doing now (shown on the bar, DEBUG line)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        if self.lines:
            log.debug("%s: %s", self.desc, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def steps(desc: str, total: int | None, unit: str = "variant") -> Iterator[Steps]:
    """A step of ``total`` items titled ``desc``; the innermost running step receives :func:`status`/:func:`advance`."""
    st = Steps(desc, total, unit)
    token = _ACTIVE.set((*_ACTIVE.get(), st))
    try:
        yield st
    finally:
        _ACTIVE.reset(token)
        st.close()


def current() -> Steps | None:
    """The innermost running step, if any."""
    active = _ACTIVE.get()
    return active[-1] if active else None


def status(text: str) -> None:
    """Tell the innermost running step what is happening (no-op outside a step)."""
    st = current()
    if st is not None:
        st.status(text)


def advance(label: str | None = None, n: int = 1, **metrics: Any) -> None:
    """Advance the innermost running step (no-op outside a step), e.g. from library loops without a bar of their
    own."""
    st = current()
    if st is not None:
        st.advance(label, n, **metrics)


def info(message: str, *args: Any) -> None:
    """An INFO line under the ``vf_lightning`` logger, honouring :func:`configured` (nothing on other ranks)."""
    if _settings().enabled:
        log.info(message, *args)


__all__ = ["LOGGER_NAME", "Steps", "advance", "configured", "current", "info", "log", "set_quiet", "status", "steps"]
