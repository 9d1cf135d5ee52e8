"""The typed records a legacy stream is read into.  Each carries `offset`,
the absolute byte offset where it starts in the input.

Nothing here imports numpy, dataclasses or typing: the converter reads every
stream through these classes and its start-up time counts (dataclasses
alone costs it ~15 ms).  Record gives each class what a dataclass would:
construction by position or keyword from the annotated fields (defaults
from the class body, `Factory(dict)` for mutable ones), repr and equality.
"""
from __future__ import annotations

from .. import format as F
from ..fileio import pread_exact


class _Default:
    def __init__(self, make):
        self.make = make


def Factory(make):
    """Default of a mutable field: Factory(dict) gives each record its own.
    (A function, so that type checkers take `details: dict = Factory(dict)`
    as they take dataclasses.field: the value is the field's type.)"""
    return _Default(make)


class Record:
    _fields = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fields = []
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("__annotations__", {}):
                if name not in fields:
                    fields.append(name)
        cls._fields = tuple(fields)

    def __init__(self, *args, **kwargs):
        cls = type(self)
        if len(args) > len(cls._fields):
            raise TypeError(f"{cls.__name__}() takes {len(cls._fields)} arguments, "
                            f"{len(args)} given")
        values = dict(zip(cls._fields, args))
        for name, value in kwargs.items():
            if name not in cls._fields or name in values:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated "
                                f"argument {name!r}")
            values[name] = value
        for name in cls._fields:
            if name not in values:
                try:
                    default = getattr(cls, name)
                except AttributeError:
                    raise TypeError(f"{cls.__name__}() missing argument {name!r}") from None
                values[name] = default.make() if isinstance(default, _Default) else default
        self.__dict__.update(values)

    def __repr__(self):
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # type: ignore[assignment]   # mutable: unhashable, as a dataclass with eq


class Wrapper(Record):
    kind: str                     # "none", "xl", "xend", "xenserver", "libvirt"
    offset: int
    image_offset: int             # where the libxc image starts
    config: bytes | None = None
    config_format: str | None = None   # "xl-text", "json", "sxp", "libvirt-xml"
    details: dict = Factory(dict)


class ImageHeader(Record):
    offset: int
    p2m_size: int
    width: int                    # toolstack unsigned long, bytes (4 or 8)
    guest: str                    # "pv" or "hvm"
    inferred: dict = Factory(dict)   # what was inferred and why


class ExtBlock(Record):
    offset: int
    id: bytes
    size: int
    data: bytes


class PVInfo(Record):
    """PV extended info and the p2m frame list (header of a PV image)."""
    offset: int
    extended: bool                # False for very old streams without ~0 marker
    total_bytes: int
    blocks: list                  # [ExtBlock] in stream order
    guest_width: int              # 8 (64-bit guest) or 4 (32-bit PAE guest)
    vcpu_size: int
    extv: bool
    xcnt: int                     # per-vcpu xsave blob size (0: none)
    p2m_frames: object            # array.array("Q") of frame numbers
    p2m_frames_offset: int = 0


class PageBatch(Record):
    """A page batch: `count` PFN entries (`raw`, as in the stream), `n_data`
    of which carry a page.

    types, pfns and data_pfns are numpy arrays (uint8[count], uint64[count],
    uint64[n_data]) decoded from `raw` on first access, so that a consumer
    that only moves the bytes never loads numpy.
    """
    offset: int
    checkpoint: int
    count: int
    raw: bytes                    # the entry array as in the stream
    width: int                    # bytes per entry (4 or 8)
    p2m_size: int
    n_data: int                   # entries that carry a page
    pages: memoryview | None      # format A page bytes; valid until the next record
    pages_offset: int
    verify: bool = False          # sent after ENABLE_VERIFY_MODE
    compressed: bool = False      # format B: pages come in COMPRESSED_DATA
    # Deferred page data (LegacyStream(defer_pages=True) on a regular file):
    # `pages` is None and the bytes are still in the file, at pages_file_offset
    # of pages_fd, for the consumer to move with pread/copy_file_range.
    pages_fd: int = -1
    pages_file_offset: int = 0
    # LegacyStream(lenient=True) only: the first entry libxc refuses (a
    # KernelFault: index, offset, code), passed on as Xen's converter does.
    # Such a batch counts every entry with a type nibble below 0xd as data.
    odd: object = None

    @property
    def types(self):
        return self._decoded()[0]

    @property
    def pfns(self):
        return self._decoded()[1]

    @property
    def data_pfns(self):
        return self._decoded()[2]

    def _decoded(self):
        d = self.__dict__.get("_decoded_arrays")
        if d is None:
            if self.odd is None:
                from .. import kernels
                d = kernels.decode_pfns(self.raw, self.width, self.p2m_size,
                                        locate=self.offset + 4)
            else:
                import numpy as np
                e = np.frombuffer(self.raw, "<u8" if self.width == 8 else "<u4") \
                    .astype(np.uint64)
                t = ((e >> np.uint64(F.ENTRY_TYPE_SHIFT)) & np.uint64(0xF)).astype(np.uint8)
                p = e & np.uint64(F.ENTRY_PFN_MASK)
                d = (t, p, p[np.array(F.DATA_TYPES)[t]])
            self.__dict__["_decoded_arrays"] = d
        return d

    @property
    def deferred(self):
        return self.pages is None and self.pages_fd >= 0

    def page_data(self):
        """The page bytes as a buffer, reading deferred data from the file."""
        if self.pages is not None or not self.deferred:
            return self.pages
        mv = memoryview(bytearray(self.n_data * 4096))
        pread_exact(self.pages_fd, mv, self.pages_file_offset, "page data", self.pages_offset)
        return mv


class Chunk(Record):
    """A metadata chunk (negative id)."""
    offset: int
    checkpoint: int
    id: int
    name: str
    value: object = None          # decoded payload (int, dict, bytes) or None
    payload_offset: int = 0
    size: int = 4                 # bytes in the stream, id included
    where: object = None          # deferred COMPRESSED_DATA: (fd, file offset, length)


class EndOfBody(Record):
    offset: int
    checkpoint: int


class HVMTail(Record):
    offset: int
    checkpoint: int
    magic_pfns: tuple             # (ioreq, bufioreq, store)
    context: bytes
    context_offset: int


class QemuRecord(Record):
    offset: int
    checkpoint: int
    signature: str                # as in the stream, e.g. "DeviceModelRecord0002"
    data: bytes | None            # None: left in the source (LegacyStream(leave_data=True))
    data_offset: int
    variant: str = ""             # "to-eof", "length", "xenserver"
    length: int = -1              # payload bytes (-1: len(data))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.length < 0:
            self.length = len(self.data)


class PVVcpu(Record):
    id: int
    context: bytes
    context_offset: int
    extended: bytes | None = None
    xsave_mask: int | None = None
    xsave: bytes | None = None


class PVTail(Record):
    offset: int
    checkpoint: int
    unmapped_pfns: object         # array.array("Q")
    vcpus: list                   # [PVVcpu]
    shared_info: bytes
    shared_info_offset: int


class BatchRun(Record):
    """Consecutive page batches none of whose entries carries a page (XTAB,
    XALLOC, BROKEN), read in one step: a stream may send millions of
    one-entry batches, and a record each would cost more than the bytes.
    Only a LegacyStream opened with coalesce=True yields these; the first
    batch of such a run still comes as a PageBatch.  Arrays are numpy:
    counts uint32[batches] (entries per batch), types uint8[entries],
    pfns uint64[entries]."""
    offset: int                   # the first batch's chunk id
    checkpoint: int
    end: int                      # just after the last batch
    counts: object
    types: object
    pfns: object
    verify: bool = False
    compressed: bool = False

    @property
    def batches(self):
        return int(self.counts.size)


class CheckpointEnd(Record):
    """The tail of a checkpoint has been read in full: it may commit."""
    offset: int                   # where the checkpoint's tail ended
    checkpoint: int
    last: bool                    # no further checkpoint follows
    trailing: int = 0             # bytes ignored after a final checkpoint
