"""report.html: a self-contained page with every section, inlined plots and escaped text; renders in Chromium."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from vf_lightning.diagnostics import (
    plot_interpolation_curves,
    plot_prune_accuracy,
    plot_variance_ratios,
    render_report_html,
    write_report_html,
)
from vf_lightning.diagnostics.html import SECTION_IDS

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}
HOSTILE = '<script>alert("x")</script>&'
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).is_file()), None)


class Page(HTMLParser):
    """Strict structure of a page: tags nest and close, h2 ids in order, image sources, links, text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.h2_ids: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            self.attrs.append((tag, name, value or ""))
            if name == "id":
                if value in self.ids:
                    self.errors.append(f"duplicate id {value}")
                self.ids.add(value or "")
        if tag == "h2":
            self.h2_ids.append(dict(attrs).get("id") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _report(tmp: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """A small synthetic report.json (merge, PFM, prune and multi-task rows) and its plots drawn into ``tmp``."""
    alphas = [0.0, 0.5, 1.0]
    curves = {f"{m}/{n}": {"acc": [0.9, 0.4 if n == "none" else 0.8, 0.9], "loss": [0.3, 2.0, 0.3]}
              for m in ("identity", "weight") for n in ("none", "reset")}  # fmt: skip
    layers = ["features.1", "features.5", "classifier"]
    vr = {"identity/none": [0.7, 0.3, 0.1], "identity/reset": [1.0, 0.99, 0.98], HOSTILE: [0.5, None, 0.2]}
    merge = {"matching": "weight", "normalization": "reset", "preserved_layers": 0, "alpha": 0.5, "acc": 0.85,
             "loss": 0.4, "params_ratio": 1.0, "flops_ratio": 1.0, "seconds": 1.5}  # fmt: skip
    prune = [{"network": "a", "pruner": "magnitude", "sparsity": s, "achieved_sparsity": s, "normalization": n,
              "acc": 0.9 - s * (0.5 if n == "none" else 0.2), "loss": 0.3, "params_ratio": 1 - s, "flops_ratio": 1.0,
              "seconds": 0.1} for s in (0.0, 0.5, 0.9) for n in ("none", "reset")]  # fmt: skip
    report: dict[str, Any] = {
        "config": {"run_name": f"demo {HOSTILE}", "note": "see https://example.org"},
        "endpoints": {"a": {"acc": 0.9, "loss": 0.3}, "b": {"acc": 0.91, "loss": 0.29}},
        "ensemble": {"acc": 0.92, "loss": 0.25},
        "alignment": {
            "weight": {
                "matching": "weight",
                "groups": 8,
                "seconds": 0.1,
                "sweeps": 3,
                "max_abs_logit_diff": 6e-6,
                "self_check": 2e-6,
            }
        },  # fmt: skip
        "lmc": {
            "alphas": alphas,
            "curves": curves,
            "barrier": {k: {"acc": 0.5 if k.endswith("none") else 0.1, "loss": 1.7} for k in curves},
        },
        "variance_ratio": {"layers": layers, "curves": vr},
        "results": [
            merge,
            {**merge, "preserved_layers": 2, "acc": 0.9, "params_ratio": 1.2},
            *prune,
            {
                "task": "t1",
                "method": "average",
                "correction": "repair",
                "aligned": True,
                "acc": 0.7,
                "normalized_acc": 0.8,
            },
        ],  # fmt: skip
        "timing": {"matching": 0.1, "evaluation": 2.5},
        "merged_checkpoint": {
            "path": "/somewhere/else/merged.pt",
            "variant": "weight/reset",
            "val_acc": 0.86,
            "test_acc": 0.85,
        },  # fmt: skip
    }
    plots = {
        "interpolation": plot_interpolation_curves(alphas, curves, tmp / "lmc.png", run_name="demo"),
        "variance_ratio": plot_variance_ratios(layers, vr, tmp / "variance_ratio.png", run_name="demo"),
        "accuracy": plot_prune_accuracy(prune, tmp / "accuracy.png", dense=0.9, run_name="demo"),
    }
    report["plots"] = {k: f"/somewhere/else/{p.name}" for k, p in plots.items()}  # as ReportWriter records them
    return report, plots


def _parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def test_page_has_every_section_inlined_images_and_no_external_resources(tmp_path: Path) -> None:
    report, plots = _report(tmp_path)
    page = render_report_html(report, plots, "demo run")
    assert page.startswith("<!DOCTYPE html>")
    doc = _parse(page)
    assert doc.h2_ids == list(SECTION_IDS)
    assert {"results", "alignment", "endpoints", "interpolation", "variance-ratio", "timing", "plots"} <= set(
        SECTION_IDS
    )
    srcs = [v for tag, name, v in doc.attrs if tag == "img" and name == "src"]
    assert len(srcs) == len(plots)
    for src in srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"
    for tag, name, value in doc.attrs:
        assert not value.lower().startswith(("http:", "https:", "//", "file:")), (tag, name, value)
        if name == "href":
            assert value.startswith("#") and value[1:] in doc.ids
    assert not {"script", "link", "iframe", "object", "embed"} & set(doc.tags)
    text = " ".join(doc.text)
    for heading in ("Full merge (1 rows)", "Partial merge (PFM) (1 rows)", "Pruning (6 rows)", "Multi-task merge"):
        assert heading in text
    assert "weight/reset" in text and "magnitude" in text and "evaluation" in text and "merged" in text
    assert HOSTILE in text  # shown as text, escaped: no script element above


def test_write_report_html_finds_plots_beside_it_and_names_the_run(tmp_path: Path) -> None:
    report, _ = _report(tmp_path)
    path = write_report_html(report, tmp_path)
    assert path == tmp_path / "report.html"
    doc = _parse(path.read_text(encoding="utf-8"))
    assert sum(1 for tag, name, _ in doc.attrs if tag == "img" and name == "src") == 3  # found in tmp_path by name
    assert f"demo {HOSTILE} — report" in "".join(doc.text)
    empty = _parse(render_report_html({}, {}, "empty"))  # an empty report still has every section
    assert empty.h2_ids == list(SECTION_IDS) and "img" not in empty.tags


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    report, _ = _report(tmp_path)
    path = write_report_html(report, tmp_path)
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", path.as_uri()]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True).stdout
    doc = _parse(out)
    assert [i for i in doc.h2_ids] == list(SECTION_IDS), out[:500]
    assert sum(1 for tag, name, v in doc.attrs if tag == "img" and name == "src" and v.startswith("data:")) == 3
    assert "script" not in doc.tags
