"""The shared name registry: duplicates refused, unknown names listed."""

from __future__ import annotations

import pytest

from vf_lightning.registry import Registry


def test_registry_refuses_duplicates_and_lists_valid_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get_or_fail("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(3)
    with pytest.raises(ValueError, match="unknown widget 'c'; choose one of a, b"):
        reg.get_or_fail("c")
