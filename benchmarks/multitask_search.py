"""Search for a CPU setting of the multi-domain task suite where alignment alone is not enough (issue 12).

Small, fast experiments with plain PyTorch loops (no Lightning): two foundations of different seeds on plain
Fashion-MNIST, LP-FT experts on the tasks of :mod:`vf_lightning.data.tasksuite`, then
:func:`vf_lightning.merge.multitask.merge_experts` (TA and TIES × none / REPAIR / TACT, aligned through the
foundations). Prints, per setting, the experts' distance from their foundation and the foundation → expert loss
barrier, and the mean normalized accuracy of each variant. Trained networks are cached under ``--cache``.

    python benchmarks/multitask_search.py --arch vgg11 --width 0.25 --ft-steps 600
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vf_lightning.data.tasksuite import DomainTaskDataModule
from vf_lightning.merge.experts import Expert, head_name, loss_barrier, path_losses, relative_distance
from vf_lightning.merge.multitask import TaskData, batches, merge_experts
from vf_lightning.models import ModelConfig, build_model

FMNIST = "/usr/share/datasets/fashion-mnist"
SUITE = [  # name, source, transform, classes, foundation (non-local)
    ("perm", "fashion_mnist", "permute", [0, 1, 2, 3, 4], "a"),
    ("invert", "fashion_mnist", "invert", [5, 6, 7, 8, 9], "a"),
    ("digits", "digits", "none", list(range(10)), "a"),
    ("rot", "fashion_mnist", "rotate", [0, 2, 4, 6, 8], "b"),
    ("contrast", "fashion_mnist", "contrast", [1, 3, 5, 7, 9], "b"),
]


def tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All (normalized, unaugmented) images and labels of a TensorImageDataset view."""
    x = (ds.images[ds.index].float() / 255.0 - ds.mean) / ds.std
    return x, ds.labels[ds.index]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int,
          params: list[nn.Parameter] | None = None, batch: int = 128, wd: float = 5e-4) -> None:
    """SGD (momentum 0.9, cosine) on cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params if params is not None else net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()


@torch.no_grad()
def loss_acc(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = torch.cat([net(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def cached(cache: Path, key: dict[str, Any], build: Any) -> dict[str, torch.Tensor]:
    path = cache / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".pt")
    if path.is_file():
        return torch.load(path, weights_only=True)
    state = build()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--norm", default="none")
    p.add_argument("--hidden", default="256,256,256")
    p.add_argument("--f-steps", type=int, default=1500)
    p.add_argument("--f-lr", type=float, default=0.05)
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--ft-steps", type=int, default=600)
    p.add_argument("--ft-lr", type=float, default=0.05)
    p.add_argument("--local", action="store_true", help="all experts from A with --local-steps at --local-lr")
    p.add_argument("--local-steps", type=int, default=100)
    p.add_argument("--local-lr", type=float, default=0.002)
    p.add_argument("--tasks", default=",".join(t[0] for t in SUITE))
    p.add_argument("--methods", default="task_arithmetic,ties")
    p.add_argument("--unaligned", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="outputs/multitask_search")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    base = dict(arch=args.arch, in_channels=1, image_size=28, width=args.width, norm=args.norm, hidden=hidden)
    fcfg = ModelConfig(num_classes=10, **base)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    plain = DomainTaskDataModule(data_dir=FMNIST, val_samples=1000, calib_samples=10)
    plain.setup()
    xf, yf = tensors(plain.train_set)
    foundations: dict[str, Expert] = {}
    for i, name in enumerate("ab"):
        def build_f(i: int = i) -> dict[str, torch.Tensor]:
            torch.manual_seed(100 + i)
            net = build_model(fcfg)
            train(net, xf, yf, args.f_steps, args.f_lr, seed=200 + i)
            return dict(net.state_dict())
        key = {"f": name, "cfg": fcfg.to_dict(), "steps": args.f_steps, "lr": args.f_lr}
        foundations[name] = Expert(name, fcfg, cached(cache, key, build_f), name)
    xv, yv = tensors(plain.val_set)
    for n, f in foundations.items():
        net = f.network()
        print(f"foundation {n}: plain val acc {loss_acc(net, xv, yv)[1]:.3f}", flush=True)
    print(f"foundations ready {time.perf_counter() - t0:.0f}s", flush=True)
    experts, tasks = [], []
    wanted = args.tasks.split(",")
    for ti, (name, source, transform, classes, fnd) in enumerate([t for t in SUITE if t[0] in wanted]):
        fnd = "a" if args.local else fnd
        val = 300 if source == "digits" else 1000
        dm = DomainTaskDataModule(source=source, transform=transform, transform_seed=ti, classes=classes,  # type: ignore[arg-type]
                                  data_dir=FMNIST, val_samples=val, calib_samples=500,
                                  test_subset=2000)  # fmt: skip
        dm.setup()
        x, y = tensors(dm.train_set)
        ecfg = ModelConfig(num_classes=len(classes), **base)  # type: ignore[arg-type]
        head = head_name(build_model(ecfg))
        body0 = {k: v for k, v in foundations[fnd].state.items() if not k.startswith(head + ".")}
        steps, lr = (args.local_steps, args.local_lr) if args.local else (args.ft_steps, args.ft_lr)

        def build_e(ti: int = ti, x: torch.Tensor = x, y: torch.Tensor = y, ecfg: ModelConfig = ecfg,
                    body0: dict[str, torch.Tensor] = body0, steps: int = steps, lr: float = lr,
                    head: str = head) -> dict[str, torch.Tensor]:  # fmt: skip
            torch.manual_seed(300 + ti)
            net = build_model(ecfg)
            net.load_state_dict(body0, strict=False)
            train(net, x, y, args.probe_steps, 0.05, seed=400 + ti,
                  params=list(dict(net.named_modules())[head].parameters()))
            probe = {f"probe::{k}": v.clone() for k, v in net.state_dict().items() if k.startswith(head + ".")}
            train(net, x, y, steps, lr, seed=500 + ti)
            return {**net.state_dict(), **probe}
        key = {"v": 2, "e": name, "t": transform, "ts": ti, "c": classes, "cfg": ecfg.to_dict(), "f": fnd,
               "fkey": [args.f_steps, args.f_lr], "p": args.probe_steps, "s": steps, "lr": lr}
        stored = cached(cache, key, build_e)
        state = {k: v for k, v in stored.items() if not k.startswith("probe::")}
        start = {**state, **body0, **{k[7:]: v for k, v in stored.items() if k.startswith("probe::")}}
        xc, yc = tensors(dm.calib_set)
        xt, yt = tensors(dm.test_set)
        xva, yva = tensors(dm.val_set)
        e = Expert(name, ecfg, state, fnd, classes)
        acc = loss_acc(e.network(), xt, yt)[1]
        alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
        losses = path_losses(ecfg, start, state, batches(xc, yc, 1000), alphas)
        print(f"expert {name:9s} from {fnd}: test acc {acc:.3f}  dist {relative_distance(body0, state):.3f}  "
              f"barrier {loss_barrier(losses, alphas):.3f}  path loss {' '.join(f'{v:.2f}' for v in losses)}",
              flush=True)
        experts.append(e)
        tasks.append(TaskData(name, [xc], batches(xva, yva, 1000), batches(xt, yt, 1000)))
    print(f"experts ready {time.perf_counter() - t0:.0f}s", flush=True)
    aligned = [False] if args.local else ([True, False] if args.unaligned else [True])
    res = merge_experts(experts, foundations, tasks, args.methods.split(","), ["none", "repair", "tact"], aligned,
                        grids={"task_arithmetic": [0.2, 0.3, 0.4, 0.6, 0.8, 1.0], "ties": [0.6, 0.8, 1.0, 1.5]},
                        options={"ties": {"k": 0.2}})
    for s in res.summary:
        key = f"{s['method']}/{s['correction']}/{'aligned' if s['aligned'] else 'unaligned'}"
        curve = res.variance_ratio["curves"][key]
        per_task = [r["normalized_acc"] for r in res.rows if (r["method"], r["correction"], r["aligned"]) ==
                    (s["method"], s["correction"], s["aligned"])]  # fmt: skip
        print(f"{key:32s} {s['mean_normalized_acc']:.3f}  lam {s['lam'][0]}  tasks "
              f"{' '.join(f'{v:.2f}' for v in per_task)}  VR {' '.join(f'{v:.2f}' for v in curve)}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s timing {res.timing}", flush=True)


if __name__ == "__main__":
    main()
