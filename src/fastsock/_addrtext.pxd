# Canonical text of IP addresses, written into caller-provided buffers.
#
# Shared by the /proc parser and the netlink reader so both sources store the
# same text for the same address. Addresses are bytes in network order; the
# output is not NUL-terminated, and each writer returns its length.

from libc.stdint cimport uint8_t, uint32_t


cdef inline Py_ssize_t write_ipv4_text(const uint8_t* b, char* out) noexcept nogil:
    cdef Py_ssize_t n = 0
    cdef int i, v
    for i in range(4):
        if i:
            out[n] = c'.'
            n += 1
        v = b[i]
        if v >= 100:
            out[n] = <char>(c'0' + v // 100)
            n += 1
        if v >= 10:
            out[n] = <char>(c'0' + (v // 10) % 10)
            n += 1
        out[n] = <char>(c'0' + v % 10)
        n += 1
    return n


cdef inline Py_ssize_t write_hex_group(uint32_t v, char* out) noexcept nogil:
    cdef const char* digits = b"0123456789abcdef"
    cdef Py_ssize_t n = 0
    cdef int shift
    cdef bint started = False
    for shift in range(12, -1, -4):
        if started or ((v >> shift) & 0xF) or shift == 0:
            out[n] = digits[(v >> shift) & 0xF]
            n += 1
            started = True
    return n


cdef inline Py_ssize_t write_ipv6_text(const uint8_t* b, char* out) noexcept nogil:
    """Write the RFC 5952 text of a 16-byte address in network order.

    The longest run of two or more zero groups becomes '::' (the first run on
    a tie); hex digits are lower case without leading zeros.
    """
    cdef uint32_t groups[8]
    cdef int i
    cdef int best_start = -1, best_len = 0, run_start = -1, run_len = 0
    cdef Py_ssize_t n = 0

    for i in range(8):
        groups[i] = (<uint32_t>b[2 * i] << 8) | b[2 * i + 1]

    for i in range(8):
        if groups[i] == 0:
            if run_start < 0:
                run_start = i
                run_len = 0
            run_len += 1
            if run_len > best_len:
                best_start = run_start
                best_len = run_len
        else:
            run_start = -1
    if best_len < 2:
        best_start = -1

    i = 0
    while i < 8:
        if i == best_start:
            out[n] = c':'
            out[n + 1] = c':'
            n += 2
            i += best_len
            continue
        if i and i != best_start + best_len:
            out[n] = c':'
            n += 1
        elif i and best_start < 0:
            out[n] = c':'
            n += 1
        n += write_hex_group(groups[i], out + n)
        i += 1
    return n


cdef inline bint is_ipv4_mapped(const uint8_t* b) noexcept nogil:
    cdef int i
    for i in range(10):
        if b[i]:
            return False
    return b[10] == 0xFF and b[11] == 0xFF
