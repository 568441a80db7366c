"""The ``vf`` console script (also ``python -m vf_lightning``): :func:`vf_lightning.cli.main` in a process of its own.

Importing the command (torch, Lightning, torchmetrics, torchvision, scipy, W&B) leaves ≈ 740,000 objects that the
garbage collector tracks, and it ran seven full collections over them on the way (1.9 s of a 9.5 s import on 2
slow cores).
The import runs with the collector paused; what it created is then frozen (``gc.freeze``: out of the view of
later collections, 0.5 s less of collections in a ``vf prune`` run), and so is everything alive when the command
is done, which spares the interpreter's exit a full collection (2.7 s → 0.7 s). W&B is imported first
(:func:`vf_lightning.runtime.import_wandb_first`: ≈ 2 s less).
"""

from __future__ import annotations

import gc

gc.disable()  # what follows imports everything; an import error ends the process
from vf_lightning.runtime import import_wandb_first, skip_final_collection  # noqa: E402

import_wandb_first()
from vf_lightning import cli  # noqa: E402

gc.freeze()
gc.enable()


def main() -> None:
    """Run ``vf`` with this process's arguments; the process exits next."""
    cli.main()
    skip_final_collection()


if __name__ == "__main__":
    main()
