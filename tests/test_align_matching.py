"""Weight / activation / ZipIt / CCA matching, merge transforms and N-model alignment."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from vf_lightning.align import (
    GroupTransform,
    align,
    align_many,
    apply_permutation,
    build_permutation_spec,
    cca_transform,
    identity_perms,
    merge_models,
    random_perms,
    transform_model,
    weight_matching,
    zipit_transform,
)
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.stats import Moments

pytestmark = pytest.mark.kernels  # torch-kernel bound: run once the background jobs free a core

wm_module = importlib.import_module("vf_lightning.align.weight_matching")  # the package exports the function

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _bn_model(seed: int, arch: str = "resnet20", width: float = 0.5) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch, norm="bn", width=width))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.normal_(0, 0.1)
        elif name.endswith("running_var"):
            b.uniform_(0.5, 1.5)
    return model.eval()


def _loader(n_batches: int = 2, bs: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.zeros(bs)) for _ in range(n_batches)]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weight_matching_recovers_a_planted_permutation_exactly() -> None:
    a = _bn_model(0)
    spec = build_permutation_spec(a, X)
    b = apply_permutation(a, spec, random_perms(spec, seed=3))
    res = align(a, b, "weight", example_input=X)
    assert _same_state(res.aligned_b(b), a)
    assert res.sweeps >= 2 and res.seconds > 0 and res.objective is not None


def test_weight_matching_of_a_model_with_itself_is_identity() -> None:
    a = _bn_model(0)
    res = align(a, a, "weight", example_input=X)
    assert all(torch.equal(p, torch.arange(p.numel())) for p in res.perms.values())


def test_weight_matching_objective_is_non_decreasing_and_deterministic() -> None:
    a, b = _bn_model(0), _bn_model(1)
    spec = build_permutation_spec(a, X)
    r1 = weight_matching(spec, a.state_dict(), b.state_dict(), seed=7)
    r2 = weight_matching(spec, a.state_dict(), b.state_dict(), seed=7)
    assert all(y >= x - 1e-9 for x, y in zip(r1.history, r1.history[1:]))
    assert r1.history[-1] > r1.history[0]
    assert all(torch.equal(r1.perms[k], r2.perms[k]) for k in r1.perms)
    aligned = r1.aligned_b(b)
    assert torch.allclose(aligned(X), b(X), atol=1e-5)  # function preserved
    capped = weight_matching(spec, a.state_dict(), b.state_dict(), seed=7, max_sweeps=1)
    assert capped.sweeps == 1


def test_running_stats_participate_in_weight_matching() -> None:
    a = _bn_model(0)
    spec = build_permutation_spec(a, X)
    state = a.state_dict()
    only_stats = {k: (v if "running" in k else torch.zeros_like(v)) for k, v in state.items()}
    planted = random_perms(spec, seed=4)
    from vf_lightning.align import permute_state_dict

    b_state = permute_state_dict(only_stats, spec, planted)
    res = weight_matching(spec, only_stats, b_state)
    recovered = permute_state_dict(b_state, spec, res.perms)
    for key in ("segments.0.0.norm1.running_mean", "segments.0.0.norm1.running_var"):
        assert torch.equal(recovered[key], state[key])  # inner groups are identified by their BN stats alone


@pytest.mark.parametrize("cfg", [ModelConfig(arch="resnet20", norm="bn", width=0.25),
                                 ModelConfig(arch="mlp", hidden=(32, 32), image_size=32)])
def test_activation_matching_recovers_a_planted_permutation(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    a = build_model(cfg).eval()
    spec = build_permutation_spec(a, X)
    planted = random_perms(spec, seed=5)
    b = apply_permutation(a, spec, planted)
    res = align(a, b, "activation", loader=_loader())
    assert _same_state(res.aligned_b(b), a)
    same = align(a, a, "activation", loader=_loader())
    assert all(torch.equal(p, torch.arange(p.numel())) for p in same.perms.values())


def test_unknown_method_fails_early_listing_valid_ones() -> None:
    a = _bn_model(0)
    with pytest.raises(ValueError, match="activation, cca, identity, weight, zip"):
        align(a, a, "wieght", example_input=X)
    with pytest.raises(ValueError, match="loader"):
        align(a, a, "activation", example_input=X)


def test_permutation_as_merge_matrices_equals_averaging_the_aligned_model() -> None:
    a, b = _bn_model(0), _bn_model(1)
    res = align(a, b, "weight", example_input=X)
    t = next(iter(res.transforms.values()))
    assert torch.allclose(t.merge.sum(1), torch.ones(t.size, dtype=t.merge.dtype))
    merged = merge_models(a, b, res.spec, res.transforms)
    aligned = res.aligned_b(b).state_dict()
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(merged.state_dict()[k], (v + aligned[k]) / 2, atol=1e-6), k
    # transform_model with a permutation equals apply_permutation
    tb = transform_model(b, res.spec, {k: (t.m_b, t.u_b) for k, t in res.transforms.items()})
    assert torch.allclose(tb(X), b(X), atol=1e-5)


def _features_cov(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    m = Moments(fa.shape[0] + fb.shape[0], outer=True)
    m.update(torch.cat([fa, fb]))
    return m.cov()


def test_zipit_merge_rows_sum_to_one_and_unmerge_is_an_indicator_within_budget() -> None:
    g = torch.Generator().manual_seed(0)
    c = 32
    base = torch.randn(c, 4000, generator=g, dtype=torch.float64)
    fa = base.clone()
    fa[1] = fa[0] + 0.01 * torch.randn(4000, generator=g, dtype=torch.float64)  # tempting same-model merges
    fa[3] = fa[2] + 0.01 * torch.randn(4000, generator=g, dtype=torch.float64)
    fb = base[torch.randperm(c, generator=g)] + 0.5 * torch.randn(c, 4000, generator=g, dtype=torch.float64)
    t = zipit_transform(_features_cov(fa, fb), a=0.3, b=0.125)
    assert t.merge.shape == (c, 2 * c) and t.unmerge.shape == (2 * c, c)
    assert torch.allclose(t.merge.sum(1), torch.ones(c, dtype=torch.float64))
    assert set(t.unmerge.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(t.unmerge.sum(1), torch.ones(2 * c, dtype=torch.float64))
    budget = int((c // 2) * 0.125)
    for rows in (t.unmerge[:c], t.unmerge[c:]):
        same_model_merges = c - int((rows.sum(0) > 0).sum())
        assert same_model_merges <= budget
    assert c - int((t.unmerge[:c].sum(0) > 0).sum()) >= 1  # the planted near-duplicates were merged


def test_zipit_of_identical_features_pairs_each_unit_with_itself() -> None:
    f = torch.randn(16, 2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = zipit_transform(_features_cov(f, f))
    assert torch.equal(t.u_a, torch.eye(16, dtype=torch.float64))
    assert torch.equal(t.u_b, torch.eye(16, dtype=torch.float64))


def test_cca_recovers_an_orthogonal_rotation() -> None:
    g = torch.Generator().manual_seed(0)
    c = 12
    fa = torch.randn(c, c, generator=g, dtype=torch.float64) @ torch.randn(c, 5000, generator=g, dtype=torch.float64)
    r, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    t = cca_transform(_features_cov(fa, r @ fa), gamma=0.1)
    assert torch.allclose(t.m_b, r.t(), atol=1e-6)  # T_B = R⁻¹ maps B's features back into A's basis
    assert torch.allclose(t.u_b, r, atol=1e-6)
    assert torch.allclose(t.m_a, torch.eye(c, dtype=torch.float64))


@pytest.mark.parametrize("method", ["zip", "cca", "identity"])
def test_merging_a_model_with_itself_is_exact(method: str) -> None:
    torch.manual_seed(0)
    a = build_model(ModelConfig(arch="mlp", hidden=(32, 32), image_size=32)).eval()
    res = align(a, a, method, loader=_loader())
    assert isinstance(next(iter(res.transforms.values())), GroupTransform)
    merged = merge_models(a, a, res.spec, res.transforms)
    assert torch.allclose(merged(X), a(X), atol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "sequential", "iterative"])
def test_n_model_alignment_brings_permuted_copies_into_one_basis(mode: str) -> None:
    torch.manual_seed(0)
    base = build_model(ModelConfig(arch="mlp", hidden=(16, 16), image_size=8)).eval()
    x = torch.randn(2, 3, 8, 8)
    spec = build_permutation_spec(base, x)
    models = [base] + [apply_permutation(base, spec, random_perms(spec, seed=s)) for s in (1, 2)]
    out = align_many(models, mode=mode, method="weight", example_input=x)
    for m in out.models[1:]:
        assert _same_state(m, out.models[0])
    for m, perms, aligned in zip(models, out.perms, out.models):
        assert _same_state(apply_permutation(m, spec, perms), aligned)
    if mode != "iterative":
        assert _same_state(out.models[0], base)
        assert all(torch.equal(out.perms[0][k], v) for k, v in identity_perms(spec).items())


@pytest.mark.parametrize("cfg", [ModelConfig(arch="vgg11", norm="bn", width=0.25),
                                 ModelConfig(arch="resnet20", norm="bn", width=0.5),
                                 ModelConfig(arch="vit", image_size=32, in_channels=3, patch=8, dim=32, depth=2,
                                             heads=4, num_classes=10)], ids=["vgg", "resnet20", "vit"])
@pytest.mark.parametrize("incremental", [0.0, 0.25, 1.0])
def test_skipping_unchanged_groups_gives_the_plain_coordinate_descent_result(
    cfg: ModelConfig, incremental: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipped groups, cached cost terms and terms updated from the units a neighbour moved (never, by default,
    whenever one neighbour moved) reach the plain coordinate descent's permutations and objective."""
    monkeypatch.setattr(wm_module, "INCREMENTAL_FRACTION", incremental)
    torch.manual_seed(0)
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    spec = build_permutation_spec(a, torch.randn(2, 3, 32, 32))
    fast = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    plain = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3, skip_unchanged=False)
    assert fast.sweeps == plain.sweeps and fast.sweeps > 1
    assert fast.objective == plain.objective
    # the history adds the gains read off the cost matrices: updated terms are float64 sums, recomputed ones
    # float32 products, so the two agree to float32 rounding
    assert fast.history == pytest.approx(plain.history, rel=1e-7)
    fp, pp = fast.perms or {}, plain.perms or {}
    assert pp and all(torch.equal(fp[k], pp[k]) for k in pp)
