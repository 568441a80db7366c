"""Concurrent pair training: the two networks' steps in worker threads give exactly the sequential result."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vf_lightning.lit import OptimConfig, PairModule
from vf_lightning.lit.concurrent import concurrent_losses
from vf_lightning.models import ModelConfig

NET = ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1, image_size=28, num_classes=10)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        m = trainer.callback_metrics
        self.losses.append((float(m["train/loss_a"]), float(m["train/loss_b"])))


def _fit(concurrent: bool | None, threads: int, **trainer_args: Any) -> tuple[PairModule, list[tuple[float, float]]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g))
    L.seed_everything(0, verbose=False)
    module = PairModule(NET, OptimConfig(lr=0.05), concurrent=concurrent)
    losses = _Losses()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
                        **trainer_args)  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer.fit(module, DataLoader(data, batch_size=16))
    finally:
        torch.set_num_threads(before)
    return module, losses.losses


@pytest.mark.parametrize("trainer_args", [{}, {"gradient_clip_val": 0.5, "accumulate_grad_batches": 2}])
def test_concurrent_pair_steps_equal_the_sequential_ones_bit_for_bit(trainer_args: dict[str, Any]) -> None:
    # two workers of one intra-op thread each compute exactly what one thread computes for one network after the
    # other: same kernels, no cross-talk; Lightning's clipping and accumulation still apply (automatic optimization)
    par, par_losses = _fit(True, 2, **trainer_args)
    seq, seq_losses = _fit(False, 1, **trainer_args)
    assert par.concurrent_threads == 1 and seq.concurrent_threads == 0
    assert par_losses == seq_losses and len(par_losses) == 3 * trainer_args.get("accumulate_grad_batches", 1)
    start = PairModule(NET, OptimConfig(lr=0.05)).state_dict()
    state_par, state_seq = par.state_dict(), seq.state_dict()
    assert state_par.keys() == state_seq.keys()
    for k, v in state_par.items():
        assert torch.equal(v, state_seq[k]), k
    assert not torch.equal(state_par["net_a.features.0.weight"], start["net_a.features.0.weight"])  # it trained


def test_concurrency_is_automatic_on_a_cpu_with_two_threads_and_refused_where_it_cannot_work() -> None:
    assert _fit(None, 2)[0].concurrent_threads == 1
    assert _fit(None, 1)[0].concurrent_threads == 0  # one core: one network after the other
    with pytest.raises(ValueError, match="precision is bf16-mixed"):
        _fit(True, 2, precision="bf16-mixed")
    with pytest.raises(ValueError, match="one intra-op thread"):
        _fit(True, 1)
    mlp = ModelConfig(arch="mlp", norm="none", in_channels=1, image_size=28, hidden=(8,))
    module = PairModule(mlp, concurrent=True)
    module.net_a.add_module("drop", torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout"):
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module, DataLoader(TensorDataset(torch.randn(8, 1, 28, 28),
                                                                                   torch.randint(0, 10, (8,)))))


def test_concurrent_losses_refuse_networks_that_share_parameters() -> None:
    shared = torch.nn.Linear(3, 2)
    a, b = torch.nn.Sequential(shared), torch.nn.Sequential(shared, torch.nn.ReLU())
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="share no parameters"):
        concurrent_losses([a, b], [lambda: (a(x).sum(), {}), lambda: (b(x).sum(), {})], 1)
    with pytest.raises(ValueError, match="one step per network"):
        concurrent_losses([a, torch.nn.Linear(3, 2)], [lambda: (a(x).sum(), {})], 1)
