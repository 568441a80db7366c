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


def test_allocator_tuning_applies_on_glibc_and_env_switches_it_off() -> None:
    import os
    import platform
    import subprocess
    import sys

    code = "from vf_lightning.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"

    def run(flag: str) -> list[str]:
        env = {**os.environ, "VF_MALLOC_TUNING": flag}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()

    assert run("0") == ["False", "False"]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert run("1") == ["True", "True"]
