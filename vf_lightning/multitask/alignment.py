"""Non-local alignment through the foundations (nonlocal-spec §3.2).

Weight matching is computed once between foundation A and foundation B (heads zeroed), then applied to
every expert derived from B: all body tensors and the input axis of its head. The anchor is the midpoint
of A and the aligned B. The matcher itself lives in :mod:`vf_lightning.align`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vf_lightning.models import build_model
from vf_lightning.multitask.network import Expert, StateDict, head_name, split_state

Perms = dict[str, torch.Tensor]


@dataclass
class Alignment:
    """Aligned experts, the anchor body and what the matching did."""

    anchor: StateDict
    experts: list[Expert]
    perms: Perms = field(default_factory=dict)
    seconds: float = 0.0
    groups: int = 0


def _weight_matching(spec: Any, state_a: StateDict, state_b: StateDict, seed: int) -> Perms:
    """Call the alignment engine's weight matching (permutations that bring B onto A)."""
    try:
        from vf_lightning.align import weight_matching  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(
            "vf_lightning.align.weight_matching is not available; non-local merging needs the alignment engine "
            "(set `align: false` to merge without alignment)"
        ) from e
    try:
        result = weight_matching(spec, state_a, state_b, seed=seed)
    except TypeError:
        result = weight_matching(spec, state_a, state_b)
    if isinstance(result, tuple):
        result = result[0]
    perms = getattr(result, "perms", result)
    if not isinstance(perms, dict):
        raise TypeError(f"weight_matching returned {type(result).__name__}; expected a dict of permutations")
    return perms


def align_through_foundations(
    foundation_a: Expert, foundation_b: Expert, experts: Sequence[Expert], example_input: torch.Tensor, seed: int = 0
) -> Alignment:
    """Permute every expert whose ``foundation`` is B onto A's basis (body and head input axis); anchor = midpoint."""
    from vf_lightning.align import build_permutation_spec, permute_state_dict

    net = build_model(foundation_a.config)
    head = head_name(net)
    net.load_state_dict(foundation_a.state)
    net = net.to(next(iter(foundation_a.state.values())).dtype)
    spec = build_permutation_spec(net, example_input.to(next(net.parameters()).dtype))

    def headless(state: StateDict) -> StateDict:
        return {k: torch.zeros_like(v) if k.startswith(head + ".") else v for k, v in state.items()}

    t0 = time.perf_counter()
    perms = _weight_matching(spec, headless(foundation_a.state), headless(foundation_b.state), seed)
    seconds = time.perf_counter() - t0
    b_aligned = permute_state_dict(foundation_b.state, spec, perms)
    body_a, _ = split_state(foundation_a.state, head)
    body_b, _ = split_state(b_aligned, head)
    anchor = {k: (v + body_b[k]) / 2 if torch.is_floating_point(v) else v.clone() for k, v in body_a.items()}
    out = []
    for e in experts:
        if e.foundation == foundation_b.name:
            out.append(replace(e, state=permute_state_dict(e.state, spec, perms)))
        elif e.foundation in (foundation_a.name, ""):
            out.append(e)
        else:
            raise ValueError(f"expert {e.name!r} names foundation {e.foundation!r}, which is neither "
                             f"{foundation_a.name!r} nor {foundation_b.name!r}")
    return Alignment(anchor, out, perms, seconds, len(spec))


def unaligned_anchor(foundations: Sequence[Expert]) -> StateDict:
    """Anchor without alignment: the plain mean of the foundations' bodies (one foundation: its body)."""
    head = head_name(build_model(foundations[0].config))
    bodies = [split_state(f.state, head)[0] for f in foundations]
    return {k: torch.stack([b[k] for b in bodies]).mean(0) if torch.is_floating_point(v) else v.clone()
            for k, v in bodies[0].items()}
