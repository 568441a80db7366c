"""Atomic file writes (a reader never sees a partially written report, plot or checkpoint), written files that
honour the umask, and the writability check run before any work."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class OutputError(ValueError):
    """An output location cannot be written (it is a file, lies under a file, or is not writable)."""


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible, so that no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync and ``os.replace``.

    The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_json(obj: Any, path: str | os.PathLike[str], indent: int = 2) -> Path:
    """Serialize ``obj`` as strict JSON (no NaN / Infinity; fails before touching ``path``) and write atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False)
    return atomic_write_bytes((text + "\n").encode("utf-8"), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` into memory, then write the bytes atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(buf.getvalue(), path)


def check_writable(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Raise :class:`OutputError` unless ``path`` is, or can be created as, a writable directory.

    Checked before any work: ``path`` must not be a file nor lie under one, and the directory it is in (the
    nearest existing one) — and ``path`` itself if it exists — must accept a new file (a real probe, so ACLs,
    read-only mounts and quotas count too).
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a file; give a directory (or remove the file)")
    base = target.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{what} {str(path)!r} lies under the file {str(base)!r}; give a path under a directory")
    for d in (base, target) if target.exists() else (base,):
        try:
            fd, probe = tempfile.mkstemp(prefix=".vf-write-check.", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputError(f"{what} {str(path)!r} is not writable ({str(d)!r}: {e.strerror or e}); "
                              "choose another location or fix its permissions") from e  # fmt: skip
    return target


# ----------------------------------------------------------------------------------------------------------------
# all-or-nothing output directories: write a staging directory next to the target, publish it with renames


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """Where this process stages the new content of ``target``: ``<target>.tmp-<pid>``, next to it."""
    t = Path(target)
    return t.parent / f"{t.name}.tmp-{os.getpid()}"


def _pid_of(path: Path) -> int | None:
    tail = path.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _carry(src: Path, dst: Path, owned: Callable[[str], bool]) -> None:
    """Move the entries of ``src`` that ``dst`` lacks into ``dst`` (directories in both: merged), except the
    top-level names ``owned`` claims for the published set."""
    for entry in sorted(src.iterdir()):
        if owned(entry.name):
            continue
        there = dst / entry.name
        if not there.exists() and not there.is_symlink():
            os.rename(entry, there)
        elif entry.is_dir() and not entry.is_symlink() and there.is_dir():
            _carry(entry, there, lambda _name: False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale(target: str | os.PathLike[str], owned: Callable[[str], bool]) -> None:
    """Remove what earlier, killed publications of ``target`` left: their staging directories, a moved-away old
    directory (put back if the new one never arrived, else its other entries carried over) and the ``.tmp``
    files of interrupted atomic writes. Staging directories of live processes are left alone."""
    t = Path(target)
    if not t.parent.is_dir():
        return
    for stale in t.parent.glob(f"{glob.escape(t.name)}.tmp-*"):
        if stale.is_dir() and not _alive(_pid_of(stale)):
            shutil.rmtree(stale, ignore_errors=True)
    for old in t.parent.glob(f"{glob.escape(t.name)}.old-*"):
        if not old.is_dir() or _alive(_pid_of(old)):
            continue
        if not t.exists():
            os.rename(old, t)  # killed between the two renames: the old set comes back
        else:
            _carry(old, t, owned)
            shutil.rmtree(old, ignore_errors=True)
    if t.is_dir():
        for leftover in [*t.glob(".*.tmp"), *t.glob(".vf-write-check.*")]:
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


def fault_point(name: str) -> None:
    """A place where the fault-injection tests kill the process: with ``VF_FAULT_POINT=<name>`` in the environment
    the process sends itself SIGKILL here (nothing runs after it, as under ``kill -9`` or the OOM killer;
    tests/test_reliability.py). No effect otherwise."""
    if os.environ.get("VF_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def publish_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str],
                owned: Callable[[str], bool]) -> Path:  # fmt: skip
    """Replace ``target`` by ``staging`` with two renames; entries of the old ``target`` that ``owned`` does not
    claim (logs, configs, the user's files) are carried over, the old set's files are dropped.

    A kill leaves the old set or the new one: between the renames the old directory waits as
    ``<target>.old-<pid>`` and :func:`clean_stale` puts it back.
    """
    s, t = Path(staging), Path(target)
    fault_point("staged")  # the whole new set is in the staging directory, the old one still in place
    old = None
    if t.exists():
        old = t.parent / f"{t.name}.old-{os.getpid()}"
        os.rename(t, old)
        fault_point("between-renames")
    try:
        os.rename(s, t)
    except BaseException:
        if old is not None:
            os.rename(old, t)
        raise
    _fsync_dir(t.parent)
    if old is not None:
        _carry(old, t, owned)
        shutil.rmtree(old, ignore_errors=True)
    return t
