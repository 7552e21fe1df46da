# cython: language_level=3
"""Parse the kernel's socket tables (/proc/net/tcp, tcp6, udp, udp6).

Each file is read with plain read(2) calls into one growing C buffer, without
the GIL. The kernel returns about one page of whole rows per read, so the read
ends at a 0-byte read, or earlier at the first short read when the caller
asks for the early stop (see read_whole_file). The rows of every file of one
snapshot are parsed, without the GIL, into one set of preallocated NumPy
arrays, so no Python object is made per row; addresses are written as
canonical text straight into Arrow-style offset and data buffers.
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
    read_hex8,
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
    SKIP_REASON_COUNT = 8

# parse_row's result for a row that was stored.
cdef enum:
    ROW_STORED = -1

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

# Bad rows per file kept with their raw text for the error report; the rest
# are only counted.
cdef enum:
    MAX_REPORTED_ROWS = 16

# Bytes asked for per read(2); the kernel returns about one page anyway.
cdef enum:
    READ_CHUNK = 65536

# Values of ParsedTable.state_index: the TCP state code (1 to 12), UNCONNECTED
# for a UDP socket in state 7 (bound, not connected), UNKNOWN_STATE otherwise.
cdef enum:
    UNKNOWN_STATE = 0
    LAST_TCP_STATE = 12
    UDP_CLOSE = 7
    UNCONNECTED = 13

UNCONNECTED_STATE_INDEX = UNCONNECTED


cdef class FileBuffer:
    """The content of one file, read until a 0-byte read or an early stop."""

    cdef char* data
    cdef Py_ssize_t capacity
    cdef Py_ssize_t longest
    cdef public Py_ssize_t size
    cdef public Py_ssize_t reads
    # Size at which the early-stop rule would have ended the read, or -1.
    cdef public Py_ssize_t early_stop_size
    cdef public bint stopped_early

    def __dealloc__(self):
        free(self.data)

    def to_bytes(self):
        return self.data[:self.size]


cdef int start_buffer(FileBuffer out) except -1:
    out.capacity = READ_CHUNK
    out.data = <char*>malloc(out.capacity)
    if out.data == NULL:
        raise MemoryError()
    out.size = 0
    out.reads = 0
    out.longest = 0
    out.early_stop_size = -1
    out.stopped_early = False
    return 0


cdef bint make_room(FileBuffer out, Py_ssize_t wanted) noexcept nogil:
    """Grow out.data to hold wanted more bytes; return False if out of memory."""
    cdef char* grown
    cdef Py_ssize_t capacity = out.capacity
    while capacity - out.size < wanted:
        capacity *= 2
    if capacity == out.capacity:
        return True
    grown = <char*>realloc(out.data, capacity)
    if grown == NULL:
        return False
    out.data = grown
    out.capacity = capacity
    return True


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


cdef bint add_read(FileBuffer out, Py_ssize_t got, Py_ssize_t page) noexcept nogil:
    """Count got bytes that a read put at the end of out; True if it was the last.

    The early-stop rule: the kernel fills each read of a socket table with
    whole rows, up to about one page. So a read that leaves more than the
    longest row's worth of the page free was the last one with data. The
    first read that the rule calls the last sets out.early_stop_size.
    """
    out.longest = longest_line(out.data + out.size, got, out.longest)
    out.size += got
    if out.early_stop_size < 0 and page - got > out.longest:
        out.early_stop_size = out.size
        return True
    return False


cdef int read_whole_file(const char* path, FileBuffer out,
                         bint stop_early) except -1:
    """Read path into out, to a 0-byte read or, with stop_early, the early stop.

    The early-stop rule (see add_read) is recorded in out.early_stop_size on
    every read. With stop_early the read ends there, which saves the final
    0-byte read: a walk of every hash bucket of the table.
    """
    cdef int fd
    cdef Py_ssize_t got
    cdef Py_ssize_t page = sysconf(_SC_PAGESIZE)
    cdef int saved_errno = 0

    start_buffer(out)
    with nogil:
        fd = c_open(path, O_RDONLY)
        if fd < 0:
            saved_errno = errno
        else:
            while True:
                if not make_room(out, READ_CHUNK):
                    saved_errno = -1
                    break
                got = c_read(fd, out.data + out.size, out.capacity - out.size)
                out.reads += 1
                if got < 0:
                    saved_errno = errno
                    break
                if got == 0:
                    break
                if add_read(out, got, page) and stop_early:
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


def buffer_from_reads(list chunks, bint stop_early=False, Py_ssize_t page_size=0):
    """Return the FileBuffer that reads returning chunks, in turn, would give.

    Each bytes object of chunks is the data of one read(2), and an implicit
    0-byte read follows the last one. The early-stop rule applies as in
    read_file, with page_size (default: the system's page size) as the most
    that one read returns. This checks the rule on made-up reads.
    """
    cdef FileBuffer buffer = FileBuffer.__new__(FileBuffer)
    cdef Py_ssize_t page = page_size if page_size > 0 else sysconf(_SC_PAGESIZE)
    cdef const unsigned char[::1] view
    start_buffer(buffer)
    for chunk in chunks:
        view = chunk
        if not make_room(buffer, view.shape[0]):
            raise MemoryError()
        if view.shape[0]:
            memcpy(buffer.data + buffer.size, &view[0], view.shape[0])
        buffer.reads += 1
        if view.shape[0] == 0:
            return buffer
        if add_read(buffer, view.shape[0], page) and stop_early:
            buffer.stopped_early = True
            return buffer
    buffer.reads += 1
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
    cdef uint32_t word
    cdef Py_ssize_t n
    cdef const char* start = p

    if p >= end:
        error[0] = TOO_FEW_FIELDS
        return -1
    if end - p < 8 * words:
        error[0] = BAD_ADDRESS
        return -1
    for i in range(words):
        if not read_hex8(p, &word):
            error[0] = BAD_ADDRESS
            return -1
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


# Where parse_row writes: the data of the ParsedTable's arrays, and how much
# of them is used.
cdef struct Columns:
    int8_t* table_index
    int8_t* family
    int32_t* local_offsets
    uint8_t* local_text
    int32_t* local_port
    int32_t* remote_offsets
    uint8_t* remote_text
    int32_t* remote_port
    int8_t* state_code
    int8_t* state_index
    int64_t* tx
    int64_t* rx
    int64_t* uid
    int64_t* inode
    Py_ssize_t rows
    int32_t local_used
    int32_t remote_used


# A skipped row kept for the error report: its place in the file's buffer.
cdef struct BadRow:
    Py_ssize_t line_number
    int reason
    Py_ssize_t start
    Py_ssize_t length


# Counts of one file's parse.
cdef struct FileResult:
    Py_ssize_t rows
    int64_t skipped[SKIP_REASON_COUNT]
    BadRow bad[MAX_REPORTED_ROWS]
    int bad_count


cdef int parse_row(const char* p, const char* line_end, int words, bint udp,
                   int8_t table_index, Columns* out) noexcept nogil:
    """Parse one row into the next row of out; return ROW_STORED or a SkipReason."""
    cdef Py_ssize_t n
    cdef int error = TOO_FEW_FIELDS
    cdef uint64_t local_port, remote_port, tx, rx, uid, inode, state
    cdef uint8_t local_bytes[16]
    cdef uint8_t remote_bytes[16]
    cdef bint mapped
    cdef Py_ssize_t row = out.rows
    cdef int i

    # Field 1: 'sl:', a slot number of any width.
    n = count_digits(p, line_end)
    if n == 0 or p + n >= line_end or p[n] != c':':
        return BAD_SLOT
    p = skip_blanks(p + n + 1, line_end)
    n = read_address(p, line_end, words, local_bytes, &local_port, &error)
    if n < 0:
        return error
    p = skip_blanks(p + n, line_end)
    n = read_address(p, line_end, words, remote_bytes, &remote_port, &error)
    if n < 0:
        return error

    p = skip_blanks(p + n, line_end)
    if p >= line_end:
        return TOO_FEW_FIELDS
    n = read_hex(p, line_end, 2, &state)
    if n != 2 or state == 0:
        return BAD_STATE

    p = skip_blanks(p + n, line_end)
    if p >= line_end:
        return TOO_FEW_FIELDS
    n = read_hex(p, line_end, 16, &tx)
    if n < 0 or p + n >= line_end or p[n] != c':':
        return BAD_QUEUE
    p += n + 1
    if p >= line_end:
        return TOO_FEW_FIELDS
    n = read_hex(p, line_end, 16, &rx)
    if n < 0 or not at_field_end(p + n, line_end) or tx > INT64_MAX \
            or rx > INT64_MAX:
        return BAD_QUEUE

    # Fields 6 and 7 (timer and retransmits) are not used.
    p = skip_blanks(p + n, line_end)
    p = skip_blanks(skip_field(p, line_end), line_end)
    p = skip_blanks(skip_field(p, line_end), line_end)
    n = read_decimal(p, line_end, &uid)
    if n < 0:
        return BAD_UID if p < line_end else TOO_FEW_FIELDS
    if not at_field_end(p + n, line_end) or uid > UINT32_MAX:
        # A uid is a 32-bit number followed by a blank.
        return BAD_UID

    # Field 9 (timeout) is not used.
    p = skip_blanks(p + n, line_end)
    p = skip_blanks(skip_field(p, line_end), line_end)
    n = read_decimal(p, line_end, &inode)
    if n < 0:
        return BAD_INODE if p < line_end else TOO_FEW_FIELDS
    if not at_field_end(p + n, line_end) or inode > INT64_MAX:
        return BAD_INODE

    if words == 4 and is_ipv4_mapped(local_bytes) and is_ipv4_mapped(remote_bytes):
        mapped = True
    elif words == 4 and is_ipv4_mapped(local_bytes):
        # A dual-stack listener bound to a mapped address has a remote of
        # '::' until connected.
        mapped = True
        for i in range(16):
            if remote_bytes[i]:
                mapped = False
                break
        if mapped:
            memset(remote_bytes, 0, 16)
            remote_bytes[10] = 0xFF
            remote_bytes[11] = 0xFF
    else:
        mapped = False

    if words == 1 or mapped:
        out.family[row] = 4
        i = 12 if mapped else 0
        out.local_used += write_ipv4_text(
            local_bytes + i, <char*>out.local_text + out.local_used)
        out.remote_used += write_ipv4_text(
            remote_bytes + i, <char*>out.remote_text + out.remote_used)
    else:
        out.family[row] = 6
        out.local_used += write_ipv6_text(
            local_bytes, <char*>out.local_text + out.local_used)
        out.remote_used += write_ipv6_text(
            remote_bytes, <char*>out.remote_text + out.remote_used)

    out.table_index[row] = table_index
    out.local_offsets[row + 1] = out.local_used
    out.remote_offsets[row + 1] = out.remote_used
    out.local_port[row] = <int32_t>local_port
    out.remote_port[row] = <int32_t>remote_port
    out.state_code[row] = <int8_t>state
    if udp and state == UDP_CLOSE:
        out.state_index[row] = UNCONNECTED
    elif state <= LAST_TCP_STATE:
        out.state_index[row] = <int8_t>state
    else:
        out.state_index[row] = UNKNOWN_STATE
    out.tx[row] = <int64_t>tx
    out.rx[row] = <int64_t>rx
    out.uid[row] = <int64_t>uid
    out.inode[row] = <int64_t>inode
    out.rows = row + 1
    return ROW_STORED


cdef void parse_rows(const char* data, Py_ssize_t size, int words, bint udp,
                     int8_t table_index, Columns* out,
                     FileResult* result) noexcept nogil:
    """Parse every row of one file's text into out, counting the skipped ones."""
    cdef const char* end = data + size
    cdef const char* line = data
    cdef const char* line_end
    cdef const char* newline
    cdef const char* p
    cdef Py_ssize_t line_number = 0
    cdef Py_ssize_t rows_before = out.rows
    cdef int status
    cdef BadRow* bad

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

        status = parse_row(p, line_end, words, udp, table_index, out)
        if status != ROW_STORED:
            result.skipped[status] += 1
            if result.bad_count < MAX_REPORTED_ROWS:
                bad = &result.bad[result.bad_count]
                bad.line_number = line_number
                bad.reason = status
                bad.start = line - data
                bad.length = line_end - line
                result.bad_count += 1
        line = line_end + 1
    result.rows = out.rows - rows_before


cdef Py_ssize_t count_lines(const char* data, Py_ssize_t size) noexcept nogil:
    """Return the number of lines in data, a last one without newline included."""
    cdef const char* p = data
    cdef const char* end = data + size
    cdef const char* newline
    cdef Py_ssize_t lines = 0
    while p < end:
        lines += 1
        newline = <const char*>memchr(p, c'\n', end - p)
        if newline == NULL:
            break
        p = newline + 1
    return lines


cdef class ParsedTable:
    """Columns of parsed socket tables, as NumPy arrays.

    The rows of every file given to parse_buffers follow one another, in the
    order of the files; table_index tells each row's file.
    """

    cdef public object table_index     # int8: position of the row's file
    cdef public object family          # int8: 4 or 6, after IPv4-mapped folding
    cdef public object local_offsets   # int32, n + 1
    cdef public object local_text      # uint8 characters
    cdef public object local_port      # int32
    cdef public object remote_offsets
    cdef public object remote_text
    cdef public object remote_port
    cdef public object state_code      # int8, as the kernel prints it
    cdef public object state_index     # int8, see UNCONNECTED_STATE_INDEX
    cdef public object tx_queue        # int64
    cdef public object rx_queue        # int64
    cdef public object uid             # int64
    cdef public object inode           # int64
    cdef public Py_ssize_t rows
    cdef public list file_rows         # rows per file
    cdef public list skipped           # per file: counts in SKIP_REASONS order
    cdef public list bad_rows          # per file: (line number, reason, raw line)


def parse_buffers(list buffers, list socket_families, list udp):
    """Parse the text of socket tables, one file per FileBuffer, into one table.

    socket_families gives each file's family (4 or 6) and udp whether it is a
    UDP table, whose state 7 means bound but not connected.
    """
    cdef Py_ssize_t files = len(buffers)
    cdef Py_ssize_t capacity = 1
    cdef Py_ssize_t i, j
    cdef FileBuffer buffer
    cdef Columns out
    cdef FileResult* results
    cdef ParsedTable table = ParsedTable.__new__(ParsedTable)
    cdef int words
    cdef bint is_udp

    if len(socket_families) != files or len(udp) != files:
        raise ValueError(
            f"got {files} buffers, {len(socket_families)} socket families and "
            f"{len(udp)} udp flags; pass one of each per file"
        )
    if files > 127:
        raise ValueError(f"got {files} buffers; parse at most 127 files at once")
    for i in range(files):
        buffer = buffers[i]
        if socket_families[i] not in (4, 6):
            raise ValueError(
                f"socket family {socket_families[i]!r} of file {i} is not 4 or 6"
            )
        capacity += count_lines(buffer.data, buffer.size)

    table_index_arr = np.empty(capacity, dtype=np.int8)
    family_arr = np.empty(capacity, dtype=np.int8)
    local_offsets_arr = np.empty(capacity + 1, dtype=np.int32)
    remote_offsets_arr = np.empty(capacity + 1, dtype=np.int32)
    local_text_arr = np.empty(capacity * MAX_ADDRESS_TEXT, dtype=np.uint8)
    remote_text_arr = np.empty(capacity * MAX_ADDRESS_TEXT, dtype=np.uint8)
    local_port_arr = np.empty(capacity, dtype=np.int32)
    remote_port_arr = np.empty(capacity, dtype=np.int32)
    state_arr = np.empty(capacity, dtype=np.int8)
    state_index_arr = np.empty(capacity, dtype=np.int8)
    tx_arr = np.empty(capacity, dtype=np.int64)
    rx_arr = np.empty(capacity, dtype=np.int64)
    uid_arr = np.empty(capacity, dtype=np.int64)
    inode_arr = np.empty(capacity, dtype=np.int64)

    out.table_index = <int8_t*>cnp.PyArray_DATA(table_index_arr)
    out.family = <int8_t*>cnp.PyArray_DATA(family_arr)
    out.local_offsets = <int32_t*>cnp.PyArray_DATA(local_offsets_arr)
    out.local_text = <uint8_t*>cnp.PyArray_DATA(local_text_arr)
    out.local_port = <int32_t*>cnp.PyArray_DATA(local_port_arr)
    out.remote_offsets = <int32_t*>cnp.PyArray_DATA(remote_offsets_arr)
    out.remote_text = <uint8_t*>cnp.PyArray_DATA(remote_text_arr)
    out.remote_port = <int32_t*>cnp.PyArray_DATA(remote_port_arr)
    out.state_code = <int8_t*>cnp.PyArray_DATA(state_arr)
    out.state_index = <int8_t*>cnp.PyArray_DATA(state_index_arr)
    out.tx = <int64_t*>cnp.PyArray_DATA(tx_arr)
    out.rx = <int64_t*>cnp.PyArray_DATA(rx_arr)
    out.uid = <int64_t*>cnp.PyArray_DATA(uid_arr)
    out.inode = <int64_t*>cnp.PyArray_DATA(inode_arr)
    out.rows = 0
    out.local_used = 0
    out.remote_used = 0
    out.local_offsets[0] = 0
    out.remote_offsets[0] = 0

    results = <FileResult*>malloc(max(files, 1) * sizeof(FileResult))
    if results == NULL:
        raise MemoryError()
    try:
        memset(results, 0, max(files, 1) * sizeof(FileResult))
        for i in range(files):
            buffer = buffers[i]
            words = 1 if socket_families[i] == 4 else 4
            is_udp = bool(udp[i])
            with nogil:
                parse_rows(buffer.data, buffer.size, words, is_udp, <int8_t>i,
                           &out, &results[i])

        table.file_rows = []
        table.skipped = []
        table.bad_rows = []
        for i in range(files):
            buffer = buffers[i]
            table.file_rows.append(results[i].rows)
            table.skipped.append([results[i].skipped[j]
                                  for j in range(SKIP_REASON_COUNT)])
            table.bad_rows.append([
                (
                    results[i].bad[j].line_number,
                    SKIP_REASONS[results[i].bad[j].reason],
                    buffer.data[results[i].bad[j].start:
                                results[i].bad[j].start + results[i].bad[j].length]
                    .decode("ascii", "replace"),
                )
                for j in range(results[i].bad_count)
            ])
    finally:
        free(results)

    cdef Py_ssize_t rows = out.rows
    table.rows = rows
    table.table_index = table_index_arr[:rows]
    table.family = family_arr[:rows]
    table.local_offsets = local_offsets_arr[:rows + 1]
    table.local_text = local_text_arr[:out.local_used]
    table.remote_offsets = remote_offsets_arr[:rows + 1]
    table.remote_text = remote_text_arr[:out.remote_used]
    table.local_port = local_port_arr[:rows]
    table.remote_port = remote_port_arr[:rows]
    table.state_code = state_arr[:rows]
    table.state_index = state_index_arr[:rows]
    table.tx_queue = tx_arr[:rows]
    table.rx_queue = rx_arr[:rows]
    table.uid = uid_arr[:rows]
    table.inode = inode_arr[:rows]
    return table


def text_column(const int8_t[::1] codes, tuple names):
    """Return the Arrow offsets (int32) and data (uint8) of names[code] per code.

    names are bytes. Raises ValueError for a code outside range(len(names)).
    """
    cdef Py_ssize_t count = codes.shape[0]
    cdef Py_ssize_t name_count = len(names)
    cdef Py_ssize_t i
    cdef int code
    cdef int32_t used = 0
    cdef const char* name_data[128]
    cdef int32_t name_length[128]
    cdef Py_ssize_t bad = -1

    if name_count > 128:
        raise ValueError(f"got {name_count} names; text_column takes at most 128")
    for i in range(name_count):
        name_data[i] = names[i]
        name_length[i] = len(names[i])

    offsets_arr = np.empty(count + 1, dtype=np.int32)
    cdef int32_t[::1] offsets = offsets_arr
    offsets[0] = 0
    with nogil:
        for i in range(count):
            code = codes[i]
            if code < 0 or code >= name_count:
                bad = i
                break
            used += name_length[code]
            offsets[i + 1] = used
    if bad >= 0:
        raise ValueError(
            f"code {codes[bad]} at row {bad} has no name; the {name_count} names "
            f"cover codes 0 to {name_count - 1}"
        )

    text_arr = np.empty(used, dtype=np.uint8)
    cdef uint8_t* text = <uint8_t*>cnp.PyArray_DATA(text_arr)
    with nogil:
        for i in range(count):
            code = codes[i]
            memcpy(text + offsets[i], name_data[code], name_length[code])
    return offsets_arr, text_arr
