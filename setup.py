"""Builds the Cython frame codec ``_frames.pyx`` as the extension module ``tunnel._frames``."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("tunnel._frames", ["_frames.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
