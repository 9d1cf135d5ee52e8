"""The typed records a legacy stream is read into.  Each carries `offset`,
the absolute byte offset where it starts in the input."""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np


@dataclass
class Wrapper:
    kind: str                     # "none", "xl", "xend", "xenserver", "libvirt"
    offset: int
    image_offset: int             # where the libxc image starts
    config: Optional[bytes] = None
    config_format: Optional[str] = None   # "xl-text", "json", "sxp", "libvirt-xml"
    details: dict = field(default_factory=dict)


@dataclass
class ImageHeader:
    offset: int
    p2m_size: int
    width: int                    # toolstack unsigned long, bytes (4 or 8)
    guest: str                    # "pv" or "hvm"
    inferred: dict = field(default_factory=dict)   # what was inferred and why


@dataclass
class ExtBlock:
    offset: int
    id: bytes
    size: int
    data: bytes


@dataclass
class PVInfo:
    """PV extended info and the p2m frame list (header of a PV image)."""
    offset: int
    extended: bool                # False for very old streams without ~0 marker
    total_bytes: int
    blocks: List[ExtBlock]
    guest_width: int              # 8 (64-bit guest) or 4 (32-bit PAE guest)
    vcpu_size: int
    extv: bool
    xcnt: int                     # per-vcpu xsave blob size (0: none)
    p2m_frames: np.ndarray
    p2m_frames_offset: int = 0


@dataclass
class PageBatch:
    offset: int
    checkpoint: int
    iteration: int
    count: int
    raw: bytes                    # the entry array as in the stream
    types: np.ndarray             # uint8[count]
    pfns: np.ndarray              # uint64[count]
    data_pfns: np.ndarray         # uint64[n_data], pfns of data-carrying entries
    pages: Optional[memoryview]   # format A page bytes; valid until the next record
    pages_offset: int
    verify: bool = False          # sent after ENABLE_VERIFY_MODE
    compressed: bool = False      # format B: pages come in COMPRESSED_DATA
    # Deferred page data (LegacyStream(defer_pages=True) on a regular file):
    # `pages` is None and the bytes are still in the file, at pages_file_offset
    # of pages_fd, for the consumer to move with pread/copy_file_range.
    pages_fd: int = -1
    pages_file_offset: int = 0

    @property
    def n_data(self):
        return int(self.data_pfns.size)

    @property
    def deferred(self):
        return self.pages is None and self.pages_fd >= 0

    def page_data(self):
        """The page bytes as a buffer, reading deferred data from the file."""
        if self.pages is not None or not self.deferred:
            return self.pages
        import os
        n = self.n_data * 4096
        buf = bytearray(n)
        mv = memoryview(buf)
        done = 0
        while done < n:
            got = os.preadv(self.pages_fd, [mv[done:]], self.pages_file_offset + done)
            if not got:
                from .errors import TruncatedStream
                raise TruncatedStream("page data", self.pages_offset + done, n - done, 0)
            done += got
        return mv


@dataclass
class Chunk:
    """A metadata chunk (negative id)."""
    offset: int
    checkpoint: int
    id: int
    name: str
    value: object = None          # decoded payload (int, dict, bytes) or None
    payload_offset: int = 0
    size: int = 4                 # bytes in the stream, id included


@dataclass
class EndOfBody:
    offset: int
    checkpoint: int


@dataclass
class HVMTail:
    offset: int
    checkpoint: int
    magic_pfns: tuple             # (ioreq, bufioreq, store)
    context: bytes
    context_offset: int


@dataclass
class QemuRecord:
    offset: int
    checkpoint: int
    signature: str                # as in the stream, e.g. "DeviceModelRecord0002"
    data: bytes
    data_offset: int
    variant: str = ""             # "to-eof", "length", "xenserver"


@dataclass
class PVVcpu:
    id: int
    context: bytes
    context_offset: int
    extended: Optional[bytes] = None
    xsave_mask: Optional[int] = None
    xsave: Optional[bytes] = None


@dataclass
class PVTail:
    offset: int
    checkpoint: int
    unmapped_pfns: np.ndarray
    vcpus: List[PVVcpu]
    shared_info: bytes
    shared_info_offset: int


@dataclass
class CheckpointEnd:
    """The tail of a checkpoint has been read in full: it may commit."""
    offset: int                   # where the checkpoint's tail ended
    checkpoint: int
    last: bool                    # no further checkpoint follows
    trailing: int = 0             # bytes ignored after a final checkpoint
