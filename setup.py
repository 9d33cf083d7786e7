"""Builds the Cython frame codec ``_frames.pyx`` as the extension module ``tunnel._frames``.

``pip install -e .`` (or ``pip install .``) builds it, with Cython taken from the build
requirements in pyproject.toml; ``python setup.py build_ext --inplace`` rebuilds it in place
after an edit. Without the extension ``tunnel.frames`` falls back to the pure-Python twin
``tunnel._frames_py`` (``TUNNEL_PURE_PYTHON=1`` forces the twin).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

extra_compile_args = ["-O3"] if os.name == "posix" else []

setup(
    ext_modules=cythonize(
        [Extension("tunnel._frames", ["_frames.pyx"], extra_compile_args=extra_compile_args)],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
