"""Atomic file writes: a reader never sees a partially written report, plot or checkpoint."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
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
    """Serialize ``obj`` as JSON (fails before touching ``path`` if it is not serializable) and write atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=False)
    return atomic_write_bytes((text + "\n").encode("utf-8"), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` into memory, then write the bytes atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(buf.getvalue(), path)
