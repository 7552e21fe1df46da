"""Type stub of the compiled key index (``_keyindex.pyx``)."""

import numpy as np
import numpy.typing as npt

class KeyIndex:
    """Positions of distinct int64 keys, found by one hash probe per key."""

    size: int

    def __init__(
        self,
        keys: npt.NDArray[np.int64],
        left_out: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        """Index keys; positions where left_out is True are not indexed."""
    def find(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Return the position of each key, or -1 for a key not in the index."""
