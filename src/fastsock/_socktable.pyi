import numpy as np

SKIP_REASONS: tuple[str, ...]

class FileBuffer:
    size: int
    reads: int
    early_stop_size: int
    stopped_early: bool
    def to_bytes(self) -> bytes: ...

class ParsedTable:
    family: np.ndarray
    local_offsets: np.ndarray
    local_text: np.ndarray
    local_port: np.ndarray
    remote_offsets: np.ndarray
    remote_text: np.ndarray
    remote_port: np.ndarray
    state_code: np.ndarray
    tx_queue: np.ndarray
    rx_queue: np.ndarray
    uid: np.ndarray
    inode: np.ndarray
    rows: int
    reads: int
    size: int
    skipped: list[int]
    bad_rows: list[tuple[int, str, str]]

def read_file(path: str, stop_early: bool = False) -> FileBuffer: ...
def parse_buffer(buffer: FileBuffer, socket_family: int) -> ParsedTable: ...
