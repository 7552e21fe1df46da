import numpy as np

SKIP_REASONS: tuple[str, ...]
UNCONNECTED_STATE_INDEX: int

class FileBuffer:
    size: int
    reads: int
    early_stop_size: int
    stopped_early: bool
    def to_bytes(self) -> bytes: ...

class ParsedTable:
    table_index: np.ndarray
    family: np.ndarray
    local_offsets: np.ndarray
    local_text: np.ndarray
    local_port: np.ndarray
    remote_offsets: np.ndarray
    remote_text: np.ndarray
    remote_port: np.ndarray
    state_code: np.ndarray
    state_index: np.ndarray
    tx_queue: np.ndarray
    rx_queue: np.ndarray
    uid: np.ndarray
    inode: np.ndarray
    rows: int
    file_rows: list[int]
    skipped: list[list[int]]
    bad_rows: list[list[tuple[int, str, str]]]

def read_file(path: str, stop_early: bool = False) -> FileBuffer: ...
def buffer_from_reads(
    chunks: list[bytes], stop_early: bool = False, page_size: int = 0
) -> FileBuffer: ...
def parse_buffers(
    buffers: list[FileBuffer], socket_families: list[int], udp: list[bool]
) -> ParsedTable: ...
def text_column(
    codes: np.ndarray, names: tuple[bytes, ...]
) -> tuple[np.ndarray, np.ndarray]: ...
