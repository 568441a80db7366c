"""Behaviour of the variance ratio, vanishing-feature profile, envelope, params/FLOPs and plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vf_lightning.diagnostics import (
    count_flops,
    count_params,
    depth_profile,
    envelope,
    plot_interpolation_curves,
    plot_prune_accuracy,
    plot_variance_ratios,
    plot_vf_profiles,
    variance_ratio,
    vf_layers,
    vf_profile,
    vf_ratio,
)
from vf_lightning.merge import average_models
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.repair import compute_goals, default_correction_sites


def _model(norm: str = "bn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="resnet20", norm=norm, width=0.25, image_size=8, init="vgg_init")).eval()


def _loader(zero: bool = False) -> DataLoader:
    x = torch.zeros(8, 3, 8, 8) if zero else torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)


def test_vf_profile_is_zero_on_zero_input_and_covers_all_layers() -> None:
    model = _model()
    prof = vf_profile(model, _loader(zero=True))
    assert set(prof) == set(vf_layers(model))
    assert any("shortcut" in k for k in prof) and any("norm" in k for k in prof)
    assert all(v == 0.0 for v in prof.values())


def test_vf_ratio_is_one_when_merging_a_model_with_itself() -> None:
    model = _model("ln")
    loader = _loader()
    merged = average_models([model, model])
    ref = vf_profile(model, loader)
    e = vf_ratio(vf_profile(merged, loader), [ref, ref])
    assert list(e) == list(ref)
    for v in e.values():
        assert v == pytest.approx(1.0, rel=1e-5)


def test_vf_profile_of_bias_free_linear_net_equals_plain_feature_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.Linear(6, 3, bias=False))
    x = torch.randn(5, 3, 2, 2)
    prof = vf_profile(net, DataLoader(TensorDataset(x), batch_size=5))
    with torch.no_grad():
        expected = (net[1](x.flatten(1)).norm(dim=1) / 6**0.5).mean()
    assert prof["1"] == pytest.approx(float(expected), rel=1e-5)


def test_envelope_dominates_values_and_follows_recursion() -> None:
    e = [0.2, 0.9, 0.5, 0.1, 0.3]
    env = envelope(e)
    L = len(e)
    assert env[-1] == e[-1]
    assert all(x >= y for x, y in zip(env, e))
    for idx in range(L - 1):
        assert env[idx] == pytest.approx(max(e[idx], env[idx + 1] * (1 + 0.4 / (L - idx + 1))))
    assert env[3] == pytest.approx(0.3 * (1 + 0.4 / 3))
    grid, vals = depth_profile(env)
    assert len(grid) == 20 and grid[-1] == 100.0 and vals[-1] == pytest.approx(env[-1])


def test_variance_ratio_is_one_for_a_model_against_itself() -> None:
    model = _model("ln")
    model.segments = model.segments[:1]  # type: ignore[assignment]  # keep the test small
    model.fc = nn.Linear(4, 10)
    loader = _loader()
    target = compute_goals([model], loader)
    ratios = variance_ratio(model, target, loader)
    assert list(ratios) == default_correction_sites(model)
    for v in ratios.values():
        assert v == pytest.approx(1.0, rel=1e-6)
    other = _model("ln", seed=1)
    other.segments, other.fc = other.segments[:1], nn.Linear(4, 10)  # type: ignore[assignment]
    shrunk = average_models([model, other])
    two = compute_goals([model, other], loader)
    assert min(variance_ratio(shrunk, two, loader).values()) < 1.0


def test_count_params_and_flops() -> None:
    lin = nn.Linear(10, 4)
    assert count_params(lin) == 44
    assert count_flops(lin, torch.randn(3, 10)) == 2 * 3 * 10 * 4
    with torch.no_grad():
        lin.weight[:2].zero_()
    assert count_params(lin, nonzero=True) == 44 - 20


def test_plots_write_png_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = [
        plot_variance_ratios(["a", "b", "c"], {"none": [1.0, 0.5, 0.2], "repair": [1.0, 1.0, 1.0]},
                             tmp_path / "vr.png"),
        plot_vf_profiles({"merged": [1.0, 0.6, 0.3]}, tmp_path / "vf.png"),
        plot_interpolation_curves([0, 0.5, 1], {"weight/none": {"acc": [0.9, 0.2, 0.9], "loss": [0.3, 2, 0.3]}},
                                  tmp_path / "lmc.png"),
        plot_prune_accuracy([{"pruner": "magnitude", "sparsity": s, "normalization": "none", "acc": 0.9 - s}
                             for s in (0.9, 0.0, 0.5)], tmp_path / "acc.png", dense=0.9, run_name="run"),
        plot_prune_accuracy([], tmp_path / "empty.png"),
        plot_vf_profiles({"w/none": [1.0, None, 0.3]}, tmp_path / "vf2.png", layers=["a", "b", "c"],  # type: ignore[list-item]
                         run_name="run"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["acc.png", "empty.png", "lmc.png", "vf.png", "vf2.png",
                                                          "vr.png"]
