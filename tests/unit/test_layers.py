"""The package layout is the architecture: each layer imports only from itself and below.

    wire  <-  codec  <-  core  <-  carriers  <-  bridge  <-  ops  <-  relay, agent

- ``tunnel.wire``: wire-level definitions (constants, the exception tree, CONTROL payloads);
- ``tunnel.codec`` and the compiled ``tunnel._frames``: the frame codec;
- ``tunnel.core``: the sans-IO multiplexer and the link policy every carrier obeys;
- ``tunnel.carriers``: the ``Link`` interface and the carriers (TLS WebSocket, QUIC);
- ``tunnel.bridge``: TCP connection <-> stream, dialling the relay, listening for agents;
- ``tunnel.ops``: logs, metrics and health shared by the entrypoints;
- ``relay`` and ``agent``: the entrypoints. They use carriers only through
  ``tunnel.carriers.base`` (the interface) and the bridge layer, never a carrier module, and
  neither imports the other.

Every import counts, including the lazy ones inside functions, and the ``cimport`` lines of the
``.pxd`` files that type the compiled per-message path.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = ["wire", "codec", "core", "carriers", "bridge", "ops", "app"]
PREFIXES = [
    ("tunnel._frames", "codec"),
    ("tunnel.wire", "wire"),
    ("tunnel.codec", "codec"),
    ("tunnel.core", "core"),
    ("tunnel.carriers", "carriers"),
    ("tunnel.bridge", "bridge"),
    ("tunnel.ops", "ops"),
    ("relay", "app"),
    ("agent", "app"),
]
#: The only carrier module relay/ and agent/ may name: the interface.
CARRIER_INTERFACE = "tunnel.carriers.base"


def layer_of(module: str) -> str | None:
    if module == "tunnel":
        return "wire"  # the package itself holds the version only
    for prefix, layer in PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path`` (``from X import y`` counts as
    ``X.y`` too, so that ``from tunnel import _frames`` names the codec)."""
    text = path.read_text() if text is None else text
    if path.suffix in (".pyx", ".pxd"):
        found = []
        for lineno, line in enumerate(text.splitlines(), 1):
            m = re.match(r"\s*(?:from\s+([\w.]+)\s+c?import\s+([\w, ]+)|c?import\s+([\w.]+))", line)
            if m and m.group(1):
                found.append((lineno, m.group(1)))
                found.extend((lineno, f"{m.group(1)}.{n.strip()}") for n in m.group(2).split(",") if n.strip())
            elif m:
                found.append((lineno, m.group(3)))
        return found
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return found


def sources() -> list[Path]:
    files = [p for d in ("tunnel", "relay", "agent") for pattern in ("*.py", "*.pxd") for p in (ROOT / d).rglob(pattern)]
    return sorted(files) + [ROOT / "_frames.pyx"]


def own_layer(path: Path) -> str:
    if path.name == "_frames.pyx":
        return "codec"
    layer = layer_of(module_name(path))
    assert layer is not None, f"{path} belongs to no layer: add its folder to LAYERS"
    return layer


def violations(path: Path, text: str | None = None) -> list[str]:
    mine = own_layer(path)
    app = module_name(path).split(".")[0] if mine == "app" else None
    wrong = []
    for lineno, target in imports_of(path, text):
        layer = layer_of(target)
        if layer is None:
            continue  # standard library or a third-party package
        if LAYERS.index(layer) > LAYERS.index(mine):
            wrong.append(f"line {lineno}: {target} ({layer}) from the {mine} layer")
        if app is not None:
            if layer == "carriers" and not (target == CARRIER_INTERFACE or target.startswith(CARRIER_INTERFACE + ".")):
                wrong.append(f"line {lineno}: {target}: {app}/ uses carriers only through {CARRIER_INTERFACE}")
            other = target.split(".")[0]
            if layer == "app" and other != app:
                wrong.append(f"line {lineno}: {target}: {app}/ must not import {other}/")
    return wrong


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layer_order(path: Path) -> None:
    wrong = violations(path)
    assert not wrong, "\n".join(wrong)


def test_every_tunnel_folder_is_a_layer() -> None:
    for folder in (ROOT / "tunnel").iterdir():
        if folder.is_dir() and not folder.name.startswith("__"):
            assert layer_of(f"tunnel.{folder.name}") is not None, f"tunnel/{folder.name}/ is in no layer"


def test_the_checker_sees_violations() -> None:
    """The rules bite: a lazy upward import, a carrier module named by the agent, relay code
    in the agent."""
    core = ROOT / "tunnel" / "core" / "session.py"
    assert violations(core, "def f():\n    from tunnel.carriers import wss\n")
    assert violations(ROOT / "tunnel" / "core" / "session.pxd", "from tunnel.carriers.session_link cimport SessionLinkStream\n")
    agent = ROOT / "agent" / "runner.py"
    assert violations(agent, "from tunnel.carriers.quic import connect_quic\n")
    assert violations(agent, "import relay.state\n")
    assert not violations(agent, "from tunnel.carriers.base import Link\nfrom tunnel.bridge.dial import Dialer\n")
