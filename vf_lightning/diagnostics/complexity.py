"""Parameter and FLOP counts (FLOPs from ``torch.utils.flop_counter``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vf_lightning.stats import eval_mode


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of (distinct) parameters; with ``nonzero`` only the non-zero entries (pruned models)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int((p != 0).sum()) if nonzero else p.numel()
    return total


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example_input`` (a multiply-add counts 2), in eval mode without grad."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example_input)
    return int(counter.get_total_flops())
