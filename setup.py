"""Builds the Cython frame codec ``_frames.pyx`` as the extension module ``tunnel._frames``.

``pip install -e .`` (or ``pip install .``) builds it, with Cython taken from the build
requirements in pyproject.toml; ``python setup.py build_ext --inplace`` rebuilds it in place
after an edit. Without the extension ``tunnel.codec`` falls back to the pure-Python twin
``tunnel.codec.pure`` (``TUNNEL_PURE_PYTHON=1`` forces the twin).
"""

import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRA_COMPILE_ARGS = ["-O3"] if os.name == "posix" else []

if os.path.exists(os.path.join(HERE, "_frames.pyx")):
    from Cython.Build import cythonize

    ext_modules = cythonize(
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
    ext_modules = [Extension("tunnel._frames", ["_frames.c"], extra_compile_args=EXTRA_COMPILE_ARGS)]

setup(ext_modules=ext_modules)
