"""Tunnel core: frame codec, sans-IO multiplexed session, carriers (TLS WebSocket, QUIC).

The build (``setup.py``) compiles the per-message path with Cython from its own ``.py``
files, each with the ``.pxd`` beside it declaring its types, into extension modules of the
same names; the ``.py`` files are the pure-Python twins. ``TUNNEL_PURE_PYTHON=1`` makes every
such module load from its ``.py`` file (and the codec from its twin, see :mod:`tunnel.codec`).
In a source tree (the ``.pxd`` files are there), an extension module older than its ``.py`` or
``.pxd`` is not used: the source runs, with a warning, until the next build.
"""

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, PathFinder
from importlib.util import spec_from_file_location

__version__ = "0.1.0"

#: True when ``TUNNEL_PURE_PYTHON`` forces the pure-Python twins.
PURE_PYTHON = os.environ.get("TUNNEL_PURE_PYTHON", "") not in ("", "0")


class _TwinFinder:
    """Finds a ``tunnel.*`` module that has both an extension and a ``.py`` file: the ``.py``
    file in pure-Python mode or when the extension is stale, else the extension."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("tunnel.") or path is None:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, ExtensionFileLoader):
            return spec
        built = spec.origin
        base = built[: -len(next(s for s in EXTENSION_SUFFIXES if built.endswith(s)))]
        source = base + ".py"
        if not os.path.exists(source):
            return spec  # compiled only (the codec, tunnel.ops._malloc)
        if not PURE_PYTHON:
            declarations = base + ".pxd"
            if not os.path.exists(declarations):
                return spec  # an installed package
            built_at = os.stat(built).st_mtime
            if os.stat(source).st_mtime <= built_at and os.stat(declarations).st_mtime <= built_at:
                return spec
            import warnings

            warnings.warn(f"{name}: {os.path.basename(built)} is older than its source; running "
                          f"the .py file (rebuild: python setup.py build_ext --inplace)", stacklevel=2)
        return spec_from_file_location(name, source)


sys.meta_path.insert(0, _TwinFinder)
