"""Every Python package of the source tree ends up in the distribution (pyproject.toml's
package list): a folder added without being listed would be missing from installs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_package_is_distributed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(ROOT), include=include))
    source = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("tunnel", "relay", "agent")
        for path in (ROOT / top).rglob("__init__.py")
    }
    assert source <= shipped, f"not distributed: {sorted(source - shipped)}"


def test_licence_is_an_spdx_expression():
    # A TOML table here makes every `pip install` print setuptools' deprecation warning.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in config["build-system"]["requires"]
