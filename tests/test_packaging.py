"""Packaging: every package folder is listed in setup.cfg, and callbacks/ imports as vf_lightning.callbacks."""

from __future__ import annotations

import configparser
from pathlib import Path


def test_setup_cfg_lists_every_package(repo: Path) -> None:
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "vf_lightning").rglob("__init__.py")}
    assert found | {"vf_lightning.callbacks"} == listed
    assert "vf_lightning.callbacks = callbacks" in cfg["options"]["package_dir"]


def test_callbacks_import_through_the_package_mapping() -> None:
    import vf_lightning.callbacks as cb

    assert hasattr(cb, "MergeCallback") and Path(cb.__file__).parent.name == "callbacks"
