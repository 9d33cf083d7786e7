"""The package layout is the architecture: each layer imports only from itself and below.

    wire  <-  codec  <-  core  <-  carriers  <-  bridge  <-  ops  <-  relay, agent

- ``tunnel.wire``: wire-level definitions (constants, the exception tree, CONTROL payloads);
- ``tunnel.codec`` and the compiled ``tunnel._frames``: the frame codec;
- ``tunnel.core``: the sans-IO multiplexer and the link policy every carrier obeys (and
  ``tunnel.quic_engine``, the QUIC engine's API in one namespace);
- ``tunnel.carriers``: the ``Link`` interface and the carriers (TLS WebSocket, QUIC);
- ``tunnel.bridge``: TCP connection <-> stream, dialling the relay, listening for agents;
- ``tunnel.ops``: logs, metrics and health shared by the entrypoints;
- ``relay`` and ``agent``: the entrypoints. They use carriers only through
  ``tunnel.carriers.base`` (the interface) and the bridge layer, never a carrier module, and
  neither imports the other.

Inside ``relay/`` and ``agent/``, and inside some layers, the same rule holds between smaller
parts (``ORDERS``): the relay's layers

    relay (shared names)  <-  state  <-  data  <-  control  <-  cli, serve

(``relay.state``: the store, cluster membership, PKI; ``relay.data``: endpoints, registry,
forwarding, peering; ``relay.control``: agent links, registration, admin API), the agent's
modules from its config up to its CLI, and in ``tunnel.carriers`` the interface below every
carrier (``base`` never imports ``quic``).

Every import counts, including the lazy ones inside functions, and the ``cimport`` lines
(relative ones resolved) of the ``.pxd`` files that type the compiled per-message path. And
there is no import cycle anywhere (``test_no_import_cycle``; type-checking-only imports aside).
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
    ("tunnel.quic_engine", "core"),  # the QUIC engine namespace, for the carrier and the core's QUIC session
    ("tunnel.carriers", "carriers"),
    ("tunnel.bridge", "bridge"),
    ("tunnel.ops", "ops"),
    ("relay", "app"),
    ("agent", "app"),
]
#: The only carrier module relay/ and agent/ may name: the interface.
CARRIER_INTERFACE = "tunnel.carriers.base"

#: Orders inside a layer or an entrypoint: each part imports only from itself and the parts
#: before it. A part is a tuple of module prefixes; ``=name`` matches that module only.
ORDERS = [
    [("=relay", "relay.settings"), ("relay.state",), ("relay.data",), ("relay.control",), ("relay.cli", "relay.serve", "relay.__main__")],
    [("relay.state.files", "relay.state.access"), ("relay.state.store",), ("relay.state.relay_state",),
     ("relay.state.cluster", "relay.state.pki", "relay.state.enrolment")],
    [("relay.control.names", "relay.control.tokens", "relay.control.admin_client"),
     ("relay.control.server", "relay.control.agent_control"), ("relay.control.admin",)],
    [("=agent", "agent.identity", "agent.config", "agent.settings"), ("agent.hints",), ("agent.health", "agent.metrics"),
     ("agent.config_watch", "agent.link_handler"), ("agent.runner",), ("agent.links",),
     ("agent.check",), ("agent.cli", "agent.__main__")],
    [("tunnel.carriers.base",), ("tunnel.carriers.dispatch", "tunnel.carriers.handshakes", "tunnel.carriers.pipe",
                                 "tunnel.carriers.proxy"),
     ("tunnel.carriers.websocket", "tunnel.carriers.session_link"), ("tunnel.carriers.wss", "tunnel.carriers.tcp"),
     ("tunnel.carriers.quic",)],
]


def rank(order: list[tuple[str, ...]], module: str) -> int | None:
    """The part of ``order`` that ``module`` belongs to (the longest matching prefix), or None."""
    best, found = -1, None
    for index, part in enumerate(order):
        for prefix in part:
            if prefix.startswith("="):
                hit = module == prefix[1:]
            else:
                hit = module == prefix or module.startswith(prefix + ".")
            if hit and len(prefix) > best:
                best, found = len(prefix), index
    return found


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


def resolve(package: str, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``package``."""
    if not level:
        return module or ""
    base = package.split(".")
    base = base[: len(base) - level + 1]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in ``path`` (``from X import y`` counts as
    ``X.y`` too, so that ``from tunnel import _frames`` names the codec)."""
    text = path.read_text() if text is None else text
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    if path.suffix in (".pyx", ".pxd"):
        found = []
        for lineno, line in enumerate(text.splitlines(), 1):
            m = re.match(r"\s*(?:from\s+(\.*)([\w.]*)\s+c?import\s+([\w, ]+)|c?import\s+([\w.]+))", line)
            if m and m.group(4):
                found.append((lineno, m.group(4)))
            elif m:
                target = resolve(package, len(m.group(1)), m.group(2))
                found.append((lineno, target))
                found.extend((lineno, f"{target}.{n.strip()}") for n in m.group(3).split(",") if n.strip())
        return found
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(package, node.level, node.module)
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
        for order in ORDERS:
            mine_rank, their_rank = rank(order, module_name(path)), rank(order, target)
            if mine_rank is not None and their_rank is not None and their_rank > mine_rank:
                wrong.append(f"line {lineno}: {target} ({order[their_rank][0]}) from {order[mine_rank][0]}")
    return wrong


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layer_order(path: Path) -> None:
    wrong = violations(path)
    assert not wrong, "\n".join(wrong)


def test_every_tunnel_folder_is_a_layer() -> None:
    for folder in (ROOT / "tunnel").iterdir():
        if folder.is_dir() and not folder.name.startswith("__") and folder.name != "_compiled":  # build output
            assert layer_of(f"tunnel.{folder.name}") is not None, f"tunnel/{folder.name}/ is in no layer"


def test_every_relay_and_agent_module_is_in_the_order() -> None:
    for path in sources():
        module = module_name(path)
        if module.split(".")[0] in ("relay", "agent"):
            assert rank(ORDERS[0 if module.startswith("relay") else 3], module) is not None, f"{path}: in no part of ORDERS"


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


def test_relative_cimports_are_resolved() -> None:
    pxd = ROOT / "tunnel" / "carriers" / "session_link.pxd"
    assert (1, "tunnel.core.session") in imports_of(pxd, "from ..core.session cimport Session\n")
    assert violations(ROOT / "tunnel" / "core" / "session.pxd", "from ..carriers.session_link cimport SessionLinkStream\n")


def test_the_checker_sees_violations_inside_a_layer() -> None:
    assert violations(ROOT / "tunnel" / "carriers" / "base.py", "from tunnel.carriers.quic import connect_quic\n")
    assert violations(ROOT / "relay" / "state" / "store" / "sqlite.py", "from relay.state.relay_state import ensure_state_dir\n")
    assert violations(ROOT / "relay" / "data" / "registry.py", "def f():\n    from relay.control.server import Relay\n")
    assert violations(ROOT / "relay" / "control" / "admin.py", "from relay.serve import serve_main\n")
    assert violations(ROOT / "agent" / "config.py", "from agent.runner import Agent\n")
    assert not violations(ROOT / "relay" / "serve.py", "from relay.control.server import Relay\n")


# --- no private name imported across modules ----------------------------------------------


def private_imports(path: Path, text: str | None = None) -> list[str]:
    """``from <project module> import _name`` where ``_name`` is not a module (a private name
    of another module: make it public where it belongs)."""
    text = path.read_text() if text is None else text
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    wrong = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.ImportFrom):
            target = resolve(package, node.level, node.module)
            if layer_of(target) is None:
                continue
            for alias in node.names:
                name = f"{target}.{alias.name}"
                is_module = any((ROOT / (name.replace(".", "/") + suffix)).exists() for suffix in (".py", ".pyx", ".pyi", "/__init__.py"))
                if alias.name.startswith("_") and not alias.name.startswith("__") and not is_module:
                    wrong.append(f"line {node.lineno}: {name}")
    return wrong


@pytest.mark.parametrize("path", [p for p in sources() if p.suffix == ".py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_from_another_module(path: Path) -> None:
    wrong = private_imports(path)
    assert not wrong, "\n".join(wrong)


def test_the_private_import_check_bites() -> None:
    agent_control = ROOT / "relay" / "control" / "agent_control.py"
    assert private_imports(agent_control, "def f():\n    from relay.control.server import RESOURCE_NAME, _valid\n")
    assert not private_imports(agent_control, "from tunnel import _frames\nfrom relay.control.names import valid\n")


# --- imports at the top of the relay's modules ----------------------------------------------

#: Imports inside functions in relay/, each with its reason.
LAZY_IMPORTS = {
    ("relay/cli.py", "relay.serve"): "the server would add about 1 s to every admin command (measured)",
    ("relay/state/store/connect.py", "relay.state.store.postgres"): "asyncpg is an optional dependency",
}


def lazy_imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    found.append((sub.lineno, resolve(package, sub.level, sub.module)))
                elif isinstance(sub, ast.Import):
                    found.extend((sub.lineno, alias.name) for alias in sub.names)
    return found


def test_relay_imports_at_the_top() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{lineno}: {module}"
             for path in sorted((ROOT / "relay").rglob("*.py")) for lineno, module in lazy_imports(path)
             if (str(path.relative_to(ROOT)), module) not in LAZY_IMPORTS]
    assert not wrong, "imports inside functions (move them to the top, or measure and list them):\n" + "\n".join(wrong)


# --- no import cycle ------------------------------------------------------------------------


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph(texts: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports (lazy ones too, type-checking-only ones not;
    ``from package import name`` is an import of ``package.name`` when that is a module)."""
    paths = sources()
    modules = {module_name(p) if p.name != "_frames.pyx" else "tunnel._frames" for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in paths:
        text = (texts or {}).get(path, path.read_text())
        own = "tunnel._frames" if path.name == "_frames.pyx" else module_name(path)
        skip = _type_checking_lines(ast.parse(text)) if path.suffix == ".py" else set()
        for lineno, target in imports_of(path, text):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != own and lineno not in skip:
                graph[own].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_sees_a_cycle() -> None:
    """The cycle once closed by a lazy import in the store: it is seen."""
    sqlite = ROOT / "relay" / "state" / "store" / "sqlite.py"
    text = sqlite.read_text() + "\n\ndef _late():\n    from relay.state.relay_state import RelayState\n"
    found = cycles(import_graph({sqlite: text}))
    assert any("relay.state.store.sqlite" in c and "relay.state.relay_state" in c for c in found)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
