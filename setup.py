"""Builds the compiled kernels: every kernels/NAME.pyx becomes the extension fastconv.backends._NAME.

The extensions are optional (Extension(optional=True)): without a compiler the install still succeeds
and the backends that need them report themselves unavailable, with the reason.
"""
from pathlib import Path

from setuptools import Extension, setup


def _extensions():
    sources = sorted(Path(__file__).parent.glob("kernels/*.pyx"))
    if not sources:
        return []
    import numpy
    from Cython.Build import cythonize

    modules = [
        Extension(f"fastconv.backends._{src.stem}", [str(src.relative_to(Path(__file__).parent))],
                  include_dirs=[numpy.get_include()], extra_compile_args=["-O3"], optional=True)
        for src in sources
    ]
    return cythonize(modules, language_level=3)


setup(ext_modules=_extensions())
