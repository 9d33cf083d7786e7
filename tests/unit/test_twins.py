"""The compiled per-message path and its pure-Python twins: every module with a ``.pxd`` is
built as an extension module under ``tunnel/_compiled/`` and used by default;
``TUNNEL_PURE_PYTHON=1`` loads the ``.py`` files instead; both expose the same attributes; the
build is current."""

from __future__ import annotations

import ast
import importlib
import importlib.util
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


def _source(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def _built(name: str) -> Path | None:
    """The extension module of ``name`` in this tree's tunnel/_compiled/, if built."""
    folder = Path(tunnel.COMPILED, *name.split(".")[1:-1])
    for suffix in EXTENSION_SUFFIXES:
        if (folder / (name.rpartition(".")[2] + suffix)).exists():
            return folder / (name.rpartition(".")[2] + suffix)
    return None


def _loaded_from(env: dict) -> dict[str, str]:
    code = ("import importlib, sys\n"
            f"for name in {HOT_PATH!r}:\n"
            "    print(name, importlib.import_module(name).__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def _require_build() -> None:
    if tunnel.PURE_PYTHON:
        pytest.skip("TUNNEL_PURE_PYTHON: the pure-Python twins are in use")
    if not any(_built(name) for name in HOT_PATH):
        pytest.skip("the per-message path is not built (python setup.py build_ext --inplace)")


def test_the_per_message_path_is_declared():
    assert {"tunnel.core.session", "tunnel.carriers.websocket", "tunnel.carriers.session_link",
            "tunnel.carriers.wss", "tunnel.bridge.tcp"} <= set(HOT_PATH)
    for name in HOT_PATH:
        assert _source(name).exists(), f"{name}: a .pxd without its .py"


def test_pure_python_mode_loads_every_twin():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TUNNEL_PURE_PYTHON="1")
    files = _loaded_from(env)
    assert all(path.endswith(".py") for path in files.values()), files


def test_compiled_modules_are_used_by_default():
    _require_build()
    assert [name for name in HOT_PATH if _built(name) is None] == [], "only part of the per-message path is built: rebuild"
    env = {k: v for k, v in os.environ.items() if k != "TUNNEL_PURE_PYTHON"}
    env["PYTHONPATH"] = str(ROOT)
    files = _loaded_from(env)
    assert not [path for path in files.values() if path.endswith(".py")], files


def test_no_extension_module_shadows_a_twin():
    """An extension beside its .py (builds before tunnel/_compiled/) would be loaded in pure
    mode too; the build removes them."""
    beside = [str(p.relative_to(ROOT)) for name in HOT_PATH for suffix in EXTENSION_SUFFIXES
              for p in [_source(name).with_suffix(suffix)] if p.exists()]
    assert not beside, f"remove {beside} (an old in-place build; python setup.py build_ext --inplace does)"


def test_the_build_is_current():
    """Editing a .py or .pxd of the per-message path without rebuilding would run old code:
    the build is the developer's job (scripts/test.sh runs it), this test says when it is due."""
    _require_build()
    stale = []
    for name in HOT_PATH:
        built = _built(name)
        sources = [_source(name), _source(name).with_suffix(".pxd")]
        if built is not None and any(s.stat().st_mtime > built.stat().st_mtime for s in sources):
            stale.append(name)
    assert not stale, f"{stale}: older than their .py/.pxd: python setup.py build_ext --inplace"


# --- The same attributes on both sides -----------------------------------------------------


def _pure_module(name: str):
    """The .py twin of ``name`` under a name of its own (its imports are the ones in use)."""
    spec = importlib.util.spec_from_file_location("twin_of_" + name.replace(".", "_"), _source(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assigned_on_self(node: ast.ClassDef) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        targets = [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else getattr(sub, "targets", [])
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def _twin_classes():
    """(module, class name, names the pure class exposes, names the compiled class exposes),
    for the classes whose compiled form is an extension type (its instances have no __dict__:
    what the .pxd does not declare public or readonly is hidden)."""
    for name in HOT_PATH:
        compiled = importlib.import_module(name)
        pure = _pure_module(name)
        for node in ast.parse(_source(name).read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            fast, slow = getattr(compiled, node.name), getattr(pure, node.name)
            if fast.__dictoffset__:
                continue  # a plain class: its instances keep every attribute
            exposed = {n for n in set(dir(slow)) | _assigned_on_self(node) if not n.startswith("__")}
            yield name, node.name, exposed, {n for n in dir(fast) if not n.startswith("__")}


def test_compiled_classes_expose_every_public_attribute():
    _require_build()
    wrong = []
    for module, cls, pure, compiled in _twin_classes():
        public = {n for n in pure if not n.startswith("_")}
        if public - compiled:
            wrong.append(f"{module}.{cls}: {sorted(public - compiled)} hidden (cdef public/readonly in the .pxd)")
        if {n for n in compiled if not n.startswith("_")} - public:
            wrong.append(f"{module}.{cls}: {sorted(compiled - public)} only in the compiled class")
    assert not wrong, "\n".join(wrong)


#: Reads of such a name on objects that are not of a twin class (the check goes by name).
OTHER_OBJECTS = {
    # A QUIC link and its streams (one unit in two modules).
    "tunnel/carriers/quic/link.py": {"_closed", "_feed"},
    "tunnel/carriers/quic/stream.py": {"_closed", "_conn", "_check_drained", "_enter_half_closed"},
    "tests/adapters/test_quic.py": {"_conn"},  # a QUIC link's aioquic connection
}


def hidden_reads(path: Path, text: str, hidden: set[str]) -> list[str]:
    """``x._name`` reads in ``path`` (not ``self._name``) of a name that only the hidden
    attributes of compiled classes carry."""
    hidden = hidden - OTHER_OBJECTS.get(str(path.relative_to(ROOT)), set())
    return [f"{path.relative_to(ROOT)}:{n.lineno}: .{n.attr}" for n in ast.walk(ast.parse(text, str(path)))
            if isinstance(n, ast.Attribute) and n.attr in hidden
            and not (isinstance(n.value, ast.Name) and n.value.id == "self")]


def _hidden_names() -> set[str]:
    hidden, visible = set(), set()
    for _module, _cls, pure, compiled in _twin_classes():
        hidden |= {n for n in pure - compiled if n.startswith("_")}
        visible |= compiled
    return hidden - visible


def test_no_code_reads_an_attribute_the_compiled_class_hides():
    """A private attribute read from another module or a test works on the twin and fails on
    the compiled class (the forwarding code once read ``TcpBridge._done``): make it public."""
    _require_build()
    hidden = _hidden_names()
    twins = {_source(name) for name in HOT_PATH}
    wrong = []
    for path in sorted(p for d in ("tunnel", "relay", "agent", "tests") for p in (ROOT / d).rglob("*.py")):
        if path not in twins:
            wrong += hidden_reads(path, path.read_text(), hidden)
    assert not wrong, "\n".join(wrong)


def test_the_hidden_read_check_bites():
    _require_build()
    hidden = _hidden_names()
    assert "_done" in hidden
    path = ROOT / "relay" / "forward.py"
    assert hidden_reads(path, "def f(bridge):\n    return bridge._done\n", hidden)
    assert not hidden_reads(path, "def f(bridge):\n    return bridge.done\n", hidden)
