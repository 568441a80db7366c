"""The traced model graph: producers, output layers, correction and variance sites, truncation, one trace."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from vf_lightning.align import graph as graph_module
from vf_lightning.align.graph import ModelGraph
from vf_lightning.models import ModelConfig, available_models, build_model
from vf_lightning.repair import default_correction_sites, plan_sites, preactivation_sites


def _model(arch: str, norm: str = "none", **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, norm=norm, width=0.25, **kw)).eval()  # type: ignore[arg-type]


def _meta(arch: str, norm: str = "none") -> nn.Module:
    """A zoo model on the meta device: structure only, no memory (tracing never runs the forward)."""
    with torch.device("meta"):
        return build_model(ModelConfig(arch=arch, norm=norm, image_size=224 if arch.startswith("tv_") else 32))


def _convs(model: nn.Module, under: str = "") -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith(under)]


@pytest.mark.parametrize("norm", ["bn", "ln", "none", "fixup"])
def test_resnet20_corrects_conv1_and_conv2_of_every_block_but_not_stem_or_shortcuts(norm: str) -> None:
    model = _model("resnet20", norm)
    sites = ModelGraph.of(model).correction_sites()
    expected = [f"segments.{s}.{b}.conv{i}" for s in range(3) for b in range(3) for i in (1, 2)]
    assert sites == expected
    names = dict(model.named_modules())
    assert all(isinstance(names[s], nn.Conv2d) for s in sites)
    shortcuts = [n for n in _convs(model) if ".shortcut." in n]
    assert len(shortcuts) == 2 and "conv1" in names
    assert not set(shortcuts) & set(sites) and "conv1" not in sites
    assert default_correction_sites(model) == expected


def test_resnet_rule_holds_at_any_width_and_depth() -> None:
    model = build_model(ModelConfig(arch="resnet32", norm="bn", width=0.5))
    sites = ModelGraph.of(model).correction_sites()
    assert sites == [f"segments.{s}.{b}.conv{i}" for s in range(3) for b in range(5) for i in (1, 2)]


def test_vgg_bn_corrects_every_conv_and_not_the_classifier() -> None:
    model = _model("vgg11", "bn")
    graph = ModelGraph.of(model)
    assert graph.correction_sites() == _convs(model, "features")
    assert "classifier" not in graph.correction_sites()


def test_mlp_corrects_its_hidden_linears() -> None:
    model = build_model(ModelConfig(arch="mlp", hidden=(16, 8, 4), image_size=4, in_channels=1))
    assert ModelGraph.of(model).correction_sites() == ["features.0", "features.2", "features.4"]


def test_imagenet_vgg16_corrects_all_convs_and_the_hidden_linears() -> None:
    model = _meta("tv_vgg16")
    assert ModelGraph.of(model).correction_sites() == _convs(model) + ["classifier.0", "classifier.2"]


def test_torchvision_resnet50_skips_stem_and_downsample_projections() -> None:
    model = _meta("tv_resnet50", "bn")
    sites = ModelGraph.of(model).correction_sites()
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
    assert sites == [f"{b}.conv{i}" for b in blocks for i in (1, 2, 3)]


def test_branch_is_found_whatever_the_operand_order() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.proj = nn.Conv2d(4, 8, 1)
            self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.stem(x))
            y = torch.relu(self.proj(x) + self.c2(torch.relu(self.c1(x))))  # shortcut first
            return self.fc(y.mean((2, 3)))

    graph = ModelGraph.of(Block())
    assert graph.correction_sites() == ["c1", "c2"]
    assert graph.correction_sites("all") == ["stem", "proj", "c1", "c2"]
    assert graph.output_layers == ["fc"]


def test_rule_all_and_an_explicit_list() -> None:
    graph = ModelGraph.of(_model("resnet20", "bn"))
    assert graph.correction_sites("all") == [p for p in graph.producers if p != "fc"]
    assert graph.producers[0] == "conv1" and graph.producers[-1] == "fc"
    chosen = ["segments.1.0.shortcut.0", "conv1"]
    assert graph.correction_sites(chosen) == ["conv1", "segments.1.0.shortcut.0"]  # forward order


def test_unknown_site_names_and_rules_fail_naming_them() -> None:
    graph = ModelGraph.of(_model("vgg11"))
    with pytest.raises(ValueError, match=r"nope.*valid producers are \['features.0'"):
        graph.correction_sites(["features.0", "nope"])
    with pytest.raises(ValueError, match="features.1"):  # a ReLU is no producer
        graph.correction_sites(["features.1"])
    with pytest.raises(ValueError, match="unknown correction-site rule 'most'"):
        graph.correction_sites("most")


@pytest.mark.parametrize("arch", available_models())
def test_output_layer_of_every_zoo_model_is_its_classifier(arch: str) -> None:
    model = _meta(arch, "bn" if arch == "tv_resnet50" else "none")
    expected = {"tv_vgg16": "classifier.4", "mlp": "classifier", "vit": "head"}.get(
        arch, "fc" if "resnet" in arch else "classifier")
    assert ModelGraph.of(model).output_layers == [expected]


def test_variance_sites_of_vgg_bn_are_its_batchnorms() -> None:
    model = _model("vgg11", "bn")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert ModelGraph.of(model).variance_sites() == bns
    assert preactivation_sites(model) == bns
    plain = _model("vgg11")
    assert ModelGraph.of(plain).variance_sites() == _convs(plain)


def test_truncated_returns_the_tensors_hooks_see_in_the_full_model() -> None:
    model = _model("resnet20", "bn")
    graph = ModelGraph.of(model)
    names = ["segments.1.0.shortcut.0", "segments.0.2.norm1", "conv1"]
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out))
               for n in names]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        for h in handles:
            h.remove()
        by_name = graph.truncated(names)(x)
        by_node = graph.truncated([graph.node_of(n) for n in names])(x)
    assert isinstance(by_name, tuple) and len(by_name) == 3
    for n, a, b in zip(names, by_name, by_node):
        torch.testing.assert_close(a, seen[n], rtol=0, atol=0)
        torch.testing.assert_close(b, seen[n], rtol=0, atol=0)
    prefix = graph.truncated(["segments.0.0.conv1"])
    assert not any(n.startswith("segments.1") for n, _ in prefix.named_modules())  # stops early


def test_node_of_rejects_unknown_and_shared_modules() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    graph = ModelGraph.of(Shared())
    with pytest.raises(ValueError, match="called 2 times"):
        graph.node_of("fc")
    with pytest.raises(ValueError, match="'missing' is not a leaf module"):
        graph.node_of("missing")


def test_one_trace_serves_correction_sites_variance_sites_plan_and_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = graph_module.trace

    def counting(model: nn.Module) -> torch.fx.GraphModule:
        calls.append(type(model).__name__)
        return real(model)

    monkeypatch.setattr(graph_module, "trace", counting)
    model = _model("resnet20", "bn")
    x = torch.randn(2, 3, 8, 8)
    fix = default_correction_sites(model)
    vr = preactivation_sites(model)
    plan = plan_sites(model, dict.fromkeys(fix, "output"), x)
    ModelGraph.of(model).spec(x)
    assert plan.traced and len(vr) == 21 and len(fix) == 18
    assert calls == ["CifarResNet"]


def test_cache_follows_module_replacement_and_does_not_keep_the_model_alive() -> None:
    model = _model("vgg11")
    first = ModelGraph.of(model)
    assert ModelGraph.of(model) is first
    model.features[0] = nn.Conv2d(3, model.features[0].out_channels, 3, padding=1)
    second = ModelGraph.of(model)
    assert second is not first and second.module("features.0") is model.features[0]
    ref = weakref.ref(model)
    del model, first, second
    gc.collect()
    assert ref() is None


def test_lockstep_runs_two_models_node_by_node_with_their_own_modules_and_hooks() -> None:
    """The lockstep module returns both models' outputs exactly, calls each model's own leaf modules (so their
    hooks fire) alternating A, B at every node, is built once per pair, and is refused for differing traces."""
    a, b = _model("resnet20", "bn"), _model("resnet20", "bn")
    torch.manual_seed(1)
    b.load_state_dict({k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in b.state_dict().items()})
    ga, gb = ModelGraph.of(a), ModelGraph.of(b)
    pair = ga.lockstep(gb)
    assert pair is not None and ga.lockstep(gb) is pair
    order: list[str] = []
    for side, model in (("a", a), ("b", b)):
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda _m, _i, _o, tag=f"{side}:{name}": order.append(tag))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = pair(x)
        assert torch.equal(out_a, a(x)) and torch.equal(out_b, b(x))
    convs = _convs(a)
    assert order[:2 * len(convs)] == [f"{s}:{n}" for n in convs for s in "ab"]  # A's conv, then B's same conv
    assert ga.lockstep(ModelGraph.of(_model("resnet32", "bn"))) is None  # a deeper net: not the same trace


def test_lockstep_is_refused_where_the_trace_may_not_run_as_the_forward_and_copies_the_input() -> None:
    """No lockstep for a trace taken in training mode (a ``self.training`` branch is baked in) or a model with a hook
    the trace never calls (on the model itself); each model reads its own copy of the input, so a forward that
    changes its input in place changes neither the other model's nor the caller's."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2.0)  # changes its input in place
            return nn.functional.dropout(self.relu(self.conv(x)), 0.5, self.training).mean((2, 3))

    torch.manual_seed(0)
    trained = Net().train()
    assert ModelGraph.of(trained).traced_in_eval is False
    a, b = Net().eval(), Net().eval()
    ga, gb = ModelGraph.of(a), ModelGraph.of(b)
    assert ga.lockstep(ModelGraph.of(trained.eval())) is None  # traced with dropout on
    pair = ga.lockstep(gb)
    assert pair is not None
    x = torch.randn(2, 3, 8, 8)
    x0 = x.clone()
    with torch.no_grad():
        out_a, out_b = pair(x)
        assert torch.equal(x, x0)
        assert torch.equal(out_a, a(x0.clone())) and torch.equal(out_b, b(x0.clone()))
    handle = a.register_forward_pre_hook(lambda _m, inp: (inp[0] * 0,))
    assert ga.lockstep(gb) is None  # the trace would skip the model's own hook
    handle.remove()
    assert ga.lockstep(gb) is pair
