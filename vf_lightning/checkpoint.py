"""Standalone model checkpoints (config + weights) and loading of pair / model checkpoints.

A model checkpoint is a dict ``{"format": "vf-model", "version": 1, "model_config": {...},
"state_dict": {...}, "meta": {...}}`` written atomically; everything is loaded with
``weights_only=True``, after the CRCs of the file's zip records are verified, and weights holding NaN / inf
are refused.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vf_lightning.io import atomic_torch_save
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.statedict import ensure_biases

FORMAT = "vf-model"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not what was expected."""


def save_model_checkpoint(
    model: nn.Module, config: ModelConfig, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights with the config that rebuilds it (atomic: temp file, then rename)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": 1,
        "model_config": config.to_dict(),
        "state_dict": state,
        "meta": meta or {},
    }
    return atomic_torch_save(payload, path)


def verify_archive(path: str | Path) -> None:
    """Check the CRC of every record of a zip-format checkpoint (``torch.save`` writes zip archives).

    ``torch.load`` does not check them, so flipped bytes in the tensor data would load as wrong weights.
    Files that are not zip archives (legacy format) are left to ``torch.load``.
    """
    p = Path(path)
    if not zipfile.is_zipfile(p):
        return
    try:
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r} is damaged ({e}); re-export or re-train it") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(p)!r} is damaged: CRC mismatch in record {bad!r} (its bytes changed "
                              "after it was written); re-export or re-train it")  # fmt: skip


def check_finite(state: dict[str, Any], where: str) -> None:
    """Refuse weights or buffers holding NaN or inf, naming the checkpoint and the first such tensor."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(t.isfinite().all()):
            nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds non-finite values ({nan} NaN, {inf} inf); the "
                                  "training diverged or the file is damaged: use another checkpoint")  # fmt: skip


def _reason(e: Exception) -> str:
    """One line on why ``torch.load`` failed (a refused pickle says which global it wanted to run)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        what = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        return (f"it holds objects other than tensors and plain data, refused without running them (weights_only) "
                f"— it may be malicious; use checkpoints written by vf-lightning ({what.rstrip('.')})")
    if isinstance(e, (OSError, RuntimeError, EOFError)):  # a cut or overwritten archive
        return f"it is damaged or truncated ({lines[0] if lines else type(e).__name__}); re-export or re-train it"
    return lines[0] if lines else type(e).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict stored in ``path`` (zip CRCs verified, ``weights_only``); every failure is a one-line
    :class:`CheckpointError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (train it first, e.g. with `vf fit`)")
    verify_archive(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {str(p)!r}: {_reason(e)}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(p)!r} is not a vf-lightning checkpoint (got {type(obj).__name__})")
    return obj


def model_from_state(config: ModelConfig | dict[str, Any], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Build the architecture and load ``state`` strictly, naming what does not fit (or is not finite)."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    check_finite(state, where)
    model = build_model(cfg)
    ensure_biases(model, state)  # repaired models may carry extra conv biases
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{where}: weights do not fit architecture {cfg.arch!r} "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.eval()
    return model


def _model_from(obj: dict[str, Any], path: str | Path) -> tuple[nn.Module, ModelConfig]:
    if obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a vf-lightning model checkpoint (format {obj.get('format')!r}); "
            "for a Lightning checkpoint of a PairModule use load_pair"
        )
    cfg = ModelConfig.from_dict(obj["model_config"])
    return model_from_state(cfg, obj["state_dict"], str(path)), cfg


def _pair_from(obj: dict[str, Any], path: str | Path) -> tuple[nn.Module, nn.Module, ModelConfig]:
    hp = obj.get("hyper_parameters") or {}
    sd = obj.get("state_dict")
    if sd is None or "net" not in hp or not any(k.startswith("net_b.") for k in sd):
        raise CheckpointError(
            f"{str(path)!r} is not a PairModule checkpoint (expected hyper_parameters.net and net_a.*/net_b.* weights)"
        )
    cfg = ModelConfig.from_dict(hp["net"])
    nets = []
    for key in ("net_a.", "net_b."):
        part = {k[len(key) :]: v for k, v in sd.items() if k.startswith(key)}
        nets.append(model_from_state(cfg, part, f"{path} [{key[:-1]}]"))
    return nets[0], nets[1], cfg


def load_model_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Load a standalone model checkpoint written by :func:`save_model_checkpoint`."""
    return _model_from(read_checkpoint(path), path)


def load_pair(path: str | Path) -> tuple[nn.Module, nn.Module, ModelConfig]:
    """Networks A and B from a ``PairModule`` Lightning checkpoint (``.ckpt``) of ``vf fit``."""
    return _pair_from(read_checkpoint(path), path)


def load_networks(paths: list[str] | str) -> tuple[list[nn.Module], list[ModelConfig]]:
    """Load networks from one pair checkpoint or from one or more model checkpoints."""
    if isinstance(paths, str):
        paths = [paths]
    models, cfgs = [], []
    for p in paths:
        obj = read_checkpoint(p)  # each file is read once
        if len(paths) == 1 and obj.get("format") != FORMAT:
            a, b, cfg = _pair_from(obj, p)
            return [a, b], [cfg, cfg]
        m, c = _model_from(obj, p)
        models.append(m)
        cfgs.append(c)
    return models, cfgs


def load_expert(path: str | Path) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """A task expert or foundation: a vf model checkpoint, or a ClassifierModule / ExpertModule ``.ckpt``.

    Returns ``(model, config, meta)`` with ``meta = {"task", "classes", "foundation"}`` (``None`` where the
    checkpoint does not say): a model checkpoint's ``meta``, or an ``ExpertModule``'s hyper-parameters
    (``task``, ``classes``, ``foundation_name``). The model is on the CPU, in eval mode.
    """
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        if "model_config" not in obj or "state_dict" not in obj:
            raise CheckpointError(f"{str(path)!r} is a vf model checkpoint without model_config / state_dict; "
                                  "re-export it with save_model_checkpoint")
        config = ModelConfig.from_dict(obj["model_config"])
        state = dict(obj["state_dict"])
        stored = dict(obj.get("meta") or {})
    else:
        hp = obj.get("hyper_parameters") or {}
        state = {k[len("net.") :]: v for k, v in (obj.get("state_dict") or {}).items() if k.startswith("net.")}
        if "net" not in hp or not state:
            raise CheckpointError(
                f"{str(path)!r} is neither a vf model checkpoint nor a ClassifierModule / ExpertModule checkpoint "
                "(hyper_parameters.net and net.* weights); give experts exported by ExpertModule (export_path) "
                "or the .ckpt files of `vf fit`"
            )
        config = ModelConfig.from_dict(hp["net"])
        stored = {"task": hp.get("task"), "classes": hp.get("classes"), "foundation": hp.get("foundation_name")}
    meta = {key: stored.get(key) for key in ("task", "classes", "foundation")}
    return model_from_state(config, state, str(path)), config, meta
