"""The shared name registry: duplicates refused, unknown names listed, typed method options checked."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from vf_lightning.align import MATCHERS, align, align_many, cca_transform
from vf_lightning.models import ModelConfig, build_model
from vf_lightning.prune import PRUNERS, prune_model
from vf_lightning.registry import REQUIRED, Registry
from vf_lightning.repair import NORMALIZATIONS

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="mlp", hidden=(8, 8), image_size=8)).eval()


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.zeros(16)) for _ in range(2)]


def test_registry_refuses_duplicates_and_lists_valid_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get_or_fail("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(3)
    with pytest.raises(ValueError, match="unknown widget 'c'; choose one of a, b"):
        reg.get_or_fail("c")


def test_options_are_the_keyword_only_parameters_with_their_types_and_defaults() -> None:
    reg: Registry[object] = Registry("method")

    @reg.register("m")
    def m(x: int, *, size: int, mode: Literal["x", "y"] = "x") -> None: ...

    assert reg.options("m") == {"size": (int, REQUIRED), "mode": (Literal["x", "y"], "x")}
    reg.check_options("m", {"size": 3, "mode": "y"}, "test")
    with pytest.raises(ValueError, match="method 'm' needs option\\(s\\) size"):
        reg.check_options("m", {}, "test")
    with pytest.raises(ValueError, match="option 'size' must be int, got 2.5"):
        reg.check_options("m", {"size": 2.5}, "test")


def test_a_method_that_swallows_kwargs_is_refused() -> None:
    reg: Registry[object] = Registry("method")
    reg.register("loose")(lambda x, **_: x)
    with pytest.raises(TypeError, match="method 'loose' takes \\*\\*kwargs"):
        reg.options("loose")


@pytest.mark.parametrize("registry", [MATCHERS, PRUNERS, NORMALIZATIONS], ids=lambda r: r.kind)
def test_every_registered_method_has_an_explicit_signature(registry: Registry[object]) -> None:
    for name in registry.names():
        registry.options(name)  # raises for a method taking **kwargs


def test_options_of_zip_list_a_and_b_with_their_defaults() -> None:
    opts = MATCHERS.options("zip")
    assert opts["a"] == (float, 0.3) and opts["b"] == (float, 0.125)
    assert list(opts)[:2] == ["a", "b"]


def test_a_misspelt_zipit_option_fails_naming_it_and_the_accepted_ones() -> None:
    a = _mlp(0)
    with pytest.raises(ValueError) as err:
        align(a, _mlp(1), "zip", loader=_loader(), alpah=0.3)
    msg = str(err.value)
    assert "\n" not in msg and "'alpah'" in msg and "'zip'" in msg and "a, b, max_samples" in msg


def test_an_option_of_another_method_is_refused_by_align_and_align_many() -> None:
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match="matching method 'weight' has no option 'gamma'"):
        align(a, b, "weight", example_input=X, gamma=0.5)
    with pytest.raises(ValueError, match="align_many: matching method 'identity' has no option 'tol'"):
        align_many([a, b], method="identity", example_input=X, tol=1e-3)


def test_seed_and_max_sweeps_reach_only_the_matchers_that_declare_them() -> None:
    a, b = _mlp(0), _mlp(1)
    capped = align(a, b, "weight", loader=_loader(), example_input=X, seed=0, max_sweeps=1)
    assert capped.sweeps == 1
    for method in ("identity", "activation", "zip", "cca"):
        align(a, b, method, loader=_loader(), example_input=X, seed=0, max_sweeps=5)


def test_cca_gamma_reaches_the_transform() -> None:
    a, b = _mlp(0), _mlp(1)
    small = align(a, b, "cca", loader=_loader(), gamma=1e-3).transforms
    large = align(a, b, "cca", loader=_loader(), gamma=10.0).transforms
    default = align(a, b, "cca", loader=_loader()).transforms
    assert any(not torch.allclose(small[k].m_b, large[k].m_b) for k in small)
    cov = torch.eye(4, dtype=torch.float64)
    assert torch.equal(cca_transform(cov, gamma=0.1).m_b, cca_transform(cov).m_b)
    assert all(torch.allclose(default[k].m_b, align(a, b, "cca", loader=_loader(), gamma=0.1).transforms[k].m_b)
               for k in default)


def test_activation_precision_accepts_float32_and_refuses_float16() -> None:
    a, b = _mlp(0), _mlp(1)
    res = align(a, b, "activation", loader=_loader(), precision="float32")
    ref = align(a, b, "activation", loader=_loader())
    assert all(torch.equal(res.perms[k], ref.perms[k]) for k in ref.perms)  # type: ignore[index]
    expected = "option 'precision' must be Literal\\['native', 'float64', 'float32'\\], got 'float16'"
    with pytest.raises(ValueError, match=expected):
        align(a, b, "activation", loader=_loader(), precision="float16")


def test_pruner_options_are_checked_and_fisher_samples_reaches_only_diag_fisher() -> None:
    model = build_model(ModelConfig(arch="mlp", hidden=(8, 8), image_size=8, num_classes=2)).eval()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))]
    assert PRUNERS.options("diag_fisher") == {"fisher_samples": (int, 1000), "fisher_chunk": (int, 32)}
    prune_model(model, "global_magnitude", 0.5, data, fisher_samples=16)
    prune_model(model, "diag_fisher", 0.5, data, fisher_samples=4, fisher_chunk=2)
    with pytest.raises(ValueError, match="pruner 'global_magnitude' has no option 'fisher_chunk'"):
        prune_model(model, "global_magnitude", 0.5, data, fisher_chunk=2)
    with pytest.raises(ValueError, match="pruner 'diag_fisher' has no option 'fisher_sample'"):
        prune_model(model, "diag_fisher", 0.5, data, fisher_sample=4)
