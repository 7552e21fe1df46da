"""Import the compiled Cython core, or fail with an error that explains the rebuild.

fastsock has no pure-Python fallback for its parsers: a slow path would make
the sampler miss the short connections it exists to catch.
"""

import importlib

from fastsock.errors import CoreNotBuiltError

REBUILD_HINT = (
    "reinstall fastsock so its Cython extensions compile: "
    "`pip install --force-reinstall --no-deps .` from the source tree, or "
    "`python setup.py build_ext --inplace` in a development checkout "
    "(needs a C compiler and the Python headers)"
)


def load_extension(name: str):
    """Import the compiled module fastsock.<name>, or raise CoreNotBuiltError."""
    try:
        return importlib.import_module(f"fastsock.{name}")
    except ImportError as error:
        raise CoreNotBuiltError(
            f"the compiled core fastsock.{name} cannot be imported ({error}); "
            + REBUILD_HINT
        ) from error
