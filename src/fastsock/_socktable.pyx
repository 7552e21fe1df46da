# cython: language_level=3
"""Parse the kernel's socket tables (/proc/net/tcp, tcp6, udp, udp6).

The file is read with plain read(2) calls into one growing C buffer, without
the GIL, until a read returns 0 bytes: the kernel returns about one page per
read, so a short read never means the end. The rows are parsed from that
buffer into preallocated NumPy arrays, so no Python object is made per row;
addresses are written as canonical text straight into Arrow-style offset and
data buffers.
"""

import numpy as np

cimport numpy as cnp
from libc.errno cimport errno
from libc.stdint cimport (
    INT64_MAX,
    UINT32_MAX,
    int8_t,
    int32_t,
    int64_t,
    uint8_t,
    uint32_t,
    uint64_t,
)
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy, memset
from posix.fcntl cimport O_RDONLY, open as c_open
from posix.unistd cimport _SC_PAGESIZE, close as c_close, read as c_read, sysconf

from fastsock._addrtext cimport (
    is_ipv4_mapped,
    write_ipv4_text,
    write_ipv6_text,
)
from fastsock._hexparse cimport (
    at_field_end,
    count_digits,
    read_decimal,
    read_hex,
    skip_blanks,
    skip_field,
)

cnp.import_array()

# Reasons a row is skipped. The order matches SKIP_REASONS below.
cdef enum SkipReason:
    TOO_FEW_FIELDS = 0
    BAD_SLOT = 1
    BAD_ADDRESS = 2
    BAD_PORT = 3
    BAD_STATE = 4
    BAD_QUEUE = 5
    BAD_UID = 6
    BAD_INODE = 7

SKIP_REASONS = (
    "too_few_fields",
    "bad_slot",
    "bad_address",
    "bad_port",
    "bad_state",
    "bad_queue",
    "bad_uid",
    "bad_inode",
)

# Longest canonical text of one address: a full IPv6 address has 8 groups of
# 4 hex digits and 7 colons.
cdef enum:
    MAX_ADDRESS_TEXT = 39

# Bad rows kept with their raw text for the error report; the rest are only
# counted.
cdef enum:
    MAX_REPORTED_ROWS = 16

# Bytes asked for per read(2); the kernel returns about one page anyway.
cdef enum:
    READ_CHUNK = 65536


cdef class FileBuffer:
    """The content of one file, read until a 0-byte read or an early stop."""

    cdef char* data
    cdef public Py_ssize_t size
    cdef public Py_ssize_t reads
    # Size at which the early-stop rule would have ended the read, or -1.
    cdef public Py_ssize_t early_stop_size
    cdef public bint stopped_early

    def __dealloc__(self):
        free(self.data)

    def to_bytes(self):
        return self.data[:self.size]


cdef Py_ssize_t longest_line(const char* data, Py_ssize_t size,
                             Py_ssize_t longest) noexcept nogil:
    """Return the longest newline-terminated line in data, or longest if more."""
    cdef const char* line = data
    cdef const char* end = data + size
    cdef const char* newline
    while line < end:
        newline = <const char*>memchr(line, c'\n', end - line)
        if newline == NULL:
            break
        if newline + 1 - line > longest:
            longest = newline + 1 - line
        line = newline + 1
    return longest


cdef int read_whole_file(const char* path, FileBuffer out,
                         bint stop_early) except -1:
    """Read path into out.

    The kernel fills each read of a socket table with whole rows, up to about
    one page. So a read that leaves more than the longest row's worth of the
    page free was the last one with data: the early-stop rule. It is recorded
    in out.early_stop_size on every read, and with stop_early the read ends
    there, which saves the final 0-byte read (a walk of every hash bucket).
    """
    cdef int fd
    cdef Py_ssize_t capacity = READ_CHUNK
    cdef Py_ssize_t got
    cdef Py_ssize_t longest = 0
    cdef Py_ssize_t page = sysconf(_SC_PAGESIZE)
    cdef char* grown
    cdef int saved_errno = 0

    out.data = <char*>malloc(capacity)
    if out.data == NULL:
        raise MemoryError()
    out.size = 0
    out.reads = 0
    out.early_stop_size = -1
    out.stopped_early = False

    with nogil:
        fd = c_open(path, O_RDONLY)
        if fd < 0:
            saved_errno = errno
        else:
            while True:
                if capacity - out.size < READ_CHUNK:
                    grown = <char*>realloc(out.data, capacity * 2)
                    if grown == NULL:
                        saved_errno = -1
                        break
                    out.data = grown
                    capacity *= 2
                got = c_read(fd, out.data + out.size, capacity - out.size)
                out.reads += 1
                if got < 0:
                    saved_errno = errno
                    break
                if got == 0:
                    break
                longest = longest_line(out.data + out.size, got, longest)
                out.size += got
                if out.early_stop_size < 0 and page - got > longest:
                    out.early_stop_size = out.size
                    if stop_early:
                        out.stopped_early = True
                        break
            c_close(fd)

    if saved_errno == -1:
        raise MemoryError()
    if saved_errno != 0:
        import os
        raise OSError(saved_errno, os.strerror(saved_errno), path.decode())
    return 0


def read_file(str path, bint stop_early=False):
    """Return a FileBuffer with the content of path.

    With stop_early, the read ends at the first read that the early-stop
    rule calls the last one with data (see read_whole_file).
    """
    cdef FileBuffer buffer = FileBuffer.__new__(FileBuffer)
    encoded = path.encode()
    read_whole_file(encoded, buffer, stop_early)
    return buffer


cdef Py_ssize_t read_address(const char* p, const char* end, int words,
                             uint8_t* out, uint64_t* port,
                             int* error) noexcept nogil:
    """Read 'HEX:PORT' where HEX is `words` 32-bit words.

    The kernel prints each word with %08X of its value in host byte order,
    so storing the parsed value back in host order gives the address bytes
    in network order, on any host.
    """
    cdef int i
    cdef uint64_t value
    cdef uint32_t word
    cdef Py_ssize_t n
    cdef const char* start = p

    if p >= end:
        error[0] = TOO_FEW_FIELDS
        return -1
    for i in range(words):
        n = read_hex(p, end, 8, &value)
        if n != 8:
            error[0] = BAD_ADDRESS
            return -1
        word = <uint32_t>value
        memcpy(out + 4 * i, &word, 4)
        p += 8
    if p >= end or p[0] != c':':
        error[0] = BAD_ADDRESS
        return -1
    p += 1
    n = read_hex(p, end, 4, port)
    if n < 1 or (p + n < end and p[n] != c' ' and p[n] != c'\t'):
        error[0] = BAD_PORT
        return -1
    return (p + n) - start


cdef class ParsedTable:
    """Columns of one parsed socket table, as NumPy arrays."""

    cdef public object family          # int8: 4 or 6, after IPv4-mapped folding
    cdef public object local_offsets   # int32, n + 1
    cdef public object local_text      # uint8 characters
    cdef public object local_port      # int32
    cdef public object remote_offsets
    cdef public object remote_text
    cdef public object remote_port
    cdef public object state_code      # int8
    cdef public object tx_queue        # int64
    cdef public object rx_queue        # int64
    cdef public object uid             # int64
    cdef public object inode           # int64
    cdef public Py_ssize_t rows
    cdef public Py_ssize_t reads
    cdef public Py_ssize_t size
    cdef public object skipped         # counts per reason, in SKIP_REASONS order
    cdef public list bad_rows          # (line number, reason, raw line)


def parse_buffer(FileBuffer buffer, int socket_family):
    """Parse the text of one socket table of the given family (4 or 6)."""
    cdef const char* data = buffer.data
    cdef const char* end = buffer.data + buffer.size
    cdef const char* line
    cdef const char* line_end
    cdef const char* p
    cdef const char* newline
    cdef Py_ssize_t capacity = 1
    cdef Py_ssize_t row = 0
    cdef Py_ssize_t line_number = 0
    cdef Py_ssize_t n
    cdef int words = 1 if socket_family == 4 else 4
    cdef int error
    cdef uint64_t value, local_port, remote_port, tx, rx, uid, inode, state
    cdef uint8_t local_bytes[16]
    cdef uint8_t remote_bytes[16]
    cdef int64_t skipped_counts[8]
    cdef ParsedTable table = ParsedTable.__new__(ParsedTable)

    memset(skipped_counts, 0, sizeof(skipped_counts))

    p = data
    while p < end:
        newline = <const char*>memchr(p, c'\n', end - p)
        if newline == NULL:
            break
        capacity += 1
        p = newline + 1

    family_arr = np.empty(capacity, dtype=np.int8)
    local_offsets_arr = np.empty(capacity + 1, dtype=np.int32)
    remote_offsets_arr = np.empty(capacity + 1, dtype=np.int32)
    local_text_arr = np.empty(capacity * MAX_ADDRESS_TEXT, dtype=np.uint8)
    remote_text_arr = np.empty(capacity * MAX_ADDRESS_TEXT, dtype=np.uint8)
    local_port_arr = np.empty(capacity, dtype=np.int32)
    remote_port_arr = np.empty(capacity, dtype=np.int32)
    state_arr = np.empty(capacity, dtype=np.int8)
    tx_arr = np.empty(capacity, dtype=np.int64)
    rx_arr = np.empty(capacity, dtype=np.int64)
    uid_arr = np.empty(capacity, dtype=np.int64)
    inode_arr = np.empty(capacity, dtype=np.int64)

    cdef int8_t[::1] c_family = family_arr
    cdef int32_t[::1] c_local_offsets = local_offsets_arr
    cdef int32_t[::1] c_remote_offsets = remote_offsets_arr
    cdef uint8_t[::1] c_local_text = local_text_arr
    cdef uint8_t[::1] c_remote_text = remote_text_arr
    cdef int32_t[::1] c_local_port = local_port_arr
    cdef int32_t[::1] c_remote_port = remote_port_arr
    cdef int8_t[::1] c_state = state_arr
    cdef int64_t[::1] c_tx = tx_arr
    cdef int64_t[::1] c_rx = rx_arr
    cdef int64_t[::1] c_uid = uid_arr
    cdef int64_t[::1] c_inode = inode_arr
    cdef int32_t local_used = 0, remote_used = 0
    cdef bint mapped

    bad_rows = []
    c_local_offsets[0] = 0
    c_remote_offsets[0] = 0

    line = data
    while line < end:
        line_number += 1
        newline = <const char*>memchr(line, c'\n', end - line)
        line_end = newline if newline != NULL else end

        p = skip_blanks(line, line_end)
        if p >= line_end or p[0] == c'\r':
            # Blank line: nothing to parse, nothing to report.
            line = line_end + 1
            continue
        if p[0] == c's' and p + 1 < line_end and p[1] == c'l':
            # The header names its columns; recognised by its first word.
            line = line_end + 1
            continue

        error = -1
        with nogil:
            # Field 1: 'sl:', a slot number of any width.
            n = count_digits(p, line_end)
            if n == 0 or p + n >= line_end or p[n] != c':':
                error = BAD_SLOT
            else:
                p = skip_blanks(p + n + 1, line_end)
                n = read_address(p, line_end, words, local_bytes,
                                 &local_port, &error)
                if n > 0:
                    p = skip_blanks(p + n, line_end)
                    n = read_address(p, line_end, words, remote_bytes,
                                     &remote_port, &error)
                if n > 0:
                    p = skip_blanks(p + n, line_end)
                    n = read_hex(p, line_end, 2, &state)
                    if p >= line_end:
                        error = TOO_FEW_FIELDS
                        n = -1
                    elif n != 2 or state == 0:
                        error = BAD_STATE
                        n = -1
                if n > 0:
                    p = skip_blanks(p + n, line_end)
                    n = read_hex(p, line_end, 16, &tx)
                    if p >= line_end:
                        error = TOO_FEW_FIELDS
                        n = -1
                    elif n < 0 or p + n >= line_end or p[n] != c':':
                        error = BAD_QUEUE
                        n = -1
                    else:
                        p += n + 1
                        n = read_hex(p, line_end, 16, &rx)
                        if p >= line_end:
                            error = TOO_FEW_FIELDS
                            n = -1
                        elif n < 0 or not at_field_end(p + n, line_end) \
                                or tx > INT64_MAX or rx > INT64_MAX:
                            error = BAD_QUEUE
                            n = -1
                if n > 0:
                    # Fields 6 and 7 (timer and retransmits) are not used.
                    p = skip_blanks(p + n, line_end)
                    p = skip_blanks(skip_field(p, line_end), line_end)
                    p = skip_blanks(skip_field(p, line_end), line_end)
                    n = read_decimal(p, line_end, &uid)
                    if n < 0:
                        error = BAD_UID if p < line_end else TOO_FEW_FIELDS
                    elif not at_field_end(p + n, line_end) or uid > UINT32_MAX:
                        # A uid is a 32-bit number followed by a blank.
                        error = BAD_UID
                        n = -1
                if n > 0:
                    # Field 9 (timeout) is not used.
                    p = skip_blanks(p + n, line_end)
                    p = skip_blanks(skip_field(p, line_end), line_end)
                    n = read_decimal(p, line_end, &inode)
                    if n < 0:
                        error = BAD_INODE if p < line_end else TOO_FEW_FIELDS
                    elif not at_field_end(p + n, line_end) or inode > INT64_MAX:
                        error = BAD_INODE
                        n = -1
                if n > 0:
                    error = -1

            if error < 0:
                if words == 4 and is_ipv4_mapped(local_bytes) \
                        and is_ipv4_mapped(remote_bytes):
                    mapped = True
                elif words == 4 and is_ipv4_mapped(local_bytes):
                    # A dual-stack listener bound to a mapped address has a
                    # remote of '::' until connected.
                    mapped = True
                    for n in range(16):
                        if remote_bytes[n]:
                            mapped = False
                            break
                    if mapped:
                        memset(remote_bytes, 0, 16)
                        remote_bytes[10] = 0xFF
                        remote_bytes[11] = 0xFF
                else:
                    mapped = False

                if words == 1 or mapped:
                    c_family[row] = 4
                    n = 12 if mapped else 0
                    local_used += write_ipv4_text(
                        local_bytes + n, <char*>&c_local_text[local_used])
                    remote_used += write_ipv4_text(
                        remote_bytes + n, <char*>&c_remote_text[remote_used])
                else:
                    c_family[row] = 6
                    local_used += write_ipv6_text(
                        local_bytes, <char*>&c_local_text[local_used])
                    remote_used += write_ipv6_text(
                        remote_bytes, <char*>&c_remote_text[remote_used])
                c_local_offsets[row + 1] = local_used
                c_remote_offsets[row + 1] = remote_used
                c_local_port[row] = <int32_t>local_port
                c_remote_port[row] = <int32_t>remote_port
                c_state[row] = <int8_t>state
                c_tx[row] = <int64_t>tx
                c_rx[row] = <int64_t>rx
                c_uid[row] = <int64_t>uid
                c_inode[row] = <int64_t>inode
                row += 1

        if error >= 0:
            skipped_counts[error] += 1
            if len(bad_rows) < MAX_REPORTED_ROWS:
                bad_rows.append((
                    line_number,
                    SKIP_REASONS[error],
                    line[:line_end - line].decode("ascii", "replace"),
                ))
        line = line_end + 1

    table.rows = row
    table.reads = buffer.reads
    table.size = buffer.size
    table.family = family_arr[:row]
    table.local_offsets = local_offsets_arr[:row + 1]
    table.local_text = local_text_arr[:local_used]
    table.remote_offsets = remote_offsets_arr[:row + 1]
    table.remote_text = remote_text_arr[:remote_used]
    table.local_port = local_port_arr[:row]
    table.remote_port = remote_port_arr[:row]
    table.state_code = state_arr[:row]
    table.tx_queue = tx_arr[:row]
    table.rx_queue = rx_arr[:row]
    table.uid = uid_arr[:row]
    table.inode = inode_arr[:row]
    table.skipped = [skipped_counts[i] for i in range(8)]
    table.bad_rows = bad_rows
    return table
