"""Task experts as body + head, the multi-task network of a merged body, and alignment through foundations.

A network of the zoo splits into a *body* (everything but the output layer) and a *head* (the output layer
of its traced graph, sized to the task). :class:`MultiTaskModel` runs one network template with a task's body (one
shared, or one per task under TALL), that task's own head and optional per-task parameter overrides (the
layers TACT or REPAIR corrected). Non-local experts are aligned through their foundations (nonlocal-spec
§3.2): weight matching between foundation A and foundation B (heads zeroed) permutes every expert of B,
body and head input axis; the anchor is the midpoint of A and the aligned B.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from vf_lightning.align import MATCHERS, ModelGraph, build_permutation_spec, permute_state_dict, weight_matching
from vf_lightning.checkpoint import load_expert
from vf_lightning.evaluate import evaluate
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.statedict import average_states, ensure_biases

StateDict = dict[str, torch.Tensor]


def head_name(model: nn.Module) -> str:
    """Name of the task head: the (last) output layer of ``model``'s traced graph."""
    outputs = ModelGraph.of(model).output_layers
    if not outputs:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear output layer to use as the task head")
    return outputs[-1]


def split_state(state: Mapping[str, torch.Tensor], head: str) -> tuple[StateDict, StateDict]:
    """``(body, head)`` parts of a full state dict; head keys are those under the module ``head``."""
    prefix = head + "."
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    hd = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not hd:
        raise KeyError(f"no parameters of head {head!r} in the state dict")
    return body, hd


def task_network(config: ModelConfig, body: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain network of ``config`` holding ``body`` and ``head`` weights (copies), on their device, in eval mode."""
    state = {**body, **head}
    net = _like(build_model(config), state)
    ensure_biases(net, state)
    net.load_state_dict(state)
    return net.eval()


def _like(net: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """``net`` moved to the device and floating dtype of ``state`` (e.g. float64 synthetic experts)."""
    for v in state.values():
        if torch.is_floating_point(v):
            return net.to(device=v.device, dtype=v.dtype)
    return net


@dataclass
class Expert:
    """One task expert: its network config (head sized to the task) and full weights; ``name`` labels the task."""

    name: str
    config: ModelConfig
    state: StateDict
    foundation: str = ""
    classes: list[int] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, path: str | Path, name: str | None = None, classes: Sequence[int] | None = None,
                        foundation: str | None = None) -> Expert:
        """An expert (or foundation) from a checkpoint; unset fields come from its metadata (CPU weights)."""
        model, config, meta = load_expert(path)
        label = name or meta.get("task") or Path(path).stem
        labels = classes if classes is not None else meta.get("classes")
        return cls(str(label), config, dict(model.state_dict()), foundation or meta.get("foundation") or "",
                   [int(c) for c in labels or []])

    def to(self, device: torch.device | str) -> Expert:
        """The same expert with its weights on ``device``."""
        return replace(self, state={k: v.to(device) for k, v in self.state.items()})

    def network(self) -> nn.Module:
        """The expert as a plain network in eval mode."""
        return task_network(self.config, self.state, {})

    def split(self) -> tuple[StateDict, StateDict]:
        """``(body, head)`` state dicts."""
        return split_state(self.state, head_name(build_model(self.config)))


class MultiTaskModel(nn.Module):
    """Merged body (shared or per task) + per-task heads + optional per-task parameter overrides.

    ``forward(x, task)`` is one pass of the template network with task ``task``'s parameters: its body,
    then ``overrides[task]`` (corrected layers' weights, biases and BatchNorm statistics; a shared REPAIR
    set is the same dict for every task), then its head. :meth:`task_network` exports one task as a plain
    network of the zoo.
    """

    def __init__(
        self,
        config: ModelConfig,
        bodies: Sequence[Mapping[str, torch.Tensor]],
        heads: Sequence[Mapping[str, torch.Tensor]],
        head_configs: Sequence[ModelConfig],
        overrides: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if len(bodies) not in (1, len(heads)):
            raise ValueError(f"got {len(bodies)} bodies for {len(heads)} tasks; give one shared body or one per task")
        if overrides is not None and len(overrides) != len(heads):
            raise ValueError(f"got {len(overrides)} override sets for {len(heads)} tasks")
        if len(head_configs) != len(heads):
            raise ValueError(f"got {len(head_configs)} head configs for {len(heads)} tasks")
        self.config = config
        self.template = _like(build_model(config), bodies[0]).eval()
        ensure_biases(self.template, {k: v for o in overrides or [] for k, v in o.items()})
        self.bodies = [dict(b) for b in bodies]
        self.heads = [dict(h) for h in heads]
        self.head_configs = list(head_configs)
        self.overrides = [dict(o) for o in overrides] if overrides is not None else None

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def task_parameters(self, task: int) -> dict[str, torch.Tensor]:
        """Full state of task ``task``: its body, its overrides and its head."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task id {task} out of range; this model has {self.num_tasks} tasks")
        params = dict(self.bodies[0] if len(self.bodies) == 1 else self.bodies[task])
        if self.overrides is not None:
            params.update(self.overrides[task])
        params.update(self.heads[task])
        return params

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return functional_call(self.template, self.task_parameters(task), (x,), strict=False)

    def task_network(self, task: int) -> nn.Module:
        """Task ``task`` as a plain network of the zoo (head sized to the task), in eval mode."""
        return task_network(self.head_configs[task], self.task_parameters(task), {})


class TaskView(nn.Module):
    """A :class:`MultiTaskModel` bound to one task id (so that single-task evaluation code can run it)."""

    def __init__(self, model: MultiTaskModel, task: int) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task)


# ------------------------------------------------------------------------------------------------ alignment
@dataclass
class Alignment:
    """Aligned experts, the anchor body and what the matching did."""

    anchor: StateDict
    experts: list[Expert]
    perms: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    groups: int = 0


def check_align_options(options: Mapping[str, Any] | None) -> None:
    """Fail naming the first option that weight matching does not take (the registered matcher's options)."""
    MATCHERS.check_options("weight", dict(options or {}), "align_options")


def _headless(expert: Expert) -> StateDict:
    head = head_name(build_model(expert.config))
    return {k: torch.zeros_like(v) if k.startswith(head + ".") else v for k, v in expert.state.items()}


def align_through_foundations(
    foundation_a: Expert,
    foundation_b: Expert,
    experts: Sequence[Expert],
    example_input: torch.Tensor,
    options: Mapping[str, Any] | None = None,
) -> Alignment:
    """Permute every expert whose ``foundation`` is B onto A's basis (body and head input axis); anchor = midpoint.

    ``options`` go to :func:`vf_lightning.align.weight_matching` (``max_sweeps``, ``tol``, ``seed``).
    """
    check_align_options(options)
    net = foundation_a.network()
    spec = build_permutation_spec(net, example_input.to(next(net.parameters())))
    result = weight_matching(spec, _headless(foundation_a), _headless(foundation_b), **dict(options or {}))
    perms = result.perms
    assert perms is not None  # weight matching always returns permutations
    head = head_name(net)
    body_a, _ = split_state(foundation_a.state, head)
    body_b, _ = split_state(permute_state_dict(foundation_b.state, spec, perms), head)
    out = []
    for e in experts:
        if e.foundation == foundation_b.name:
            out.append(replace(e, state=permute_state_dict(e.state, spec, perms)))
        elif e.foundation in (foundation_a.name, ""):
            out.append(e)
        else:
            raise ValueError(f"expert {e.name!r} names foundation {e.foundation!r}, which is neither "
                             f"{foundation_a.name!r} nor {foundation_b.name!r}")
    return Alignment(average_states([body_a, body_b]), out, perms, result.seconds, len(spec.groups))


def unaligned_anchor(foundations: Sequence[Expert]) -> StateDict:
    """Anchor without alignment: the plain mean of the foundations' bodies (one foundation: its body)."""
    if not foundations:
        raise ValueError("unaligned_anchor needs at least one foundation")
    head = head_name(build_model(foundations[0].config))
    return average_states([split_state(f.state, head)[0] for f in foundations])


# ------------------------------------------------------------------------------------------------- locality
def relative_distance(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor]) -> float:
    """``‖θ_end − θ_start‖ / ‖θ_start‖`` over the floating-point entries of ``start`` (e.g. a foundation's body)."""
    keys = [k for k, v in start.items() if torch.is_floating_point(v)]
    if not keys:
        raise ValueError("relative_distance: no floating-point entries to compare")
    num = sum(float((end[k].double() - start[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(start[k].double().pow(2).sum()) for k in keys)
    return (num / max(den, 1e-30)) ** 0.5


def path_losses(config: ModelConfig, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                data: Sequence[tuple[torch.Tensor, torch.Tensor]], alphas: Sequence[float]) -> list[float]:
    """Cross-entropy on ``data`` of the network ``(1−α)·start + α·end`` (full states of ``config``) for each α."""
    losses = []
    for a in alphas:
        state = {k: ((1 - a) * v + a * end[k]) if torch.is_floating_point(v) else v for k, v in start.items()}
        losses.append(evaluate(task_network(config, state, {}), data)["loss"])
    return losses


def loss_barrier(losses: Sequence[float], alphas: Sequence[float]) -> float:
    """Largest excess of the path's loss over the straight line between its end losses (≥ 0)."""
    first, last = losses[0], losses[-1]
    return max(0.0, *(loss - ((1 - a) * first + a * last) for loss, a in zip(losses, alphas)))
