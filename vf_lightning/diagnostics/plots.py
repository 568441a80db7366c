"""PNG plots (matplotlib, Agg backend) of per-layer curves and interpolation curves, written atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vf_lightning.diagnostics.vanishing import envelope  # noqa: E402
from vf_lightning.io import atomic_write_bytes  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def plot_layer_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    ylabel: str,
    title: str = "",
    layers: Sequence[str] | None = None,
    reference: float | None = None,
) -> Path:
    """One line per variant over layer index (tick labels from ``layers`` when given)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), list(ys), marker="o", ms=3, label=name)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1)
    if layers is not None:
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(list(layers), rotation=90, fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_variance_ratios(
    layers: Sequence[str], curves: Mapping[str, Sequence[float]], path: str | os.PathLike[str]
) -> Path:
    """Variance ratio per layer for each variant (e.g. ``"weight/none"``, ``"weight/repair"``)."""
    return plot_layer_curves(curves, path, "std(model) / std(target)", "Variance ratio per layer", layers, 1.0)


def plot_vf_profiles(
    curves: Mapping[str, Sequence[float]], path: str | os.PathLike[str], with_envelope: bool = True
) -> Path:
    """Vanishing-feature ratios ``E^l`` per variant, with their envelopes ``ε^l`` dashed."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, ys in curves.items():
        (line,) = ax.plot(range(len(ys)), list(ys), marker="o", ms=3, label=f"E {name}")
        if with_envelope:
            ax.plot(range(len(ys)), envelope(ys), ls="--", color=line.get_color(), label=f"ε {name}")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("input-induced feature ratio")
    ax.set_title("Vanishing feature profile")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_interpolation_curves(
    alphas: Sequence[float], curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike[str]
) -> Path:
    """Accuracy and loss against α, one line per ``"<matching>/<normalization>"`` curve."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        if "acc" in curve:
            ax_acc.plot(list(alphas), list(curve["acc"]), marker="o", ms=3, label=name)
        if "loss" in curve:
            ax_loss.plot(list(alphas), list(curve["loss"]), marker="o", ms=3, label=name)
    for ax, label in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("α")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Interpolation curves")
    return _save(fig, path)


def plot_multitask_accuracy(rows: Sequence[Mapping[str, object]], path: str | os.PathLike[str]) -> Path:
    """Mean normalized accuracy over tasks per method (groups) × correction (bars), aligned and unaligned.

    ``rows`` are multi-task report rows (``method``, ``correction``, ``aligned``, ``normalized_acc``).
    """
    means: dict[tuple[bool, str, str], list[float]] = {}
    for r in rows:
        key = (bool(r["aligned"]), str(r["method"]), str(r["correction"]))
        means.setdefault(key, []).append(float(r["normalized_acc"]))  # type: ignore[arg-type]
    methods = list(dict.fromkeys(m for _, m, _ in means))
    corrections = list(dict.fromkeys(c for _, _, c in means))
    panels = [a for a in (True, False) if any(k[0] == a for k in means)]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.6 * len(methods)) * len(panels), 4), squeeze=False)
    width = 0.8 / max(len(corrections), 1)
    for ax, aligned in zip(axes[0], panels):
        for j, corr in enumerate(corrections):
            ys = [sum(v) / len(v) if (v := means.get((aligned, m, corr))) else float("nan") for m in methods]
            ax.bar([i + (j - (len(corrections) - 1) / 2) * width for i in range(len(methods))], ys, width,
                   label=corr)  # fmt: skip
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, fontsize=8)
        ax.set_xlabel("merging method")
        ax.set_ylabel("mean normalized accuracy (merged / expert)")
        ax.set_title(f"Multi-task merge, {'aligned' if aligned else 'unaligned'}: normalized accuracy")
        ax.legend(title="correction", fontsize=8)
    return _save(fig, path)
