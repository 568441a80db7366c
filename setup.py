"""Packaging lives in setup.cfg; this adds the callbacks/ folder, mapped to ``vf_lightning.callbacks``.

setup.cfg's ``packages = find:`` cannot list a package whose folder sits outside ``vf_lightning/``.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["vf_lightning", "vf_lightning.*"]), "vf_lightning.callbacks"])
