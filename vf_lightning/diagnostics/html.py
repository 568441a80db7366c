"""A self-contained static HTML page of a run's report.json: tables and plots, readable offline.

Inline CSS, PNGs embedded as base64 data URIs, no scripts, no external resources; every text escaped. Each section
is an ``<h2>`` with a stable id (:data:`SECTION_IDS`) and is always present (a short note when the run has none).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vf_lightning.io import atomic_write_bytes

SECTION_IDS: tuple[str, ...] = ("endpoints", "alignment", "results", "interpolation", "variance-ratio", "timing",
                                "plots", "models", "config")  # fmt: skip
ROW_ORDER = ("network", "task", "method", "correction", "aligned", "matching", "pruner", "sparsity",
             "achieved_sparsity", "normalization", "preserved_layers", "alpha", "acc", "normalized_acc", "loss",
             "params_ratio", "flops_ratio", "seconds")  # fmt: skip
PLOT_TITLES = {"interpolation": "Interpolation curves", "variance_ratio": "Variance ratio per layer",
               "vanishing_feature": "Vanishing-feature profile", "accuracy": "Accuracy vs sparsity",
               "multitask_accuracy": "Multi-task normalized accuracy"}  # fmt: skip

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:78rem;
padding:0 1rem;color:#1d1d1f;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;
margin-top:2rem}h3{font-size:1rem;margin-bottom:.3rem}
nav a{margin-right:.8rem}p.meta{color:#555;margin-top:0}p.none{color:#777;font-style:italic}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0 1rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}td.best{font-weight:bold;background:#e6f4ea!important}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85rem}pre{background:#f6f6f6;padding:.6rem;overflow:auto;font-size:.8rem}
"""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    """A cell's text: floats with 4 digits (tiny ones in scientific notation), None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], best: str | None = None) -> str:
    """An HTML table of ``rows`` over ``columns``; the highest ``best`` value in bold."""
    top = max((r[best] for r in rows if best and _num(r.get(best))), default=None) if best else None
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = ["num"] if _num(v) else []
            if c == best and top is not None and v == top:
                cls.append("best")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of ``rows`` (scalar values only), in :data:`ROW_ORDER` first, then as first seen."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if not any(isinstance(r.get(k), dict) for r in rows)]
    return [k for k in ROW_ORDER if k in keys] + [k for k in keys if k not in ROW_ORDER]


def _none(text: str) -> str:
    return f'<p class="none">{html.escape(text)}</p>'


def _endpoints(report: Mapping[str, Any]) -> str:
    rows = [{"model": k, **v} for k, v in report.get("endpoints", {}).items() if isinstance(v, Mapping)]
    if isinstance(report.get("ensemble"), Mapping):
        rows.append({"model": "ensemble (output average)", **report["ensemble"]})
    cols = ["model", *(c for c in _columns(rows) if c != "model")]
    return _table(rows, cols) if rows else _none("No endpoint evaluations in this run.")


def _alignment(report: Mapping[str, Any]) -> str:
    rows = [{"matching": k, **v} for k, v in report.get("alignment", {}).items() if isinstance(v, Mapping)]
    if not rows:
        return _none("No alignment in this run.")
    first = ["matching", "self_check", "max_abs_logit_diff", "seconds", "groups", "sweeps", "objective"]
    cols = [c for c in first if any(c in r for r in rows)] + [c for c in _columns(rows) if c not in first]
    note = ("<p><b>self_check</b>: output change of a network under its own permutation (≈0 when the alignment is "
            "function-preserving); <b>max_abs_logit_diff</b>: aligned B against the original B.</p>")  # fmt: skip
    return note + _table(rows, cols)


def _row_kind(r: Mapping[str, Any]) -> str:
    if "task" in r:
        return "Multi-task merge"
    if "sparsity" in r:
        return "Pruning"
    if (r.get("preserved_layers") or 0) > 0:
        return "Partial merge (PFM)"
    return "Full merge"


def _results(report: Mapping[str, Any]) -> str:
    rows = [r for r in report.get("results", []) if isinstance(r, Mapping)]
    if not rows:
        return _none("No result rows in this run.")
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        kinds.setdefault(_row_kind(r), []).append(r)
    out = []
    for kind, group in kinds.items():
        best = "normalized_acc" if kind == "Multi-task merge" else "acc"
        out.append(f"<h3>{html.escape(kind)} ({len(group)} rows)</h3>" + _table(group, _columns(group), best))
    return "".join(out)


def _interpolation(report: Mapping[str, Any]) -> str:
    barrier = report.get("lmc", {}).get("barrier", {})
    rows = []
    for variant, b in barrier.items():
        matching, _, norm = str(variant).rpartition("/")
        rows.append({"variant": variant, "matching": matching or variant, "normalization": norm,
                     "acc_barrier": b.get("acc"), "loss_barrier": b.get("loss")})  # fmt: skip
    if not rows:
        return _none("No interpolation curves in this run.")
    note = "<p>Barrier: the largest drop (accuracy) or rise (loss) along the path below the endpoints' line.</p>"
    return note + _table(rows, ["variant", "matching", "normalization", "acc_barrier", "loss_barrier"])


def _curve_summary(curves: Mapping[str, Sequence[float | None]], what: str) -> list[dict[str, Any]]:
    rows = []
    for variant, ys in curves.items():
        finite = [float(y) for y in ys if y is not None and y == y]
        rows.append({"variant": variant, f"mean {what}": sum(finite) / len(finite) if finite else None,
                     f"min {what}": min(finite, default=None), f"last layer {what}": ys[-1] if ys else None,
                     "layers": len(ys)})  # fmt: skip
    return rows


def _variance(report: Mapping[str, Any]) -> str:
    out = []
    vr = report.get("variance_ratio", {}).get("curves", {})
    if vr:
        out.append("<p>std(model) / std(target) per layer at the inputs of the activations; 1 means no collapse."
                   "</p>" + _table(_curve_summary(vr, "ratio"), ["variant", "mean ratio", "min ratio",
                                                                 "last layer ratio", "layers"]))  # fmt: skip
    vf = report.get("vanishing_feature", {}).get("curves", {})
    if vf:
        out.append(
            "<h3>Vanishing-feature ratio</h3>"
            + _table(_curve_summary(vf, "E"), ["variant", "mean E", "min E", "last layer E", "layers"])
        )
    return "".join(out) or _none("No variance ratios in this run.")


def _timing(report: Mapping[str, Any]) -> str:
    rows = [{"phase": k, "seconds": v} for k, v in report.get("timing", {}).items()]
    return _table(rows, ["phase", "seconds"]) if rows else _none("No timings in this run.")


def _image(key: str, path: str | os.PathLike[str]) -> str:
    caption = html.escape(PLOT_TITLES.get(key, key))
    p = Path(path)
    if not p.is_file():
        return f'<figure><p class="none">{caption}: file {html.escape(p.name)} not found.</p></figure>'
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return (f'<figure id="plot-{html.escape(key)}"><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption} ({html.escape(p.name)})</figcaption></figure>")  # fmt: skip


def _plots(plots: Mapping[str, str | os.PathLike[str]]) -> str:
    return "".join(_image(k, p) for k, p in plots.items()) if plots else _none("No plots in this run.")


def _models(report: Mapping[str, Any]) -> str:
    rows = []
    for key, v in report.items():
        if key.endswith("_checkpoint") and isinstance(v, Mapping):
            rows.append({"model": key.removesuffix("_checkpoint"), "file": Path(str(v.get("path", ""))).name,
                         **{k: x for k, x in v.items() if k != "path"}})  # fmt: skip
    if not rows:
        return _none("No models saved by this run.")
    return "<p>Chosen on held-out validation data (val_acc); test_acc is the reported accuracy.</p>" + _table(
        rows, ["model", "file", *(c for c in _columns(rows) if c not in ("model", "file"))]
    )


def _config(report: Mapping[str, Any]) -> str:
    config = report.get("config")
    if not config:
        return _none("No configuration recorded.")
    text = json.dumps(config, indent=1, sort_keys=False, default=str)
    return f"<details><summary>resolved configuration</summary><pre>{html.escape(text)}</pre></details>"


SECTIONS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("endpoints", "Endpoints and ensemble", _endpoints),
    ("alignment", "Alignment", _alignment),
    ("results", "Results", _results),
    ("interpolation", "Interpolation barriers", _interpolation),
    ("variance-ratio", "Variance ratio", _variance),
    ("timing", "Timing (seconds)", _timing),
)


def render_report_html(report: Mapping[str, Any], plots: Mapping[str, str | os.PathLike[str]], title: str) -> str:
    """The page: one ``<h2 id=...>`` section per part of ``report`` and the ``plots`` (key → PNG path) inlined."""
    parts = [(sid, heading, fn(report)) for sid, heading, fn in SECTIONS]
    parts.insert(6, ("plots", "Plots", _plots(plots)))
    parts += [("models", "Saved models", _models(report)), ("config", "Configuration", _config(report))]
    nav = "".join(f'<a href="#{sid}">{html.escape(heading)}</a>' for sid, heading, _ in parts)
    body = "".join(f'<section><h2 id="{sid}">{html.escape(heading)}</h2>{content}</section>'
                   for sid, heading, content in parts)  # fmt: skip
    t = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{t}</title>'
        f"<style>{CSS}</style></head><body><h1>{t}</h1>"
        f'<p class="meta">vf_lightning run report (from report.json)</p><nav>{nav}</nav>{body}</body></html>\n'
    )


def report_title(report: Mapping[str, Any], default: str = "run") -> str:
    """The run's name: the config's ``run_name``, else a logger's ``name``, else ``default``."""
    config = report.get("config") or {}
    if config.get("run_name"):
        return str(config["run_name"])
    loggers = (config.get("trainer") or {}).get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        name = (lg.get("init_args") or {}).get("name") if isinstance(lg, Mapping) else None
        if name:
            return str(name)
    return default


def write_report_html(report: Mapping[str, Any], out_dir: str | os.PathLike[str], *, title: str | None = None,
                      name: str = "report.html") -> Path:  # fmt: skip
    """Write ``out_dir/report.html``; plots are looked up by file name in ``out_dir`` first (a staging directory
    before it is published), then at the path recorded in ``report["plots"]``."""
    out = Path(out_dir)
    plots = {}
    for key, p in (report.get("plots") or {}).items():
        beside = out / Path(str(p)).name
        plots[key] = beside if beside.is_file() else Path(str(p))
    default = out.resolve().name.split(".tmp-")[0]  # a staging directory is named <out_dir>.tmp-<pid>
    page = render_report_html(report, plots, title or f"{report_title(report, default)} — report")
    return atomic_write_bytes(page.encode("utf-8"), out / name)
