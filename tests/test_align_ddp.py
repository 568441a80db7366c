"""Activation statistics under DDP: two gloo CPU processes on halves of the data equal one process on all of it."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vf_lightning.align import activation_statistics, build_permutation_spec, perms_from_stats
from vf_lightning.models import ModelConfig, build_model

CFG = ModelConfig(arch="resnet20", norm="bn", width=0.25)


def _setup() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    a = build_model(CFG).eval()
    b = build_model(CFG).eval()
    data = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return a, b, data


def _batches(x: torch.Tensor, bs: int = 16) -> list[torch.Tensor]:
    return list(x.split(bs))


def _summary(a: torch.nn.Module, b: torch.nn.Module, loader: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    spec = build_permutation_spec(a, loader[0][:2])
    stats = activation_statistics(a, b, spec, loader)
    out = {f"{k}/corr": st.corr() for k, st in stats.items()}  # type: ignore[union-attr]
    for k, p in perms_from_stats(stats, spec).items():
        corr = out[f"{k}/corr"]
        out[f"{k}/lap"] = corr[torch.arange(p.numel()), p].sum()
        live = bool((stats[k].a.var > 1e-6).all() and (stats[k].b.var > 1e-6).all())  # type: ignore[union-attr]
        if live:  # with dead units the LAP has ties; compare perms only where it is well posed
            out[f"{k}/perm"] = p
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        a, b, data = _setup()
        half = data.shape[0] // world
        result = _summary(a, b, _batches(data[rank * half:(rank + 1) * half]))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_same_statistics_and_perms_as_one() -> None:
    a, b, data = _setup()
    single = _summary(a, b, _batches(data))
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the ranks inherit this process's imports (spawn would import torch and this module again, ~6 s)
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, start_method="fork")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert sum(k.endswith("/perm") for k in single) >= 2
    for key, ref in single.items():
        for res in ranks:
            if key.endswith("/perm"):
                assert torch.equal(res[key], ref), key
            else:
                assert torch.allclose(res[key], ref, atol=1e-6, rtol=0), key
    # the halves alone differ from the whole: the all-reduce is what makes them agree
    half = _summary(a, b, _batches(data[:32]))
    assert any(not torch.allclose(half[k], single[k], atol=1e-6) for k in single if k.endswith("/corr"))
