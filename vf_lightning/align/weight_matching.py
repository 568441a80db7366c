"""Weight matching (Git Re-Basin, method-spec §2): coordinate descent over groups with one LAP per group.

A group's cost matrix (in B's original unit order) depends only on the permutations of its neighbours, the
groups sharing a parameter with it; a group none of whose neighbours changed since it was last solved would
get the same assignment again, so it is skipped; of a group that is solved, only the cost terms of parameters
whose other permutations changed are brought up to date: when one neighbour moved few of its units (late sweeps
swap a handful), by adding ``<A, B_now - B_then>`` over the slices of those units (float64), otherwise by a new
float32 product over the whole parameter. Terms that only the group itself enters (its own rows, biases and
norm statistics) are one product of the concatenated matrices, computed once. Cost matrices are built on the
models' device, the LAP is solved on CPU.

Attention groups split into heads (:attr:`PermGroup.heads`) are solved together with the other groups of their
head set (:func:`solve_assignments`): for every pair of heads the within-head LAPs of each group, then one LAP
over heads on the summed within-head optima, which is exact for block-structured permutations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from vf_lightning.align.permute import (
    Perms,
    expand_index,
    head_perm,
    identity_perms,
    invert_perm,
    permute_axis,
    permute_state_dict,
)
from vf_lightning.align.results import AlignmentResult
from vf_lightning.align.spec import PermAxis, PermGroup, PermutationSpec

# a cost term whose one neighbour moved at most this fraction of its units is updated from the slices of those
# units (a float64 product over them) rather than recomputed (a float32 product over the whole contraction)
INCREMENTAL_FRACTION = 0.25


def _mat(t: torch.Tensor, ax: PermAxis, size: int) -> torch.Tensor:
    """The units of ``ax`` in ``t`` (its span of the axis) moved to the front, as ``size × rest``."""
    offset, length = ax.span(t.shape[ax.axis])
    return t.narrow(ax.axis, offset, length).movedim(ax.axis, 0).reshape(size, -1)


def solve_lap(cost: torch.Tensor) -> torch.Tensor:
    """Column index per row maximising ``Σ cost[i, col[i]]`` (scipy, on CPU in float64)."""
    _, col = linear_sum_assignment(cost.detach().cpu().to(torch.float64).numpy(), maximize=True)
    return torch.from_numpy(np.asarray(col, dtype=np.int64))


def head_sets(spec: PermutationSpec) -> list[list[int]]:
    """Indices of the groups solved together: each head set, and every other group on its own (graph order)."""
    units: list[list[int]] = []
    where: dict[str, int] = {}
    for gi, g in enumerate(spec.groups):
        if g.heads > 1:
            if g.head_set not in where:
                where[g.head_set] = len(units)
                units.append([])
            units[where[g.head_set]].append(gi)
        else:
            units.append([gi])
    return units


def solve_assignments(groups: list[PermGroup], costs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The permutation of each group maximising ``Σ cost[i, perm[i]]``; groups of one head set share their heads.

    A single plain group is one LAP. For a head set: ``V[h, h'] = Σ_groups`` (optimal within-head assignment of
    head ``h`` of A to head ``h'`` of B), one LAP over heads on ``V``, then each group's within-head assignments.
    """
    if len(groups) == 1 and groups[0].heads == 1:
        return [solve_lap(costs[0])]
    heads = groups[0].heads
    if any(g.heads != heads for g in groups):
        raise ValueError(f"groups {[g.name for g in groups]} share a head set but not a head count")
    total = torch.zeros(heads, heads, dtype=torch.float64)
    within: list[list[list[torch.Tensor]]] = []
    for g, cost in zip(groups, costs):
        c = cost.detach().cpu().to(torch.float64)
        d = g.head_dim
        blocks = c.reshape(heads, d, heads, d).permute(0, 2, 1, 3)  # [h, h', i, j]
        sol = [[solve_lap(blocks[h, k]) for k in range(heads)] for h in range(heads)]
        for h in range(heads):
            for k in range(heads):
                total[h, k] += blocks[h, k][torch.arange(d), sol[h][k]].sum()
        within.append(sol)
    order = solve_lap(total)
    return [head_perm(order, [sol[h][int(order[h])] for h in range(heads)]) for sol in within]


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


def other_axes(spec: PermutationSpec) -> dict[tuple[int, int], list[tuple[int, PermAxis]]]:
    """Per (group, axis index): the other axes of the same parameter, with the group permuting each."""
    on_key: dict[str, list[tuple[int, int, PermAxis]]] = {}
    for gi, g in enumerate(spec.groups):
        for ai, ax in enumerate(g.axes):
            on_key.setdefault(ax.key, []).append((gi, ai, ax))
    return {(gi, ai): [(n, nax) for n, na, nax in on_key[ax.key] if (n, na) != (gi, ai)]
            for gi, g in enumerate(spec.groups) for ai, ax in enumerate(g.axes)}


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

    ``objective`` is exact (float64 dot products of the final weights). ``history`` starts from the exact
    objective of ``init_perms`` and adds each sweep's assignment gains (read off the cost matrices, so to
    float32-product rounding) instead of re-taking every dot product after every sweep.
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
    a_mats = {(ax.key, ax.axis, ax.offset): _mat(a[ax.key], ax, g.size) for g in spec.groups for ax in g.axes}
    a_flat = {k: a[k].reshape(-1).double() for k in keys}
    dots: dict[str, torch.Tensor] = {}  # <A_k, B_k> per parameter, recomputed only once B_k was permuted
    dirty = set(keys)
    deps = axis_dependencies(spec)
    fixed: dict[int, torch.Tensor] = {}  # per group: the sum of its cost terms no other permutation enters
    changed_at = [-1] * len(spec.groups)  # step of each group's last permutation change
    solved_at = [0] * len(spec.groups)  # step at which each group was last solved (0: never)
    # per (group, axis): its cost term in B's original unit order and the neighbours' permutations it is for
    terms: dict[tuple[int, int], tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
    others = other_axes(spec)
    step = 0

    def objective() -> float:
        for k in dirty:
            dots[k] = torch.dot(a_flat[k], cur_b[k].reshape(-1).double())
        dirty.clear()
        return float(sum(dots[k] for k in keys))

    def b_mat(gi: int, ax: PermAxis, inv_old: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """``_mat`` of B's entry (or of ``t``, a slice of it) with this group's units in B's original order."""
        return _mat(cur_b[ax.key] if t is None else t, ax, spec.groups[gi].size).index_select(0, inv_old)

    def term(gi: int, ai: int, inv_old: torch.Tensor) -> torch.Tensor:
        """``<A_i, B_j>`` over one axis of group ``gi``, in B's original order (cached while the neighbours'
        permutations hold; updated from the slices of the units a neighbour moved when those are few)."""
        g = spec.groups[gi]
        ax = g.axes[ai]
        cached = terms.get((gi, ai))
        if skip_unchanged and cached is not None:
            t, seen = cached
            moved = [(n, nax) for n, nax in others[(gi, ai)] if not torch.equal(perms[spec.groups[n].name], seen[n])]
            if not moved:
                return t
            if len(moved) == 1 and moved[0][1].axis != ax.axis:
                n, nax = moved[0]
                now_p = perms[spec.groups[n].name]
                units = (now_p != seen[n]).nonzero().squeeze(1)
                if units.numel() <= INCREMENTAL_FRACTION * now_p.numel():
                    # only the slices of the neighbour's axis at the units it moved differ from when the term
                    # was computed: add <A, B_now - B_then> over them (the difference is exact in float64)
                    back = invert_perm(now_p)[seen[n]]
                    offset = nax.span(cur_b[ax.key].shape[nax.axis])[0]
                    now_idx = (offset + expand_index(units, nax.inner)).to(dev)
                    then_idx = (offset + expand_index(back[units], nax.inner)).to(dev)
                    diff = (b_mat(gi, ax, inv_old, cur_b[ax.key].index_select(nax.axis, now_idx)).double()
                            - b_mat(gi, ax, inv_old, cur_b[ax.key].index_select(nax.axis, then_idx)).double())
                    a_sub = _mat(a[ax.key].index_select(nax.axis, now_idx), ax, g.size).double()
                    t.addmm_(a_sub, diff.t())  # in place: ``cost`` holds a sum of the terms, not the term
                    terms[(gi, ai)] = (t, {**seen, n: now_p.clone()})
                    return t
        t = (a_mats[(ax.key, ax.axis, ax.offset)] @ b_mat(gi, ax, inv_old).t()).double()  # float32 products
        terms[(gi, ai)] = (t, {n: perms[spec.groups[n].name].clone() for n, _ in others[(gi, ai)]})
        return t

    def fixed_terms(gi: int, inv_old: torch.Tensor) -> torch.Tensor:
        """The sum of the terms of parameters only this group permutes (they never change): one product of the
        concatenated matrices."""
        g = spec.groups[gi]
        own = [ax for ai, ax in enumerate(g.axes) if not deps[gi][ai]]
        if not own:
            return torch.zeros(g.size, g.size, dtype=torch.float64, device=dev)
        a_cat = torch.cat([a_mats[(ax.key, ax.axis, ax.offset)] for ax in own], dim=1)
        return (a_cat @ torch.cat([b_mat(gi, ax, inv_old) for ax in own], dim=1).t()).double()

    history = [objective()]
    units = head_sets(spec)
    sweeps = 0
    for _ in range(max_sweeps):
        sweeps += 1
        progress, gain = False, 0.0
        for ui in torch.randperm(len(units), generator=gen).tolist():
            step += 1
            unit = units[ui]
            if skip_unchanged and all(solved_at[gi] > 0 and all(changed_at[n] < solved_at[gi]
                                                                for n in set().union(*deps[gi])) for gi in unit):
                continue
            groups = [spec.groups[gi] for gi in unit]
            costs = []
            for gi, g in zip(unit, groups):
                solved_at[gi] = step
                inv_old = invert_perm(perms[g.name]).to(dev)
                if gi not in fixed:
                    fixed[gi] = fixed_terms(gi, inv_old)
                cost = fixed[gi].clone()
                for ai in range(len(g.axes)):
                    if deps[gi][ai]:
                        cost += term(gi, ai, inv_old)  # cost[i, j] = <A_i, B_j> in B's original unit order
                costs.append(cost.cpu())
            news = solve_assignments(groups, costs)
            rows = [torch.arange(g.size) for g in groups]
            old_l = sum(float(c[r, perms[g.name]].sum()) for g, c, r in zip(groups, costs, rows))
            new_l = sum(float(c[r, n].sum()) for c, r, n in zip(costs, rows, news))
            if new_l > old_l + tol:
                progress, gain = True, gain + (new_l - old_l)
                for gi, g, new in zip(unit, groups, news):
                    changed_at[gi] = step
                    rel = invert_perm(perms[g.name])[new].to(dev)
                    for ax in g.axes:
                        cur_b[ax.key] = permute_axis(cur_b[ax.key], ax, rel)
                        dirty.add(ax.key)
                    perms[g.name] = new
        history.append(history[-1] + gain)
        if not progress:
            break
    return AlignmentResult(method="weight", spec=spec, perms=perms, objective=objective(), sweeps=sweeps,
                           seconds=time.perf_counter() - t0, history=tuple(history))
