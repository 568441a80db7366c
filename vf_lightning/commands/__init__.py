"""Front-end commands ``vf merge`` and ``vf prune`` (jsonargparse over typed dataclass configs)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser


def _config_mode(args: Sequence[str]) -> str | None:
    """The top-level ``mode`` key of the ``--config`` YAML, if any (``multitask`` selects the expert merger)."""
    for i, a in enumerate(args):
        path = a.split("=", 1)[1] if a.startswith("--config=") else args[i + 1] if a == "--config" and i + 1 < len(
            args) else None  # fmt: skip
        if path and Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text()) or {}
            if isinstance(data, dict) and data.get("mode"):
                return str(data["mode"])
    return None


def _parse(prog: str, cls: type, args: Sequence[str], description: str) -> tuple[Any, ArgumentParser]:
    parser = ArgumentParser(prog=prog, description=description, default_config_files=[])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(cls, as_group=False)
    ns = parser.parse_args(list(args))
    init = parser.instantiate_classes(ns)
    kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "__path__")}
    try:
        return cls(**kwargs), parser
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # unreachable


def _guard(parser: ArgumentParser, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; configuration problems found while starting up become one-line errors (exit code 2)."""
    from vf_lightning.checkpoint import CheckpointError
    from vf_lightning.data import DataNotFoundError

    try:
        return fn()
    except (CheckpointError, DataNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _commands() -> dict[str, tuple[type, type, Callable[[Any], None], str]]:
    from vf_lightning.commands.merge import MergeConfig, MergeRun, print_summary
    from vf_lightning.commands.prune import PruneConfig, PruneRun, print_prune_summary

    return {
        "merge": (MergeConfig, MergeRun, print_summary, "Align, merge and repair two trained networks."),
        "prune": (PruneConfig, PruneRun, print_prune_summary, "One-shot prune a network, then re-normalize it."),
    }


def run(cmd: str, args: Sequence[str]) -> None:
    """Dispatch ``vf merge`` / ``vf prune`` (``mode: multitask`` in a merge config selects the expert merger)."""
    if cmd == "merge" and _config_mode(args) == "multitask":
        from vf_lightning.multitask.command import main as multitask_main

        multitask_main(list(args))
        return
    commands = _commands()
    if cmd not in commands:
        raise ValueError(f"unknown command {cmd!r}; choose one of {', '.join(commands)}")
    config_cls, runner_cls, summarize, description = commands[cmd]
    cfg, parser = _parse(f"vf {cmd}", config_cls, args, description)
    try:
        runner = _guard(parser, lambda: runner_cls(cfg))
    except ValueError as e:
        parser.error(str(e))
    summarize(runner.run())
    print(f"\nreport: {Path(cfg.out_dir) / 'report.json'}")
