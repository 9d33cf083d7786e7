"""The compiled per-message path and its pure-Python twins: every module with a ``.pxd`` is
built as an extension module and used by default; ``TUNNEL_PURE_PYTHON=1`` loads the ``.py``
files instead; an extension older than its sources is not used."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import tunnel

ROOT = Path(__file__).resolve().parents[2]
#: The modules the build compiles: those with a .pxd beside their .py (setup.py).
HOT_PATH = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "tunnel").rglob("*.pxd"))


def _loaded_from(env: dict) -> dict[str, str]:
    code = ("import importlib, sys\n"
            f"for name in {HOT_PATH!r}:\n"
            "    print(name, importlib.import_module(name).__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_the_per_message_path_is_declared():
    assert {"tunnel.core.session", "tunnel.carriers.websocket", "tunnel.carriers.session_link",
            "tunnel.carriers.wss", "tunnel.bridge.tcp"} <= set(HOT_PATH)
    for name in HOT_PATH:
        assert (ROOT / (name.replace(".", "/") + ".py")).exists(), f"{name}: a .pxd without its .py"


def test_pure_python_mode_loads_every_twin():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TUNNEL_PURE_PYTHON="1")
    files = _loaded_from(env)
    assert all(path.endswith(".py") for path in files.values()), files


def test_compiled_modules_are_used_by_default():
    built = [name for name in HOT_PATH
             if any((ROOT / (name.replace(".", "/") + suffix)).exists() for suffix in EXTENSION_SUFFIXES)]
    if not built:
        pytest.skip("the per-message path is not built (python setup.py build_ext --inplace)")
    assert built == HOT_PATH, "only part of the per-message path is built: rebuild"
    env = {k: v for k, v in os.environ.items() if k != "TUNNEL_PURE_PYTHON"}
    env["PYTHONPATH"] = str(ROOT)
    files = _loaded_from(env)
    assert not [path for path in files.values() if path.endswith(".py")], files


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """``tunnel.zz_twin`` in a directory of its own: a .py, a .pxd and an "extension"."""
    monkeypatch.setattr(tunnel, "PURE_PYTHON", False)
    source = tmp_path / "zz_twin.py"
    declarations = tmp_path / "zz_twin.pxd"
    built = tmp_path / ("zz_twin" + EXTENSION_SUFFIXES[0])
    for path in (source, declarations, built):
        path.write_text("")
    importlib.invalidate_caches()
    return tmp_path, source, declarations, built


def _touch(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


def test_a_fresh_extension_is_used(fake_module):
    folder, source, declarations, built = fake_module
    _touch(source, 1000)
    _touch(declarations, 1000)
    _touch(built, 2000)
    assert tunnel._TwinFinder.find_spec("tunnel.zz_twin", [str(folder)]).origin == str(built)


@pytest.mark.parametrize("edited", ["py", "pxd"])
def test_an_extension_older_than_its_source_is_not_used(fake_module, edited):
    folder, source, declarations, built = fake_module
    _touch(source, 1000)
    _touch(declarations, 1000)
    _touch(built, 2000)
    _touch(source if edited == "py" else declarations, 3000)
    with pytest.warns(UserWarning, match="older than its source"):
        spec = tunnel._TwinFinder.find_spec("tunnel.zz_twin", [str(folder)])
    assert spec.origin == str(source)


def test_pure_python_mode_picks_the_source(fake_module, monkeypatch):
    folder, source, declarations, built = fake_module
    _touch(built, 5000)
    monkeypatch.setattr(tunnel, "PURE_PYTHON", True)
    assert tunnel._TwinFinder.find_spec("tunnel.zz_twin", [str(folder)]).origin == str(source)


def test_an_installed_extension_is_used(fake_module):
    """No .pxd beside it (a wheel ships none): no timestamp check, whatever the install order."""
    folder, source, declarations, built = fake_module
    declarations.unlink()
    _touch(built, 1000)
    _touch(source, 2000)
    assert tunnel._TwinFinder.find_spec("tunnel.zz_twin", [str(folder)]).origin == str(built)


def test_modules_outside_the_package_are_left_alone(tmp_path):
    (tmp_path / "zz_other.py").write_text("")
    assert tunnel._TwinFinder.find_spec("zz_other", [str(tmp_path)]) is None
