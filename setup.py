"""Builds the compiled modules: the Cython frame codec ``_frames.pyx`` as ``tunnel._frames``
and the C module ``tunnel/ops/_malloc.c`` (glibc malloc thresholds) as ``tunnel.ops._malloc``.

``pip install -e .`` (or ``pip install .``, or from an sdist) builds them, with Cython taken
from the build requirements in pyproject.toml; ``python setup.py build_ext --inplace`` rebuilds
them in place after an edit. Without the codec ``tunnel.codec`` falls back to the pure-Python
twin ``tunnel.codec.pure`` (``TUNNEL_PURE_PYTHON=1`` forces the twin); without ``_malloc``,
``tunnel.ops.process.tune_malloc`` uses ctypes.
"""

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

#: The per-message path (WebSocket framing, session, link, bridge), compiled by Cython from the
#: modules' own .py files with the .pxd beside each (the types of the hot classes and methods),
#: as extension modules of the same names; the .py files stay the pure-Python twins
#: (TUNNEL_PURE_PYTHON=1 loads them, see tunnel/__init__.py).
HOT_PATH = [
    "tunnel.core.policy",
    "tunnel.core.session",
    "tunnel.carriers.websocket",
    "tunnel.carriers.session_link",
    "tunnel.carriers.wss",
    "tunnel.bridge.tcp",
]


def hot_path() -> list:
    from Cython.Build import cythonize

    return cythonize(
        [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-O2"] if os.name == "posix" else [])
         for name in HOT_PATH],
        # Python semantics everywhere (bounds checks, negative indices, division): the twins
        # must behave the same; the .pxd files give the types, annotations stay hints. No
        # pickling support and plain (non-introspectable) functions: less code per module,
        # about 0.25 MB less resident.
        compiler_directives={"language_level": 3, "annotation_typing": False, "auto_pickle": False,
                             "binding": False},
        quiet=True,
    )


setup(ext_modules=codec + [malloc] + hot_path())
