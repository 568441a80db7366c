"""Behaviour of one-shot pruners, sparsity reporting and post-pruning normalization."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vf_lightning.models import ModelConfig, build_model
from vf_lightning.prune import (
    PRUNERS,
    diag_fisher,
    get_pruner,
    prunable_modules,
    prune_and_normalize,
    prune_model,
    sparsity_report,
)
from vf_lightning.repair import compute_goals, reset_bn_stats
from vf_lightning.stats import stream_moments


def _loader(n: int = 32, bs: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=bs)


def _model(arch: str = "vgg11", norm: str = "none") -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, norm=norm, width=0.125, image_size=16, init="vgg_init")).eval()


def test_registry_lists_pruners_and_rejects_unknown() -> None:
    assert {"global_magnitude", "layerwise_magnitude", "diag_fisher"} <= set(PRUNERS)
    with pytest.raises(ValueError, match="global_magnitude"):
        get_pruner("magnitude")


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9])
def test_global_magnitude_reaches_sparsity_within_one_element_and_keeps_biases(sparsity: float) -> None:
    dense = _model()
    pruned = prune_model(dense, "global_magnitude", sparsity)
    rep = sparsity_report(pruned)
    assert abs(rep["zeros"] - sparsity * rep["total"]) <= 1  # type: ignore[operator]
    for (name, m), (_, d) in zip(prunable_modules(pruned), prunable_modules(dense)):
        assert torch.equal(m.bias, d.bias), name
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        kept = m.weight != 0
        torch.testing.assert_close(m.weight[kept], d.weight[kept])
    new = torch.cat([m.weight.flatten() for _, m in prunable_modules(pruned)])
    old = torch.cat([m.weight.flatten() for _, m in prunable_modules(dense)])
    smallest_kept = old[new != 0].abs().min() if (new != 0).any() else torch.tensor(float("inf"))
    largest_pruned = old[new == 0].abs().max() if (new == 0).any() else torch.tensor(0.0)
    assert largest_pruned <= smallest_kept


def test_layerwise_magnitude_reaches_sparsity_per_layer() -> None:
    pruned = prune_model(_model(), "layerwise_magnitude", 0.6)
    for name, m in prunable_modules(pruned):
        assert abs(int((m.weight == 0).sum()) - 0.6 * m.weight.numel()) <= 0.5 + 1e-9, name


def test_module_selection_include_exclude() -> None:
    dense = _model()
    pruned = prune_model(dense, "global_magnitude", 0.5, exclude=["classifier"])
    assert torch.equal(pruned.classifier.weight, dense.classifier.weight)
    only = prune_model(dense, "layerwise_magnitude", 0.5, include=["features.0"])
    assert torch.equal(only.features[3].weight, dense.features[3].weight)
    assert sparsity_report(only, include=["features.0"])["global"] == pytest.approx(0.5, abs=1e-2)


def test_diag_fisher_is_per_sample_and_prunes_layerwise() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 4, (6,))
    fisher = diag_fisher(model, [("1", model[1])], DataLoader(TensorDataset(x, y), batch_size=4))
    expected = torch.zeros_like(model[1].weight)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected += model[1].weight.grad.pow(2) / 6
    torch.testing.assert_close(fisher["1"], expected, rtol=1e-4, atol=1e-7)
    pruned = prune_model(_model(), "diag_fisher", 0.5, loader=_loader(), fisher_samples=16)
    for name, m in prunable_modules(pruned):
        assert abs(int((m.weight == 0).sum()) - 0.5 * m.weight.numel()) <= 0.5, name


@pytest.mark.parametrize("arch,norm,expected", [("vgg11", "ln", "repair"), ("vgg11", "bn", "reset")])
def test_normalization_at_sparsity_zero_changes_nothing(arch: str, norm: str, expected: str) -> None:
    loader = _loader()
    dense = _model(arch, norm)
    if norm == "bn":
        dense = reset_bn_stats(dense, loader)  # exact stats, as a finished training run would have approximately
    res = prune_and_normalize(dense, 0.0, loader, max_samples=32, eps=1e-12)
    assert res.normalization == expected
    x = next(iter(loader))[0]
    torch.testing.assert_close(res.normalized.eval()(x), dense(x), rtol=1e-4, atol=1e-4)


def test_post_prune_repair_matches_dense_statistics_and_keeps_zeros() -> None:
    loader = _loader()
    dense = _model("vgg11", "ln")
    goals = compute_goals([dense], loader, max_samples=32)
    res = prune_and_normalize(dense, 0.7, loader, normalization="repair", goals=goals, eps=1e-12)
    for (name, m), (_, p) in zip(prunable_modules(res.normalized), prunable_modules(res.pruned)):
        assert torch.equal(m.weight == 0, p.weight == 0), name
    stats = stream_moments([res.normalized], [goals.sites], loader)[0]
    for s in goals.sites:
        torch.testing.assert_close(stats[s].std, goals.std[s], rtol=1e-3, atol=1e-4)
    assert res.report["global"] == pytest.approx(0.7, abs=1e-3)


def test_reset_after_pruning_changes_only_batchnorm_buffers() -> None:
    loader = _loader()
    dense = _model("vgg11", "bn")
    res = prune_and_normalize(dense, 0.8, loader, normalization="auto", max_samples=16)
    assert res.normalization == "reset"
    sd_p, sd_n = res.pruned.state_dict(), res.normalized.state_dict()
    changed = [k for k in sd_p if not torch.equal(sd_p[k], sd_n[k])]
    assert changed and all("running_" in k for k in changed)
