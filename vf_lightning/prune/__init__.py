"""One-shot pruning (global / layer-wise magnitude, diagonal Fisher) and post-pruning normalization."""

from vf_lightning.prune.normalize import PruneResult, normalize_pruned, prune_and_normalize
from vf_lightning.prune.pruners import (
    PRUNERS,
    diag_fisher,
    get_pruner,
    prunable_modules,
    prune_model,
    register_pruner,
    sparsity_report,
)

__all__ = [
    "PRUNERS",
    "PruneResult",
    "diag_fisher",
    "get_pruner",
    "normalize_pruned",
    "prunable_modules",
    "prune_and_normalize",
    "prune_model",
    "register_pruner",
    "sparsity_report",
]
