"""Behaviour of interpolation, averaging, the interpolation curve, barriers, evaluate and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vf_lightning.evaluate import evaluate
from vf_lightning.io import atomic_torch_save, atomic_write_json
from vf_lightning.merge import average_models, barrier, interpolate_state
from vf_lightning.models import ModelConfig, build_model


def _bn_pair() -> tuple[nn.Module, nn.Module]:
    cfg = ModelConfig(arch="vgg11", norm="bn", width=0.125, image_size=16)
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    a(torch.randn(4, 3, 16, 16))  # move BN buffers away from their defaults
    b(torch.randn(4, 3, 16, 16) * 2)
    b.features[1].num_batches_tracked.fill_(7)
    return a.eval(), b.eval()


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(20, 3, 16, 16, generator=g), torch.randint(0, 10, (20,), generator=g)),
                      batch_size=8)


def test_alpha_zero_and_one_reproduce_endpoints_exactly() -> None:
    a, b = _bn_pair()
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, ref in [(0.0, sa), (1.0, sb)]:
        out = interpolate_state(sa, sb, alpha)
        for k, v in out.items():
            if torch.is_floating_point(v):
                assert torch.equal(v, ref[k]), k
    mid = interpolate_state(sa, sb, 0.25)
    k = "features.1.running_var"
    torch.testing.assert_close(mid[k], 0.75 * sa[k] + 0.25 * sb[k])
    assert torch.equal(mid["features.1.num_batches_tracked"], sa["features.1.num_batches_tracked"])


def test_merging_a_model_with_itself_is_identity() -> None:
    a, _ = _bn_pair()
    merged = average_models([a, a, a], weights=[0.2, 0.3, 0.5])
    assert type(merged) is type(a) and merged is not a
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(merged.eval()(x), a(x))


def test_barrier_conventions() -> None:
    assert barrier([0.7, 0.7, 0.7], "acc") == 0.0
    assert barrier([1.2, 1.2, 1.2], "loss") == 0.0
    assert barrier([0.9, 0.5, 0.8], "acc") == pytest.approx(0.35)
    assert barrier([0.3, 1.3, 0.5], "loss") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="kind"):
        barrier([1, 2], "top5")  # type: ignore[arg-type]


def test_evaluate_returns_fraction_and_mean_loss_and_restores_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    model.train()
    loader = _loader()
    out = evaluate(model, loader)
    assert 0.0 <= out["acc"] <= 1.0 and model.training
    x, y = loader.dataset.tensors
    with torch.no_grad():
        logits = model(x)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert out["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_atomic_write_leaves_no_partial_file_when_the_writer_raises(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "report.json"
    atomic_write_json({"ok": 1}, target)
    with pytest.raises(TypeError):
        atomic_write_json({"bad": object()}, target)
    ckpt = tmp_path / "model.ckpt"
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails inside torch.save)
        atomic_torch_save({"f": lambda: 0}, ckpt)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_torch_save({"w": torch.ones(2)}, ckpt)
    assert torch.equal(torch.load(ckpt)["w"], torch.ones(2))
