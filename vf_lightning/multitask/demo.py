"""End-to-end multi-task demo on Fashion-MNIST (CPU): train what is missing with ``vf fit``, then merge.

``python -m vf_lightning.multitask.demo [--setting nonlocal|local|all] [--force]`` trains the two foundations
(``configs/fit/fmnist_foundation_{a,b}.yaml``) and one expert per task (``configs/fit/fmnist_expert*.yaml``)
when their checkpoints are absent, then runs ``configs/merge/fmnist_{setting}.yaml`` through the multi-task
merge command (a thin adapter over :func:`vf_lightning.merge.multitask.merge_experts`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from vf_lightning.multitask import command

ROOT = Path(__file__).resolve().parents[2]
FIT = ROOT / "configs" / "fit"
MERGE = ROOT / "configs" / "merge"


def _fit(args: list[str]) -> None:
    from vf_lightning.cli import fit_cli

    fit_cli(["fit", *args])


def train_missing(setting: str, force: bool = False) -> None:
    """Train the foundations and the ``setting``'s experts listed in its merge config when their files are absent."""
    cfg = yaml.safe_load((MERGE / f"fmnist_{setting}.yaml").read_text())
    for name, path in cfg["foundations"].items():
        if force or not Path(path).is_file():
            print(f"[demo] training foundation {name} -> {path}", flush=True)
            _fit(["--config", str(FIT / f"fmnist_foundation_{name}.yaml")])
    base = FIT / ("fmnist_expert_local.yaml" if setting == "local" else "fmnist_expert.yaml")
    for i, e in enumerate(cfg["experts"]):
        if not force and Path(e["path"]).is_file():
            continue
        print(f"[demo] training expert {e['task']} (classes {e['classes']}, foundation {e['foundation']})", flush=True)
        classes = "[" + ",".join(str(c) for c in e["classes"]) + "]"
        _fit([
            "--config", str(base),
            f"--seed_everything={10 + i}",
            f"--model.init_args.task={e['task']}",
            f"--model.init_args.classes={classes}",
            f"--data.init_args.classes={classes}",
            f"--model.init_args.net.num_classes={len(e['classes'])}",
            f"--model.init_args.foundation={cfg['foundations'][e['foundation']]}",
            f"--model.init_args.foundation_name={e['foundation']}",
            f"--model.init_args.export_path={e['path']}",
            f"--model.init_args.seed={10 + i}",
            f"--data.init_args.seed={10 + i}",
        ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["nonlocal", "local", "all"], default="nonlocal")
    parser.add_argument("--force", action="store_true", help="retrain even when checkpoints exist")
    parser.add_argument("--no-wandb", action="store_true", help="skip W&B logging")
    args = parser.parse_args(argv)
    settings = ["nonlocal", "local"] if args.setting == "all" else [args.setting]
    for setting in settings:
        t0 = time.perf_counter()
        train_missing(setting, args.force)
        extra = []
        if args.no_wandb:
            extra.append("--wandb=false")
        command.main(["--config", str(MERGE / f"fmnist_{setting}.yaml"), *extra])
        print(f"[demo] {setting}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
