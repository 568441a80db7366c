"""Permutation specs traced from the model graph: invariance for every zoo model, errors, sites, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from vf_lightning.align import (
    PermGroup,
    PermutationSpec,
    UnsupportedOpError,
    align,
    apply_permutation,
    build_permutation_spec,
    check_compatible,
    check_permutation_invariance,
    random_perms,
)
from vf_lightning.models import ModelConfig, available_models, build_model

pytestmark = pytest.mark.kernels  # torch-kernel bound: run once the background jobs free a core

NORMS = ("none", "bn", "ln", "fixup")


def _zoo_cases() -> list[tuple[str, str]]:
    cases = []
    for arch in available_models():
        for norm in NORMS:
            try:
                _builder_accepts(arch, norm)
            except ValueError:
                continue
            cases.append((arch, norm))
    return cases


def _builder_accepts(arch: str, norm: str) -> None:
    """Raise ValueError if the registered builder refuses ``norm`` (without building big models twice)."""
    from vf_lightning.models.config import _REGISTRY

    cfg = ModelConfig(arch=arch, norm=norm, width=0.0625, hidden=(4,), image_size=8)
    if not arch.startswith("tv_"):
        _REGISTRY[arch](cfg)
        return
    accepted = {"tv_vgg16": ("none", "bn"), "tv_resnet50": ("bn",)}.get(arch)
    if accepted is None:
        _REGISTRY[arch](cfg)
    elif norm not in accepted:
        raise ValueError(norm)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, size: int = 32) -> nn.Module:
    """Non-trivial weights everywhere: zero-initialised tensors, affine params, scalars and BN running stats.

    BN running stats are first set from a random batch (so the signal survives depth), then perturbed.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:  # He-normal, so the input signal survives depth (also replaces Fixup's zero init)
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
        elif name.endswith(("weight", "scale")):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()  # a model built on the meta device has none
            m.momentum = 1.0
        model.train()
        model(torch.randn(8, 3, size, size, generator=gen))
        for m in bns:
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean += 0.2 * std * torch.randn(std.shape, generator=gen)
            m.running_var *= 0.6 + 0.8 * torch.rand(std.shape, generator=gen)
    return model.eval()


@pytest.mark.parametrize(("arch", "norm"), _zoo_cases())
def test_random_permutation_leaves_logits_unchanged_for_every_zoo_model(arch: str, norm: str) -> None:
    torch.manual_seed(0)
    size = 32 if arch.startswith("tv_") else 16
    cfg = ModelConfig(arch=arch, norm=norm, width=0.25, hidden=(32, 32), image_size=size)
    with torch.device("meta"):  # randomize() sets every tensor: no time on the zoo's own init (138M for tv_vgg16)
        model = build_model(cfg)
    model = randomize(model.to_empty(device="cpu"), size=size)
    x = torch.randn(2, 3, size, size)
    spec = build_permutation_spec(model, x)
    assert len(spec) > 0
    model.eval()
    with torch.no_grad():  # logits of order 1, so that 1e-4 is a meaningful float32 tolerance
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        scale = model(x).abs().max()
        head.weight /= scale
        if head.bias is not None:
            head.bias /= scale
        logits = model(x)
    assert (logits[0] - logits[1]).abs().max() > 1e-3, "the check would be vacuous on input-independent logits"
    assert check_permutation_invariance(model, spec, x, seed=1) <= 1e-4


@pytest.mark.parametrize("cfg", [ModelConfig(arch="vgg11", norm="bn", width=0.25),
                                 ModelConfig(arch="resnet20", norm="ln", width=0.25)])
def test_invariance_check_detects_an_incomplete_spec(cfg: ModelConfig) -> None:
    model = randomize(build_model(cfg)).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = build_permutation_spec(model, x)
    g = spec.groups[0]  # permute the first layer's outputs but not its consumers
    broken = PermGroup(g.name, g.size, tuple(a for a in g.axes if a.role == "out"))
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert check_permutation_invariance(model, spec, x) < 1e-4 * scale
    assert check_permutation_invariance(model, PermutationSpec((broken,) + spec.groups[1:]), x) > 1e-2 * scale


def test_group_counts_match_the_reference_specs() -> None:
    x = torch.randn(2, 3, 32, 32)
    assert len(build_permutation_spec(build_model(ModelConfig(arch="resnet20", norm="bn")), x)) == 12
    assert len(build_permutation_spec(build_model(ModelConfig(arch="vgg16", norm="bn")), x)) == 13


def test_residual_group_pools_sites_on_its_stream_and_bn_stats_are_permuted() -> None:
    model = build_model(ModelConfig(arch="resnet20", norm="bn", width=0.25))
    spec = build_permutation_spec(model, torch.randn(2, 3, 32, 32))
    stream = spec["conv1"]
    acts = [s.module for s in stream.activation_sites]
    assert acts == ["relu", "segments.0.0.relu2", "segments.0.1.relu2", "segments.0.2.relu2"]
    keys = {a.key for a in stream.axes}
    assert {"norm1.running_mean", "norm1.running_var", "segments.1.0.shortcut.0.weight"} <= keys
    assert not any(k.endswith("num_batches_tracked") for g in spec for k in (a.key for a in g.axes))
    assert stream.producers == ["conv1", "segments.0.0.conv2", "segments.0.1.conv2", "segments.0.2.conv2"]
    # first layer input and classifier output are fixed
    assert not spec.axes_of("fc.bias") and [a.axis for _, a in spec.axes_of("fc.weight")] == [1]
    assert [a.axis for _, a in spec.axes_of("conv1.weight")] == [0]


def test_shared_module_called_several_times_gets_one_site_per_call() -> None:
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=4)
    spec = build_permutation_spec(model, torch.randn(1, 3, 32, 32))
    inner1 = spec["layer1.0.conv1"]
    assert [(s.module, s.call) for s in inner1.activation_sites] == [("layer1.0.relu", 0)]
    assert ("layer1.0.relu", 2) in [(s.module, s.call) for s in spec["layer1.0.conv3"].activation_sites]


def test_flatten_expands_channel_permutation_over_spatial_positions() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.size(0), -1))

    model = Net()
    x = torch.randn(3, 3, 4, 4)
    spec = build_permutation_spec(model, x)
    (g,) = spec.groups
    assert ("fc.weight", 1, 16) in [(a.key, a.axis, a.inner) for a in g.axes]
    assert check_permutation_invariance(model, spec, x) < 1e-5


class _Sorts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sort(self.fc1(x), dim=1).values)


class _MixingView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # N×4×2×1
        return self.fc(h.view(h.shape[0], 2, 4).sum(1))


class _PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.PReLU(6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(("model", "x", "named"), [
    (_Sorts(), torch.randn(2, 4), "sort"),
    (_MixingView(), torch.randn(2, 3, 2, 1), "view"),
    (_PReLUNet(), torch.randn(2, 4), "PReLU"),
])
def test_unsupported_op_is_refused_naming_the_node(model: nn.Module, x: torch.Tensor, named: str) -> None:
    with pytest.raises(UnsupportedOpError, match="fx node") as err:
        build_permutation_spec(model, x)
    assert named in str(err.value)


def test_permuted_model_is_an_ordinary_checkpoint() -> None:
    model = randomize(build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25))).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = build_permutation_spec(model, x)
    permuted = apply_permutation(model, spec, random_perms(spec, seed=5))
    assert type(permuted) is type(model)
    buf = io.BytesIO()
    torch.save(permuted.state_dict(), buf)
    buf.seek(0)
    fresh = build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25)).eval()
    fresh.load_state_dict(torch.load(buf))
    assert torch.allclose(fresh(x), model(x), atol=1e-5)
    assert not torch.equal(fresh.state_dict()["features.0.weight"], model.state_dict()["features.0.weight"])


@pytest.mark.parametrize(("cfg_b", "param"), [
    (ModelConfig(arch="vgg11", norm="bn", width=0.5), "features.0.weight"),
    (ModelConfig(arch="vgg13", norm="bn", width=0.25), "features.3.weight"),
    (ModelConfig(arch="vgg11", norm="none", width=0.25), "features.1.weight"),
])
def test_mismatched_models_are_refused_naming_the_first_parameter(cfg_b: ModelConfig, param: str) -> None:
    a = build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25))
    b = build_model(cfg_b)
    with pytest.raises(ValueError) as err:
        check_compatible(a, b)
    assert repr(param) in str(err.value)
    with pytest.raises(ValueError, match="differ"):
        align(a, b, "weight", example_input=torch.randn(1, 3, 32, 32))
