# cython: language_level=3
"""Read NETLINK_SOCK_DIAG messages into columns: socket dumps and close events.

Both a dump reply and a close event (the sock_diag destroy multicast groups)
carry one ``struct inet_diag_msg`` per socket, followed by netlink attributes.
Messages are received without the GIL into a growing C array of fixed-size
rows, and converted to NumPy columns at the end, so no Python object is made
per socket. Addresses become canonical text in Arrow-style offset and data
buffers, exactly as the /proc parser writes them.

Struct layouts come from the kernel's UAPI headers (linux/inet_diag.h,
linux/tcp.h). A ``struct tcp_info`` from a kernel older than those headers is
shorter, so its counters are read only when the attribute covers them.
"""

import os

import numpy as np

cimport numpy as cnp
from libc.errno cimport EAGAIN, EINTR, ENOBUFS, errno
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

from fastsock._addrtext cimport (
    is_ipv4_mapped,
    write_ipv4_text,
    write_ipv6_text,
)

cnp.import_array()


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buffer, size_t length, int flags)
    ssize_t send(int fd, const void* buffer, size_t length, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long count, int timeout_ms)
    short POLLIN


cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec* now)
    int CLOCK_REALTIME


cdef extern from "<arpa/inet.h>" nogil:
    uint16_t ntohs(uint16_t value)


cdef extern from "<linux/netlink.h>" nogil:
    struct nlmsghdr:
        uint32_t nlmsg_len
        uint16_t nlmsg_type
        uint16_t nlmsg_flags
        uint32_t nlmsg_seq
        uint32_t nlmsg_pid
    int NLMSG_DONE
    int NLMSG_ERROR
    int NLM_F_REQUEST
    int NLM_F_DUMP


cdef extern from "<linux/sock_diag.h>" nogil:
    int SOCK_DIAG_BY_FAMILY


cdef extern from "<linux/inet_diag.h>" nogil:
    struct inet_diag_sockid:
        uint16_t idiag_sport
        uint16_t idiag_dport
        uint32_t idiag_src[4]
        uint32_t idiag_dst[4]
        uint32_t idiag_if
        uint32_t idiag_cookie[2]

    struct inet_diag_req_v2:
        uint8_t sdiag_family
        uint8_t sdiag_protocol
        uint8_t idiag_ext
        uint8_t pad
        uint32_t idiag_states
        inet_diag_sockid id

    struct inet_diag_req:
        uint8_t idiag_family
        uint8_t idiag_src_len
        uint8_t idiag_dst_len
        uint8_t idiag_ext
        inet_diag_sockid id
        uint32_t idiag_states
        uint32_t idiag_dbs

    struct inet_diag_msg:
        uint8_t idiag_family
        uint8_t idiag_state
        uint8_t idiag_timer
        uint8_t idiag_retrans
        inet_diag_sockid id
        uint32_t idiag_expires
        uint32_t idiag_rqueue
        uint32_t idiag_wqueue
        uint32_t idiag_uid
        uint32_t idiag_inode

    int INET_DIAG_INFO
    int INET_DIAG_PROTOCOL
    int TCPDIAG_GETSOCK


# Reads the counters of a struct tcp_info attribute of any length. The kernel
# appends fields over time, so a short attribute is copied into a zeroed
# struct and the counters count only when the attribute reaches past them.
cdef extern from *:
    """
    #include <stddef.h>
    #include <string.h>
    #include <linux/tcp.h>

    typedef struct {
        unsigned long long bytes_acked;
        unsigned long long bytes_received;
        unsigned int rtt_us;
        unsigned int total_retrans;
        unsigned int rcv_space;
    } fastsock_tcp_counters;

    static int fastsock_read_tcp_info(const void* data, size_t length,
                                      fastsock_tcp_counters* out) {
        struct tcp_info info;
        size_t needed = offsetof(struct tcp_info, tcpi_bytes_received)
                        + sizeof(info.tcpi_bytes_received);
        if (length < needed) {
            return 0;
        }
        memset(&info, 0, sizeof(info));
        memcpy(&info, data, length < sizeof(info) ? length : sizeof(info));
        out->bytes_acked = info.tcpi_bytes_acked;
        out->bytes_received = info.tcpi_bytes_received;
        out->rtt_us = info.tcpi_rtt;
        out->total_retrans = info.tcpi_total_retrans;
        out->rcv_space = info.tcpi_rcv_space;
        return 1;
    }
    """
    ctypedef struct fastsock_tcp_counters:
        unsigned long long bytes_acked
        unsigned long long bytes_received
        unsigned int rtt_us
        unsigned int total_retrans
        unsigned int rcv_space
    int read_tcp_info "fastsock_read_tcp_info"(
        const void* data, size_t length, fastsock_tcp_counters* out) nogil


cdef enum:
    AF_INET_CODE = 2
    AF_INET6_CODE = 10
    IPPROTO_TCP_CODE = 6
    IPPROTO_UDP_CODE = 17
    TCP_SYN_RECV_STATE = 3
    TCP_LISTEN_STATE = 10
    TCP_NEW_SYN_RECV_STATE = 12
    # For DiagColumns.state_index: UDP's state 7 (bound, not connected) is
    # UNCONN, at the index after the last TCP state, as in _socktable.
    UDP_CLOSE_STATE = 7
    LAST_TCP_STATE = 12
    UNCONNECTED_INDEX = 13

# Bytes of one recv(2). A dump reply skb is at most 32 KiB (the kernel caps
# nlk->max_recvmsg_len there), and an event is one message of a few hundred
# bytes, so 64 KiB never truncates; MSG_TRUNC still checks it.
cdef enum:
    RECEIVE_BUFFER_SIZE = 65536

# Rows reserved before the first realloc; the array doubles after.
cdef enum:
    INITIAL_ROWS = 1024

# Longest canonical text of one address (8 groups of 4 hex digits, 7 colons).
cdef enum:
    MAX_ADDRESS_TEXT = 39

# Outcome of the nogil receive loops, turned into exceptions with the GIL.
cdef enum ReceiveStatus:
    RECEIVE_OK = 0
    RECEIVE_OS_ERROR = 1
    RECEIVE_NO_MEMORY = 2
    RECEIVE_TRUNCATED = 3
    RECEIVE_KERNEL_ERROR = 4
    RECEIVE_MALFORMED = 5


cdef struct DiagRow:
    uint8_t protocol
    uint8_t socket_family
    uint8_t state
    uint8_t has_counters
    uint16_t local_port
    uint16_t remote_port
    uint8_t local[16]
    uint8_t remote[16]
    uint32_t rx_queue
    uint32_t tx_queue
    uint32_t uid
    uint32_t inode
    uint64_t cookie
    uint64_t bytes_acked
    uint64_t bytes_received
    uint32_t rtt_us
    uint32_t retransmits
    uint32_t rcv_space
    int64_t time_us


cdef class DiagBuffer:
    """Rows of received inet_diag messages, in arrival order.

    ``overruns`` counts recv(2) calls that failed with ENOBUFS: the kernel
    dropped multicast messages because the socket's receive buffer was full.
    ``messages`` counts every inet_diag message received, ``skipped`` those
    of an unknown family or too short to parse.
    """

    cdef DiagRow* rows
    cdef Py_ssize_t count
    cdef Py_ssize_t capacity
    cdef public Py_ssize_t overruns
    cdef public Py_ssize_t messages
    cdef public Py_ssize_t skipped
    cdef public Py_ssize_t receives

    def __cinit__(self):
        self.rows = NULL
        self.count = 0
        self.capacity = 0

    def __dealloc__(self):
        free(self.rows)

    def __len__(self):
        return self.count

    @property
    def rows_count(self):
        return self.count


cdef DiagRow* next_row(DiagBuffer buffer) noexcept nogil:
    """Return a zeroed row at the end of buffer, or NULL when memory ran out."""
    cdef Py_ssize_t capacity
    cdef DiagRow* grown
    if buffer.count == buffer.capacity:
        capacity = buffer.capacity * 2 if buffer.capacity else INITIAL_ROWS
        grown = <DiagRow*>realloc(buffer.rows, capacity * sizeof(DiagRow))
        if grown == NULL:
            return NULL
        buffer.rows = grown
        buffer.capacity = capacity
    memset(&buffer.rows[buffer.count], 0, sizeof(DiagRow))
    buffer.count += 1
    return &buffer.rows[buffer.count - 1]


cdef inline int64_t now_us() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <int64_t>now.tv_sec * 1000000 + now.tv_nsec // 1000


cdef int parse_diag_message(const nlmsghdr* header, int default_protocol,
                            int64_t time_us, DiagBuffer buffer) noexcept nogil:
    """Append one inet_diag message to buffer: 0 on success, 1 if skipped, -1 on OOM.

    default_protocol is used when the message has no INET_DIAG_PROTOCOL
    attribute, as dump replies do; close events always carry it.
    """
    cdef const uint8_t* payload = <const uint8_t*>header + 16
    cdef Py_ssize_t length = <Py_ssize_t>header.nlmsg_len - 16
    cdef const inet_diag_msg* message = <const inet_diag_msg*>payload
    cdef Py_ssize_t offset = sizeof(inet_diag_msg)
    cdef uint16_t attribute_length, attribute_type
    cdef const uint8_t* attribute
    cdef fastsock_tcp_counters counters
    cdef int protocol = default_protocol
    cdef bint has_counters = False
    cdef DiagRow* row

    memset(&counters, 0, sizeof(counters))
    if length < <Py_ssize_t>sizeof(inet_diag_msg):
        return 1
    if message.idiag_family != AF_INET_CODE and message.idiag_family != AF_INET6_CODE:
        return 1

    # Attributes: {u16 length, u16 type, payload}, each aligned to 4 bytes.
    offset = (offset + 3) & ~3
    while offset + 4 <= length:
        attribute = payload + offset
        memcpy(&attribute_length, attribute, 2)
        memcpy(&attribute_type, attribute + 2, 2)
        if attribute_length < 4 or offset + attribute_length > length:
            break
        if attribute_type == INET_DIAG_PROTOCOL and attribute_length >= 5:
            protocol = attribute[4]
        elif attribute_type == INET_DIAG_INFO:
            has_counters = read_tcp_info(attribute + 4, attribute_length - 4,
                                         &counters) == 1
        offset += (attribute_length + 3) & ~3

    row = next_row(buffer)
    if row == NULL:
        return -1
    row.protocol = <uint8_t>protocol
    row.socket_family = 4 if message.idiag_family == AF_INET_CODE else 6
    row.state = message.idiag_state
    if row.state == TCP_NEW_SYN_RECV_STATE:
        # /proc/net/tcp shows request sockets as SYN_RECV; so does this source.
        row.state = TCP_SYN_RECV_STATE
    row.local_port = ntohs(message.id.idiag_sport)
    row.remote_port = ntohs(message.id.idiag_dport)
    # idiag_src and idiag_dst are in network byte order; IPv4 uses word 0.
    memcpy(row.local, message.id.idiag_src, 16)
    memcpy(row.remote, message.id.idiag_dst, 16)
    row.rx_queue = message.idiag_rqueue
    row.tx_queue = message.idiag_wqueue
    if protocol == IPPROTO_TCP_CODE and row.state == TCP_LISTEN_STATE:
        # A listener's wqueue is its backlog limit; /proc/net/tcp shows 0.
        row.tx_queue = 0
    row.uid = message.idiag_uid
    row.inode = message.idiag_inode
    row.cookie = (<uint64_t>message.id.idiag_cookie[1] << 32) \
        | message.id.idiag_cookie[0]
    row.time_us = time_us
    if has_counters:
        row.has_counters = 1
        row.bytes_acked = counters.bytes_acked
        row.bytes_received = counters.bytes_received
        row.rtt_us = counters.rtt_us
        row.retransmits = counters.total_retrans
        row.rcv_space = counters.rcv_space
    return 0


cdef struct ReceiveResult:
    int status
    int error
    bint done


cdef void parse_datagram(const uint8_t* data, Py_ssize_t size, uint32_t seq,
                         int default_protocol, int message_type,
                         DiagBuffer buffer, ReceiveResult* result) noexcept nogil:
    """Parse every netlink message of one received datagram.

    seq 0 accepts any sequence number (multicast events carry 0); otherwise
    messages of an older request are ignored. Socket messages have the type
    of the request: SOCK_DIAG_BY_FAMILY, or TCPDIAG_GETSOCK for a dump of
    both families (see dump_tcp).
    """
    cdef Py_ssize_t offset = 0
    cdef const nlmsghdr* header
    cdef int32_t code
    cdef int parsed
    cdef int64_t time_us = now_us()

    while offset + 16 <= size:
        header = <const nlmsghdr*>(data + offset)
        if header.nlmsg_len < 16 or offset + header.nlmsg_len > size:
            result.status = RECEIVE_MALFORMED
            return
        if seq == 0 or header.nlmsg_seq == seq:
            if header.nlmsg_type == NLMSG_DONE:
                result.done = True
                if header.nlmsg_len >= 20:
                    memcpy(&code, data + offset + 16, 4)
                    if code < 0:
                        result.status = RECEIVE_KERNEL_ERROR
                        result.error = -code
                return
            if header.nlmsg_type == NLMSG_ERROR:
                result.done = True
                if header.nlmsg_len >= 20:
                    memcpy(&code, data + offset + 16, 4)
                    if code < 0:
                        result.status = RECEIVE_KERNEL_ERROR
                        result.error = -code
                return
            if header.nlmsg_type == message_type:
                buffer.messages += 1
                parsed = parse_diag_message(header, default_protocol, time_us,
                                            buffer)
                if parsed < 0:
                    result.status = RECEIVE_NO_MEMORY
                    return
                buffer.skipped += parsed
        offset += (header.nlmsg_len + 3) & ~3


cdef int raise_receive_error(ReceiveResult* result, str what) except -1:
    if result.status == RECEIVE_NO_MEMORY:
        raise MemoryError(f"out of memory while receiving {what}")
    if result.status == RECEIVE_TRUNCATED:
        raise OSError(
            f"a netlink datagram of {what} did not fit in {RECEIVE_BUFFER_SIZE} "
            "bytes; the receive buffer size in _netlink.pyx must grow"
        )
    if result.status == RECEIVE_MALFORMED:
        raise OSError(f"malformed netlink message while receiving {what}")
    if result.status in (RECEIVE_OS_ERROR, RECEIVE_KERNEL_ERROR):
        raise OSError(result.error, f"{what} failed: {os.strerror(result.error)}")
    return 0


cdef struct DumpRequest:
    nlmsghdr header
    inet_diag_req_v2 body


cdef struct TcpDumpRequest:
    nlmsghdr header
    inet_diag_req body


def dump(DiagBuffer into, int fd, int family, int protocol, uint32_t states,
         bint with_tcp_info, uint32_t seq):
    """Dump the sockets of one family (4 or 6) and protocol (6 TCP, 17 UDP).

    fd is a blocking NETLINK_SOCK_DIAG socket. Rows are appended to into;
    returns how many. states is a bit mask of TCP states (bit n for state n).
    Raises OSError with the kernel's errno when it rejects the request (ENOENT
    when the kernel has no diag module for the protocol).
    """
    cdef DumpRequest request
    memset(&request, 0, sizeof(request))
    request.header.nlmsg_len = sizeof(DumpRequest)
    request.header.nlmsg_type = SOCK_DIAG_BY_FAMILY
    request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP
    request.header.nlmsg_seq = seq
    request.body.sdiag_family = AF_INET_CODE if family == 4 else AF_INET6_CODE
    request.body.sdiag_protocol = <uint8_t>protocol
    request.body.idiag_states = states
    if with_tcp_info:
        request.body.idiag_ext = 1 << (INET_DIAG_INFO - 1)
    return receive_dump(
        into, fd, &request, sizeof(DumpRequest), seq, protocol,
        SOCK_DIAG_BY_FAMILY,
        f"the sock_diag dump of family {family} protocol {protocol}",
    )


def dump_tcp(DiagBuffer into, int fd, uint32_t states, bint with_tcp_info,
             uint32_t seq):
    """Dump the TCP sockets of both families (4 and 6) in one request.

    This is the older TCPDIAG_GETSOCK request, which the kernel answers for
    AF_UNSPEC with the same messages as two SOCK_DIAG_BY_FAMILY dumps. Each
    dump walks every bucket of the kernel's TCP hash, so one request in
    place of two saves a walk: 2.2 ms in place of 3.2 ms for 2,000 sockets
    on Linux 6.18 (a Python test script on the 2-core machine of
    docs/performance.md). Arguments, rows and errors are as for dump. A
    kernel without this request rejects it before any row, with EINVAL.
    """
    cdef TcpDumpRequest request
    memset(&request, 0, sizeof(request))
    request.header.nlmsg_len = sizeof(TcpDumpRequest)
    request.header.nlmsg_type = TCPDIAG_GETSOCK
    request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP
    request.header.nlmsg_seq = seq
    request.body.idiag_family = 0  # AF_UNSPEC: both families
    request.body.idiag_states = states
    if with_tcp_info:
        request.body.idiag_ext = 1 << (INET_DIAG_INFO - 1)
    return receive_dump(
        into, fd, &request, sizeof(TcpDumpRequest), seq, IPPROTO_TCP_CODE,
        TCPDIAG_GETSOCK, "the TCPDIAG_GETSOCK dump of TCP",
    )


cdef Py_ssize_t receive_dump(DiagBuffer into, int fd, const void* request,
                             size_t length, uint32_t seq, int protocol,
                             int message_type, str what) except -1:
    """Send a dump request and append the rows of its reply to into; return how many."""
    cdef uint8_t* data
    cdef ssize_t got
    cdef Py_ssize_t before = into.count
    cdef ReceiveResult result
    memset(&result, 0, sizeof(result))

    data = <uint8_t*>malloc(RECEIVE_BUFFER_SIZE)
    if data == NULL:
        raise MemoryError()
    try:
        with nogil:
            got = send(fd, request, length, 0)
            if got < 0:
                result.status = RECEIVE_OS_ERROR
                result.error = errno
            while result.status == RECEIVE_OK and not result.done:
                got = recv(fd, data, RECEIVE_BUFFER_SIZE, MSG_TRUNC)
                into.receives += 1
                if got < 0:
                    if errno == EINTR:
                        continue
                    result.status = RECEIVE_OS_ERROR
                    result.error = errno
                elif got > RECEIVE_BUFFER_SIZE:
                    result.status = RECEIVE_TRUNCATED
                elif got == 0:
                    result.status = RECEIVE_MALFORMED
                else:
                    parse_datagram(data, got, seq, protocol, message_type, into,
                                   &result)
    finally:
        free(data)

    raise_receive_error(&result, what)
    return into.count - before


def read_events(DiagBuffer into, int fd, int timeout_ms, Py_ssize_t max_datagrams):
    """Wait up to timeout_ms for close events on fd, then read what is queued.

    fd is a NETLINK_SOCK_DIAG socket bound to the destroy multicast groups.
    Reads at most max_datagrams datagrams without blocking once the first
    arrived, and appends one row per socket to into, stamped with the time
    of its receipt. An ENOBUFS from recv(2) means the kernel dropped events;
    it is counted in into.overruns and reading goes on. Returns the number
    of datagrams read.
    """
    cdef pollfd waiter
    cdef ssize_t got
    cdef Py_ssize_t datagrams = 0
    cdef int ready
    cdef uint8_t* data
    cdef ReceiveResult result
    memset(&result, 0, sizeof(result))

    data = <uint8_t*>malloc(RECEIVE_BUFFER_SIZE)
    if data == NULL:
        raise MemoryError()
    try:
        with nogil:
            waiter.fd = fd
            waiter.events = POLLIN
            waiter.revents = 0
            ready = poll(&waiter, 1, timeout_ms)
            if ready < 0 and errno != EINTR:
                result.status = RECEIVE_OS_ERROR
                result.error = errno
            while ready > 0 and result.status == RECEIVE_OK \
                    and datagrams < max_datagrams:
                got = recv(fd, data, RECEIVE_BUFFER_SIZE, MSG_DONTWAIT | MSG_TRUNC)
                into.receives += 1
                if got < 0:
                    if errno == ENOBUFS:
                        into.overruns += 1
                        continue
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN:
                        result.status = RECEIVE_OS_ERROR
                        result.error = errno
                    break
                if got > RECEIVE_BUFFER_SIZE:
                    result.status = RECEIVE_TRUNCATED
                    break
                datagrams += 1
                result.done = False
                parse_datagram(data, got, 0, 0, SOCK_DIAG_BY_FAMILY, into, &result)
                if result.status == RECEIVE_KERNEL_ERROR:
                    # An error message on a multicast socket is not an event.
                    result.status = RECEIVE_OK
    finally:
        free(data)

    raise_receive_error(&result, "close events")
    return datagrams


cdef inline bint is_zero(const uint8_t* b) noexcept nogil:
    cdef int i
    for i in range(16):
        if b[i]:
            return False
    return True


cdef class DiagColumns:
    """Columns of a DiagBuffer, as NumPy arrays; text as Arrow-style buffers."""

    cdef public object protocol        # uint8: 6 TCP, 17 UDP
    cdef public object socket_family   # int8: 4 or 6, the socket's own family
    cdef public object family          # int8: 4 or 6, after IPv4-mapped folding
    cdef public object local_offsets   # int32, n + 1
    cdef public object local_text      # uint8 characters
    cdef public object local_port      # int32
    cdef public object remote_offsets
    cdef public object remote_text
    cdef public object remote_port
    cdef public object state_code      # int8
    cdef public object state_index     # int8: as _socktable's (TCP code, 13 UNCONN, 0)
    cdef public object tx_queue        # int64
    cdef public object rx_queue        # int64
    cdef public object uid             # int64
    cdef public object inode           # int64
    cdef public object cookie          # int64, the kernel's u64 bit for bit
    cdef public object has_counters    # bool: the tcp_info counters are valid
    cdef public object bytes_acked     # int64
    cdef public object bytes_received  # int64
    cdef public object rtt_us          # int64
    cdef public object retransmits     # int64
    # int64: tcpi_rcv_space, set when the handshake completes and kept by
    # tcp_disconnect(), so it tells a reset connection from a failed connect.
    cdef public object rcv_space
    cdef public object time_us         # int64, Unix microseconds of receipt
    cdef public Py_ssize_t rows


def to_columns(DiagBuffer buffer):
    """Convert the rows of buffer to a DiagColumns."""
    cdef Py_ssize_t count = buffer.count
    cdef Py_ssize_t i
    cdef DiagRow* row
    cdef const uint8_t* local
    cdef const uint8_t* remote
    cdef uint8_t folded_remote[16]
    cdef uint8_t folded_local[16]
    cdef bint mapped
    cdef DiagColumns columns = DiagColumns.__new__(DiagColumns)

    protocol_arr = np.empty(count, dtype=np.uint8)
    socket_family_arr = np.empty(count, dtype=np.int8)
    family_arr = np.empty(count, dtype=np.int8)
    local_offsets_arr = np.empty(count + 1, dtype=np.int32)
    remote_offsets_arr = np.empty(count + 1, dtype=np.int32)
    local_text_arr = np.empty(count * MAX_ADDRESS_TEXT, dtype=np.uint8)
    remote_text_arr = np.empty(count * MAX_ADDRESS_TEXT, dtype=np.uint8)
    local_port_arr = np.empty(count, dtype=np.int32)
    remote_port_arr = np.empty(count, dtype=np.int32)
    state_arr = np.empty(count, dtype=np.int8)
    state_index_arr = np.empty(count, dtype=np.int8)
    tx_arr = np.empty(count, dtype=np.int64)
    rx_arr = np.empty(count, dtype=np.int64)
    uid_arr = np.empty(count, dtype=np.int64)
    inode_arr = np.empty(count, dtype=np.int64)
    cookie_arr = np.empty(count, dtype=np.uint64)
    has_counters_arr = np.empty(count, dtype=np.uint8)
    acked_arr = np.empty(count, dtype=np.int64)
    received_arr = np.empty(count, dtype=np.int64)
    rtt_arr = np.empty(count, dtype=np.int64)
    retransmits_arr = np.empty(count, dtype=np.int64)
    rcv_space_arr = np.empty(count, dtype=np.int64)
    time_arr = np.empty(count, dtype=np.int64)

    cdef uint8_t[::1] c_protocol = protocol_arr
    cdef int8_t[::1] c_socket_family = socket_family_arr
    cdef int8_t[::1] c_family = family_arr
    cdef int32_t[::1] c_local_offsets = local_offsets_arr
    cdef int32_t[::1] c_remote_offsets = remote_offsets_arr
    cdef uint8_t[::1] c_local_text = local_text_arr
    cdef uint8_t[::1] c_remote_text = remote_text_arr
    cdef int32_t[::1] c_local_port = local_port_arr
    cdef int32_t[::1] c_remote_port = remote_port_arr
    cdef int8_t[::1] c_state = state_arr
    cdef int8_t[::1] c_state_index = state_index_arr
    cdef int64_t[::1] c_tx = tx_arr
    cdef int64_t[::1] c_rx = rx_arr
    cdef int64_t[::1] c_uid = uid_arr
    cdef int64_t[::1] c_inode = inode_arr
    cdef uint64_t[::1] c_cookie = cookie_arr
    cdef uint8_t[::1] c_has_counters = has_counters_arr
    cdef int64_t[::1] c_acked = acked_arr
    cdef int64_t[::1] c_received = received_arr
    cdef int64_t[::1] c_rtt = rtt_arr
    cdef int64_t[::1] c_retransmits = retransmits_arr
    cdef int64_t[::1] c_rcv_space = rcv_space_arr
    cdef int64_t[::1] c_time = time_arr
    cdef int32_t local_used = 0, remote_used = 0

    c_local_offsets[0] = 0
    c_remote_offsets[0] = 0
    with nogil:
        for i in range(count):
            row = &buffer.rows[i]
            local = row.local
            remote = row.remote

            # Fold an IPv6 socket's IPv4-mapped addresses to IPv4, as the
            # /proc parser does: both mapped, or a mapped local address with
            # an unconnected remote of '::'. A close event can also have a
            # mapped remote with a local '::', because tcp_disconnect()
            # clears the local address of a socket not bound to one.
            mapped = False
            if row.socket_family == 6 and is_ipv4_mapped(local):
                if is_ipv4_mapped(remote):
                    mapped = True
                elif is_zero(remote):
                    mapped = True
                    memset(folded_remote, 0, 16)
                    folded_remote[10] = 0xFF
                    folded_remote[11] = 0xFF
                    remote = folded_remote
            elif row.socket_family == 6 and is_zero(local) and is_ipv4_mapped(remote):
                mapped = True
                memset(folded_local, 0, 16)
                folded_local[10] = 0xFF
                folded_local[11] = 0xFF
                local = folded_local

            if row.socket_family == 4 or mapped:
                c_family[i] = 4
                local_used += write_ipv4_text(
                    local + (12 if mapped else 0), <char*>&c_local_text[local_used])
                remote_used += write_ipv4_text(
                    remote + (12 if mapped else 0), <char*>&c_remote_text[remote_used])
            else:
                c_family[i] = 6
                local_used += write_ipv6_text(local, <char*>&c_local_text[local_used])
                remote_used += write_ipv6_text(
                    remote, <char*>&c_remote_text[remote_used])
            c_local_offsets[i + 1] = local_used
            c_remote_offsets[i + 1] = remote_used

            c_protocol[i] = row.protocol
            c_socket_family[i] = <int8_t>row.socket_family
            c_local_port[i] = row.local_port
            c_remote_port[i] = row.remote_port
            c_state[i] = <int8_t>row.state
            if row.protocol == IPPROTO_UDP_CODE and row.state == UDP_CLOSE_STATE:
                c_state_index[i] = UNCONNECTED_INDEX
            elif 1 <= row.state <= LAST_TCP_STATE:
                c_state_index[i] = <int8_t>row.state
            else:
                c_state_index[i] = 0
            c_tx[i] = row.tx_queue
            c_rx[i] = row.rx_queue
            c_uid[i] = row.uid
            c_inode[i] = row.inode
            c_cookie[i] = row.cookie
            c_has_counters[i] = row.has_counters
            c_acked[i] = <int64_t>row.bytes_acked
            c_received[i] = <int64_t>row.bytes_received
            c_rtt[i] = row.rtt_us
            c_retransmits[i] = row.retransmits
            c_rcv_space[i] = row.rcv_space
            c_time[i] = row.time_us

    columns.rows = count
    columns.protocol = protocol_arr
    columns.socket_family = socket_family_arr
    columns.family = family_arr
    columns.local_offsets = local_offsets_arr
    columns.local_text = local_text_arr[:local_used]
    columns.local_port = local_port_arr
    columns.remote_offsets = remote_offsets_arr
    columns.remote_text = remote_text_arr[:remote_used]
    columns.remote_port = remote_port_arr
    columns.state_code = state_arr
    columns.state_index = state_index_arr
    columns.tx_queue = tx_arr
    columns.rx_queue = rx_arr
    columns.uid = uid_arr
    columns.inode = inode_arr
    columns.cookie = cookie_arr.view(np.int64)
    columns.has_counters = has_counters_arr.view(np.bool_)
    columns.bytes_acked = acked_arr
    columns.bytes_received = received_arr
    columns.rtt_us = rtt_arr
    columns.retransmits = retransmits_arr
    columns.rcv_space = rcv_space_arr
    columns.time_us = time_arr
    return columns


cdef inline uint64_t fnv1a(uint64_t hash, const uint8_t* data,
                           Py_ssize_t length) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(length):
        hash = (hash ^ data[i]) * <uint64_t>0x100000001B3
    return hash


def four_tuple_keys(const uint8_t[::1] is_udp,
                    const int32_t[::1] local_offsets, const uint8_t[::1] local_text,
                    const int32_t[::1] local_port,
                    const int32_t[::1] remote_offsets, const uint8_t[::1] remote_text,
                    const int32_t[::1] remote_port):
    """Return a 64-bit FNV-1a hash per row of (protocol, both addresses, both ports).

    The addresses are the canonical text columns, given as Arrow offsets and
    data buffers, so rows of the /proc source and of netlink messages that
    name the same socket get the same key.
    """
    cdef Py_ssize_t count = local_port.shape[0]
    cdef Py_ssize_t i
    cdef uint64_t hash
    cdef int32_t ports[2]
    keys_arr = np.empty(count, dtype=np.uint64)
    cdef uint64_t[::1] c_keys = keys_arr

    with nogil:
        for i in range(count):
            hash = <uint64_t>0xCBF29CE484222325
            hash = fnv1a(hash, &is_udp[i], 1)
            hash = fnv1a(hash, &local_text[0] + local_offsets[i],
                         local_offsets[i + 1] - local_offsets[i])
            hash = fnv1a(hash, <const uint8_t*>b"|", 1)
            hash = fnv1a(hash, &remote_text[0] + remote_offsets[i],
                         remote_offsets[i + 1] - remote_offsets[i])
            ports[0] = local_port[i]
            ports[1] = remote_port[i]
            hash = fnv1a(hash, <const uint8_t*>ports, 8)
            c_keys[i] = hash
    return keys_arr.view(np.int64)
