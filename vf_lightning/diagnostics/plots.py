"""PNG plots (matplotlib, Agg backend) of per-layer curves, interpolation curves and pruning accuracy.

Variants are keyed ``"<matching>/<normalization>"`` (prune: ``"<pruner>/<sparsity>/<normalization>"``): the part
before the last ``/`` picks the colour, the normalization the line style and marker, so lines that coincide still
show. Legends sit outside the data area; an optional ``run_name`` is appended to every title.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from vf_lightning.diagnostics.vanishing import envelope  # noqa: E402
from vf_lightning.io import atomic_write_bytes  # noqa: E402

LINESTYLES: tuple[str | tuple[int, tuple[int, ...]], ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)),
                                                             (0, (1, 3)), (0, (8, 3)))  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MAX_NAMED_LAYERS = 40  # more layers than this: indices on the x axis
MAX_LAYER_NAME = 20  # a longer layer name: indices on the x axis


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def _title(text: str, run_name: str) -> str:
    return f"{text} — {run_name}" if run_name and text else (run_name or text)


def _suptitle(fig: plt.Figure, text: str) -> None:
    """A figure title above the panels' own titles (not on top of them)."""
    fig.suptitle(text, y=1.02)


def _floats(ys: Iterable[float | None]) -> list[float]:
    """Values as floats, missing ones (None in report.json) as NaN (a gap in the line)."""
    return [float("nan") if y is None else float(y) for y in ys]


def split_variant(key: str) -> tuple[str, str]:
    """``"<group>/<normalization>"`` → ``(group, normalization)``; a key without ``/`` is its own group."""
    group, sep, norm = key.rpartition("/")
    return (group, norm) if sep else (key, "")


def _norm_style(i: int) -> dict[str, Any]:
    """Line style and marker of the ``i``-th normalization: hollow every other one and smaller, so coinciding points
    still show."""
    return {"ls": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)],
            "fillstyle": "full" if i % 2 == 0 else "none", "ms": max(2.5, 5.5 - 1.5 * i)}  # fmt: skip


class _Styles:
    """Colour per group (matching, pruner), line style and marker per normalization, assigned in order seen."""

    def __init__(self, keys: Iterable[str]) -> None:
        parts = [split_variant(k) for k in keys]
        self.groups = list(dict.fromkeys(g for g, _ in parts))
        self.norms = list(dict.fromkeys(n for _, n in parts))
        cmap = plt.get_cmap("tab10" if len(self.groups) <= 10 else "tab20")
        self.colours = {g: cmap(i % cmap.N) for i, g in enumerate(self.groups)}

    def of(self, key: str) -> dict[str, Any]:
        group, norm = split_variant(key)
        i = self.norms.index(norm)
        return {"color": self.colours[group], **_norm_style(i)}

    def legend(self, ax: Axes, group_title: str, extra: Sequence[Line2D] = ()) -> None:
        """Two legends right of ``ax``: colours (``group_title``) above, normalizations (line styles) below."""
        handles = [Line2D([], [], color=self.colours[g], lw=2.5, label=g) for g in self.groups]
        norms = [n for n in self.norms if n]
        title = group_title if norms else "variant"
        first = ax.legend(handles=[*handles, *extra], title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                          fontsize=8, title_fontsize=8, frameon=False)  # fmt: skip
        if not norms:
            return
        ax.add_artist(first)
        first.set_clip_on(False)  # add_artist clips to the axes: a clipped legend is left out of the tight bbox
        # the first legend's size, to put the second below it (its own layout, not a draw of the whole figure)
        box = first.get_window_extent().transformed(ax.transAxes.inverted())
        styles = [Line2D([], [], color="0.3", label=n, **_norm_style(i)) for i, n in enumerate(self.norms)]
        ax.legend(handles=styles, title="normalization", loc="upper left", bbox_to_anchor=(1.02, box.y0 - 0.03),
                  fontsize=8, title_fontsize=8, frameon=False, handlelength=3)  # fmt: skip


def _group_title(keys: Iterable[str]) -> str:
    """``"matching"``, or ``"pruner / sparsity"`` for prune keys (three parts)."""
    return "pruner / sparsity" if any(k.count("/") >= 2 for k in keys) else "matching"


def _layer_axis(ax: Axes, n: int, layers: Sequence[str] | None) -> None:
    """Layer names as x tick labels when there are few and they are short, else integer layer indices."""
    names = list(layers) if layers is not None else []
    if names and len(names) == n and n <= MAX_NAMED_LAYERS and max(len(s) for s in names) <= MAX_LAYER_NAME:
        ax.set_xticks(range(n))
        if max(len(s) for s in names) <= 4:
            ax.set_xticklabels(names, fontsize=8)
        else:
            ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_xlabel("layer")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer index (execution order)")


def _curves_on(ax: Axes, curves: Mapping[str, Sequence[float]], styles: _Styles,
               x: Sequence[float] | None = None) -> None:  # fmt: skip
    for name, ys in curves.items():
        vals = _floats(ys)
        ax.plot(list(x) if x is not None else range(len(vals)), vals, lw=1.4, label=name,
                **styles.of(name))  # fmt: skip


def plot_layer_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    ylabel: str,
    title: str = "",
    layers: Sequence[str] | None = None,
    reference: float | None = None,
    *,
    x: Sequence[float] | None = None,
    xlabel: str | None = None,
    log_y: bool = False,
    run_name: str = "",
) -> Path:
    """One line per variant over layer index (names from ``layers`` when short), or over numeric ``x``."""
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = _Styles(curves)
    _curves_on(ax, curves, styles, x)
    extra: list[Line2D] = []
    if reference is not None:
        ax.axhline(reference, color="0.4", ls="--", lw=1)
        extra.append(Line2D([], [], color="0.4", ls="--", lw=1, label=f"reference {reference:g}"))
    if x is None:
        _layer_axis(ax, max((len(v) for v in curves.values()), default=0), layers)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(title, run_name))
    ax.grid(alpha=0.3)
    styles.legend(ax, _group_title(curves), extra)
    return _save(fig, path)


def plot_variance_ratios(
    layers: Sequence[str],
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    run_name: str = "",
) -> Path:
    """Variance ratio per layer for each variant (e.g. ``"weight/none"``) on a log axis, 1 (no collapse) dashed."""
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = _Styles(curves)
    _curves_on(ax, curves, styles)
    ax.axhline(1.0, color="0.4", ls="--", lw=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, ...: readable without 10^x
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    finite = [v for ys in curves.values() for v in _floats(ys) if math.isfinite(v) and v > 0]
    if finite:  # 1 always in view, and at least a factor 1.25 either side of it
        ax.set_ylim(min(min(finite) / 1.25, 0.8), max(max(finite) * 1.25, 1.25))
    _layer_axis(ax, len(layers), layers)
    ax.set_ylabel("variance ratio  std(model) / std(target)")
    ax.set_title(_title("Variance collapse per layer (1 = none)", run_name))
    ax.grid(alpha=0.3, which="both")
    styles.legend(ax, _group_title(curves), [Line2D([], [], color="0.4", ls="--", lw=1, label="no collapse (1)")])
    return _save(fig, path)


def plot_vf_profiles(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    with_envelope: bool = True,
    *,
    layers: Sequence[str] | None = None,
    run_name: str = "",
) -> Path:
    """Vanishing-feature ratios ``E^l`` per variant; their envelopes ``ε^l`` in a second panel of their own."""
    panels = 2 if with_envelope else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    styles = _Styles(curves)
    n = max((len(v) for v in curves.values()), default=0)
    _curves_on(axes[0][0], curves, styles)
    axes[0][0].set_ylabel("input-induced feature ratio $E^l$")
    axes[0][0].set_title("Vanishing-feature ratio per layer")
    if with_envelope:
        _curves_on(axes[0][1], {k: envelope(_floats(v)) for k, v in curves.items()}, styles)
        axes[0][1].set_ylabel("envelope $\\varepsilon^l$")
        axes[0][1].set_title("Envelope of the ratio")
    for ax in axes[0]:
        ax.axhline(1.0, color="0.4", ls="--", lw=1)
        _layer_axis(ax, n, layers)
        ax.grid(alpha=0.3)
    _suptitle(fig, _title("Vanishing features (1 = as the endpoints)", run_name))
    styles.legend(axes[0][-1], _group_title(curves))
    return _save(fig, path)


def plot_interpolation_curves(
    alphas: Sequence[float],
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    run_name: str = "",
) -> Path:
    """Accuracy and loss against α, one line per ``"<matching>/<normalization>"`` curve."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    styles = _Styles(curves)
    for name, curve in curves.items():
        for ax, key in ((ax_acc, "acc"), (ax_loss, "loss")):
            if key in curve:
                ax.plot(list(alphas), _floats(curve[key]), lw=1.4, label=name,
                        **styles.of(name))  # fmt: skip
    for ax, label in ((ax_acc, "test accuracy"), (ax_loss, "test loss")):
        ax.set_xlabel("interpolation weight α  (0 = model A, 1 = model B)")
        ax.set_ylabel(label)
        if all(0 <= a <= 1 for a in alphas):
            ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_acc.set_title("Accuracy along the path")
    ax_loss.set_title("Loss along the path")
    _suptitle(fig, _title("Linear interpolation between the endpoints", run_name))
    styles.legend(ax_loss, _group_title(curves))
    return _save(fig, path)


def plot_prune_accuracy(
    rows: Sequence[Mapping[str, object]],
    path: str | os.PathLike[str],
    *,
    dense: float | Mapping[str, float] | None = None,
    run_name: str = "",
) -> Path:
    """Test accuracy against sparsity (a numeric axis), one line per ``pruner/normalization``.

    ``rows`` are prune report rows (``pruner``, ``sparsity``, ``normalization``, ``acc``, optionally ``network``);
    ``dense`` is the dense accuracy (per network when a mapping), drawn as a dashed reference line.
    """
    networks = list(dict.fromkeys(str(r.get("network", "")) for r in rows))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        net = f"{r.get('network', '')}:" if len(networks) > 1 else ""
        key = f"{net}{r['pruner']}/{r['normalization']}"
        series.setdefault(key, []).append((float(r["sparsity"]), float(r["acc"])))  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = _Styles(series)
    for key, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, lw=1.4, label=key, **styles.of(key))
    extra: list[Line2D] = []
    refs = dense.items() if isinstance(dense, Mapping) else ([("", dense)] if dense is not None else [])
    for i, (name, acc) in enumerate(refs):
        ls = LINESTYLES[1 + i % (len(LINESTYLES) - 1)]
        ax.axhline(float(acc), color="black", ls=ls, lw=1)
        label = f"dense {name} ({acc:.3f})" if name else f"dense ({acc:.3f})"
        extra.append(Line2D([], [], color="black", ls=ls, lw=1, label=label))
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel("test accuracy")
    ax.set_xlim(left=min([0.0, *(x for pts in series.values() for x, _ in pts)]) - 0.02)
    ax.set_title(_title("Accuracy vs sparsity", run_name))
    ax.grid(alpha=0.3)
    styles.legend(ax, "network: pruner" if len(networks) > 1 else "pruner", extra)
    return _save(fig, path)


def plot_multitask_accuracy(
    rows: Sequence[Mapping[str, object]], path: str | os.PathLike[str], *, run_name: str = ""
) -> Path:
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
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.6 * len(methods)) * len(panels), 4), squeeze=False,
                             sharey=True)  # fmt: skip
    width = 0.8 / max(len(corrections), 1)
    for ax, aligned in zip(axes[0], panels):
        for j, corr in enumerate(corrections):
            ys = [sum(v) / len(v) if (v := means.get((aligned, m, corr))) else float("nan") for m in methods]
            ax.bar([i + (j - (len(corrections) - 1) / 2) * width for i in range(len(methods))], ys, width,
                   label=corr, color=plt.get_cmap("tab10")(j % 10))  # fmt: skip
        ax.axhline(1.0, color="0.4", ls="--", lw=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, fontsize=8)
        ax.set_xlabel("merging method")
        ax.set_title("aligned" if aligned else "unaligned")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("mean normalized accuracy (merged / expert)")
    axes[0][-1].legend(title="correction", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       frameon=False)  # fmt: skip
    _suptitle(fig, _title("Multi-task merge: normalized accuracy (1 = expert)", run_name))
    return _save(fig, path)
