"""The ``vf`` command: ``fit`` / ``validate`` / ``test`` (LightningCLI) and ``merge`` / ``prune``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

USAGE = """usage: vf {fit,validate,test,merge,prune} [--config FILE.yaml] [options]

vf-lightning: train base models, then align, merge, repair and prune them without retraining.

commands:
  fit        train a model or a pair of models (LightningCLI; configs in configs/fit/)
  validate   evaluate a checkpoint on the validation data
  test       evaluate a checkpoint on the test data
  merge      align + merge + normalize two trained networks, write report.json (configs/merge/)
  prune      one-shot prune a trained network with post-pruning normalization (configs/prune/)

`vf COMMAND --help` lists every option; every option also works from YAML; `--print_config` prints one.
"""


class VFLightningCLI(LightningCLI):
    """LightningCLI with vf-lightning defaults (config saved with every run, overwriting allowed)."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("--run_name", type=str, default=None, help="name of the run (informational)")

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a bad value becomes a one-line usage error, not a traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:
            parser = self._parser(self.subcommand)
            parser.error(f"invalid configuration: {e}".split("\nGiven value")[0])


def fit_cli(args: Sequence[str] | None) -> None:
    """Run the LightningCLI for ``fit``/``validate``/``test``/``predict`` (``args=None``: from ``sys.argv``)."""
    VFLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=None if args is None else list(args),
        auto_configure_optimizers=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``vf`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd = args[0]
    if cmd in ("fit", "validate", "test", "predict"):
        fit_cli(None if argv is None else args)
    elif cmd in ("merge", "prune"):
        from vf_lightning import commands

        commands.run(cmd, args[1:])
    else:
        print(f"vf: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
