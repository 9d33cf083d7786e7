"""Builds the compiled modules: the Cython frame codec ``_frames.pyx`` as ``tunnel._frames``
and the C module ``tunnel/ops/_malloc.c`` (glibc malloc thresholds) as ``tunnel.ops._malloc``.

``pip install -e .`` (or ``pip install .``, or from an sdist) builds them, with Cython taken
from the build requirements in pyproject.toml; ``python setup.py build_ext --inplace`` rebuilds
them in place after an edit. Without the codec ``tunnel.codec`` falls back to the pure-Python
twin ``tunnel.codec.pure`` (``TUNNEL_PURE_PYTHON=1`` forces the twin); without ``_malloc``,
``tunnel.ops.process.tune_malloc`` uses ctypes.
"""

import glob
import os

from Cython.Build import cythonize  # a build requirement (pyproject.toml)
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA_COMPILE_ARGS = ["-O3"] if os.name == "posix" else []

codec = cythonize(
    [Extension("tunnel._frames", ["_frames.pyx"], extra_compile_args=EXTRA_COMPILE_ARGS)],
    compiler_directives={
        "language_level": 3,
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": False,
    },
)

malloc = Extension("tunnel.ops._malloc", ["tunnel/ops/_malloc.c"], extra_compile_args=EXTRA_COMPILE_ARGS)

# The per-message path (WebSocket framing, session, link, bridge): every module of tunnel/ with
# a .pxd beside its .py is compiled by Cython from that .py (the .pxd declares the types of its
# hot classes and methods) into an extension module of the same name, written under
# tunnel/_compiled/ (tunnel.core.session -> tunnel/_compiled/core/session.*.so) so that the .py
# files stay importable as the pure-Python twins: tunnel/__init__.py chooses. Python semantics
# throughout (bounds checks, negative indices, division), so that both behave the same; the
# annotations stay hints. No pickling support and no introspectable functions: less code,
# about 0.25 MB less resident in the agent.
HOT_PATH = sorted(os.path.relpath(path, HERE)[:-4].replace(os.sep, ".")
                  for path in glob.glob(os.path.join(HERE, "tunnel", "**", "*.pxd"), recursive=True))
hot_path = cythonize(
    [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-O2"] if os.name == "posix" else [])
     for name in HOT_PATH],
    compiler_directives={"language_level": 3, "annotation_typing": False, "auto_pickle": False, "binding": False},
    quiet=True,
)
for extension in hot_path:
    # Generated under its own name (what cimports and imports refer to), stored under _compiled/.
    extension.name = "tunnel._compiled." + extension.name.removeprefix("tunnel.")
    # An in-place build copies into the folder without creating it.
    os.makedirs(os.path.join(HERE, *extension.name.split(".")[:-1]), exist_ok=True)
    # Builds before tunnel/_compiled/ wrote the extension beside its .py, where it would shadow
    # the twin: remove such leftovers.
    for stale in glob.glob(os.path.join(HERE, extension.sources[0][: -len(".c")] + ".*.so")):
        os.remove(stale)

setup(ext_modules=codec + [malloc] + hot_path)
