"""Markdown tables of a multi-task ``vf merge`` report (docs/results_multitask.md): experts (accuracy, distance
from the foundation, loss barrier from the linear-probe model, read from the exported experts), mean normalized
accuracy per (aligned, method) × correction, and the variance ratio per layer none → REPAIR → TACT.

    python benchmarks/multitask_tables.py configs/merge/fmnist_nonlocal.yaml configs/merge/fmnist_local.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml


def tables(config_path: Path) -> list[str]:
    """The tables of the report that the merge config ``config_path`` wrote (its ReportWriter's out_dir)."""
    config = yaml.safe_load(config_path.read_text())
    writer = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ReportWriter"))
    out_dir = Path(writer["init_args"]["out_dir"])
    report = json.loads((out_dir / "report.json").read_text())
    paths = {e["task"]: e["path"] for e in config["model"]["init_args"]["experts"]}
    lines = [f"Experts ({out_dir.name}):", "", "| task | foundation | test acc | distance | barrier |",
             "|---|---|---|---|---|"]
    for e in report["experts"]:
        meta = torch.load(paths[e["task"]], weights_only=True).get("meta", {})
        barrier = f"{meta['barrier']:.3f}" if "barrier" in meta else "–"
        lines.append(f"| {e['task']} | {e['foundation']} | {e['acc']:.3f} | {e['distance']:.3f} | {barrier} |")
    summary = {(s["aligned"], s["method"], s["correction"]): s for s in report["multitask_summary"]}
    layers = report["variance_ratio"]["layers"]
    curves = report["variance_ratio"]["curves"]
    lines += ["", "| aligned | method | none | REPAIR | TACT | TACT − none | VR per layer: none → REPAIR → TACT |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for aligned in (True, False):
        for method in dict.fromkeys(m for _, m, _ in summary):
            if (aligned, method, "none") not in summary:
                continue
            acc = {c: summary[(aligned, method, c)]["mean_normalized_acc"] for c in ("none", "repair", "tact")}
            key = "aligned" if aligned else "unaligned"
            vr = " → ".join(" / ".join(f"{v:.2f}" for v in curves[f"{method}/{c}/{key}"])
                            for c in ("none", "repair", "tact"))  # fmt: skip
            lines.append(f"| {'yes' if aligned else 'no'} | {method} | {acc['none']:.3f} | {acc['repair']:.3f} | "
                         f"{acc['tact']:.3f} | {acc['tact'] - acc['none']:+.3f} | {vr} |")
    lines += ["", f"Layers: {', '.join(layers)}. Timing (s): " +
              ", ".join(f"{k} {v:.0f}" for k, v in report.get("timing", {}).items())]  # fmt: skip
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(tables(Path(arg))), "\n", sep="")
