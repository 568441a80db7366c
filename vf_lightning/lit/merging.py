"""LightningModules of ``vf merge`` / ``vf prune``: networks loaded from finished checkpoints, nothing trained.

``vf merge`` and ``vf prune`` are LightningCLI ``validate`` runs of such a module: the callbacks of
:mod:`vf_lightning.callbacks` do the merging, PFM, interpolation, variance-collapse and pruning work at the
validation hooks, exactly as during ``vf fit``, and ``ReportWriter`` writes report.json, plots and the chosen
model. Checkpoints are read (``weights_only``) and checked for a common architecture at construction, before
any data is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from string import ascii_lowercase
from typing import Any

import lightning as L
from torch import nn

from vf_lightning.align import check_compatible
from vf_lightning.checkpoint import CheckpointError, load_networks
from vf_lightning.merge.experts import Expert
from vf_lightning.models import ModelConfig


class CheckpointModule(L.LightningModule):
    """Base of the checkpoint-loading modules: ``networks()`` by name, ``model_config``, no training step."""

    model_config: ModelConfig

    def networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def forward(self, x: Any) -> Any:
        return next(iter(self.networks().values()))(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing per batch: the callbacks do their work, on their own bounded data, at the epoch end."""
        return None


def network_names(n: int) -> list[str]:
    """``a``, ``b``, ``c``, ... (then ``n26``, ...) for ``n`` networks."""
    return [ascii_lowercase[i] if i < 26 else f"n{i}" for i in range(n)]


class MergeModule(CheckpointModule):
    """The networks of ``checkpoints``: one pair checkpoint of ``vf fit`` (networks a, b) or two or more model
    checkpoints (a, b, c, ... in the order given; A is the reference basis of the merge).

    Args:
        checkpoints: paths of a PairModule ``.ckpt`` or of ``vf-model`` checkpoints (``net_a.pt``, ...).
    """

    def __init__(self, checkpoints: list[str]) -> None:
        super().__init__()
        if not checkpoints:
            raise CheckpointError("model.checkpoints (--checkpoints) is empty: give one pair checkpoint of `vf fit` "
                                  "or two or more model checkpoints (e.g. outputs/run/net_a.pt outputs/run/net_b.pt)")
        models, cfgs = load_networks(list(checkpoints))
        for m in models[1:]:
            check_compatible(models[0], m)  # before any data work
        self.save_hyperparameters({"checkpoints": list(checkpoints)})
        self.model_config = cfgs[0]
        self.nets = nn.ModuleDict(dict(zip(network_names(len(models)), (m.eval() for m in models))))
        for p in self.nets.parameters():
            p.requires_grad_(False)

    def networks(self) -> dict[str, nn.Module]:
        return dict(self.nets.items())


# --------------------------------------------------------------------------------------------------------------
# multi-task merging: foundations + task experts


@dataclass
class ExpertEntry:
    """One task expert of ``vf merge``: its checkpoint and (optionally) its metadata.

    ``task``, ``classes`` (the original labels of the task, relabelled 0..k-1) and ``foundation`` (a key of
    :class:`ExpertsModule`'s ``foundations``) default to what the checkpoint stores (``ExpertModule`` writes them).
    """

    path: str
    task: str | None = None
    classes: list[int] | None = None
    foundation: str | None = None


def _entry(e: ExpertEntry | Mapping[str, Any]) -> ExpertEntry:
    return e if isinstance(e, ExpertEntry) else ExpertEntry(**dict(e))


def _body_config(cfg: ModelConfig) -> ModelConfig:
    """The architecture without the head's size (experts of different tasks share it)."""
    return replace(cfg, num_classes=1)


class ExpertsModule(CheckpointModule):
    """Task experts fine-tuned from one or more foundations, for the multi-task merge (``TaskMergeCallback``).

    Everything is loaded and checked at construction, before any data work: every file exists, there is at
    least one expert, every expert knows its classes and names a listed foundation, task names are distinct
    and all networks share one body architecture (heads may differ in size).

    Args:
        foundations: name → checkpoint of each foundation (vf model checkpoint or ``.ckpt`` of ``vf fit``).
        experts: the experts (see :class:`ExpertEntry`); one task each.
        reference: the foundation whose basis the others are aligned to (and that experts without a
            foundation came from).
    """

    def __init__(self, foundations: dict[str, str], experts: list[ExpertEntry], reference: str = "a") -> None:
        super().__init__()
        entries = [_entry(e) for e in experts]
        if not entries:
            raise ValueError("model.experts is empty: list the expert checkpoints (path, and optionally task, "
                             "classes, foundation)")  # fmt: skip
        if not foundations:
            raise ValueError("model.foundations is empty: give name → checkpoint of the foundations the experts "
                             "were fine-tuned from")  # fmt: skip
        if reference not in foundations:
            raise ValueError(f"model.reference {reference!r} is not among the foundations {sorted(foundations)}")
        paths = [*foundations.values(), *(e.path for e in entries)]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint(s) {missing} do not exist (train them first, e.g. with "
                                  "`make multitask-demo` or `vf fit`)")  # fmt: skip
        found = {name: Expert.from_checkpoint(path, name, foundation=name) for name, path in foundations.items()}
        loaded = [Expert.from_checkpoint(e.path, e.task, e.classes, e.foundation) for e in entries]
        loaded = [replace(x, foundation=x.foundation or reference) for x in loaded]
        self._check(entries, loaded, found)
        self.save_hyperparameters({"foundations": dict(foundations), "experts": [asdict(e) for e in entries],
                                   "reference": reference})  # fmt: skip
        self.reference = reference
        self.model_config = loaded[0].config
        self.tasks = [x.name for x in loaded]
        self.expert_classes = [list(x.classes) for x in loaded]
        self.expert_foundations = [x.foundation for x in loaded]
        self.expert_configs = [x.config for x in loaded]
        self.foundation_names = list(found)
        self.foundation_configs = [f.config for f in found.values()]
        self.expert_nets = nn.ModuleList(x.network() for x in loaded)
        self.foundation_nets = nn.ModuleList(f.network() for f in found.values())
        for p in self.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _check(entries: list[ExpertEntry], experts: list[Expert], foundations: dict[str, Expert]) -> None:
        for entry, x in zip(entries, experts):
            if not x.classes:
                raise ValueError(f"expert {entry.path!r}: no `classes` in the config nor in its checkpoint; list the "
                                 "original labels of its task")  # fmt: skip
            if x.foundation not in foundations:
                raise ValueError(f"expert {entry.path!r} names foundation {x.foundation!r}, which is not among "
                                 f"model.foundations {sorted(foundations)}")  # fmt: skip
            if x.config.num_classes != len(x.classes):
                raise ValueError(f"expert {entry.path!r} has a {x.config.num_classes}-way head but {len(x.classes)} "
                                 f"classes {x.classes}")  # fmt: skip
        names = [x.name for x in experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task name(s) {dup} are used by more than one expert; give each expert its own `task`")
        clash = sorted(set(names) & {f"foundation_{f}" for f in foundations})
        if clash:
            raise ValueError(f"task name(s) {clash} clash with the foundations' network names; rename the tasks")
        first, where = _body_config(experts[0].config), entries[0].path
        others = [(e.path, x.config) for e, x in zip(entries[1:], experts[1:])]
        others += [(f"foundation {name}", f.config) for name, f in foundations.items()]
        for label, cfg in others:
            if _body_config(cfg) != first:
                raise ValueError(f"{label} has architecture {cfg.to_dict()}, which differs from {where}'s "
                                 f"{experts[0].config.to_dict()} (beyond num_classes); merge experts of one "
                                 "architecture")  # fmt: skip

    def networks(self) -> dict[str, nn.Module]:
        """The experts by task name, then the foundations as ``foundation_<name>``."""
        nets: dict[str, nn.Module] = dict(zip(self.tasks, self.expert_nets))
        nets.update({f"foundation_{n}": m for n, m in zip(self.foundation_names, self.foundation_nets)})
        return nets

    def experts_and_foundations(self) -> tuple[list[Expert], dict[str, Expert]]:
        """The :class:`Expert` records of :func:`~vf_lightning.merge.multitask.merge_experts`, with the weights
        of this module's networks (on its device)."""
        experts = [Expert(t, cfg, dict(net.state_dict()), f, list(c))
                   for t, cfg, c, f, net in zip(self.tasks, self.expert_configs, self.expert_classes,
                                                self.expert_foundations, self.expert_nets)]  # fmt: skip
        founds = {n: Expert(n, cfg, dict(net.state_dict()), n)
                  for n, cfg, net in zip(self.foundation_names, self.foundation_configs, self.foundation_nets)}
        return experts, founds
