"""Long-running commands allocate Arrow memory with malloc unless the user chose."""

import os
import subprocess
import sys

import pytest

PRINT_POOL = (
    "from fastsock.memory import use_returning_allocator; use_returning_allocator(); "
    "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"
)


@pytest.mark.parametrize(
    ("chosen", "expected"), [(None, "system"), ("mimalloc", "mimalloc")]
)
def test_allocator_is_malloc_unless_chosen(chosen, expected):
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen

    result = subprocess.run(
        [sys.executable, "-c", PRINT_POOL], env=env, capture_output=True, text=True,
        check=True,
    )

    assert result.stdout.strip() == expected
