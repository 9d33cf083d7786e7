"""Tunnel core: frame codec, sans-IO multiplexed session, carriers (TLS WebSocket, QUIC).

The build (``setup.py``) compiles the per-message path with Cython from its own ``.py``
files, each with the ``.pxd`` beside it declaring its types, into extension modules of the
same names, kept apart under ``tunnel/_compiled/`` (``tunnel/_compiled/core/session.*.so`` for
``tunnel.core.session``); the ``.py`` files are the pure-Python twins.

Which one runs is chosen here, once, at import: ``PURE_PYTHON`` (``TUNNEL_PURE_PYTHON``, read
nowhere else). Each package of the per-message path sets ``__path__ = search_path(__name__,
__path__)``: its compiled folder first, so that its extension modules are found before the
``.py`` files, unless ``PURE_PYTHON`` is set or nothing is built; the codec chooses the same
way (:mod:`tunnel.codec`).

Keeping the build current is the developer's job, as with any C extension:
``python setup.py build_ext --inplace`` after editing a ``.py`` that has a ``.pxd``.
``scripts/test.sh`` re-runs that build before the tests, and a unit test fails when an
extension module is older than its sources (tests/unit/test_twins.py).
"""

import os

__version__ = "0.1.0"

#: True when ``TUNNEL_PURE_PYTHON`` forces the pure-Python twins (the only place it is read).
PURE_PYTHON = os.environ.get("TUNNEL_PURE_PYTHON", "") not in ("", "0")

#: Where the build puts the compiled per-message path, one folder per package.
COMPILED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_compiled")


def search_path(package: str, path: list[str]) -> list[str]:
    """The ``__path__`` for ``package`` (``tunnel.core``...): its folder of extension modules
    first when they are built and ``PURE_PYTHON`` is not set, else ``path`` unchanged."""
    if PURE_PYTHON:
        return list(path)
    folder = os.path.join(COMPILED, *package.split(".")[1:])
    return [folder, *path] if os.path.isdir(folder) else list(path)
