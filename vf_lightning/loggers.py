"""Loggers: Lightning's WandbLogger that stays offline unless W&B is set up on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = ".",
        project: str = "vf-lightning",
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            offline=resolve_offline(offline),
            log_model=log_model,
            **kwargs,
        )
