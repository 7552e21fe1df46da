"""Type stub of the compiled sock_diag reader (``_netlink.pyx``)."""

import numpy as np
import numpy.typing as npt

class DiagBuffer:
    """Rows of received inet_diag messages, in arrival order."""

    overruns: int
    messages: int
    skipped: int
    receives: int
    @property
    def rows_count(self) -> int: ...
    def __len__(self) -> int: ...

class DiagColumns:
    """Columns of a DiagBuffer as NumPy arrays; text as Arrow-style buffers."""

    protocol: npt.NDArray[np.uint8]
    socket_family: npt.NDArray[np.int8]
    family: npt.NDArray[np.int8]
    local_offsets: npt.NDArray[np.int32]
    local_text: npt.NDArray[np.uint8]
    local_port: npt.NDArray[np.int32]
    remote_offsets: npt.NDArray[np.int32]
    remote_text: npt.NDArray[np.uint8]
    remote_port: npt.NDArray[np.int32]
    state_code: npt.NDArray[np.int8]
    state_index: npt.NDArray[np.int8]
    tx_queue: npt.NDArray[np.int64]
    rx_queue: npt.NDArray[np.int64]
    uid: npt.NDArray[np.int64]
    inode: npt.NDArray[np.int64]
    cookie: npt.NDArray[np.int64]
    has_counters: npt.NDArray[np.bool_]
    bytes_acked: npt.NDArray[np.int64]
    bytes_received: npt.NDArray[np.int64]
    rtt_us: npt.NDArray[np.int64]
    retransmits: npt.NDArray[np.int64]
    rcv_space: npt.NDArray[np.int64]
    time_us: npt.NDArray[np.int64]
    rows: int

def dump(
    into: DiagBuffer,
    fd: int,
    family: int,
    protocol: int,
    states: int,
    with_tcp_info: bool,
    seq: int,
) -> int: ...
def dump_tcp(
    into: DiagBuffer, fd: int, states: int, with_tcp_info: bool, seq: int
) -> int: ...
def read_events(
    into: DiagBuffer, fd: int, timeout_ms: int, max_datagrams: int
) -> int: ...
def to_columns(buffer: DiagBuffer) -> DiagColumns: ...
def four_tuple_keys(
    is_udp: npt.NDArray[np.uint8],
    local_offsets: npt.NDArray[np.int32],
    local_text: npt.NDArray[np.uint8],
    local_port: npt.NDArray[np.int32],
    remote_offsets: npt.NDArray[np.int32],
    remote_text: npt.NDArray[np.uint8],
    remote_port: npt.NDArray[np.int32],
) -> npt.NDArray[np.int64]: ...
