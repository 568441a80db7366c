"""The merge session: goals in the merged basis (ZipIt from both transformed endpoints), REPAIR hits them at every
corrected site, method-spec correction sites on ResNets, N-model merging, PFM through the normalization registry."""

from __future__ import annotations

import torch
from torch import nn

from vf_lightning.align import apply_permutation, build_permutation_spec, model_maps, random_perms, transform_model
from vf_lightning.merge import MergeSession, SessionData
from vf_lightning.merge.pfm import pfm_sweep
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.repair import NORMALIZATIONS, WEIGHT_ONLY, affine_correct, reference_stats, register_normalization
from vf_lightning.repair.registry import NormContext


def _data(n: int = 256, channels: int = 1, size: int = 32, seed: int = 0, scale: float = 1.0) -> SessionData:
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    calib = [x[i : i + 64] for i in range(0, n, 64)]
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]
    return SessionData(calib, batches, batches[:2])


def _pair(cfg: ModelConfig, seeds: tuple[int, int] = (1, 2)) -> list[nn.Module]:
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model(cfg).eval())
    return out


PLAIN_VGG = ModelConfig(arch="vgg11", norm="none", width=0.125, in_channels=1, num_classes=10)


def test_zip_goals_come_from_both_transformed_endpoints_and_repair_hits_them_without_zeroing_channels() -> None:
    a, b = _pair(PLAIN_VGG)
    data = _data(scale=10.0)  # channel variances ≫ ε, so REPAIR's sqrt(v + ε) hits the goal std to ~1e-4
    s = MergeSession([a, b], data)
    merge = s.merge("zip")
    assert merge.protocol == "both_transformed"
    goals = s.goals(merge)
    res = s.alignment("zip")
    # goals equal the statistics of the two transformed endpoints, channel by channel (merged basis)
    a_t = transform_model(a, res.spec, model_maps(res.transforms, "a"))
    b_t = transform_model(b, res.spec, model_maps(res.transforms, "b"))
    sa, sb = reference_stats([a_t, b_t], data.calib, s.fix_sites)
    raw_a = reference_stats([a], data.calib, s.fix_sites)[0]
    moved = 0
    for site in s.fix_sites:
        torch.testing.assert_close(goals.mean[site], (sa.mean[site] + sb.mean[site]) / 2)
        torch.testing.assert_close(goals.std[site], (sa.std[site] + sb.std[site]) / 2)
        assert bool((goals.std[site] > 0).all()), f"{site}: a goal std of 0 would zero a merged channel"
        moved += int(not torch.allclose(goals.std[site], raw_a.std[site]))
    assert moved > 0, "ZipIt's merged basis should differ from A's untransformed channel order"
    repaired = s.normalized("zip", "repair")
    after = reference_stats([repaired], data.calib, s.fix_sites)[0]
    exact = affine_correct(merge.model, goals, data.calib, "repair", s.fix_sites, eps=1e-12)
    hit = reference_stats([exact], data.calib, s.fix_sites)[0]
    for site in s.fix_sites:
        torch.testing.assert_close(after.mean[site], goals.mean[site], atol=1e-4, rtol=1e-4)
        ratio = after.std[site] / goals.std[site]  # a·sqrt(v) = σ*·sqrt(v / (v + ε)) ≤ σ*
        assert bool((ratio > 0.5).all() and (ratio < 1 + 1e-4).all()), f"{site}: REPAIR missed or zeroed a channel"
        torch.testing.assert_close(hit.mean[site], goals.mean[site], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hit.std[site], goals.std[site], atol=1e-4, rtol=1e-4)


def test_cca_uses_one_reference_and_permutations_interpolate_a_and_aligned_b() -> None:
    a, b = _pair(PLAIN_VGG)
    s = MergeSession([a, b], _data())
    assert s.merge("cca").protocol == "one_reference" and len(s.merge("cca").endpoints) == 1
    m = s.merge("weight", 0.25)
    assert m.protocol == "interpolated" and m.weights == [0.75, 0.25]
    goals = s.goals(m)
    sa, sb = s.endpoint_stats(m)
    site = s.fix_sites[0]
    torch.testing.assert_close(goals.std[site], 0.75 * sa.std[site] + 0.25 * sb.std[site])


def test_resnet_session_corrects_block_convs_only_and_reports_the_self_check() -> None:
    cfg = ModelConfig(arch="resnet20", norm="ln", width=0.5, num_classes=10)
    a, b = _pair(cfg)
    s = MergeSession([a, b], _data(64, channels=3))
    assert s.fix_sites and all(site.endswith(("conv1", "conv2")) and "." in site for site in s.fix_sites)
    assert "conv" not in [site.split(".")[0] for site in s.fix_sites]  # the stem is not corrected
    assert not any("shortcut" in site or "downsample" in site for site in s.fix_sites)
    info = s.alignment_report("weight")
    assert info["self_check"] <= 1e-4 and info["max_abs_logit_diff"] <= 1e-4
    assert set(info) >= {"matching", "seconds", "max_abs_logit_diff", "self_check", "groups"}


def test_three_permuted_copies_merge_back_to_the_reference() -> None:
    (a,) = _pair(PLAIN_VGG, (1,))
    spec = build_permutation_spec(a, torch.randn(2, 1, 32, 32))
    b = apply_permutation(a, spec, random_perms(spec, seed=3))
    c = apply_permutation(a, spec, random_perms(spec, seed=4))
    data = _data(128)
    for mode in ("reference", "sequential", "iterative"):
        s = MergeSession([a, b, c], data, multi_mode=mode)  # type: ignore[arg-type]
        merged = s.merge("weight").model
        x = data.calib[0]
        torch.testing.assert_close(merged(x), a(x), atol=1e-4, rtol=1e-4)
        assert s.evaluate_variant("weight", "none")["acc"] == s.endpoint_metrics()[0]["acc"]


def test_a_user_registered_normalization_runs_inside_pfm_on_the_merged_part_only() -> None:
    name = "test_half_repair"
    if name not in NORMALIZATIONS:
        @register_normalization(name)
        def _half(model: nn.Module, ctx: NormContext) -> nn.Module:
            assert ctx.goals is not None and ctx.sites is not None
            return affine_correct(model, ctx.goals.scaled(0.5), ctx.data, "repair", ctx.sites,  # type: ignore[arg-type]
                                  bn_sites=ctx.bn_sites)  # fmt: skip
    assert name not in WEIGHT_ONLY
    a, b = _pair(ModelConfig(arch="vgg11", norm="bn", width=0.125, in_channels=1))
    data = _data(128)
    s = MergeSession([a, b], data)
    res = s.alignment("weight")
    seen: dict[int, nn.Module] = {}
    rows = pfm_sweep(a, b, res, [3], ["none", name], data.calib, lambda ms: [{"acc": 0.0, "loss": 0.0}] * len(ms),
                     data.example(), on_variant=lambda pfm, row: seen.setdefault(len(seen), pfm),
                     goals=s.goals(s.merge("weight"), s.stat_sites), sites=s.fix_sites)  # fmt: skip
    assert [r["normalization"] for r in rows] == ["none", name]
    plain, fixed = seen[0], seen[1]
    for (k, v0), v1 in zip(plain.state_dict().items(), fixed.state_dict().values()):
        if k.startswith(("a.", "b.")):
            assert torch.equal(v0, v1), f"{k}: the preserved prefix changed"
    assert any(not torch.equal(v0, v1) for (k, v0), v1 in zip(plain.state_dict().items(), fixed.state_dict().values())
               if k.startswith("merged."))  # fmt: skip
