"""The model zoo: every registered model builds, runs forward and backward, and matches reference sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vf_lightning.models import ChannelLayerNorm, ModelConfig, available_models, build_model

pytestmark = pytest.mark.kernels  # torch-kernel bound: run once the background jobs free a core

NORMS = {"mlp": ["none"], "tv_vgg16": ["none", "bn"], "tv_resnet50": ["bn"], "vit": ["ln"]}
for _a in available_models():
    if _a.startswith("vgg"):
        NORMS[_a] = ["none", "bn", "ln"]
    elif _a.startswith("resnet"):
        NORMS[_a] = ["bn", "ln", "none", "fixup"]

CASES = [(a, n) for a in available_models() for n in NORMS[a]]


def tiny_config(arch: str, norm: str, **kw: object) -> ModelConfig:
    if arch == "mlp":
        return ModelConfig(arch=arch, norm=norm, in_channels=1, image_size=8, hidden=(16, 16), **kw)  # type: ignore[arg-type]
    if arch.startswith("tv_"):
        return ModelConfig(arch=arch, norm=norm, num_classes=7, **kw)  # type: ignore[arg-type]
    if arch == "vit":
        return ModelConfig(arch=arch, norm=norm, in_channels=1, patch=8, dim=16, depth=2, heads=4, **kw)  # type: ignore[arg-type]
    return ModelConfig(arch=arch, norm=norm, width=0.125, in_channels=1, **kw)  # type: ignore[arg-type]


def tiny_input(cfg: ModelConfig) -> torch.Tensor:
    size = 8 if cfg.arch == "mlp" else 64 if cfg.arch.startswith("tv_") else 32
    return torch.randn(2, cfg.in_channels, size, size)


@pytest.mark.parametrize(("arch", "norm"), CASES)
def test_every_zoo_model_runs_forward_and_backward(arch: str, norm: str) -> None:
    cfg = tiny_config(arch, norm)
    model = build_model(cfg)
    x = tiny_input(cfg)
    # oneDNN's AVX2 1×1-convolution weight-gradient kernel (torch 2.14.1) corrupted the heap on this machine for the
    # 0.125-width resnet44-ln (`double free or corruption` with OMP_NUM_THREADS=1, a spinning hang with 2 threads);
    # these tiny shapes only check that every parameter gets a gradient, so they run on PyTorch's own kernels
    with torch.backends.mkldnn.flags(enabled=False):
        out = model(x)
        assert out.shape == (2, cfg.num_classes)
        torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"arch": "vgg16", "norm": "bn"}, 14_728_266),
        ({"arch": "vgg16", "norm": "none"}, 14_719_818),
        ({"arch": "resnet20", "norm": "bn"}, 272_474),
        ({"arch": "resnet20", "norm": "bn", "width": 4.0}, 4_327_754),
        ({"arch": "resnet20", "norm": "none"}, 271_594),
    ],
)
def test_parameter_counts_match_the_reference_models(kw: dict, expected: int) -> None:
    model = build_model(ModelConfig(**kw))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_channel_layernorm_normalizes_each_position_over_channels() -> None:
    ln = ChannelLayerNorm(6)
    y = ln(torch.randn(3, 6, 5, 4) * 3 + 1)
    assert torch.allclose(y.mean(1), torch.zeros(3, 5, 4), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(3, 5, 4), atol=1e-3)


def test_vgg_init_conv_std_follows_fan_out() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg16", init="vgg_init"))
    conv = model.features[2]  # 64 → 64
    assert isinstance(conv, torch.nn.Conv2d)
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() - expected) / expected < 0.05
    assert torch.count_nonzero(conv.bias) == 0


def test_width_multiplier_and_bias_switch() -> None:
    model = build_model(ModelConfig(arch="vgg11", width=0.5, bias=False))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 32 and all(c.bias is None for c in convs)
    assert model.classifier.bias is None


def test_unknown_arch_and_unsupported_norm_are_named() -> None:
    with pytest.raises(ValueError, match="unknown model arch 'vgg99'"):
        ModelConfig(arch="vgg99")
    with pytest.raises(ValueError, match="mlp"):
        build_model(ModelConfig(arch="mlp", norm="bn"))
    with pytest.raises(ValueError, match="resnet20"):
        build_model(ModelConfig(arch="resnet20", norm="xx"))  # type: ignore[arg-type]


def test_fixup_resnet_starts_as_zero_output() -> None:
    model = build_model(ModelConfig(arch="resnet20", norm="fixup"))
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0


@pytest.mark.parametrize("kernel,padding,stride,shape,fast", [
    (3, 1, 1, (1, 1), True),  # the last stage of a VGG on 28×28 inputs
    (5, 2, 1, (1, 1), True),
    (3, 1, 1, (2, 2), False),  # a real map: nn.Conv2d's path
    (3, 0, 1, (3, 3), False),
    (3, 1, 2, (1, 1), False),  # strided: nn.Conv2d's path
])
def test_conv2d_on_a_one_by_one_map_equals_nn_conv2d_in_output_and_gradients(kernel: int, padding: int, stride: int,
                                                                             shape: tuple[int, int],
                                                                             fast: bool) -> None:  # fmt: skip
    from torch import nn

    from vf_lightning.models.layers import Conv2d

    torch.manual_seed(0)
    ours = Conv2d(8, 6, kernel, padding=padding, stride=stride)
    ref = nn.Conv2d(8, 6, kernel, padding=padding, stride=stride)
    ref.load_state_dict(ours.state_dict())
    assert ours._centre_tap_only() == (padding == kernel // 2 and stride == 1)
    calls = []
    ours.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(5, 8, *shape)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xa = x.clone().contiguous(memory_format=memory_format).requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert ya.shape == yb.shape
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(yb)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)
        if fast:  # every tap but the centre one gets an exact zero gradient, as in the convolution
            c = kernel // 2
            off_centre = ours.weight.grad.clone()
            off_centre[:, :, c, c] = 0
            assert off_centre.abs().max() == 0
        ours.zero_grad()
        ref.zero_grad()
    assert len(calls) == 2


def test_vgg_last_stage_on_28_pixel_inputs_uses_the_centre_tap_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from vf_lightning.models.layers import Conv2d

    model = build_model(ModelConfig(arch="vgg11", norm="bn", width=0.25, in_channels=1, image_size=28))
    assert sum(isinstance(m, Conv2d) for m in model.modules()) == 8
    convolved = []  # the input sizes that went through nn.Conv2d's kernels
    conv_forward = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, x, w, b: convolved.append(x.shape[-1]) or
                        conv_forward(self, x, w, b))  # fmt: skip
    model(torch.randn(2, 1, 28, 28))
    assert convolved == [28, 14, 7, 7, 3, 3]  # the two convs on 1×1 maps took the matrix product


@pytest.fixture
def native_pools(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per call of ``F.max_pool2d`` (the kernel ``nn.MaxPool2d`` runs) while the test runs."""
    calls: list[int] = []
    pool = F.max_pool2d
    monkeypatch.setattr(F, "max_pool2d", lambda *a, **k: calls.append(1) or pool(*a, **k))
    return calls


@pytest.mark.parametrize("shape", [(6, 16, 28, 28), (4, 8, 7, 7), (3, 1, 5, 6), (2, 3, 2, 2)])
def test_maxpool2d_outside_autograd_equals_nn_maxpool2d_bit_for_bit_and_trains_through_its_kernel(
    shape: tuple[int, ...], native_pools: list[int]
) -> None:
    from torch import nn

    from vf_lightning.models.layers import MaxPool2d

    torch.manual_seed(0)
    ours, ref = MaxPool2d(2, 2), nn.MaxPool2d(2, 2)
    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")  # NaNs propagate as in max_pool2d
    x[-1, -1, 1, :] = 0.0  # ties (ReLU zeros)
    native = native_pools
    for memory_format in (torch.channels_last, torch.contiguous_format):
        xf = x.contiguous(memory_format=memory_format)
        with torch.inference_mode():
            y = ours(xf)
        expected = ref(xf)
        assert y.shape == expected.shape and torch.equal(y.nan_to_num(7.0), expected.nan_to_num(7.0))
        assert y.is_contiguous(memory_format=memory_format)
    assert len(native) == 2 + (shape[1] > 1)  # channels_last took the maxima (C = 1 is both layouts), NCHW the kernel
    native.clear()
    xg = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    xr = x.clone().requires_grad_()
    ours(xg).nan_to_num(0.0).sum().backward()  # training: max_pool2d's kernel and gradient
    ref(xr).nan_to_num(0.0).sum().backward()
    assert native == [1, 1] and torch.equal(xg.grad, xr.grad)


def test_maxpool2d_with_other_settings_takes_the_kernel(native_pools: list[int]) -> None:
    from torch import nn

    from vf_lightning.models.layers import MaxPool2d

    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in (MaxPool2d(3, 2), MaxPool2d(2, 1), MaxPool2d(2, 2, padding=1), MaxPool2d(2, 2, ceil_mode=True)):
            ref = nn.MaxPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
            assert torch.equal(m(x), ref(x))
    assert len(native_pools) == 8  # ours and the reference: both max_pool2d
    with pytest.raises(RuntimeError, match="too small"):  # a map smaller than the window fails as in max_pool2d
        with torch.no_grad():
            MaxPool2d(2, 2)(torch.randn(2, 3, 1, 4).contiguous(memory_format=torch.channels_last))
