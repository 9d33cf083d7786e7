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

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA_COMPILE_ARGS = ["-O3"] if os.name == "posix" else []

if os.path.exists(os.path.join(HERE, "_frames.pyx")):
    from Cython.Build import cythonize

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
else:  # an sdist without the .pyx still carries the generated C
    codec = [Extension("tunnel._frames", ["_frames.c"], extra_compile_args=EXTRA_COMPILE_ARGS)]

malloc = Extension("tunnel.ops._malloc", ["tunnel/ops/_malloc.c"], extra_compile_args=EXTRA_COMPILE_ARGS)

# The per-message path (WebSocket framing, session, link, bridge): every module of tunnel/ with
# a .pxd beside its .py is compiled by Cython from that .py (the .pxd declares the types of its
# hot classes and methods) into an extension module of the same name. The .py files stay the
# pure-Python twins: TUNNEL_PURE_PYTHON=1 loads them (tunnel/__init__.py). Python semantics
# throughout (bounds checks, negative indices, division), so that both behave the same; the
# annotations stay hints. No pickling support and no introspectable functions: less code,
# about 0.25 MB less resident in the agent.
from Cython.Build import cythonize  # noqa: E402 - a build requirement (pyproject.toml)

HOT_PATH = sorted(os.path.relpath(path, HERE)[:-4].replace(os.sep, ".")
                  for path in glob.glob(os.path.join(HERE, "tunnel", "**", "*.pxd"), recursive=True))
hot_path = cythonize(
    [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-O2"] if os.name == "posix" else [])
     for name in HOT_PATH],
    compiler_directives={"language_level": 3, "annotation_typing": False, "auto_pickle": False, "binding": False},
    quiet=True,
)

setup(ext_modules=codec + [malloc] + hot_path)
