# cython: language_level=3
"""A hash index from distinct int64 keys to their positions in an array.

The lifetime tracker looks up every socket of a sample among the open ones.
A sorted search of 100,000 keys in random order costs about 12 ms on the
machine of docs/performance.md, because each key misses the cache several
times; one probe into an open-addressing table costs about one miss.
"""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

cnp.import_array()

# Slots per key, at least: a load factor of 1/2 or less keeps probe runs short.
cdef enum:
    SLOTS_PER_KEY = 2


cdef inline uint64_t slot_hash(int64_t key) noexcept nogil:
    # The splitmix64 finaliser, so that inodes, which grow by small steps,
    # spread over every slot.
    cdef uint64_t z = <uint64_t>key + 0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef class KeyIndex:
    """Positions of distinct int64 keys, found by one hash probe per key."""

    cdef int64_t* slot_keys
    cdef int64_t* slot_positions  # -1 marks an empty slot
    cdef uint64_t mask
    cdef public Py_ssize_t size

    def __cinit__(self, const int64_t[::1] keys, left_out=None):
        """Index keys; positions where the bool array left_out is True are not indexed."""
        cdef uint64_t slots = 16
        cdef Py_ssize_t i
        cdef uint64_t slot
        cdef const unsigned char[::1] c_left_out = None
        cdef bint has_left_out = left_out is not None

        if has_left_out:
            if len(left_out) != keys.shape[0]:
                raise ValueError(
                    f"left_out has {len(left_out)} values for {keys.shape[0]} keys; "
                    "pass one bool per key"
                )
            c_left_out = np.ascontiguousarray(left_out, dtype=np.bool_).view(np.uint8)

        while slots < <uint64_t>(SLOTS_PER_KEY * keys.shape[0]):
            slots *= 2
        self.mask = slots - 1
        self.size = keys.shape[0]
        self.slot_keys = <int64_t*>malloc(slots * sizeof(int64_t))
        self.slot_positions = <int64_t*>malloc(slots * sizeof(int64_t))
        if self.slot_keys == NULL or self.slot_positions == NULL:
            raise MemoryError()

        with nogil:
            for i in range(<Py_ssize_t>slots):
                self.slot_positions[i] = -1
            for i in range(keys.shape[0]):
                if has_left_out and c_left_out[i]:
                    continue
                slot = slot_hash(keys[i]) & self.mask
                while self.slot_positions[slot] >= 0:
                    if self.slot_keys[slot] == keys[i]:
                        break
                    slot = (slot + 1) & self.mask
                if self.slot_positions[slot] < 0:
                    # A repeated key keeps its first position.
                    self.slot_keys[slot] = keys[i]
                    self.slot_positions[slot] = i

    def __dealloc__(self):
        free(self.slot_keys)
        free(self.slot_positions)

    def find(self, const int64_t[::1] keys):
        """Return the position of each key, or -1 for a key not in the index."""
        result = np.empty(keys.shape[0], dtype=np.int64)
        cdef int64_t[::1] c_result = result
        cdef Py_ssize_t i
        cdef uint64_t slot
        cdef int64_t found

        with nogil:
            for i in range(keys.shape[0]):
                slot = slot_hash(keys[i]) & self.mask
                found = -1
                while self.slot_positions[slot] >= 0:
                    if self.slot_keys[slot] == keys[i]:
                        found = self.slot_positions[slot]
                        break
                    slot = (slot + 1) & self.mask
                c_result[i] = found
        return result
