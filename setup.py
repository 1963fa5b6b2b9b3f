"""Builds the compiled kernels: every kernels/NAME.pyx becomes the extension fastconv.backends._NAME.

The extensions are optional (Extension(optional=True)): without a compiler the install still succeeds
and the backends that need them report themselves unavailable, with the reason. OpenMP is used when a
test program compiles and links with -fopenmp; otherwise the same sources build serially (kernels/
openmp_shim.pxd). `-O3`, never `-ffast-math` (pooling must see NaN); FASTCONV_MARCH_NATIVE=1 adds
`-march=native` (a build for this machine only); FASTCONV_SANITIZE=1 builds with AddressSanitizer and
UndefinedBehaviorSanitizer (see the README for the run).
"""
import os
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
OPENMP_TEST = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


class BuildExtWithOpenMP(build_ext):
    def _compiles_with(self, flag):
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "openmp_test.c")
            source.write_text(OPENMP_TEST)
            try:
                objects = self.compiler.compile([str(source)], output_dir=tmp, extra_postargs=[flag])
                self.compiler.link_executable(objects, "openmp_test", output_dir=tmp, extra_postargs=[flag])
            except Exception:  # CompileError, LinkError, or no compiler at all
                return False
        return True

    def build_extensions(self):
        openmp = self._compiles_with("-fopenmp")
        print(f"fastconv: building the kernels {'with' if openmp else 'WITHOUT'} OpenMP")
        for ext in self.extensions:
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()


def _extensions():
    sources = sorted(HERE.glob("kernels/*.pyx"))
    if not sources:
        return []
    import numpy
    from Cython.Build import cythonize

    headers = [str(h.relative_to(HERE)) for h in sorted(HERE.glob("kernels/*.h")) + sorted(HERE.glob("kernels/*.pxd"))]
    flags = ["-O3"] + (["-march=native"] if os.environ.get("FASTCONV_MARCH_NATIVE") == "1" else [])
    link = []
    if os.environ.get("FASTCONV_SANITIZE") == "1":  # a checking build: run it with libasan preloaded
        flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                 "-fno-sanitize-recover=undefined"]
        link = ["-fsanitize=address,undefined"]
    modules = [
        Extension(f"fastconv.backends._{src.stem}", [str(src.relative_to(HERE))],
                  include_dirs=[numpy.get_include(), "kernels"], depends=headers,
                  extra_compile_args=list(flags), extra_link_args=list(link), optional=True)
        for src in sources
    ]
    return cythonize(modules, language_level=3, include_path=[str(HERE / "kernels")])


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtWithOpenMP})
