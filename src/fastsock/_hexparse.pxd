# Bounds-checked readers of the fields in /proc/net/{tcp,udp}[6] rows.
#
# Each reader takes a cursor into the row and the end of the row, and returns
# the number of bytes consumed, or -1 when the field is malformed. The callers
# turn -1 into a counted skip, so none of these raise.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


# Value of each byte as a hex digit, or -1. A table lookup has no branch
# to mispredict: address fields mix digits and letters at random.
cdef extern from *:
    """
    static const signed char fastsock_hex_values[256] = {
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
         0,  1,  2,  3,  4,  5,  6,  7,  8,  9, -1, -1, -1, -1, -1, -1,
        -1, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    };
    """
    const signed char fastsock_hex_values[256]


cdef inline int hex_digit(char c) noexcept nogil:
    return fastsock_hex_values[<unsigned char>c]


cdef inline Py_ssize_t read_hex(const char* p, const char* end,
                                Py_ssize_t max_digits,
                                uint64_t* out) noexcept nogil:
    """Read 1 to max_digits hex digits into out."""
    cdef Py_ssize_t n = 0
    cdef int d
    cdef uint64_t value = 0
    while p + n < end and n < max_digits:
        d = hex_digit(p[n])
        if d < 0:
            break
        value = (value << 4) | <uint64_t>d
        n += 1
    if n == 0:
        return -1
    out[0] = value
    return n


cdef inline bint read_hex8(const char* p, uint32_t* out) noexcept nogil:
    """Read exactly 8 hex digits into out; the caller checks that 8 bytes remain.

    Without a branch per digit: -1 marks a non-digit, and OR-ing the digit
    values leaves the sign bit set if any was one.
    """
    cdef int i
    cdef int digit
    cdef int seen = 0
    cdef uint32_t value = 0
    for i in range(8):
        digit = fastsock_hex_values[<unsigned char>p[i]]
        seen |= digit
        value = (value << 4) | <uint32_t>(digit & 0xF)
    out[0] = value
    return seen >= 0


cdef inline Py_ssize_t read_decimal(const char* p, const char* end,
                                    uint64_t* out) noexcept nogil:
    """Read an unsigned decimal of at most 19 digits into out."""
    cdef Py_ssize_t n = 0
    cdef uint64_t value = 0
    while p + n < end and c'0' <= p[n] <= c'9' and n < 19:
        value = value * 10 + <uint64_t>(p[n] - c'0')
        n += 1
    if n == 0:
        return -1
    out[0] = value
    return n


cdef inline const char* skip_blanks(const char* p, const char* end) noexcept nogil:
    while p < end and (p[0] == c' ' or p[0] == c'\t'):
        p += 1
    return p


cdef inline const char* skip_field(const char* p, const char* end) noexcept nogil:
    while p < end and p[0] != c' ' and p[0] != c'\t':
        p += 1
    return p


cdef inline bint at_field_end(const char* p, const char* end) noexcept nogil:
    """Return whether p is past the end, or on a blank or carriage return."""
    return p >= end or p[0] == c' ' or p[0] == c'\t' or p[0] == c'\r'


cdef inline Py_ssize_t count_digits(const char* p, const char* end) noexcept nogil:
    cdef Py_ssize_t n = 0
    while p + n < end and c'0' <= p[n] <= c'9':
        n += 1
    return n
