"""Where datasets are found on disk (DESIGN §6): explicit dir, ``VF_DATA_DIR``, system locations, download."""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

SYSTEM_DIRS: dict[str, list[str]] = {
    "fashion_mnist": ["/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion_mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
}

HINTS: dict[str, str] = {
    "fashion_mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian) or pass data_dir / set "
    "VF_DATA_DIR to a folder holding the four *-idx*-ubyte(.gz) files, or set download: true",
    "mnist": "pass data_dir / set VF_DATA_DIR to a folder with the MNIST idx files, or set download: true",
    "cifar10": "pass data_dir / set VF_DATA_DIR to a folder holding cifar-10-batches-py, or set download: true",
    "cifar100": "pass data_dir / set VF_DATA_DIR to a folder holding cifar-100-python, or set download: true",
    "imagenet": "pass data_dir pointing at an ImageNet folder with train/ and val/ class sub-folders",
}


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset is not found in any of the places searched."""

    def __init__(self, dataset: str, searched: list[str], extra: str = "") -> None:
        where = "\n  ".join(searched) if searched else "(nowhere: no location given)"
        msg = f"dataset {dataset!r} not found. Looked in:\n  {where}\nHow to get it: {HINTS.get(dataset, '')}"
        if extra:
            msg += f"\n{extra}"
        super().__init__(msg)


class DataDirError(DataNotFoundError):
    """An explicitly given ``data_dir`` does not exist (it is refused, not replaced by another copy)."""

    def __init__(self, dataset: str, data_dir: str | os.PathLike[str]) -> None:
        others = [os.environ.get("VF_DATA_DIR") or "", *SYSTEM_DIRS.get(dataset, [])]
        FileNotFoundError.__init__(
            self, f"data_dir {str(data_dir)!r} of dataset {dataset!r} does not exist or is not a directory (the "
            f"other locations {[o for o in others if o]} are not used in its place): fix the path, or drop "
            f"data_dir to search $VF_DATA_DIR and the system locations; {HINTS.get(dataset, '')}")


def candidate_dirs(dataset: str, data_dir: str | os.PathLike[str] | None, subdirs: list[str],
                   must_exist: bool = True) -> list[Path]:  # fmt: skip
    """Search order: ``data_dir`` (and sub-folders), ``$VF_DATA_DIR`` (and sub-folders), system locations.

    A ``data_dir`` that is not a directory raises :class:`DataDirError` (unless ``must_exist`` is False: a
    download target), rather than silently falling back to another copy of the data.
    """
    if data_dir and must_exist and not Path(data_dir).expanduser().is_dir():
        raise DataDirError(dataset, data_dir)
    roots: list[Path] = []
    for base in (data_dir, os.environ.get("VF_DATA_DIR")):
        if base:
            b = Path(base).expanduser()
            roots.append(b)
            roots.extend(b / s for s in subdirs)
    roots.extend(Path(p) for p in SYSTEM_DIRS.get(dataset, []))
    seen: list[Path] = []
    for r in roots:
        if r not in seen:
            seen.append(r)
    return seen


class DataFileError(ValueError):
    """A dataset file that is there but cannot be read (damaged, truncated, not the expected format): names it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"dataset file {str(path)!r} is damaged: {reason}; re-install or re-download it (Fashion-"
                         "MNIST: `make data`), or point data_dir at an intact copy")  # fmt: skip


def _open_idx(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataFileError(path, f"{type(e).__name__}: {e}") from e


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) as a uint8 tensor, checking its header; a damaged file raises
    :class:`DataFileError` naming it.

    A process reads each file once: the decoded array is kept (a few files, keyed by path, size and modification
    time, so a replaced file is read again) and every call returns a fresh copy. Decompressing Fashion-MNIST's
    training images takes ≈ 0.3 s, and a test session or a notebook sets up many data modules."""
    try:
        st = path.stat()
    except OSError as e:
        raise DataFileError(path, f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(_decoded_idx(path.resolve(), st.st_size, st.st_mtime_ns).copy())


@functools.lru_cache(maxsize=8)
def _decoded_idx(path: Path, size: int, mtime_ns: int) -> np.ndarray:
    """The checked, decoded contents of an IDX file (read-only; size and mtime only key the cache)."""
    raw = _open_idx(path)
    if len(raw) < 8:
        raise DataFileError(path, "not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataFileError(path, "not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataFileError(path, f"the header says {dims} but it holds {data.size} bytes (truncated download?)")
    data = data.reshape(dims)
    data.flags.writeable = False
    return data


def find_idx_split(folder: Path, split: str) -> tuple[Path, Path] | None:
    """Locate ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``folder``."""
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        hits = [folder / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        hit = next((h for h in hits if h.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]
