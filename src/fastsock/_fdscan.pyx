# cython: language_level=3
"""Walk /proc/<pid>/fd and collect the socket inode that each fd link points to.

The walk runs in C without the GIL. Directories are opened relative to a
descriptor of the proc root (openat, readlinkat), so the kernel resolves one
path component per call instead of the whole path. Every link whose target
is ``socket:[N]`` becomes an (inode, pid) pair in a growing C buffer, and the
buffers are copied into NumPy arrays at the end, so no Python object is made
per fd.

Races are normal: a process or an fd can vanish between readdir and the next
call. Those cases, and fd directories that the caller may not read, are
counted and skipped. Only failing to open the proc root itself raises.
"""

import os

import numpy as np

cimport numpy as cnp
from libc.errno cimport EACCES, ENOENT, EPERM, ESRCH, errno
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.fcntl cimport O_CLOEXEC, O_DIRECTORY, O_RDONLY, open as c_open, openat
from posix.stat cimport fstat, fstatat, struct_stat
from posix.unistd cimport close as c_close

from fastsock._hexparse cimport read_decimal
from fastsock.errors import ProcReadError

cnp.import_array()


cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR:
        pass

    struct dirent:
        char d_name[256]

    DIR* fdopendir(int fd)
    dirent* readdir(DIR* dirp)
    int closedir(DIR* dirp)
    int dirfd(DIR* dirp)


cdef extern from "<unistd.h>" nogil:
    ssize_t readlinkat(int dirfd, const char* path, char* buf, size_t size)


cdef extern from "<fcntl.h>" nogil:
    int dup(int fd)


# readdir reports an error only through errno, so errno has to be cleared
# before the call. Cython treats an assignment to a cimported errno as a new
# local variable, hence this C helper.
cdef extern from *:
    """
    #include <errno.h>
    static void fastsock_set_errno(int value) { errno = value; }
    """
    void set_errno "fastsock_set_errno"(int value) nogil


# Bytes read from each fd link. "socket:[" plus 20 digits and "]" is 29 bytes;
# longer targets (file paths) are truncated, which is fine because they are
# not sockets.
DEF LINK_BUFFER_SIZE = 64

# Pairs and processes reserved before the first realloc; buffers double after.
DEF INITIAL_CAPACITY = 4096

# "<pid>/fd" for any int32 pid, with the terminating NUL, needs at most 15 bytes.
DEF FD_DIR_PATH_SIZE = 32

cdef const char* SOCKET_PREFIX = b"socket:["
DEF SOCKET_PREFIX_LENGTH = 8

# Status codes of the nogil functions, turned into exceptions by
# raise_scan_error once the GIL is held again.
cdef enum ScanStatus:
    SCAN_OK = 0
    SCAN_NO_MEMORY = -1
    SCAN_ROOT_UNREADABLE = -2


cdef struct ScanCounters:
    int64_t processes_scanned
    int64_t processes_vanished
    int64_t fd_dirs_denied
    int64_t fd_dirs_failed
    int64_t fds_read
    int64_t fds_vanished
    int64_t fds_denied


cdef struct ScanState:
    # (inode, pid) for every fd link to a socket, in walk order.
    int64_t* pair_inodes
    int32_t* pair_pids
    Py_ssize_t pair_count
    Py_ssize_t pair_capacity

    # Every pid whose fd directory was looked at, with the st_size of that
    # directory (-1 when stat failed).
    int32_t* process_pids
    int64_t* process_fd_counts
    Py_ssize_t process_count
    Py_ssize_t process_capacity

    ScanCounters counters
    int root_fd


cdef class FdScan:
    """Socket links found by one walk, with the walk's counters.

    ``inodes`` (int64) and ``pids`` (int32) are parallel: row i says that
    process ``pids[i]`` has an fd pointing to ``socket:[inodes[i]]``. A process
    that holds one socket through two fds gives two equal rows.
    ``scanned_pids`` (int32) lists every pid that the walk looked at, and
    ``fd_counts`` (int64) the st_size of its fd directory, which Linux 6.2 and
    later set to the number of open fds (-1 when stat failed).
    """

    cdef readonly object inodes
    cdef readonly object pids
    cdef readonly object scanned_pids
    cdef readonly object fd_counts
    cdef readonly int64_t processes_scanned
    cdef readonly int64_t processes_vanished
    cdef readonly int64_t fd_dirs_denied
    cdef readonly int64_t fd_dirs_failed
    cdef readonly int64_t fds_read
    cdef readonly int64_t fds_vanished
    cdef readonly int64_t fds_denied

    def counters(self):
        """Return the walk's counters as a dict of name -> count."""
        return {
            "processes_scanned": self.processes_scanned,
            "processes_vanished": self.processes_vanished,
            "fd_dirs_denied": self.fd_dirs_denied,
            "fd_dirs_failed": self.fd_dirs_failed,
            "fds_read": self.fds_read,
            "fds_vanished": self.fds_vanished,
            "fds_denied": self.fds_denied,
        }


cdef inline int32_t parse_pid(const char* name) noexcept nogil:
    """Return the pid that a directory name spells, or -1 if it is not a pid."""
    cdef int64_t value = 0
    cdef Py_ssize_t i = 0
    cdef char c = name[0]
    while c != 0:
        if c < c'0' or c > c'9' or i >= 10:
            return -1
        value = value * 10 + (c - c'0')
        i += 1
        c = name[i]
    if i == 0 or value > 2147483647:
        return -1
    return <int32_t>value


cdef inline int64_t parse_socket_inode(const char* target,
                                       Py_ssize_t length) noexcept nogil:
    """Return N from a link target "socket:[N]", or -1 for any other target."""
    cdef uint64_t value
    cdef Py_ssize_t digits
    if length < SOCKET_PREFIX_LENGTH + 2 or length >= LINK_BUFFER_SIZE:
        return -1
    if memcmp(target, SOCKET_PREFIX, SOCKET_PREFIX_LENGTH) != 0:
        return -1
    if target[length - 1] != b']':
        return -1

    digits = read_decimal(target + SOCKET_PREFIX_LENGTH, target + length - 1, &value)
    if digits != length - 1 - SOCKET_PREFIX_LENGTH:
        return -1
    if value > <uint64_t>0x7FFFFFFFFFFFFFFF:
        return -1
    return <int64_t>value


cdef Py_ssize_t grown_capacity(Py_ssize_t capacity) noexcept nogil:
    if capacity == 0:
        return INITIAL_CAPACITY
    return capacity * 2


cdef int reserve_pair(ScanState* state) noexcept nogil:
    """Make room for one more pair. Return 0, or SCAN_NO_MEMORY."""
    cdef Py_ssize_t capacity
    cdef int64_t* inodes
    cdef int32_t* pids
    if state.pair_count < state.pair_capacity:
        return SCAN_OK

    capacity = grown_capacity(state.pair_capacity)
    inodes = <int64_t*>realloc(state.pair_inodes, capacity * sizeof(int64_t))
    if inodes == NULL:
        return SCAN_NO_MEMORY
    state.pair_inodes = inodes
    pids = <int32_t*>realloc(state.pair_pids, capacity * sizeof(int32_t))
    if pids == NULL:
        return SCAN_NO_MEMORY
    state.pair_pids = pids
    state.pair_capacity = capacity
    return SCAN_OK


cdef int record_process(ScanState* state, int32_t pid,
                        int64_t fd_count) noexcept nogil:
    """Append a scanned pid and its fd count. Return 0, or SCAN_NO_MEMORY."""
    cdef Py_ssize_t capacity
    cdef int32_t* pids
    cdef int64_t* counts

    if state.process_count == state.process_capacity:
        capacity = grown_capacity(state.process_capacity)
        pids = <int32_t*>realloc(state.process_pids, capacity * sizeof(int32_t))
        if pids == NULL:
            return SCAN_NO_MEMORY
        state.process_pids = pids
        counts = <int64_t*>realloc(state.process_fd_counts,
                                   capacity * sizeof(int64_t))
        if counts == NULL:
            return SCAN_NO_MEMORY
        state.process_fd_counts = counts
        state.process_capacity = capacity

    state.process_pids[state.process_count] = pid
    state.process_fd_counts[state.process_count] = fd_count
    state.process_count += 1
    return SCAN_OK


cdef inline bint is_vanished(int error) noexcept nogil:
    return error == ENOENT or error == ESRCH


cdef inline bint is_denied(int error) noexcept nogil:
    return error == EACCES or error == EPERM


cdef void count_open_failure(ScanState* state, int error) noexcept nogil:
    if is_vanished(error):
        state.counters.processes_vanished += 1
    elif is_denied(error):
        state.counters.fd_dirs_denied += 1
    else:
        state.counters.fd_dirs_failed += 1


cdef int64_t stat_fd_count(int root_fd, const char* fd_dir_path) noexcept nogil:
    """Return the st_size of <root>/<pid>/fd, or -1 when stat fails."""
    cdef struct_stat info
    if fstatat(root_fd, fd_dir_path, &info, 0) != 0:
        return -1
    return info.st_size


cdef int read_fd_links(ScanState* state, DIR* fd_dir, int32_t pid) noexcept nogil:
    """Add a pair for every socket link in an open fd directory.

    Return 0, or SCAN_NO_MEMORY.
    """
    cdef dirent* entry
    cdef char target[LINK_BUFFER_SIZE]
    cdef ssize_t length
    cdef int64_t inode
    cdef int dir_fd = dirfd(fd_dir)
    cdef bint any_denied = False

    while True:
        set_errno(0)
        entry = readdir(fd_dir)
        if entry == NULL:
            # readdir fails with ENOENT when the process exits mid-listing.
            if errno != 0:
                count_open_failure(state, errno)
            elif any_denied:
                state.counters.fd_dirs_denied += 1
            return SCAN_OK
        if entry.d_name[0] == b'.':
            continue

        length = readlinkat(dir_fd, entry.d_name, target, LINK_BUFFER_SIZE)
        if length < 0:
            # EACCES means that the kernel's ptrace access check failed, which
            # can happen to root too (under a security module policy, say).
            # Any other error, ENOENT in practice, means the fd was closed
            # after readdir listed it.
            if is_denied(errno):
                state.counters.fds_denied += 1
                any_denied = True
            else:
                state.counters.fds_vanished += 1
            continue
        state.counters.fds_read += 1

        inode = parse_socket_inode(target, length)
        if inode < 0:
            continue
        if reserve_pair(state) != SCAN_OK:
            return SCAN_NO_MEMORY
        state.pair_inodes[state.pair_count] = inode
        state.pair_pids[state.pair_count] = pid
        state.pair_count += 1


cdef int scan_process(ScanState* state, int32_t pid) noexcept nogil:
    """Scan <root>/<pid>/fd. Return 0, or SCAN_NO_MEMORY."""
    cdef char fd_dir_path[FD_DIR_PATH_SIZE]
    cdef struct_stat info
    cdef int fd_dir_fd
    cdef int error
    cdef DIR* fd_dir
    cdef int status

    snprintf(fd_dir_path, FD_DIR_PATH_SIZE, b"%d/fd", pid)
    state.counters.processes_scanned += 1

    fd_dir_fd = openat(state.root_fd, fd_dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd_dir_fd < 0:
        error = errno
        count_open_failure(state, error)
        if is_vanished(error):
            return SCAN_OK
        # A denied fd directory still reports its size, so that incremental
        # rescans see it unchanged instead of retrying it every time.
        return record_process(state, pid, stat_fd_count(state.root_fd, fd_dir_path))

    # The size is taken before the listing: an fd opened later shows up as a
    # changed count at the next rescan, never as a missed one.
    if fstat(fd_dir_fd, &info) != 0:
        info.st_size = -1
    fd_dir = fdopendir(fd_dir_fd)
    if fd_dir == NULL:
        c_close(fd_dir_fd)
        state.counters.fd_dirs_failed += 1
        return SCAN_OK

    status = read_fd_links(state, fd_dir, pid)
    closedir(fd_dir)
    if status != SCAN_OK:
        return status
    return record_process(state, pid, info.st_size)


cdef int walk_all(ScanState* state) noexcept nogil:
    """Scan every numeric directory of the proc root.

    Return 0, SCAN_NO_MEMORY, or SCAN_ROOT_UNREADABLE with errno set.
    """
    cdef DIR* root_dir = open_listing(state.root_fd)
    cdef dirent* entry
    cdef int32_t pid
    cdef int status = SCAN_OK

    if root_dir == NULL:
        return SCAN_ROOT_UNREADABLE

    while status == SCAN_OK:
        entry = readdir(root_dir)
        if entry == NULL:
            break
        pid = parse_pid(entry.d_name)
        if pid >= 0:
            status = scan_process(state, pid)

    closedir(root_dir)
    return status


cdef DIR* open_listing(int root_fd) noexcept nogil:
    """Open a listing of the proc root, or return NULL with errno set.

    The listing gets its own descriptor so that closedir leaves root_fd open.
    """
    cdef int listing_fd = dup(root_fd)
    cdef DIR* listing
    cdef int error
    if listing_fd < 0:
        return NULL
    listing = fdopendir(listing_fd)
    if listing == NULL:
        error = errno
        c_close(listing_fd)
        set_errno(error)
    return listing


cdef int walk_listed(ScanState* state, const int32_t* pids,
                     Py_ssize_t count) noexcept nogil:
    """Scan the given pids. Return 0, or SCAN_NO_MEMORY."""
    cdef Py_ssize_t i
    cdef int status
    for i in range(count):
        status = scan_process(state, pids[i])
        if status != SCAN_OK:
            return status
    return SCAN_OK


cdef int list_processes(ScanState* state, bint stat_fd_dirs) noexcept nogil:
    """Record every pid of the proc root, with its fd count if stat_fd_dirs.

    Return 0, SCAN_NO_MEMORY, or SCAN_ROOT_UNREADABLE with errno set.
    """
    cdef DIR* root_dir = open_listing(state.root_fd)
    cdef dirent* entry
    cdef int32_t pid
    cdef int64_t fd_count = -1
    cdef char fd_dir_path[FD_DIR_PATH_SIZE]
    cdef int status = SCAN_OK

    if root_dir == NULL:
        return SCAN_ROOT_UNREADABLE

    while status == SCAN_OK:
        entry = readdir(root_dir)
        if entry == NULL:
            break
        pid = parse_pid(entry.d_name)
        if pid < 0:
            continue

        if stat_fd_dirs:
            snprintf(fd_dir_path, FD_DIR_PATH_SIZE, b"%d/fd", pid)
            fd_count = stat_fd_count(state.root_fd, fd_dir_path)
            if fd_count < 0 and is_vanished(errno):
                continue
        status = record_process(state, pid, fd_count)

    closedir(root_dir)
    return status


cdef int raise_scan_error(int status, int saved_errno, str proc_root) except -1:
    if status == SCAN_NO_MEMORY:
        raise MemoryError(
            f"out of memory while collecting the fd links under {proc_root}"
        )
    raise ProcReadError(
        saved_errno,
        f"failed to open the proc root as a directory ({os.strerror(saved_errno)}). "
        f"Pass the path of a mounted /proc or of a fixture tree",
        proc_root,
    )


cdef void init_state(ScanState* state) noexcept nogil:
    memset(state, 0, sizeof(ScanState))
    state.root_fd = -1


cdef void free_state(ScanState* state) noexcept nogil:
    free(state.pair_inodes)
    free(state.pair_pids)
    free(state.process_pids)
    free(state.process_fd_counts)
    if state.root_fd >= 0:
        c_close(state.root_fd)


cdef int open_root(ScanState* state, bytes encoded_root, str proc_root) except -1:
    cdef const char* c_root = encoded_root
    cdef int saved_errno = 0
    with nogil:
        state.root_fd = c_open(c_root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if state.root_fd < 0:
            saved_errno = errno
    if state.root_fd < 0:
        raise_scan_error(SCAN_ROOT_UNREADABLE, saved_errno, proc_root)
    return 0


cdef FdScan collect_result(ScanState* state):
    cdef FdScan result = FdScan.__new__(FdScan)
    cdef cnp.ndarray inodes = np.empty(state.pair_count, dtype=np.int64)
    cdef cnp.ndarray pids = np.empty(state.pair_count, dtype=np.int32)
    cdef cnp.ndarray scanned = np.empty(state.process_count, dtype=np.int32)
    cdef cnp.ndarray fd_counts = np.empty(state.process_count, dtype=np.int64)

    if state.pair_count:
        memcpy(cnp.PyArray_DATA(inodes), state.pair_inodes,
               state.pair_count * sizeof(int64_t))
        memcpy(cnp.PyArray_DATA(pids), state.pair_pids,
               state.pair_count * sizeof(int32_t))
    if state.process_count:
        memcpy(cnp.PyArray_DATA(scanned), state.process_pids,
               state.process_count * sizeof(int32_t))
        memcpy(cnp.PyArray_DATA(fd_counts), state.process_fd_counts,
               state.process_count * sizeof(int64_t))

    result.inodes = inodes
    result.pids = pids
    result.scanned_pids = scanned
    result.fd_counts = fd_counts
    result.processes_scanned = state.counters.processes_scanned
    result.processes_vanished = state.counters.processes_vanished
    result.fd_dirs_denied = state.counters.fd_dirs_denied
    result.fd_dirs_failed = state.counters.fd_dirs_failed
    result.fds_read = state.counters.fds_read
    result.fds_vanished = state.counters.fds_vanished
    result.fds_denied = state.counters.fds_denied
    return result


def scan_fds(str proc_root, pids=None):
    """Walk the fd links of every process under proc_root, or only of ``pids``.

    ``pids`` is any sequence of pids (converted to int32). Return an FdScan.
    Raise ProcReadError when proc_root cannot be opened as a directory.
    """
    cdef ScanState state
    cdef int status = SCAN_OK
    cdef int saved_errno = 0
    cdef cnp.ndarray listed
    cdef const int32_t* c_listed = NULL
    cdef Py_ssize_t listed_count = 0
    cdef bint walk_listed_only = pids is not None
    encoded_root = os.fsencode(proc_root)

    if walk_listed_only:
        listed = np.ascontiguousarray(pids, dtype=np.int32)
        c_listed = <const int32_t*>cnp.PyArray_DATA(listed)
        listed_count = listed.shape[0]

    init_state(&state)
    try:
        open_root(&state, encoded_root, proc_root)
        with nogil:
            if walk_listed_only:
                status = walk_listed(&state, c_listed, listed_count)
            else:
                status = walk_all(&state)
                if status == SCAN_ROOT_UNREADABLE:
                    saved_errno = errno
        if status != SCAN_OK:
            raise_scan_error(status, saved_errno, proc_root)
        return collect_result(&state)
    finally:
        free_state(&state)


def count_fds(str proc_root):
    """Return (pids, fd_counts) for every process under proc_root.

    ``fd_counts`` (int64) holds the st_size of each <pid>/fd directory, which
    is the number of open fds on Linux 6.2 and later, and -1 when stat failed.
    A process that exits during the listing is left out. No fd link is read.
    """
    return list_root(proc_root, True)


def list_pids(str proc_root):
    """Return the pids under proc_root as an int32 array, in directory order."""
    pids, _ = list_root(proc_root, False)
    return pids


cdef tuple list_root(str proc_root, bint stat_fd_dirs):
    cdef ScanState state
    cdef int status = SCAN_OK
    cdef int saved_errno = 0
    encoded_root = os.fsencode(proc_root)

    init_state(&state)
    try:
        open_root(&state, encoded_root, proc_root)
        with nogil:
            status = list_processes(&state, stat_fd_dirs)
            if status == SCAN_ROOT_UNREADABLE:
                saved_errno = errno
        if status != SCAN_OK:
            raise_scan_error(status, saved_errno, proc_root)
        result = collect_result(&state)
        return result.scanned_pids, result.fd_counts
    finally:
        free_state(&state)
