"""Weight matching (Git Re-Basin, method-spec §2): coordinate descent over groups with one LAP per group.

A group's cost matrix (in B's original unit order) depends only on the permutations of its neighbours, the
groups sharing a parameter with it; a group none of whose neighbours changed since it was last solved would
get the same assignment again, so it is skipped; of a group that is solved, only the cost terms of parameters
whose other permutations changed are recomputed. Cost matrices are built on the models' device, the LAP is
solved on CPU.
"""

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


def axis_dependencies(spec: PermutationSpec) -> list[list[set[int]]]:
    """Per group and axis, the groups whose permutations enter that axis's cost term (its neighbours).

    Those are the other groups permuting the same parameter; a group with two axes on one parameter depends
    on its own permutation there too and lists itself.
    """
    users: dict[str, list[int]] = {}
    for gi, g in enumerate(spec.groups):
        for ax in g.axes:
            users.setdefault(ax.key, []).append(gi)
    return [[{n for n in users[ax.key] if n != gi or users[ax.key].count(gi) > 1} for ax in g.axes]
            for gi, g in enumerate(spec.groups)]


def _device(state: Mapping[str, torch.Tensor], keys: list[str]) -> torch.device:
    return state[keys[0]].device if keys else torch.device("cpu")


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    max_sweeps: int = 100,
    tol: float = 1e-12,
    seed: int = 0,
    init_perms: Perms | None = None,
    skip_unchanged: bool = True,
) -> AlignmentResult:
    """Permutations of B maximising ``Σ_k ⟨θ_A^k, π(θ_B)^k⟩`` over all spec entries (BN running stats included).

    Groups are visited in a fresh random order per sweep (seeded); stops after the first sweep without an
    improvement larger than ``tol`` or after ``max_sweeps``. ``skip_unchanged`` skips groups whose neighbours
    did not change since they were last solved (same result as solving them; ``False``: plain coordinate
    descent). Costs are computed on the device of ``state_a``, in float32 products summed in float64.
    """
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    perms = {k: v.clone() for k, v in (init_perms or identity_perms(spec)).items()}
    keys = sorted({ax.key for g in spec.groups for ax in g.axes})
    dev = _device(state_a, keys)
    a = {k: state_a[k].detach().to(dev, torch.float32) for k in keys}
    # B with every current permutation applied; updated in place per solved group
    cur_b = permute_state_dict({k: state_b[k].detach().to(dev, torch.float32) for k in keys}, spec,
                               {k: v.to(dev) for k, v in perms.items()})
    a_mats = {(ax.key, ax.axis): _mat(a[ax.key], ax, g.size) for g in spec.groups for ax in g.axes}
    a_flat = {k: a[k].reshape(-1).double() for k in keys}
    deps = axis_dependencies(spec)
    changed_at = [-1] * len(spec.groups)  # step of each group's last permutation change
    solved_at = [0] * len(spec.groups)  # step at which each group was last solved (0: never)
    # per (group, axis): its cost term in B's original unit order and the step it was computed at
    terms: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    step = 0

    def objective() -> float:
        return float(sum(torch.dot(a_flat[k], cur_b[k].reshape(-1).double()) for k in keys))

    def term(gi: int, ai: int, old_dev: torch.Tensor) -> torch.Tensor:
        """``<A_i, B_j>`` over one axis of group ``gi``, in B's original order (cached while its inputs hold)."""
        cached = terms.get((gi, ai))
        if skip_unchanged and cached is not None and all(changed_at[n] < cached[1] for n in deps[gi][ai]):
            return cached[0]
        g = spec.groups[gi]
        ax = g.axes[ai]
        t = torch.empty(g.size, g.size, dtype=torch.float64, device=dev)
        t[:, old_dev] = (a_mats[(ax.key, ax.axis)] @ _mat(cur_b[ax.key], ax, g.size).t()).double()
        terms[(gi, ai)] = (t, step)
        return t

    history = [objective()]
    sweeps = 0
    for _ in range(max_sweeps):
        sweeps += 1
        progress = False
        for gi in torch.randperm(len(spec.groups), generator=gen).tolist():
            step += 1
            if skip_unchanged and solved_at[gi] > 0 and all(changed_at[n] < solved_at[gi]
                                                            for n in set().union(*deps[gi])):
                continue
            solved_at[gi] = step
            g = spec.groups[gi]
            old = perms[g.name]
            old_dev = old.to(dev)
            cost = torch.zeros(g.size, g.size, dtype=torch.float64, device=dev)
            for ai in range(len(g.axes)):
                cost += term(gi, ai, old_dev)  # cost[i, j] = <A_i, B_j> in B's original unit order
            cost_cpu = cost.cpu()
            new = solve_lap(cost_cpu)
            old_l = float(cost_cpu[torch.arange(g.size), old].sum())
            new_l = float(cost_cpu[torch.arange(g.size), new].sum())
            if new_l > old_l + tol:
                progress = True
                changed_at[gi] = step
                rel = invert_perm(old)[new].to(dev)
                for ax in g.axes:
                    cur_b[ax.key] = cur_b[ax.key].index_select(ax.axis, expand_index(rel, ax.inner))
                perms[g.name] = new
        if not progress:  # nothing changed: the objective is the last one
            history.append(history[-1])
            break
        history.append(objective())
    return AlignmentResult(method="weight", spec=spec, perms=perms, objective=history[-1], sweeps=sweeps,
                           seconds=time.perf_counter() - t0, history=tuple(history))
