"""Test fixture: the synthetic multi-domain tasks of nonlocal-spec §6.1 (foundations, local and non-local experts
in seconds on CPU).

Task t has ``classes`` classes with task-specific means in R^d plus unit noise, pushed through a fixed random
projection and ``2·tanh``, plus a task-specific shift: tasks differ in input distribution and in labels.
Models are float64 MLPs of the zoo (``mlp`` with ``in_channels = d``, ``image_size = 1``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vf_lightning.merge.experts import Expert, align_through_foundations, head_name, unaligned_anchor
from vf_lightning.merge.multitask import TaskData, batches, prepare, run_variant
from vf_lightning.models import ModelConfig, build_model


@dataclass
class SyntheticTask:
    """Inputs and labels of one task (train and test)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_tasks(
    seed: int = 0, num_tasks: int = 4, classes: int = 5, dim: int = 32, n_train: int = 1500, n_test: int = 600,
    mean_scale: float = 1.3, shift_scale: float = 1.0,
) -> list[SyntheticTask]:
    """``num_tasks`` synthetic classification tasks (float64), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    tasks = []
    for t in range(num_tasks):
        means = mean_scale * torch.randn(classes, dim, generator=g, dtype=torch.float64)
        shift = shift_scale * torch.randn(dim, generator=g, dtype=torch.float64)

        def sample(n: int, means: torch.Tensor = means, shift: torch.Tensor = shift) -> tuple[torch.Tensor, ...]:
            y = torch.randint(0, classes, (n,), generator=g)
            z = means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
            return 2.0 * torch.tanh(z @ proj) + shift, y

        xtr, ytr = sample(n_train)
        xte, yte = sample(n_test)
        tasks.append(SyntheticTask(f"task{t}", xtr, ytr, xte, yte))
    return tasks


def mlp_config(dim: int, num_classes: int, hidden: tuple[int, ...] = (128, 128, 128)) -> ModelConfig:
    """The zoo MLP on ``dim``-dimensional vectors."""
    return ModelConfig(arch="mlp", in_channels=dim, image_size=1, hidden=hidden, num_classes=num_classes)


def train_steps(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int,
    params: list[nn.Parameter] | None = None, batch: int = 128,
) -> nn.Module:
    """Adam on cross-entropy for ``steps`` minibatch steps (only ``params`` if given)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else list(net.parameters()), lr=lr)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@dataclass
class SyntheticSetting:
    """Foundations (full networks on the union problem), experts and task data of one synthetic run."""

    tasks: list[SyntheticTask]
    foundations: list[Expert]
    experts: list[Expert]


def build_setting(
    seed: int = 0, local: bool = False, num_tasks: int = 4, foundation_steps: int = 3000, probe_steps: int = 500,
    finetune_steps: int = 1500, finetune_lr: float = 2e-3, local_steps: int = 150, local_lr: float = 2e-4,
    hidden: tuple[int, ...] = (128, 128, 128), n_train: int = 1500, n_test: int = 600,
) -> SyntheticSetting:
    """Two foundations (seeds differ) and one expert per task: non-local = first half of the tasks from A, rest
    from B with full fine-tuning; ``local`` = every expert from A with short low-lr fine-tuning.
    """
    tasks = make_tasks(seed, num_tasks=num_tasks, n_train=n_train, n_test=n_test)
    classes = int(tasks[0].y_train.max()) + 1
    dim = tasks[0].x_train.shape[1]
    x_all = torch.cat([t.x_train for t in tasks])
    y_all = torch.cat([t.y_train + i * classes for i, t in enumerate(tasks)])
    fcfg = mlp_config(dim, classes * num_tasks, hidden)
    foundations = []
    for f in range(2):
        torch.manual_seed(1000 * seed + f)
        net = build_model(fcfg).double()
        train_steps(net, x_all, y_all, foundation_steps, 2e-3, seed=1000 * seed + 10 + f)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        foundations.append(Expert(f"foundation{'AB'[f]}", fcfg, state))
    ecfg = mlp_config(dim, classes, hidden)
    experts = []
    for t, task in enumerate(tasks):
        src = 0 if local or t < num_tasks // 2 else 1
        torch.manual_seed(1000 * seed + 100 + t)
        net = build_model(ecfg).double()
        head = head_name(net)
        body = {k: v for k, v in foundations[src].state.items() if not k.startswith(head + ".")}
        net.load_state_dict(body, strict=False)
        head_params = list(dict(net.named_modules())[head].parameters())
        train_steps(net, task.x_train, task.y_train, probe_steps, 1e-2, seed=1000 * seed + 200 + t, params=head_params)
        steps, lr = (local_steps, local_lr) if local else (finetune_steps, finetune_lr)
        train_steps(net, task.x_train, task.y_train, steps, lr, seed=1000 * seed + 300 + t)
        experts.append(Expert(task.name, ecfg, {k: v.detach().clone() for k, v in net.state_dict().items()},
                              foundation=foundations[src].name))
    return SyntheticSetting(tasks, foundations, experts)


def results_table(seed: int = 0, local: bool = False) -> list[str]:
    """Markdown rows: mean normalized accuracy (none / REPAIR / TACT) and mean VR per layer for TA, TIES, TALL."""
    s = build_setting(seed, local=local)
    tasks = [TaskData(t.name, [t.x_train[:1000]], batches(t.x_train[1000:], t.y_train[1000:]),
                      batches(t.x_test, t.y_test)) for t in s.tasks]
    rows = []
    for aligned in [False] if local else [True, False]:
        if aligned:
            al = align_through_foundations(s.foundations[0], s.foundations[1], s.experts, s.tasks[0].x_train[:8])
            anchor, experts = al.anchor, al.experts
        else:
            anchor, experts = unaligned_anchor(s.foundations[:1] if local else s.foundations), s.experts
        prep = prepare(anchor, experts, tasks)
        for method in ("task_arithmetic", "ties", "tall"):
            r = {c: run_variant(prep, tasks, method, c) for c in ("none", "repair", "tact")}  # type: ignore[arg-type]
            vr = {c: " / ".join(f"{v:.2f}" for v in r[c].curve(prep.sites)) for c in r}
            rows.append(f"| {'local' if local else 'non-local'} | {'yes' if aligned else 'no'} | {method} | "
                        f"{r['none'].mean_normalized:.3f} | {r['repair'].mean_normalized:.3f} | "
                        f"{r['tact'].mean_normalized:.3f} | {vr['none']} → {vr['tact']} |")
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    results_table(int(sys.argv[1]) if len(sys.argv) > 1 else 0, local="--local" in sys.argv)
