"""Loggers: Lightning's WandbLogger that stays offline unless W&B is set up on this machine, and a CSVLogger whose
folder, like the W&B one, follows the run directory (``save_dir: null``, filled in by ``vf``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_configured() -> bool:
    """True when W&B credentials exist (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_offline(offline: bool | None) -> bool:
    """``offline=None`` → honour ``WANDB_MODE`` if set, else offline unless W&B credentials exist."""
    if offline is not None:
        return offline
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    return not wandb_configured()


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline: null`` meaning auto (offline without W&B credentials).

    Offline runs are written under ``save_dir/wandb/`` and can be uploaded later with ``wandb sync``.
    ``save_dir: null`` (and ``name: null``): the run directory (and the run's name) under ``vf``, else ``.``.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        project: str = "vf-lightning",
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        save_dir = save_dir or "."
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            offline=resolve_offline(offline),
            log_model=log_model,
            **kwargs,
        )


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (``<save_dir>/<name>/version_<n>/metrics.csv``) with ``save_dir: null`` meaning the
    run directory under ``vf`` (else ``.``)."""

    def __init__(self, save_dir: str | None = None, name: str | None = "csv", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:  # fmt: skip
        super().__init__(save_dir=save_dir or ".", name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)  # fmt: skip
