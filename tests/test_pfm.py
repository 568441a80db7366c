"""Preserve-First Merging: depth semantics, exactness limits, normalization inside PFM, sweep, ratios, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vf_lightning.merge.pfm as pfm_mod
from vf_lightning.align import align, apply_permutation, build_permutation_spec, merge_models, random_perms
from vf_lightning.evaluate import evaluate
from vf_lightning.merge.pfm import (
    PFMError,
    PFMGroup,
    PFMModel,
    PFMSource,
    PreserveFirstMerger,
    build_pfm,
    evaluate_variants,
    load_pfm,
    max_preserved,
    pfm_sweep,
    save_pfm,
)
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.stats import stream_moments

pytestmark = pytest.mark.kernels  # torch-kernel bound: run once the background jobs free a core

CASES = [("vgg11", "bn", 16), ("vgg11", "none", 16), ("resnet20", "bn", 8)]


def _cfg(arch: str, norm: str, size: int, bias: bool = True) -> ModelConfig:
    return ModelConfig(arch=arch, norm=norm, width=0.125 if arch.startswith("vgg") else 0.25, image_size=size,
                       bias=bias)


def _pair(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    a = build_model(cfg).eval()
    torch.manual_seed(2)
    b = build_model(cfg).eval()
    for m in (a, b):  # non-trivial BN statistics, so that merging them matters
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
    return a, b


def _x(size: int, n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _loader(size: int, n: int = 32) -> DataLoader:
    x = _x(size, n, seed=3)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(4))
    return DataLoader(TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize("arch,norm,size", CASES)
@torch.no_grad()
def test_zero_and_max_preserved_are_full_merge_and_ensemble(arch: str, norm: str, size: int) -> None:
    cfg = _cfg(arch, norm, size)
    a, b = _pair(cfg)
    x = _x(size)
    al = align(a, b, "weight", example_input=x[:2])
    merger = PreserveFirstMerger(a, b, al)
    merged = merge_models(a, b, al.spec, al.transforms)
    for k in (0, 1):  # one preserved layer only re-routes the first conv, which reads the shared input
        assert (merger.build(k)(x) - merged(x)).abs().max() <= 1e-5
    ens = merger.build(merger.max_preserved)
    assert (ens(x) - (a(x) + b(x)) / 2).abs().max() <= 1e-5
    assert ens.transitions == list(merger.layout.outputs)


@pytest.mark.parametrize("arch,norm,size", [("vgg11", "bn", 16), ("resnet20", "bn", 8)])
@torch.no_grad()
def test_permuted_copy_merges_back_to_a_at_every_depth(arch: str, norm: str, size: int) -> None:
    a, _ = _pair(_cfg(arch, norm, size))
    x = _x(size)
    spec = build_permutation_spec(a, x[:2])
    b = apply_permutation(a, spec, random_perms(spec, seed=5))
    al = align(a, b, "weight", spec=spec)
    merger = PreserveFirstMerger(a, b, al)
    ref = a(x)
    for k in range(merger.max_preserved + 1):
        assert (merger.build(k)(x) - ref).abs().max() <= 1e-5, f"preserved={k}"


@torch.no_grad()
def test_identity_matching_at_last_vgg_position_matches_hand_computation() -> None:
    a, b = _pair(_cfg("vgg11", "none", 16))
    x = _x(16)
    al = align(a, b, "identity", example_input=x[:2])
    merger = PreserveFirstMerger(a, b, al)
    k = merger.max_preserved - 1  # transition = last conv
    pfm = merger.build(k)
    last = [i for i, m in enumerate(a.features) if isinstance(m, nn.Conv2d)][-1]
    assert pfm.transitions == [f"features.{last}"]
    h_a, h_b = a.features[:last](x), b.features[:last](x)
    z = torch.relu((a.features[last](h_a) + b.features[last](h_b)) / 2)
    w = (a.classifier.weight + b.classifier.weight) / 2
    c = (a.classifier.bias + b.classifier.bias) / 2
    expected = torch.flatten(a.pool(z), 1) @ w.t() + c
    assert (pfm(x) - expected).abs().max() <= 1e-5


def test_max_preserved_of_zoo_models() -> None:
    x = torch.zeros(2, 3, 32, 32)
    assert max_preserved(build_model(ModelConfig(arch="vgg16", width=0.125)), x) == 14
    assert max_preserved(build_model(ModelConfig(arch="vgg11", norm="bn", width=0.125)), x) == 9
    assert max_preserved(build_model(ModelConfig(arch="resnet20", norm="bn", width=0.25)), x[..., :8, :8]) == 13


def test_resnet_transitions_follow_the_residual_stream() -> None:
    a, b = _pair(_cfg("resnet20", "bn", 8))
    al = align(a, b, "identity", example_input=_x(8)[:2])
    lay = PreserveFirstMerger(a, b, al).layout
    assert lay.transitions(2) == ["conv1", "segments.0.0.conv2"]
    assert lay.transitions(4) == ["conv1", "segments.0.0.conv2", "segments.0.1.conv2", "segments.0.2.conv2"]
    assert lay.transitions(5) == ["segments.1.0.conv1", "segments.1.0.shortcut.0"]
    assert lay.transitions(6) == ["segments.1.0.conv2", "segments.1.0.shortcut.0"]
    with pytest.raises(PFMError, match="preserved layers must be in 0..13"):
        lay.transitions(14)


@pytest.mark.parametrize("arch,norm,size", [("vgg11", "bn", 16), ("resnet20", "bn", 8)])
def test_params_and_flops_ratios_grow_from_one_to_two(arch: str, norm: str, size: int) -> None:
    a, b = _pair(_cfg(arch, norm, size))
    x = _x(size, 1)
    merger = PreserveFirstMerger(a, b, align(a, b, "identity", example_input=x))
    models = [merger.build(k) for k in range(merger.max_preserved + 1)]
    params = [m.params_ratio(a) for m in models]
    flops = [m.flops_ratio(a, x) for m in models]
    assert params[0] == 1.0 and flops[0] == 1.0
    # monotone up to the averaging mixers (2 weights per transition channel, < 0.5 % of the model)
    assert all(p1 <= p2 + 5e-3 for p1, p2 in zip(params, params[1:])), params
    assert all(f1 <= f2 + 5e-3 for f1, f2 in zip(flops, flops[1:])), flops
    assert params[len(params) // 2] < 1.5 < params[-2]
    assert params[-1] == pytest.approx(2.0, abs=0.01) and flops[-1] == pytest.approx(2.0, abs=0.01)


def _site_moments(pfm: PFMModel, sites: list[str], loader: DataLoader) -> dict:
    return stream_moments([pfm], [sites], loader)[0]


@pytest.mark.parametrize("method", ["repair", "rescale"])
def test_repair_inside_pfm_hits_goal_statistics_at_merged_sites(method: str) -> None:
    a, b = _pair(_cfg("vgg11", "none", 16))
    loader = _loader(16)
    merger = PreserveFirstMerger(a, b, align(a, b, "weight", example_input=_x(16)[:2]))
    goals = merger.goals(loader)
    pfm = merger.variant(3, method, loader, eps=1e-12)  # eps only biases σ by sqrt(v/(v+ε))
    sites = pfm.merged_sites()
    assert f"merged.{pfm.transitions[0]}" in sites and "merged.classifier" not in sites
    mom = _site_moments(pfm, sites, loader)
    for site in sites:
        name = site[len("merged."):]
        torch.testing.assert_close(mom[site].std, goals.std[name], rtol=1e-4, atol=1e-5)
        if method == "repair":
            torch.testing.assert_close(mom[site].mean, goals.mean[name], rtol=1e-4, atol=1e-5)
    # the preserved prefixes are untouched
    plain = merger.build(3)
    for (k1, v1), (k2, v2) in zip(plain.a.state_dict().items(), pfm.a.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_reset_inside_pfm_sets_merged_batchnorms_to_population_statistics() -> None:
    a, b = _pair(_cfg("resnet20", "bn", 8))
    loader = _loader(8)
    merger = PreserveFirstMerger(a, b, align(a, b, "weight", example_input=_x(8)[:2]))
    pfm = merger.variant(6, "reset", loader)
    bns = pfm.merged_batchnorms()
    assert bns
    mom = stream_moments([pfm], [bns], loader, pre=True)[0]
    modules = dict(pfm.named_modules())
    for name in bns:
        torch.testing.assert_close(modules[name].running_mean, mom[name].mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(modules[name].running_var, mom[name].var.float(), rtol=1e-4, atol=1e-5)
    untouched = merger.build(6)
    for (k1, v1), (_, v2) in zip(untouched.b.state_dict().items(), pfm.b.state_dict().items()):
        assert torch.equal(v1, v2), k1


def test_sweep_reuses_one_goal_statistics_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _pair(_cfg("vgg11", "none", 16))
    loader = _loader(16)
    x = _x(16)
    calls = []
    original = pfm_mod.reference_stats

    def counting(*args: object, **kw: object) -> object:
        calls.append(1)
        return original(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pfm_mod, "reference_stats", counting)
    al = align(a, b, "weight", example_input=x[:2])
    rows = pfm_sweep(a, b, al, [0, 3, 9], ["none", "repair", "rescale", "bias_calibration", "zero_bias"], loader,
                     lambda ms: evaluate_variants(ms, list(loader), "cpu"), x[:1], max_samples=24)
    assert len(calls) == 1
    assert len(rows) == 15
    assert set(rows[0]) == {"preserved_layers", "normalization", "acc", "loss", "params_ratio", "flops_ratio",
                            "seconds"}
    ens = [r for r in rows if r["preserved_layers"] == 9]
    assert len({(r["acc"], round(r["loss"], 6)) for r in ens}) == 1  # nothing left to normalize in the ensemble
    assert [r["params_ratio"] for r in rows if r["normalization"] == "none"] == sorted(
        r["params_ratio"] for r in rows if r["normalization"] == "none")


@torch.no_grad()
def test_sweep_over_several_matchings_evaluates_each_depth_once_and_equals_the_single_sweeps() -> None:
    a, b = _pair(_cfg("vgg11", "bn", 16))
    x, loader = _x(16), _loader(16)
    batches = list(loader)
    aligned = {m: align(a, b, m, example_input=x[:2]) for m in ("identity", "weight")}
    groups: list[PFMGroup] = []

    def evaluate_fn(variants: list[PFMModel]) -> list[dict[str, float]]:
        groups.append(PFMGroup(variants))
        return evaluate_variants(variants, batches, "cpu")

    depths, norms = [3, 9], ["none", "reset"]
    rows = pfm_sweep(a, b, {m: PFMSource(al) for m, al in aligned.items()}, depths, norms, loader, evaluate_fn,
                     x[:1], max_samples=24)  # fmt: skip
    assert len(groups) == len(depths)  # one evaluation per depth, covering both matchings
    # A's prefix is A's own for both matchings; B's differ by the permutation of the transition outputs, except
    # at the ensemble depth (the transition is the output layer: nothing permuted), where everything is shared
    assert [(len(g.a_prefixes), len(g.b_prefixes)) for g in groups] == [(1, 2), (1, 1)]
    assert [(r["matching"], r["preserved_layers"]) for r in rows] == [
        (m, k) for m in aligned for k in depths for _ in norms]
    with pytest.raises(PFMError, match="in its PFMSource"):
        pfm_sweep(a, b, {"weight": PFMSource(aligned["weight"])}, depths, norms, loader, evaluate_fn, x[:1],
                  merged=a)  # fmt: skip
    for m, al in aligned.items():
        single = pfm_sweep(a, b, al, depths, norms, loader, lambda vs: evaluate_variants(vs, batches, "cpu"), x[:1],
                           max_samples=24)  # fmt: skip
        mine = [r for r in rows if r["matching"] == m]
        for r1, r2 in zip(mine, single, strict=True):
            assert (r1["preserved_layers"], r1["normalization"], r1["acc"]) == (
                r2["preserved_layers"], r2["normalization"], r2["acc"])
            assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6)


@pytest.mark.parametrize("arch,norm,size", [("vgg11", "bn", 16), ("resnet20", "bn", 8)])
@torch.no_grad()
def test_variants_of_one_depth_share_one_prefix_pass_and_keep_their_own_results(arch: str, norm: str,
                                                                               size: int) -> None:
    a, b = _pair(_cfg(arch, norm, size))
    x, loader = _x(size), _loader(size)
    merger = PreserveFirstMerger(a, b, align(a, b, "weight", example_input=x[:2]))
    variants = [merger.variant(3, n, loader, max_samples=24) for n in ("none", "reset", "repair", "zero_bias")]
    runs = [0] * len(variants)
    for i, v in enumerate(variants):
        v.a.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))  # type: ignore[union-attr]
    outs = PFMGroup(variants)(x)
    assert runs == [1, 0, 0, 0], "the preserved prefixes run once, for all variants"
    for v, out in zip(variants, outs, strict=True):
        assert torch.equal(out, v(x))
    assert len({round(float(o.abs().sum()), 3) for o in outs}) == len(outs), "the merged parts differ"
    batches = list(loader)
    for v, r in zip(variants, evaluate_variants(variants, batches, "cpu"), strict=True):
        single = evaluate(v, batches)
        assert r["acc"] == single["acc"] and r["loss"] == pytest.approx(single["loss"], abs=1e-5)
    with pytest.raises(PFMError, match="one depth"):
        PFMGroup([variants[0], merger.variant(4, "none")])
    # another matching of the pair: A's prefix is A's own in both (shared), B's differs (one run each)
    ident = PreserveFirstMerger(a, b, align(a, b, "identity", example_input=x[:2])).variant(3, "none")
    changed = merger.variant(3, "none")
    next(changed.b.parameters()).add_(1.0)  # type: ignore[union-attr]
    mixed = [variants[0], ident, changed]
    group = PFMGroup(mixed).eval()
    assert (len(group.a_prefixes), len(group.b_prefixes)) == (1, 3)
    for v, out in zip(mixed, group(x), strict=True):
        assert torch.equal(out, v(x))


@pytest.mark.parametrize("method", ["zip", "cca"])
@torch.no_grad()
def test_general_merge_matrices_keep_the_depth_limits(method: str) -> None:
    a, b = _pair(_cfg("vgg11", "bn", 16))
    x, loader = _x(16), _loader(16)
    al = align(a, b, method, loader=loader, example_input=x[:2])
    merger = PreserveFirstMerger(a, b, al)
    assert (merger.build(0)(x) - merge_models(a, b, al.spec, al.transforms)(x)).abs().max() <= 1e-5
    assert (merger.build(merger.max_preserved)(x) - (a(x) + b(x)) / 2).abs().max() <= 1e-5
    repaired = merger.variant(4, "repair", loader, one_ref=True)
    assert torch.isfinite(repaired(x)).all()


@pytest.mark.parametrize("arch,norm,size,k,method", [("vgg11", "none", 16, 4, "repair"),
                                                     ("resnet20", "bn", 8, 6, "reset")])
@torch.no_grad()
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, arch: str, norm: str, size: int, k: int,
                                                         method: str) -> None:
    cfg = _cfg(arch, norm, size, bias=False)
    a, b = _pair(cfg)
    loader = _loader(size)
    merger = PreserveFirstMerger(a, b, align(a, b, "weight", example_input=_x(size)[:2]))
    pfm = merger.variant(k, method, loader)
    path = save_pfm(pfm, tmp_path / "pfm.pt", cfg, meta={"matching": "weight"})
    loaded, loaded_cfg = load_pfm(path)
    assert loaded_cfg == cfg and loaded.preserved == k and loaded.transitions == pfm.transitions
    x = _x(size)
    assert torch.equal(loaded(x), pfm(x))


def test_unsupported_graph_and_bad_arguments_fail_clearly(tmp_path) -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Conv2d(3, 4, 1)
            self.conv = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(torch.relu(self.conv(self.inp(x))))
            return self.fc(h.mean((2, 3)))

    m = Shared()
    al = align(m, m, "identity", example_input=torch.randn(2, 3, 4, 4))
    with pytest.raises(PFMError, match="called more than once"):
        build_pfm(m, m, al, 1)
    a, b = _pair(_cfg("vgg11", "none", 16))
    merger = PreserveFirstMerger(a, b, align(a, b, "identity", example_input=_x(16)[:2]))
    with pytest.raises(ValueError, match="unknown normalization .tact."):
        merger.variant(2, "tact")
    with pytest.raises(PFMError, match="needs a calibration loader"):
        merger.variant(2, "repair")
    with pytest.raises(ValueError, match="only defined for networks without normalization"):
        a_bn, b_bn = _pair(_cfg("vgg11", "bn", 16))
        PreserveFirstMerger(a_bn, b_bn, align(a_bn, b_bn, "identity", example_input=_x(16)[:2])).variant(
            2, "bias_calibration")
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(PFMError, match="not a PFM checkpoint"):
        load_pfm(tmp_path / "x.pt")
