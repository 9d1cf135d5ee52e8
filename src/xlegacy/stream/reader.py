"""Legacy stream -> typed records with offsets.

The reader knows the framing and nothing of guest images: it yields records
(see records.py) in stream order, checkpoint after checkpoint, and leaves
applying them to restorer.py.  Page data of a format A batch is handed out as
a memoryview that stays valid only until the next record is requested.

The framing needs no numpy (the converter reads every stream through this
module and its start-up counts): PFN arrays are checked and their data
entries counted by kernels.count_data; the numpy views of a batch
(PageBatch.types/pfns/data_pfns) are decoded only when a consumer asks.
"""
from __future__ import annotations

import sys
import threading
from array import array

from .. import format as F
from . import infer as _infer
from .. import kernels
from .. import options as _options
from ..errors import StreamError, TruncatedStream, UnsupportedStream
from ..kernels.faults import KernelFault
from .records import (BatchRun, CheckpointEnd, Chunk, EndOfBody, ExtBlock, HVMTail, ImageHeader,
                      PageBatch, PVInfo, PVTail, PVVcpu, QemuRecord)
from .source import open_source
from .wrappers import detect

# Annotations only (`from __future__ import annotations`): typing itself
# costs every command ~3 ms at start-up, and mypy reads this name as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import os
    from typing import Any

    from .._typing import StreamSource
    from ..pagemap import PageMap
    from .records import QemuRecord

# Bounds on variable-length metadata, beyond "what the source still holds".
MAX_TOOLSTACK = 64 << 20
MAX_HVM_CONTEXT = 64 << 20
MAX_QEMU = 1 << 30
MAX_EXT_INFO = 1 << 20
MAX_XSAVE = 1 << 20
# Window sizes for BatchRun (LegacyStream coalesce=True); the smallest
# holds a whole batch of 1024 64-bit entries, so the window can grow.
RUN_WINDOW_MIN = 16 << 10
RUN_WINDOW_MAX = 1 << 20
# Type nibbles d..f (BROKEN, XALLOC, XTAB) carry no page: as the top byte of
# an entry's low word, 0xd0..0xff.
_NO_DATA_BYTES = bytes(range(0xD0))


def ulongs(raw, width):
    """Little-endian unsigned longs of `width` bytes as an array('Q')."""
    a = array("Q" if width == 8 else "I")
    if a.itemsize != width:   # pragma: no cover - exotic platforms
        a = array(next(c for c in "ILQ" if array(c).itemsize == width))
    a.frombytes(raw)
    if sys.byteorder != "little":   # pragma: no cover
        a.byteswap()
    return a if a.typecode == "Q" else array("Q", a)


def page_truncation(batch, exc):
    """A TruncatedStream inside a batch's page data, named by the page it
    ran out in (its pfn, its offset) rather than by the batch alone."""
    pages_at = batch.pages_offset
    page = max(0, min((exc.offset - pages_at) // F.PAGE_SIZE, batch.n_data - 1))
    err = TruncatedStream(
        f"data page {page} (pfn {_data_pfn(batch, page)}) of the {batch.count}-entry "
        f"batch at offset {batch.offset}, which starts at offset "
        f"{pages_at + page * F.PAGE_SIZE}",
        exc.offset, F.PAGE_SIZE, exc.offset - pages_at - page * F.PAGE_SIZE)
    err.in_page_data = True          # every byte up to the cut fits the reading (inference)
    return err


def _data_pfn(batch, page):
    """The pfn of a batch's page-th data entry (error path: no numpy)."""
    seen = 0
    for x in ulongs(batch.raw, batch.width):
        if F.DATA_TYPES[F.entry_type(x)]:
            if seen == page:
                return F.entry_pfn(x)
            seen += 1
    return 0


def check_options(width, guest):
    """ValueError unless width is None|32|64 and guest None|"pv"|"hvm"."""
    _options.width(width)
    _options.guest(guest)


# Guards LegacyStream._started (see __iter__).
_ITER_LOCK = threading.Lock()

class LegacyStream:
    """An open legacy stream.

    After construction `wrapper` and `header` (and `pv_info` for PV) are
    known; iterating yields every record from the first chunk on, each with
    its absolute byte offset.  A stream can be iterated once.

    defer_pages: format A page data of a regular-file source is not read but
        described (PageBatch.pages_fd / pages_file_offset; page_data() reads
        it); other sources hand out the bytes as usual.
    leave_data: for consumers that move bytes themselves (the converter):
        page data and qemu payloads are not read at all.  PageBatch.pages and
        QemuRecord.data are None; the bytes follow in `src` at pages_offset /
        data_offset, for the consumer to move (copy, splice, defer) or read
        (qemu_data()) before it asks for the next record, which skips
        whatever it left.
    lookahead: False: never read past what the stream needs to find out
        whether a checkpoint is the last.  CheckpointEnd.last then only says
        whether LAST_CHECKPOINT was seen, and the end of the stream is
        noticed when the next record is asked for (a pipe shared with a
        live sender is not read into).
    lenient: accept what Xen's converter passes on although libxc refuses
        it: PFN entries with bits 63..32 set, type 5..7 or a pfn beyond
        p2m_size (PageBatch.odd names the first; every entry with a type
        nibble below 0xd then counts as data) and a negative VCPU_INFO
        max_vcpu_id (no vcpu online).  Consumers report what they accept.
        (A p2m_size outside 1..2^28 needs force_reading.)
    observer: a callable given every record before it is yielded (may also
        be set as the attribute before iterating).
    defer_compressed: COMPRESSED_DATA payloads of a regular-file source are
        not read but described: Chunk.value is None and Chunk.where is
        (fd, file offset, length).
    coalesce: after a page batch that carries no page, the batches of the
        same kind that follow it come as one BatchRun record (read by one
        kernel call from a window of the source) rather than a PageBatch
        each.  For consumers that only count entries (restore, info,
        verify); needs numpy.
    force_reading: read the stream as the given width and guest even where
        the bytes contradict them (a reading that does not get through the
        first checkpoint while another one does; with lenient also a
        p2m_size outside 1..2^28).  Without it such a width/guest is refused
        with an error naming the reading the bytes fit (see infer.py).

    Inference (width or guest not given) proves its reading on the whole
    stream before anything is yielded: see infer.py.  Options used by it:
    wrapper (a Wrapper record: the source is at the libxc image, detection
    is skipped), pv_guest_width (the guest width of a PV stream without
    extended info), framing_only (leave_data, and COMPRESSED_DATA payloads
    skipped too), prove=False (read as told; nothing is checked ahead).
    """

    def __init__(self, source: StreamSource, width: int | None = None,
                 guest: str | None = None, defer_pages: bool = False, *,
                 leave_data: bool = False, lookahead: bool = True, lenient: bool = False,
                 observer: Any = None, defer_compressed: bool = False, coalesce: bool = False,
                 force_reading: bool = False, wrapper: Any = None,
                 pv_guest_width: int | None = None, framing_only: bool = False,
                 prove: bool = True) -> None:
        check_options(width, guest)
        self.coalesce = coalesce
        self._window = RUN_WINDOW_MIN
        self.defer_pages = defer_pages
        self.defer_compressed = defer_compressed
        self.framing_only = framing_only
        self.leave_data = leave_data or framing_only
        self.lookahead = lookahead
        self.lenient = lenient
        self.observer = observer
        self.src = open_source(source)
        try:
            self._open(width, guest, wrapper, pv_guest_width, force_reading, prove)
        except BaseException:
            if self.src is not source:     # a Source handed in stays the caller's
                self.src.close()
            raise

    def _open(self, width, guest, wrapper, pv_guest_width, force, prove):
        self.wrapper = wrapper if wrapper is not None else detect(self.src)
        start = self.src.pos
        # What the proof read through (None: not proven): lets a consumer
        # prepare for later checkpoints before it gets there.
        self.proven_checkpoints = None
        if prove and not (force and width and guest):
            reading = _infer.choose(self.src, self.wrapper, width // 8 if width else None,
                                    guest, lenient=self.lenient)
            w, g, why = reading.width, reading.guest, reading.why
            pv_guest_width = reading.pv_guest_width
            self.proven_checkpoints = reading.checkpoints
        else:
            w, g, why = width // 8, guest, {"width": "given", "guest": "given"}
        self.width = w
        self.guest = g
        self.pv_guest_width = pv_guest_width
        p2m_size = self._ulong("libxc header (p2m_size)")
        # Only a consumer that never sizes anything by p2m_size (the converter:
        # lenient) may take one out of range, and only when forced.
        if not 1 <= p2m_size <= F.MAX_PFNS and not (force and self.lenient):
            raise StreamError("implausible p2m_size", offset=start,
                              expected="1..2^28 pfns", found=str(p2m_size))
        self.header = ImageHeader(start, p2m_size, w, g, why)
        self.p2m_size = p2m_size
        self.pv_info = self._read_pv_info() if g == "pv" else None
        self._started = False
        self._left = None            # (end, batch or None): data left in the source
        # State that decides how later bytes are read.
        self.vcpu_online = [0]

    # ------------------------------------------------------------ helpers
    def _i32(self, what):
        return F.I32.unpack(self.src.read(4, what))[0]

    def _u32(self, what):
        return F.U32.unpack(self.src.read(4, what))[0]

    def _ulong(self, what):
        return F.ulong(self.width).unpack(self.src.read(self.width, what))[0]

    @staticmethod
    def _check_length(n, limit, what, at):
        if n > limit:
            raise StreamError(f"{what} too long", offset=at,
                              expected=f"at most {limit} bytes", found=f"{n} bytes")

    def _bounded(self, n, limit, what, at):
        self._check_length(n, limit, what, at)
        return self.src.read(n, what)

    # ------------------------------------------------------------ PV header
    def _read_pv_info(self):
        src, w = self.src, self.width
        at = src.pos
        ones = (1 << (8 * w)) - 1
        first = self._ulong("PV extended-info marker")
        blocks = []
        # Without extended info nothing in the header says the guest's width:
        # inference proves it from the tail's vcpu context size and the
        # page-table levels (pv_guest_width); libxc assumed its own width.
        guest_width = self.pv_guest_width or w
        vcpu_size = F.PV_VCPU_SIZE_64 if guest_width == 8 else F.PV_VCPU_SIZE_32
        extv = False
        xcnt = 0
        total = 0
        extended = first == ones
        if extended:
            total = self._u32("extended-info size")
            if total > MAX_EXT_INFO:
                raise StreamError("extended info too long", offset=at + w,
                                  expected=f"at most {MAX_EXT_INFO} bytes", found=str(total))
            used = 0
            while used < total:
                b_at = src.pos
                if total - used < F.EXT_BLOCK.size:
                    raise StreamError("extended-info block header overruns total_bytes",
                                      offset=b_at, expected=f"{F.EXT_BLOCK.size} bytes",
                                      found=f"{total - used} left of {total}")
                bid, size = F.EXT_BLOCK.unpack(src.read(F.EXT_BLOCK.size, "extended-info block"))
                used += F.EXT_BLOCK.size
                if size > total - used:
                    raise StreamError(f"extended-info block {bid!r} overruns total_bytes",
                                      offset=b_at + 4, expected=f"at most {total - used}",
                                      found=str(size))
                data = src.read(size, f"extended-info block {bid!r}")
                used += size
                blocks.append(ExtBlock(b_at, bid, size, data))
                if bid == b"vcpu":
                    if size == F.PV_VCPU_SIZE_64:
                        guest_width = 8
                    elif size == F.PV_VCPU_SIZE_32:
                        guest_width = 4
                    else:
                        raise StreamError("bad 'vcpu' extended-info block size", offset=b_at + 4,
                                          expected="0x1430 (64-bit guest) or 0xaf0 (32-bit guest)",
                                          found=hex(size))
                    vcpu_size = size
                elif bid == b"extv":
                    extv = True
                elif bid == b"xcnt":
                    if size < 4:
                        raise StreamError("short 'xcnt' block", offset=b_at + 4,
                                          expected="at least 4 bytes", found=str(size))
                    xcnt = F.U32.unpack_from(data, 0)[0]
                    if xcnt and (xcnt < 16 or xcnt > MAX_XSAVE):
                        raise StreamError("bad xsave size in 'xcnt' block", offset=b_at + 8,
                                          expected=f"0 or 16..{MAX_XSAVE}", found=str(xcnt))
                # any other id: libxc skips it; it stays in `blocks` for the report
        nframes = F.p2m_frame_count(self.p2m_size, guest_width)
        fl_at = src.pos if extended else at
        frames = ulongs(src.read((nframes - (0 if extended else 1)) * w, "p2m frame list"), w)
        if not extended:
            frames.insert(0, first)
        return PVInfo(at, extended, total, blocks, guest_width, vcpu_size, extv, xcnt,
                      frames, fl_at)

    # ------------------------------------------------------------ records
    def __iter__(self):
        # The check and the claim happen under a lock, so two threads racing
        # for the same stream get one iterator and one clear error.
        with _ITER_LOCK:
            if self._started:
                raise RuntimeError("a LegacyStream can be iterated only once")
            self._started = True
        if self.observer is None:
            return self._records()
        return self._observed(self._records())

    def _observed(self, records):
        for rec in records:
            self.observer(rec)
            yield rec

    def _records(self):
        src = self.src
        checkpoint = 1
        compress_next = False        # ENABLE_COMPRESSION seen in checkpoint 1
        while True:
            compressed = checkpoint > 1 and compress_next
            verify = False
            last = False
            # ---- body
            while True:
                at = src.pos
                cid = self._i32("chunk id")
                if cid > 0:
                    batch = self._batch(at, cid, checkpoint, compressed, verify)
                    yield batch
                    self._skip_left()
                    if self.coalesce and not batch.n_data and batch.odd is None:
                        run = self._run(checkpoint, compressed, verify)
                        if run is not None:
                            yield run
                    continue
                if cid == 0:
                    yield EndOfBody(at, checkpoint)
                    break
                chunk = self._chunk(at, cid, checkpoint, compressed)
                if cid == F.ENABLE_VERIFY_MODE:
                    verify = True
                elif cid == F.LAST_CHECKPOINT:
                    last = True
                elif cid == F.ENABLE_COMPRESSION and checkpoint == 1:
                    compress_next = True
                elif cid == F.VCPU_INFO:
                    self.vcpu_online = chunk.value["online"]
                yield chunk
            # ---- tail
            if self.guest == "hvm":
                yield self._hvm_tail(checkpoint)
                yield self._qemu(checkpoint)
                self._skip_left()
            else:
                yield self._pv_tail(checkpoint)
            end = src.pos
            eof = self.lookahead and src.at_eof()
            trailing = 0
            if last and self.lookahead and not eof:
                rem = src.remaining()
                trailing = rem if rem is not None else -1
            yield CheckpointEnd(end, checkpoint, last or eof, trailing)
            # Without lookahead the end of the stream is looked for only now,
            # when the consumer asks for more.
            if last or eof or (not self.lookahead and src.at_eof()):
                return
            checkpoint += 1

    def _batch(self, at, count, checkpoint, compressed, verify):
        if count > F.MAX_BATCH:
            raise StreamError("page batch too large", offset=at,
                              expected=f"at most {F.MAX_BATCH} entries (MAX_BATCH)",
                              found=f"{count} entries")
        src, w = self.src, self.width
        raw = src.read(count * w, "PFN array")
        odd = None
        try:
            n_data = kernels.count_data(raw, w, self.p2m_size, locate=at + 4)
        except KernelFault as exc:
            if not self.lenient:
                raise
            odd = exc
            n_data = count - len(raw[3::w].translate(None, _NO_DATA_BYTES))
        batch = PageBatch(at, checkpoint, count, raw, w, self.p2m_size, n_data, None,
                          src.pos, verify, compressed, odd=odd)
        if compressed or not n_data:
            return batch
        nbytes = n_data * F.PAGE_SIZE
        try:
            if self.leave_data:
                src.need(nbytes, "page data")
                self._left = (batch.pages_offset + nbytes, batch)
                return batch
            where = src.defer(nbytes, "page data") if self.defer_pages else None
            if where is None:
                batch.pages = src.view(nbytes, "page data")
            else:
                batch.pages_fd, batch.pages_file_offset = where
        except TruncatedStream as exc:
            raise page_truncation(batch, exc) from None
        return batch

    def _run(self, checkpoint, compressed, verify):
        """coalesce: the no-data batches right after one, as a BatchRun
        (None when the next record is something else).  The window grows
        while runs fill it, so a long run costs a few large reads and a
        lone no-data batch one small one."""
        src = self.src
        at = src.pos
        window = src.peek_some(self._window)
        nb, used, counts, types, pfns = kernels.scan_nodata(window, self.width,
                                                            self.p2m_size)
        if used > len(window) // 2:
            self._window = min(2 * self._window, RUN_WINDOW_MAX)
        else:
            self._window = RUN_WINDOW_MIN
        if not nb:
            return None
        src.skip(used, "page batches")
        return BatchRun(at, checkpoint, at + used, counts, types, pfns, verify, compressed)

    def _skip_left(self):
        """leave_data: skip what the consumer left of a record's data."""
        if self._left is None:
            return
        end, batch = self._left
        self._left = None
        n = end - self.src.pos
        if n > 0:
            try:
                self.src.skip(n, "page data" if batch is not None else "qemu data")
            except TruncatedStream as exc:
                if batch is None:
                    raise
                raise page_truncation(batch, exc) from None

    def record_end(self) -> int:
        """Where the record last yielded ends, its page or qemu data included
        (also when left in the source for the consumer)."""
        return self._left[0] if self._left is not None else self.src.pos

    def qemu_data(self, rec: QemuRecord) -> bytes:
        """A QemuRecord's payload; with leave_data it is read from the source
        (before the next record is asked for)."""
        if rec.data is None:
            if self.src.pos != rec.data_offset:
                raise RuntimeError("qemu data must be read before the next record")
            rec.data = self.src.read(rec.length, "qemu data")
        return rec.data

    def _chunk(self, at, cid, checkpoint, compressed):
        src = self.src
        name = F.CHUNK_NAMES.get(cid)
        if name is None:
            raise StreamError("unknown chunk id", offset=at,
                              expected="a batch size 1..1024, 0, or a chunk id -1..-20",
                              found=str(cid))
        body = src.pos
        value = None
        if cid in F.HVM_PARAM_CHUNKS:
            _pad, value = F.PAD_U64.unpack(src.read(F.PAD_U64.size, name))
        elif cid == F.VCPU_INFO:
            max_id = self._i32("VCPU_INFO max_vcpu_id")
            if max_id > F.MAX_VCPU_ID or (max_id < 0 and not self.lenient):
                raise StreamError("bad VCPU_INFO max_vcpu_id", offset=body,
                                  expected=f"0..{F.MAX_VCPU_ID}", found=str(max_id))
            words = max(max_id // 64 + 1, 0)
            bits = int.from_bytes(src.read(words * 8, "VCPU_INFO map"), "little")
            bits &= (1 << (max_id + 1)) - 1 if max_id >= 0 else 0
            online = []
            while bits:
                low = bits & -bits
                online.append(low.bit_length() - 1)
                bits ^= low
            value = {"max_id": max_id, "online": online}
        elif cid == F.TSC_INFO:
            mode, nsec, khz, inc = F.TSC_INFO_LAYOUT.unpack(
                src.read(F.TSC_INFO_LAYOUT.size, name))
            value = {"mode": mode, "nsec": nsec, "khz": khz, "incarnation": inc}
        elif cid == F.TOOLSTACK:
            n = self._u32("TOOLSTACK length")
            value = self._bounded(n, MAX_TOOLSTACK, "TOOLSTACK data", body)
        elif cid == F.COMPRESSED_DATA:
            n = self._ulong("COMPRESSED_DATA length")
            if not compressed:
                raise StreamError("COMPRESSED_DATA outside a compressed checkpoint", offset=at,
                                  expected="page data only after ENABLE_COMPRESSION, "
                                           "from checkpoint 2 on",
                                  found=f"{n} compressed bytes in checkpoint {checkpoint}")
            if self.framing_only:
                src.skip(n, "COMPRESSED_DATA")
                return Chunk(at, checkpoint, cid, name, None, body, src.pos - at)
            where = src.defer(n, "COMPRESSED_DATA") if self.defer_compressed else None
            if where is not None:
                # Left in the file for the consumer to pread where it wants it.
                return Chunk(at, checkpoint, cid, name, None, body, src.pos - at,
                             where=(where[0], where[1], n))
            # Bounded by what the source still holds; pipes read in steps.
            value = src.read(n, "COMPRESSED_DATA")
        elif cid in (F.TMEM, F.TMEM_EXTRA):
            raise UnsupportedStream(f"{name} chunk (transcendent memory state) is not "
                                    "supported; the guest used tmem", offset=at)
        # ENABLE_VERIFY_MODE, LAST_CHECKPOINT, ENABLE_COMPRESSION carry nothing.
        return Chunk(at, checkpoint, cid, name, value, body, src.pos - at)

    # ------------------------------------------------------------ tails
    def _hvm_tail(self, checkpoint):
        src = self.src
        at = src.pos
        magic = F.MAGIC_PFNS.unpack(src.read(F.MAGIC_PFNS.size, "HVM tail magic pfns"))
        n = self._u32("HVM context length")
        ctx_at = src.pos
        context = self._bounded(n, MAX_HVM_CONTEXT, "HVM context", ctx_at - 4)
        return HVMTail(at, checkpoint, magic, context, ctx_at)

    def _qemu(self, checkpoint):
        src = self.src
        at = src.pos
        sig = src.read(F.QEMU_SIG_LEN, "qemu record signature")
        if sig == F.QEMU_TO_EOF:
            nxt = src.peek(5)
            if nxt[:1] == b"\n" and len(nxt) == 5 and (
                    self.wrapper.kind == "xenserver"
                    or (src.remaining() is not None
                        and int.from_bytes(nxt[1:5], "big") == src.remaining() - 5)):
                src.skip(1, "XenServer qemu record")
                n = int.from_bytes(src.read(4, "XenServer qemu length"), "big")
                return self._qemu_payload(at, checkpoint, sig.decode() + "\\n", n,
                                          "xenserver")
            rem = src.remaining()
            if self.leave_data and rem is not None:
                return self._qemu_payload(at, checkpoint, sig.decode(), rem, "to-eof")
            data_at = src.pos
            data = src.read_to_eof("qemu data", MAX_QEMU)
            return QemuRecord(at, checkpoint, sig.decode(), data, data_at, "to-eof")
        if sig in (F.QEMU_V2, F.QEMU_REMUS):
            n = self._u32("qemu record length")
            return self._qemu_payload(at, checkpoint, sig.decode(), n, "length")
        raise StreamError("bad qemu record signature", offset=at,
                          expected="'QemuDeviceModelRecord', 'DeviceModelRecord0002' or "
                                   "'RemusDeviceModelState'",
                          found=repr(sig))

    def _qemu_payload(self, at, checkpoint, signature, n, variant):
        src = self.src
        data_at = src.pos
        if variant != "to-eof":
            self._check_length(n, MAX_QEMU, "qemu data", data_at - 4)
        if not self.leave_data:
            return QemuRecord(at, checkpoint, signature, src.read(n, "qemu data"), data_at,
                              variant)
        src.need(n, "qemu data")
        self._left = (data_at + n, None)
        return QemuRecord(at, checkpoint, signature, None, data_at, variant, n)

    def _pv_tail(self, checkpoint):
        src, info = self.src, self.pv_info
        at = src.pos
        count = self._u32("PV tail unmapped pfn count")
        if count > F.MAX_UNMAPPED:
            raise StreamError("bad unmapped pfn count", offset=at,
                              expected=f"at most {F.MAX_UNMAPPED}", found=str(count))
        unmapped = ulongs(src.read(count * self.width, "unmapped pfn list"), self.width)
        vcpus = []
        for vid in self.vcpu_online:
            c_at = src.pos
            ctx = src.read(info.vcpu_size, f"vcpu {vid} context")
            ext = src.read(F.PV_EXT_VCPU_SIZE, f"vcpu {vid} extended context") if info.extv else None
            mask = xsave = None
            if info.xcnt:
                x_at = src.pos
                blob = src.read(info.xcnt, f"vcpu {vid} xsave area")
                mask, size = F.XSAVE_HEAD.unpack_from(blob, 0)
                if size != info.xcnt - F.XSAVE_HEAD.size:
                    raise StreamError(f"vcpu {vid} xsave size disagrees with 'xcnt'",
                                      offset=x_at + 8,
                                      expected=str(info.xcnt - F.XSAVE_HEAD.size),
                                      found=str(size))
                xsave = blob[F.XSAVE_HEAD.size:]
            vcpus.append(PVVcpu(vid, ctx, c_at, ext, mask, xsave))
        si_at = src.pos
        shared = src.read(F.SHARED_INFO_SIZE, "shared info page")
        return PVTail(at, checkpoint, unmapped, vcpus, shared, si_at)

    def pages(self, checkpoint: int | None = None,
              cache_dir: str | os.PathLike[str] | None = None) -> PageMap:
        """A PageMap of this stream (PFN -> where its page lies in the file),
        built from the framing alone; see xlegacy.pagemap.  Needs a regular
        file and a stream not yet iterated (this consumes it)."""
        from ..pagemap import build    # numpy lives above the stream layer
        return build(self, checkpoint=checkpoint, cache_dir=cache_dir)

    def close(self) -> None:
        self.src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(source: StreamSource, width: int | None = None,  # noqa: A001
         guest: str | None = None, defer_pages: bool = False, **options: Any) -> LegacyStream:
    """Open a legacy stream: a path, '-', a file descriptor, a binary file
    object or bytes-like (like builtins.open, a function of this name).

    width (32|64) and guest ("pv"|"hvm") override what is inferred.  With
    defer_pages, format A page data of a regular-file source is not read but
    described (PageBatch.pages_fd / pages_file_offset; page_data() reads it).
    Other options: see LegacyStream.
    """
    return LegacyStream(source, width=width, guest=guest, defer_pages=defer_pages, **options)


