"""Weight matching (Git Re-Basin, method-spec §2): coordinate descent over groups with one LAP per group."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from vf_lightning.align.permute import Perms, expand_index, identity_perms, invert_perm, permute_state_dict
from vf_lightning.align.results import AlignmentResult
from vf_lightning.align.spec import PermAxis, PermutationSpec


def _mat(t: torch.Tensor, ax: PermAxis, size: int) -> torch.Tensor:
    """``t`` with ``ax`` moved to the front, as ``size × rest`` (blocks of ``inner`` stay with their unit)."""
    return t.movedim(ax.axis, 0).reshape(size, -1)


def solve_lap(cost: torch.Tensor) -> torch.Tensor:
    """Column index per row maximising ``Σ cost[i, col[i]]`` (scipy, on CPU in float64)."""
    _, col = linear_sum_assignment(cost.detach().cpu().to(torch.float64).numpy(), maximize=True)
    return torch.from_numpy(np.asarray(col, dtype=np.int64))


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    max_sweeps: int = 100,
    tol: float = 1e-12,
    seed: int = 0,
    init_perms: Perms | None = None,
) -> AlignmentResult:
    """Permutations of B maximising ``Σ_k ⟨θ_A^k, π(θ_B)^k⟩`` over all spec entries (BN running stats included).

    Groups are visited in a fresh random order per sweep (seeded); stops after the first sweep without an
    improvement larger than ``tol`` or after ``max_sweeps``.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    perms = {k: v.clone() for k, v in (init_perms or identity_perms(spec)).items()}
    keys = sorted({ax.key for g in spec.groups for ax in g.axes})
    a = {k: state_a[k].detach().cpu().float() for k in keys}
    # B with every current permutation applied; updated in place per solved group
    cur_b = permute_state_dict({k: state_b[k].detach().cpu().float() for k in keys}, spec, perms)
    a_mats = {(ax.key, ax.axis): _mat(a[ax.key], ax, g.size) for g in spec.groups for ax in g.axes}

    def objective() -> float:
        return float(sum(torch.dot(a[k].reshape(-1).double(), cur_b[k].reshape(-1).double()) for k in keys))

    history = [objective()]
    sweeps = 0
    for _ in range(max_sweeps):
        sweeps += 1
        progress = False
        for gi in torch.randperm(len(spec.groups), generator=gen).tolist():
            g = spec.groups[gi]
            cost_cur = torch.zeros(g.size, g.size, dtype=torch.float64)
            for ax in g.axes:
                cost_cur += (a_mats[(ax.key, ax.axis)] @ _mat(cur_b[ax.key], ax, g.size).t()).double()
            old = perms[g.name]
            cost = torch.empty_like(cost_cur)
            cost[:, old] = cost_cur  # cost[i, j] = <A_i, B_j> in B's original unit order
            new = solve_lap(cost)
            old_l = float(cost_cur.diagonal().sum())
            new_l = float(cost[torch.arange(g.size), new].sum())
            if new_l > old_l + tol:
                progress = True
                rel = invert_perm(old)[new]
                for ax in g.axes:
                    cur_b[ax.key] = cur_b[ax.key].index_select(ax.axis, expand_index(rel, ax.inner))
                perms[g.name] = new
        history.append(objective())
        if not progress:
            break
    return AlignmentResult(method="weight", spec=spec, perms=perms, objective=history[-1], sweeps=sweeps,
                           seconds=time.perf_counter() - t0, history=tuple(history))
