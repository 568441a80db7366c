"""Accuracy and mean cross-entropy of a classifier over a loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vf_lightning.stats import eval_mode, model_device


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    raise TypeError(f"evaluate needs (x, y) batches or dicts with 'x' and 'y', got {type(batch).__name__}")


def evaluate(
    model: nn.Module,
    loader: Iterable[object],
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> dict[str, float]:
    """``{"acc", "loss"}``: top-1 accuracy as a fraction in [0, 1] and mean cross-entropy, in eval mode.

    ``device`` defaults to the model's device; the model's train/eval mode is restored afterwards.
    """
    return _evaluate(model, loader, device, max_samples, heads=False)[0]


def evaluate_heads(
    model: nn.Module,
    loader: Iterable[object],
    device: torch.device | str | None = None,
    max_samples: int | None = None,
) -> list[dict[str, float]]:
    """:func:`evaluate` for a model whose forward returns a list of logits tensors (several models sharing part
    of their computation, e.g. :class:`vf_lightning.merge.pfm.PFMGroup`): one ``{"acc", "loss"}`` per output, each
    batch moved and run once."""
    return _evaluate(model, loader, device, max_samples, heads=True)


def _evaluate(model: nn.Module, loader: Iterable[object], device: torch.device | str | None, max_samples: int | None,
              heads: bool) -> list[dict[str, float]]:  # fmt: skip
    dev = torch.device(device) if device is not None else model_device(model)
    correct: list[int] = []
    loss_sum: list[float] = []
    n = 0
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            x, y = _split_batch(batch)
            if max_samples is not None:
                if n >= max_samples:
                    break
                x, y = x[: max_samples - n], y[: max_samples - n]
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            out = model(x)
            outputs = list(out) if heads else [out]
            if not correct:
                correct, loss_sum = [0] * len(outputs), [0.0] * len(outputs)
            for i, logits in enumerate(outputs):
                loss_sum[i] += F.cross_entropy(logits.float(), y, reduction="sum").item()
                correct[i] += int((logits.argmax(1) == y).sum().item())
            n += y.shape[0]
    if n == 0:
        raise ValueError("evaluate got an empty loader; pass a loader with at least one batch")
    return [{"acc": c / n, "loss": s / n} for c, s in zip(correct, loss_sum)]
