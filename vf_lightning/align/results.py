"""Typed results of a matching: per-group permutations or merge / unmerge matrices."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from vf_lightning.align.permute import Perms, apply_permutation
from vf_lightning.align.spec import PermutationSpec
from vf_lightning.distributed import broadcast_tensor, is_distributed


@dataclass(frozen=True)
class GroupTransform:
    """ZipIt-style merge (``C×2C``) and unmerge (``2C×C``) matrices of one group.

    Merged features are ``merge @ [f_A; f_B]``; ``unmerge[:C] @ z`` / ``unmerge[C:] @ z`` map them back to A's / B's
    basis. Per model (the ×2 of the reference, so that averaging two transformed models gives ``merge``):
    ``m_a = 2·merge[:, :C]``, ``m_b = 2·merge[:, C:]``, ``u_a = unmerge[:C]``, ``u_b = unmerge[C:]``.
    """

    merge: torch.Tensor
    unmerge: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.merge.shape[0])

    @property
    def m_a(self) -> torch.Tensor:
        return 2 * self.merge[:, : self.size]

    @property
    def m_b(self) -> torch.Tensor:
        return 2 * self.merge[:, self.size:]

    @property
    def u_a(self) -> torch.Tensor:
        return self.unmerge[: self.size]

    @property
    def u_b(self) -> torch.Tensor:
        return self.unmerge[self.size:]

    @classmethod
    def identity(cls, size: int) -> GroupTransform:
        """Plain averaging: ``merge = ½[I, I]``, ``unmerge = [I; I]``."""
        eye = torch.eye(size, dtype=torch.float64)
        return cls(torch.cat([eye, eye], 1) / 2, torch.cat([eye, eye], 0))

    @classmethod
    def from_perm(cls, perm: torch.Tensor) -> GroupTransform:
        """Permutation matching as matrices: ``merge = ½[I, Q]``, ``unmerge = [I; Qᵀ]`` with ``Q[i, perm[i]] = 1``."""
        n = perm.numel()
        eye = torch.eye(n, dtype=torch.float64)
        q = eye[perm.cpu()]
        return cls(torch.cat([eye, q], 1) / 2, torch.cat([eye, q.t()], 0))


@dataclass(frozen=True)
class AlignmentResult:
    """What a matcher found for B relative to A.

    ``perms`` (permutation methods) maps group name → index vector (unit ``i`` of aligned B is unit ``perm[i]`` of
    B); ``transforms`` maps group name → :class:`GroupTransform` (always available, derived from ``perms`` where
    needed). ``objective``/``sweeps``/``history`` describe the optimisation, ``seconds`` its wall time.
    """

    method: str
    spec: PermutationSpec
    perms: Perms | None = None
    transforms_: dict[str, GroupTransform] | None = field(default=None, repr=False)
    objective: float | None = None
    sweeps: int = 0
    seconds: float = 0.0
    history: tuple[float, ...] = ()

    @property
    def is_permutation(self) -> bool:
        return self.perms is not None

    @property
    def transforms(self) -> dict[str, GroupTransform]:
        """Merge / unmerge matrices of every group (``M = ½[I, P]`` for permutation matchings)."""
        if self.transforms_ is not None:
            return self.transforms_
        assert self.perms is not None
        return {name: GroupTransform.from_perm(p) for name, p in self.perms.items()}

    def aligned_b(self, model_b: nn.Module) -> nn.Module:
        """Model B permuted into A's basis (an ordinary module of B's class); only for permutation matchings."""
        if self.perms is None:
            raise ValueError(f"matching {self.method!r} produced general transforms, not permutations; use "
                             "vf_lightning.align.merge_models / transform_model instead of aligned_b")
        return apply_permutation(model_b, self.spec, self.perms)

    def broadcast(self, device: torch.device | str) -> AlignmentResult:
        """Rank 0's permutations / transforms on every rank (they agree already when statistics are reduced; this
        makes it exact whatever the floating-point order of the reductions). Identity in one process."""
        if not is_distributed():
            return self
        perms = {k: broadcast_tensor(p, device) for k, p in self.perms.items()} if self.perms is not None else None
        tr = None
        if self.transforms_ is not None:
            tr = {k: GroupTransform(broadcast_tensor(g.merge, device), broadcast_tensor(g.unmerge, device))
                  for k, g in self.transforms_.items()}  # fmt: skip
        return replace(self, perms=perms, transforms_=tr)

    def summary(self) -> dict[str, object]:
        """JSON-friendly summary (method, seconds, objective, sweeps, number of groups)."""
        return {"matching": self.method, "seconds": self.seconds, "objective": self.objective,
                "sweeps": self.sweeps, "groups": len(self.spec)}
