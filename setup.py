"""Build the Cython extensions of fastsock.

Every ``src/fastsock/*.pyx`` file becomes an extension module of the same name.
"""

from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

SOURCE_DIR = Path("src") / "fastsock"

extensions = [
    Extension(
        f"fastsock.{pyx.stem}",
        [str(pyx)],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O2"],
    )
    for pyx in sorted(SOURCE_DIR.glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["src"],
        compiler_directives={"boundscheck": False, "wraparound": False},
    ),
)
