"""aioquic's packet path compiled by scripts/build_aioquic.py: which modules are loaded, and
whether what is installed is current. Skips (saying why) where aioquic is pure Python: the
build step fell back, or was never run in this Python."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_aioquic.py"


def _build_script():
    spec = importlib.util.spec_from_file_location("build_aioquic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_script()


def _status() -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), "--status"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return json.loads(out)


def _loaded_from() -> dict[str, str]:
    names = ["aioquic." + name.replace("/", ".") for name in build.MODULES]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(name, importlib.import_module(name).__file__)\n"
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_the_compiled_modules_exist_in_the_installed_release():
    """The list names modules of the pinned release (an upgrade that moved one fails here)."""
    pkg = build.package_dir()
    missing = [name for name in build.MODULES if not (pkg / (name + ".py")).exists()]
    assert not missing, f"aioquic has no {missing}: update scripts/build_aioquic.py's MODULES"


def test_the_compiled_modules_are_loaded():
    status = _status()
    stamp = status["stamp"]
    if not stamp:
        pytest.skip("aioquic is pure Python here: scripts/build_aioquic.py was not run in this Python")
    if stamp.get("status") != "compiled":
        pytest.skip(f"aioquic is pure Python here: the build fell back ({stamp.get('why', '?')[:200]})")
    assert status["current"], "the compiled aioquic is stale (aioquic, Cython or Python changed): run setup.sh"
    loaded = _loaded_from()
    pure = sorted(name for name, path in loaded.items() if not path.strip().endswith(build.SUFFIX))
    assert not pure, f"loaded from .py although compiled: {pure}"
