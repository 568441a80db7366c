"""Behaviour of RESET, REPAIR, RESCALE, RESHIFT, folding, bias calibration and the normalization registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vf_lightning.evaluate import evaluate
from vf_lightning.merge import interpolate_models
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.repair import (
    NORMALIZATIONS,
    FoldPlans,
    Measure,
    affine_coefficients,
    affine_correct,
    auto_normalization,
    batchnorm_sites,
    bias_calibrate,
    bias_calibrate_merged,
    compute_goals,
    default_correction_sites,
    ensure_biases,
    evaluated_stats,
    fold_affine,
    get_normalization,
    inference_copy,
    normalize,
    reference_stats,
    reset_bn_stats,
    sequential_estimate,
    zero_bias,
)
from vf_lightning.stats import stream_moments


def _loader(n: int = 48, shape: tuple[int, ...] = (3, 16, 16), bs: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _small(arch: str) -> DataLoader:
    """Calibration data sized for ``arch``: ResNets take any size, so they get 8×8 inputs to keep tests fast."""
    return _loader(shape=(3, 8, 8)) if arch.startswith("resnet") else _loader()


def _pair(arch: str = "vgg11", norm: str = "none", bias: bool = True, **kw: object) -> tuple[nn.Module, nn.Module]:
    cfg = ModelConfig(arch=arch, norm=norm, width=0.125, image_size=16, bias=bias, init="vgg_init", **kw)  # type: ignore[arg-type]
    torch.manual_seed(1)
    a = build_model(cfg).eval()
    torch.manual_seed(2)
    b = build_model(cfg).eval()
    return a, b


def _site_stats(model: nn.Module, sites: list[str], loader: DataLoader) -> dict:
    model.eval()
    return stream_moments([model], [sites], loader)[0]


@pytest.mark.parametrize("arch,norm", [("vgg11", "none"), ("resnet20", "ln")])
def test_repair_hits_goal_mean_and_std_per_channel(arch: str, norm: str) -> None:
    a, b = _pair(arch, norm)
    loader = _small(arch)
    merged = interpolate_models(a, b, 0.5)
    sites = default_correction_sites(merged)
    goals = compute_goals([a, b], loader, [0.5, 0.5], sites)
    fixed = affine_correct(merged, goals, loader, "repair", eps=1e-10)  # ε only shrinks collapsed channels' std
    stats = _site_stats(fixed, sites, loader)
    for s in sites:
        scale = goals.std[s].max()
        torch.testing.assert_close(stats[s].mean, goals.mean[s], rtol=1e-3, atol=1e-3 * scale)
        torch.testing.assert_close(stats[s].std, goals.std[s], rtol=1e-3, atol=1e-3 * scale)
    assert type(fixed) is type(merged)


def test_rescale_keeps_mean_signs_hits_std_and_adds_no_bias() -> None:
    a, b = _pair("vgg11", "none", bias=False)
    loader = _loader()
    merged = interpolate_models(a, b, 0.5)
    sites = default_correction_sites(merged)
    before = _site_stats(merged, sites[:1], loader)[sites[0]].mean
    goals = compute_goals([a, b], loader, [0.5, 0.5], sites)
    fixed = affine_correct(merged, goals, loader, "rescale", eps=1e-10)
    stats = _site_stats(fixed, sites, loader)
    assert torch.equal(torch.sign(stats[sites[0]].mean), torch.sign(before))
    for s in sites:
        torch.testing.assert_close(stats[s].std, goals.std[s], rtol=1e-3, atol=1e-3 * goals.std[s].max())
    assert all(m.bias is None for m in fixed.modules() if isinstance(m, nn.Conv2d))


def test_reshift_hits_goal_mean() -> None:
    a, b = _pair("vgg11", "none")
    loader = _loader()
    merged = interpolate_models(a, b, 0.3)
    sites = default_correction_sites(merged)
    goals = compute_goals([a, b], loader, [0.7, 0.3], sites)
    fixed = normalize(merged, "reshift", loader, goals=goals)
    stats = _site_stats(fixed, sites, loader)
    for s in sites:
        torch.testing.assert_close(stats[s].mean, goals.mean[s], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("module", [nn.Conv2d(3, 5, 3, bias=False), nn.Conv2d(3, 5, 3), nn.Linear(4, 5)])
def test_fold_affine_equals_explicit_affine_after_layer(module: nn.Module) -> None:
    x = torch.randn(2, 3, 6, 6) if isinstance(module, nn.Conv2d) else torch.randn(2, 4)
    a, c = torch.rand(5) + 0.5, torch.randn(5)
    shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (1, -1)
    expected = module(x) * a.view(shape) + c.view(shape)
    fold_affine(module, a, c)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


class _SharedConvOutput(nn.Module):
    """conv1 → bn1 (foldable); conv2's output is read by bn2 and by the sum (not foldable); bn3 reads a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.bn1(self.conv1(x)))
        return self.bn3(torch.relu(self.bn2(h) + h)).mean((2, 3))


@pytest.mark.parametrize("arch", ["vgg11", "resnet20", "shared"])
def test_inference_copy_folds_batchnorms_into_the_layer_before_them_only(arch: str) -> None:
    torch.manual_seed(0)
    model = _SharedConvOutput() if arch == "shared" else build_model(ModelConfig(arch=arch, norm="bn", width=0.25))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for n in bns:
            bn = model.get_submodule(n)
            bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    x = torch.randn(4, 3, 32, 32)
    assert model.training, "the model's mode is left as it was"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model itself is unchanged"
    left = [n for n, m in fast.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == ([] if arch != "shared" else ["bn2", "bn3"])
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert inference_copy(plain) is plain, "nothing to fold: no copy"


def test_fold_plans_trace_one_architecture_once_and_fold_its_variants_like_a_fresh_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vf_lightning.repair.fold as fold

    torch.manual_seed(0)
    a = build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25)).eval()
    variants = [interpolate_models(a, build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25)), t)
                for t in (0.25, 0.75)]  # fmt: skip
    traces = []
    traced = fold.foldable_batchnorms
    monkeypatch.setattr(fold, "foldable_batchnorms", lambda m: traces.append(m) or traced(m))
    plans = FoldPlans()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for v in [a, *variants]:
            assert torch.equal(inference_copy(v, plans)(x), inference_copy(v)(x))
    assert len(traces) == 1 + 3  # the plan once, and the three copies made without one
    # same module names and types, but BatchNorms without running statistics: not foldable, traced on its own
    bare = build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25)).eval()
    for m in bare.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    with torch.no_grad():
        assert torch.equal(inference_copy(bare, plans)(x), bare(x))


def test_folded_model_equals_unfolded_correction_hooks() -> None:
    a, b = _pair("resnet20", "ln")
    loader = _small("resnet20")
    merged = interpolate_models(a, b, 0.5)
    sites = default_correction_sites(merged)
    goals = compute_goals([a, b], loader, None, sites)
    folded = copy.deepcopy(merged)
    modules = dict(folded.named_modules())
    coeffs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_output(name, mom):  # type: ignore[no-untyped-def]
        ac = affine_coefficients("repair", mom.mean, mom.var, goals.mean[name], goals.std[name])
        fold_affine(modules[name], *ac)
        coeffs[name] = ac
        return ac

    sequential_estimate(folded, dict.fromkeys(sites, "output"), loader, on_output)
    wrapped = copy.deepcopy(merged)
    wmods = dict(wrapped.named_modules())
    shape = (1, -1, 1, 1)
    for s, (sa, sc) in coeffs.items():
        wmods[s].register_forward_hook(
            lambda _m, _i, y, sa=sa, sc=sc: y * sa.float().view(shape) + sc.float().view(shape)
        )
    x = next(iter(loader))[0]
    torch.testing.assert_close(folded(x), wrapped(x), rtol=1e-4, atol=1e-4)


def test_reset_gives_exact_population_statistics() -> None:
    a, _ = _pair("resnet20", "bn")
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    loader = _small("resnet20")
    reset = reset_bn_stats(a, loader)
    names = batchnorm_sites(reset)
    reset.eval()
    stats = stream_moments([reset], [names], loader, pre=True)[0]
    mods = dict(reset.named_modules())
    for n in names:
        torch.testing.assert_close(mods[n].running_mean.double(), stats[n].mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mods[n].running_var.double(), stats[n].var, rtol=1e-4, atol=1e-5)


def test_reset_max_samples_uses_only_first_samples() -> None:
    a, _ = _pair("vgg11", "bn")
    loader = _loader(n=48)
    r1 = reset_bn_stats(a, loader, max_samples=20)
    r2 = reset_bn_stats(a, DataLoader(TensorDataset(loader.dataset.tensors[0][:20]), batch_size=7))
    for (k, v1), v2 in zip(r1.state_dict().items(), r2.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5, msg=k)


def test_repair_on_batchnorm_net_matches_reset_logits() -> None:
    a, b = _pair("vgg11", "bn")
    loader = _loader()
    a, b = reset_bn_stats(a, loader), reset_bn_stats(b, loader)
    merged = interpolate_models(a, b, 0.5)
    repaired = normalize(merged, "repair", loader, refs=[a, b], weights=[0.5, 0.5])
    reset = normalize(merged, "reset", loader)
    x = next(iter(loader))[0]
    out_reset = reset.eval()(x)
    torch.testing.assert_close(repaired.eval()(x), out_reset, rtol=1e-3, atol=1e-3 * out_reset.abs().max().item())


def test_untraceable_model_falls_back_and_still_hits_goals() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Linear(6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent control flow defeats torch.fx
                x = x * 0
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    a, b = Branchy(), Branchy()
    loader = _loader()
    merged = interpolate_models(a, b, 0.5)
    goals = compute_goals([a, b], loader, sites=["c1", "c2"])
    fixed = affine_correct(merged, goals, loader, eps=1e-10)
    stats = _site_stats(fixed, ["c1", "c2"], loader)
    for s in ["c1", "c2"]:
        torch.testing.assert_close(stats[s].std, goals.std[s], rtol=1e-3, atol=1e-4)


def test_repair_adds_bias_to_bias_free_conv_and_ensure_biases_restores_it() -> None:
    a, b = _pair("resnet20", "ln")
    loader = _small("resnet20")
    fixed = normalize(interpolate_models(a, b, 0.5), "repair", loader, refs=[a, b])
    sd = fixed.state_dict()
    assert "segments.0.0.conv1.bias" in sd and "segments.0.0.conv1.bias" not in a.state_dict()
    fresh = copy.deepcopy(a)
    added = ensure_biases(fresh, sd)
    assert "segments.0.0.conv1" in added
    fresh.load_state_dict(sd)
    x = next(iter(loader))[0]
    torch.testing.assert_close(fresh(x), fixed(x))


def test_goals_are_reusable_and_one_reference_and_averaged_goals() -> None:
    a, b = _pair("vgg11", "none")
    loader = _loader(n=32)
    sites = default_correction_sites(a)
    sa, sb = reference_stats([a, b], loader, sites)
    merged = interpolate_models(a, b, 0.5)
    via_refs = normalize(merged, "repair", loader, refs=[a, b], weights=[0.5, 0.5])
    from vf_lightning.repair import combine_goals

    via_goals = normalize(merged, "repair", loader, goals=combine_goals([sa, sb], [0.5, 0.5]))
    x = next(iter(loader))[0]
    torch.testing.assert_close(via_refs(x), via_goals(x))
    one_ref = combine_goals([sa], [1.0])
    torch.testing.assert_close(one_ref.std[sites[0]], sa.std[sites[0]])
    avg = one_ref.averaged()
    assert torch.allclose(avg.std[sites[1]], avg.std[sites[1]].mean().expand_as(avg.std[sites[1]]))
    assert torch.allclose(avg.mean[sites[1]].abs(), sa.mean[sites[1]].abs().mean().expand(len(avg.mean[sites[1]])))


def test_accuracy_and_statistics_from_one_pass_equal_the_two_passes() -> None:
    """evaluated_stats: one forward per batch gives evaluate's numbers and reference_stats's goals, BatchNorm
    sites (derived from their producers) included."""
    a, _ = _pair("vgg11", "bn")
    loader = _loader(n=40)  # batches of 16, 16, 8
    sites = [*default_correction_sites(a), *batchnorm_sites(a)]
    assert batchnorm_sites(a)
    calls = []
    handle = a.register_forward_hook(lambda *_: calls.append(1))
    metrics, goals = evaluated_stats(a.train(), loader, sites)
    handle.remove()
    assert len(calls) == len(loader) and a.training  # one pass; the mode is restored
    assert metrics == evaluate(a, loader)
    (ref,) = reference_stats([a], loader, sites)
    assert goals.sites == ref.sites
    for s in sites:
        torch.testing.assert_close(goals.mean[s], ref.mean[s], rtol=0, atol=0)
        torch.testing.assert_close(goals.std[s], ref.std[s], rtol=0, atol=0)


def test_bias_calibration_endpoints_and_power_rule() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mlp", hidden=(8, 8, 8), image_size=4, in_channels=1)
    a, b = build_model(cfg), build_model(cfg)
    for alpha, ref in [(0.0, a), (1.0, b)]:
        out = bias_calibrate(a, b, alpha)
        for k, v in out.state_dict().items():
            torch.testing.assert_close(v, ref.state_dict()[k])
    half = bias_calibrate(a, b, 0.5).state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    bias_keys = [k for k in sa if k.endswith("bias")]
    for layer, k in enumerate(bias_keys, start=1):
        torch.testing.assert_close(half[k], 2.0 ** (1 - layer) * (sa[k] + sb[k]) / 2)
    merged_form = bias_calibrate_merged(interpolate_models(a, b, 0.5)).state_dict()
    for k in sa:
        torch.testing.assert_close(merged_form[k], half[k])


def test_bias_calibration_refuses_normalized_nets() -> None:
    a, b = _pair("vgg11", "bn")
    with pytest.raises(ValueError, match="normalization"):
        bias_calibrate(a, b, 0.5)
    with pytest.raises(ValueError, match="normalization"):
        normalize(a, "bias_calibration")


def test_zero_bias_zeroes_conv_and_linear_biases_only() -> None:
    a, _ = _pair("vgg11", "bn")
    out = zero_bias(a)
    for m in out.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.bias is not None and not m.bias.any()
    for k, v in out.state_dict().items():
        if "running" in k or k.startswith("features.1."):
            assert torch.equal(v, a.state_dict()[k])


def test_registry_names_and_unknown_name_error() -> None:
    assert {"none", "reset", "repair", "rescale", "reshift", "bias_calibration", "zero_bias"} <= set(NORMALIZATIONS)
    with pytest.raises(ValueError, match="repair"):
        get_normalization("repiar")


def test_auto_rule_picks_by_normalization_layer() -> None:
    assert auto_normalization(_pair("vgg11", "bn")[0]) == "reset"
    assert auto_normalization(_pair("resnet20", "ln")[0]) == "repair"
    assert auto_normalization(_pair("vgg11", "none")[0]) == "rescale"


def test_normalization_of_a_model_against_itself_changes_nothing() -> None:
    a, _ = _pair("vgg11", "ln")
    loader = _loader(n=32)
    x = next(iter(loader))[0]
    for name in ("repair", "rescale", "reshift"):
        out = normalize(a, name, loader, refs=[a], eps=1e-12)
        torch.testing.assert_close(out(x), a(x), rtol=1e-4, atol=1e-5)
    loose = normalize(a, "repair", loader, refs=[a])  # default ε = 1e-5 perturbs only slightly
    torch.testing.assert_close(loose(x), a(x), rtol=1e-2, atol=1e-3)


def _same_correction(model: nn.Module, run: object, monkeypatch: pytest.MonkeyPatch, exact: bool) -> None:
    """``run(model)`` with the cached walk and with one truncated pass per level give the same model."""
    from vf_lightning.repair import correct

    walked = run(model)  # type: ignore[operator]
    monkeypatch.setattr(correct, "CACHE_BYTES", 0)
    passes = run(model)  # type: ignore[operator]
    sw, sp = walked.state_dict(), passes.state_dict()
    assert sw.keys() == sp.keys()
    for k in sw:
        if exact:
            assert torch.equal(sw[k], sp[k]), k
        else:
            torch.testing.assert_close(sw[k], sp[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,norm,at", [("vgg11", "bn", "producers"), ("resnet20", "bn", "producers"),
                                          ("resnet20", "ln", "producers"), ("resnet20", "ln", "norms")])
def test_cached_walk_gives_the_per_level_passes_result(arch: str, norm: str, at: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """RESET is bit-identical; REPAIR agrees to float rounding (corrected conv outputs are rescaled, not rerun);
    covers residual adds, in-place ReLUs and norm-layer sites (recomputed after their correction)."""
    from vf_lightning.align import ModelGraph

    a, b = _pair(arch, norm)
    loader = _small(arch)
    merged = interpolate_models(a, b, 0.5)
    sites = default_correction_sites(merged) if at == "producers" else ModelGraph.of(merged).variance_sites()
    assert at == "producers" or all(isinstance(dict(merged.named_modules())[s], nn.LayerNorm | nn.GroupNorm)
                                    or not isinstance(dict(merged.named_modules())[s], nn.Conv2d) for s in sites)
    goals = compute_goals([a, b], loader, [0.5, 0.5], sites)
    if norm == "bn":
        _same_correction(merged, lambda m: reset_bn_stats(m, loader), monkeypatch, exact=True)
    _same_correction(merged, lambda m: affine_correct(m, goals, loader, "repair"), monkeypatch, exact=False)


def test_cached_walk_refuses_an_inplace_op_whose_operand_is_read_again() -> None:
    from vf_lightning.align.graph import GraphWalk, ModelGraph

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c1(x)
            z = self.c2(y)
            y.add_(1)  # in place, and y has another reader (c2): execution order matters
            return z + y

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.c1(x).add_(1))  # in place on a value nothing else reads

    assert not GraphWalk.supported(ModelGraph.of(Shared()))
    assert GraphWalk.supported(ModelGraph.of(Plain()))
    torch.manual_seed(0)
    a, b = Shared(), Shared()
    loader = _loader()
    goals = compute_goals([a, b], loader, sites=["c1", "c2"])
    fixed = affine_correct(interpolate_models(a, b, 0.5), goals, loader, eps=1e-10)  # the per-level passes
    stats = _site_stats(fixed, ["c1", "c2"], loader)
    for s in ["c1", "c2"]:
        torch.testing.assert_close(stats[s].std, goals.std[s], rtol=1e-3, atol=1e-4)


def test_cached_walk_on_a_vit_gives_the_per_level_passes_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token features (N×L×C sites), class token / positional embedding attributes, attention reshapes."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vit", image_size=16, in_channels=3, patch=4, dim=32, depth=2, heads=4, num_classes=10)
    a, b = build_model(cfg).eval(), build_model(cfg).eval()
    loader = _loader(n=40, shape=(3, 16, 16), bs=16)
    merged = interpolate_models(a, b, 0.5)
    goals = compute_goals([a, b], loader, [0.5, 0.5], default_correction_sites(merged))
    _same_correction(merged, lambda m: affine_correct(m, goals, loader, "repair"), monkeypatch, exact=False)


@pytest.mark.parametrize("arch,norm,method", [("vgg11", "bn", "reset"), ("resnet20", "bn", "repair"),
                                              ("resnet20", "ln", "repair"), ("vgg11", "none", "rescale")])  # fmt: skip
def test_measure_gives_the_normalized_models_statistics_without_a_pass(
    arch: str, norm: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Measure at the variance-ratio sites equals a statistics pass over the normalized model: BatchNorm outputs
    (derived from the re-estimated running statistics), corrected layers' outputs, LayerNorm outputs (read off the
    cached walk). Without the walk, sites only the walk could give leave it unfilled; a normalization without a
    statistics pass never fills it."""
    from vf_lightning.align import ModelGraph
    from vf_lightning.repair import correct

    a, b = _pair(arch, norm)
    loader = _small(arch)
    merged = interpolate_models(a, b, 0.5)
    sites = ModelGraph.of(merged).variance_sites()
    goals = compute_goals([a, b], loader, [0.5, 0.5], default_correction_sites(merged))
    passes = [0]
    real_iter = correct.iter_inputs

    def counted(*args: object, **kw: object) -> object:
        passes[0] += 1
        return real_iter(*args, **kw)  # type: ignore[arg-type]

    for cache in (True, False):
        if not cache:
            monkeypatch.setattr(correct, "CACHE_BYTES", 0)
        wanted = Measure(sites)
        out = normalize(merged, method, loader, goals=goals if method != "reset" else None, measure=wanted)
        expected = reference_stats([out], loader, sites)[0]
        if not cache and norm == "ln":
            assert wanted.goals is None  # LayerNorm outputs need a pass of their own without the walk
            continue
        assert wanted.goals is not None and wanted.goals.sites == sites
        for site in sites:
            scale = float(expected.std[site].max())
            # float rounding: the walk rescales corrected outputs rather than rerunning the folded layers
            torch.testing.assert_close(wanted.goals.std[site], expected.std[site], rtol=1e-4, atol=1e-6 * scale)
            torch.testing.assert_close(wanted.goals.mean[site], expected.mean[site], rtol=1e-4, atol=1e-5 * scale)
    monkeypatch.setattr(correct, "iter_inputs", counted)  # the walk path: one pass over the data, not two
    monkeypatch.setattr(correct, "CACHE_BYTES", 2**31)
    wanted = Measure(sites)
    normalize(merged, method, loader, goals=goals if method != "reset" else None, measure=wanted)
    assert wanted.goals is not None
    with_measure = passes[0]
    passes[0] = 0
    normalize(merged, method, loader, goals=goals if method != "reset" else None)
    assert with_measure == passes[0]
    for plain in ("none", "zero_bias"):
        wanted = Measure(sites)
        normalize(merged, plain, loader, measure=wanted)
        assert wanted.goals is None


def test_evaluation_and_statistics_leave_every_submodules_mode_as_it_was() -> None:
    """A model whose parts are in different modes (e.g. a PFMGroup, in training mode, holding eval-mode variants)
    gets each part's own mode back, not the root's (evaluation, statistics passes, spec tracing, FLOP count)."""
    from vf_lightning.align import build_permutation_spec, check_permutation_invariance
    from vf_lightning.diagnostics import count_flops

    a, _ = _pair("vgg11", "bn")
    loader = _loader()
    model = nn.Sequential(a)  # the wrapper trains, the network inside is in eval mode
    model.train()
    a.eval()
    modes = [m.training for m in model.modules()]
    sites = default_correction_sites(a)
    evaluate(model, loader)
    inference_copy(model)
    reference_stats([a], loader, sites)
    evaluated_stats(a, list(loader), sites)
    reset_bn_stats(a, loader, inplace=True)
    x = next(iter(loader))[0][:2]
    spec = build_permutation_spec(model, x)
    check_permutation_invariance(model, spec, x)
    count_flops(model, x)
    assert [m.training for m in model.modules()] == modes
