"""Experts as body + task head, and the multi-task network that runs a merged body with per-task state.

A network of the zoo splits into a *body* (everything but the last ``nn.Linear``) and a *head* (that last
linear layer, sized to the task). :class:`MultiTaskModel` holds one network template, the merged body (one
shared or one per task under TALL), every task's own head and optional per-task affine corrections
(TACT, or one shared REPAIR set). ``forward(x, task)`` runs a single pass with the task's parameters,
the corrections folded into the corrected layers' weights (cached per task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from vf_lightning.models import ModelConfig, build_model

StateDict = dict[str, torch.Tensor]
Affine = tuple[torch.Tensor, torch.Tensor]
FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def head_name(model: nn.Module) -> str:
    """Name of the task head: the last ``nn.Linear`` registered in ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as the task head")
    return names[-1]


def split_state(state: Mapping[str, torch.Tensor], head: str) -> tuple[StateDict, StateDict]:
    """``(body, head)`` parts of a full state dict; head keys are those under the module ``head``."""
    prefix = head + "."
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    hd = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not hd:
        raise KeyError(f"no parameters of head {head!r} in the state dict")
    return body, hd


@dataclass
class Expert:
    """One task expert: its network config (head sized to the task) and full weights; ``name`` labels the task."""

    name: str
    config: ModelConfig
    state: StateDict
    foundation: str = ""
    classes: list[int] = field(default_factory=list)

    def network(self) -> nn.Module:
        """The expert as a plain network in eval mode."""
        return task_network(self.config, self.state, {})

    def split(self) -> tuple[StateDict, StateDict]:
        """``(body, head)`` state dicts."""
        return split_state(self.state, head_name(build_model(self.config)))


def body_of(state: Mapping[str, torch.Tensor], config: ModelConfig) -> StateDict:
    """The body part of a full state dict of ``config``'s architecture."""
    return split_state(state, head_name(build_model(config)))[0]


@torch.no_grad()
def fold_into(module: nn.Module, params: dict[str, torch.Tensor], prefix: str, scale: torch.Tensor,
              shift: torch.Tensor) -> None:
    """Fold the per-channel ``y ↦ a⊙y + b`` after ``module`` into ``params`` (its weight/bias entries, in place).

    Conv/Linear: ``W ← a⊙W``, ``bias ← a⊙bias + b``; norms with affine: ``γ ← a⊙γ``, ``β ← a⊙β + b``.
    """
    if not isinstance(module, FOLDABLE):
        raise TypeError(f"cannot fold a correction into {type(module).__name__} at {prefix!r}; "
                        "choose sites that are Conv/Linear or affine normalization layers")
    wk, bk = f"{prefix}.weight", f"{prefix}.bias"
    if wk not in params:
        raise ValueError(f"{prefix!r} ({type(module).__name__}) has no affine weight to fold a correction into")
    w = params[wk]
    a = scale.to(device=w.device, dtype=torch.float64)
    b = shift.to(device=w.device, dtype=torch.float64)
    params[wk] = (w.to(torch.float64) * a.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    old = params.get(bk)
    base = old.to(torch.float64) * a if old is not None else torch.zeros_like(a)
    params[bk] = (base + b).to(w.dtype)


def add_missing_biases(model: nn.Module, sites: Sequence[str]) -> None:
    """Give bias-free Conv/Linear site modules a zero bias Parameter so that a shift can be folded in."""
    modules = dict(model.named_modules())
    for s in sites:
        m = modules[s]
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))


class MultiTaskModel(nn.Module):
    """Merged body (shared or per task) + per-task heads + optional per-task affine corrections.

    ``forward(x, task)`` is one pass of the template network with task ``task``'s parameters; corrections
    ``corrections[task][site] = (a, b)`` are folded into the site layers (a shared REPAIR set is the same
    dict for every task). :meth:`task_network` exports one task as a plain network of the zoo.
    """

    def __init__(
        self,
        config: ModelConfig,
        bodies: Sequence[Mapping[str, torch.Tensor]],
        heads: Sequence[Mapping[str, torch.Tensor]],
        head_configs: Sequence[ModelConfig],
        corrections: Sequence[Mapping[str, Affine]] | None = None,
    ) -> None:
        super().__init__()
        if len(bodies) not in (1, len(heads)):
            raise ValueError(f"got {len(bodies)} bodies for {len(heads)} tasks; give one shared body or one per task")
        if corrections is not None and len(corrections) != len(heads):
            raise ValueError(f"got {len(corrections)} correction sets for {len(heads)} tasks")
        self.config = config
        self.template = match_dtype(build_model(config), bodies[0]).eval()
        self.head = head_name(self.template)
        sites = sorted({s for c in corrections or [] for s in c})
        add_missing_biases(self.template, sites)
        self.bodies = [dict(b) for b in bodies]
        self.heads = [dict(h) for h in heads]
        self.head_configs = list(head_configs)
        self.corrections = [dict(c) for c in corrections] if corrections is not None else None
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def task_parameters(self, task: int) -> dict[str, torch.Tensor]:
        """Full state of task ``task``: its body, corrections folded in, and its head (cached)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task id {task} out of range; this model has {self.num_tasks} tasks")
        if task not in self._cache:
            params = dict(self.bodies[0] if len(self.bodies) == 1 else self.bodies[task])
            params.update(self.heads[task])
            if self.corrections is not None:
                modules = dict(self.template.named_modules())
                for site, (a, b) in self.corrections[task].items():
                    fold_into(modules[site], params, site, a, b)
            self._cache[task] = params
        return self._cache[task]

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return functional_call(self.template, self.task_parameters(task), (x,), strict=False)

    def task_network(self, task: int) -> nn.Module:
        """Task ``task`` as a plain network of the zoo (head sized to the task), in eval mode."""
        params = self.task_parameters(task)
        return task_network(self.head_configs[task], params, {})


class TaskView(nn.Module):
    """A :class:`MultiTaskModel` bound to one task id (so that single-task evaluation code can run it)."""

    def __init__(self, model: MultiTaskModel, task: int) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task)


def task_network(config: ModelConfig, body: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain network of ``config`` with ``body`` and ``head`` weights (copies), in eval mode."""
    state = {**body, **head}
    net = match_dtype(build_model(config), state)
    add_missing_biases(net, [k[: -len(".bias")] for k in head_bias_keys(net, state)])
    net.load_state_dict(state)
    return net.eval()


def match_dtype(net: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Cast ``net`` to the floating dtype of ``state`` (e.g. float64 synthetic experts)."""
    for v in state.values():
        if torch.is_floating_point(v):
            return net.to(v.dtype)
    return net


def head_bias_keys(net: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """``*.bias`` keys of ``state`` whose Conv/Linear module in ``net`` was built without a bias."""
    modules = dict(net.named_modules())
    out = []
    for k in state:
        if k.endswith(".bias"):
            m = modules.get(k[: -len(".bias")])
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.bias is None:
                out.append(k)
    return out
