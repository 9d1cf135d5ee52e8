"""Legacy stream -> typed records with offsets.

The reader knows the framing and nothing of guest images: it yields records
(see records.py) in stream order, checkpoint after checkpoint, and leaves
applying them to restore.py.  Page data of a format A batch is handed out as
a memoryview that stays valid only until the next record is requested.
"""
import numpy as np

from . import format as F
from . import infer as _infer
from . import kernels
from .errors import StreamError, TruncatedStream, UnsupportedStream
from .records import (CheckpointEnd, Chunk, EndOfBody, ExtBlock, HVMTail, ImageHeader,
                      PageBatch, PVInfo, PVTail, PVVcpu, QemuRecord)
from .source import open_source
from .wrappers import detect

# Bounds on variable-length metadata, beyond "what the source still holds".
MAX_TOOLSTACK = 64 << 20
MAX_HVM_CONTEXT = 64 << 20
MAX_QEMU = 1 << 30
MAX_EXT_INFO = 1 << 20
MAX_XSAVE = 1 << 20


class LegacyStream:
    """An open legacy stream.

    After construction `wrapper` and `header` (and `pv_info` for PV) are
    known; iterating yields every record from the first chunk on, each with
    its absolute byte offset.  A stream can be iterated once.
    """

    def __init__(self, source, width=None, guest=None, defer_pages=False):
        if width not in (None, 32, 64):
            raise ValueError("width must be 32 or 64")
        if guest not in (None, "pv", "hvm"):
            raise ValueError("guest must be 'pv' or 'hvm'")
        self.src = open_source(source)
        try:
            self._open(width, guest, defer_pages)
        except BaseException:
            self.src.close()
            raise

    def _open(self, width, guest, defer_pages):
        self.defer_pages = defer_pages
        self.wrapper = detect(self.src)
        start = self.src.pos
        head = self.src.peek(_infer.HEAD_BYTES)
        try:
            w, g, why = _infer.infer(head, width // 8 if width else None, guest)
        except StreamError as exc:
            exc.offset = start
            raise
        self.width = w
        self.guest = g
        ul = F.ulong(w)
        p2m_size = ul.unpack(self.src.read(w, "libxc header (p2m_size)"))[0]
        if not 1 <= p2m_size <= F.MAX_PFNS:
            raise StreamError("implausible p2m_size", offset=start,
                              expected="1..2^28 pfns", found=str(p2m_size))
        self.header = ImageHeader(start, p2m_size, w, g, why)
        self.p2m_size = p2m_size
        self.pv_info = self._read_pv_info() if g == "pv" else None
        self._started = False
        # State that decides how later bytes are read.
        self.vcpu_online = [0]

    # ------------------------------------------------------------ helpers
    def _i32(self, what):
        return F.I32.unpack(self.src.read(4, what))[0]

    def _u32(self, what):
        return F.U32.unpack(self.src.read(4, what))[0]

    def _ulong(self, what):
        return F.ulong(self.width).unpack(self.src.read(self.width, what))[0]

    def _bounded(self, n, limit, what, at):
        if n > limit:
            raise StreamError(f"{what} too long", offset=at,
                              expected=f"at most {limit} bytes", found=f"{n} bytes")
        return self.src.read(n, what)

    # ------------------------------------------------------------ PV header
    def _read_pv_info(self):
        src, w = self.src, self.width
        at = src.pos
        ones = (1 << (8 * w)) - 1
        first = self._ulong("PV extended-info marker")
        blocks = []
        guest_width = w
        vcpu_size = F.PV_VCPU_SIZE_64 if w == 8 else F.PV_VCPU_SIZE_32
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
        raw = src.read((nframes - (0 if extended else 1)) * w, "p2m frame list")
        frames = np.frombuffer(raw, dtype="<u8" if w == 8 else "<u4").astype(np.uint64)
        if not extended:
            frames = np.concatenate([np.array([first], dtype=np.uint64), frames])
        return PVInfo(at, extended, total, blocks, guest_width, vcpu_size, extv, xcnt,
                      frames, fl_at)

    # ------------------------------------------------------------ records
    def __iter__(self):
        if self._started:
            raise RuntimeError("a LegacyStream can be iterated only once")
        self._started = True
        return self._records()

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
                    yield self._batch(at, cid, checkpoint, compressed, verify)
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
                yield from self._hvm_tail(checkpoint)
            else:
                yield self._pv_tail(checkpoint)
            end = src.pos
            eof = src.at_eof()
            trailing = 0
            if last and not eof:
                rem = src.remaining()
                trailing = rem if rem is not None else -1
            yield CheckpointEnd(end, checkpoint, last or eof, trailing)
            if last or eof:
                return
            checkpoint += 1

    def _batch(self, at, count, checkpoint, compressed, verify):
        if count > F.MAX_BATCH:
            raise StreamError("page batch too large", offset=at,
                              expected=f"at most {F.MAX_BATCH} entries (MAX_BATCH)",
                              found=f"{count} entries")
        raw = self.src.read(count * self.width, "PFN array")
        types, pfns, data_pfns = kernels.decode_pfns(raw, self.width, self.p2m_size,
                                                     locate=at + 4)
        pages_at = self.src.pos
        pages = None
        where = None
        if not compressed and data_pfns.size:
            try:
                nbytes = data_pfns.size * F.PAGE_SIZE
                if self.defer_pages:
                    where = self.src.defer(nbytes, "page data")
                if where is None:
                    pages = self.src.view(nbytes, "page data")
            except TruncatedStream as exc:
                # Name the page the data ran out in, not just the batch.
                page = min((exc.offset - pages_at) // F.PAGE_SIZE, data_pfns.size - 1)
                raise TruncatedStream(
                    f"data page {page} (pfn {int(data_pfns[page])}) of the {count}-entry "
                    f"batch at offset {at}, which starts at offset "
                    f"{pages_at + page * F.PAGE_SIZE}",
                    exc.offset, pages_at + (page + 1) * F.PAGE_SIZE - exc.offset,
                    exc.offset - pages_at - page * F.PAGE_SIZE) from None
        batch = PageBatch(at, checkpoint, 0, count, raw, types, pfns, data_pfns, pages,
                          pages_at, verify, compressed)
        if where is not None:
            batch.pages_fd, batch.pages_file_offset = where
        return batch

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
            if not 0 <= max_id <= F.MAX_VCPU_ID:
                raise StreamError("bad VCPU_INFO max_vcpu_id", offset=body,
                                  expected=f"0..{F.MAX_VCPU_ID}", found=str(max_id))
            words = max_id // 64 + 1
            bitmap = np.frombuffer(src.read(words * 8, "VCPU_INFO map"), dtype="<u8")
            bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
            online = [int(i) for i in np.flatnonzero(bits[:max_id + 1])]
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
        yield HVMTail(at, checkpoint, magic, context, ctx_at)
        yield self._qemu(checkpoint)

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
                data_at = src.pos
                data = self._bounded(n, MAX_QEMU, "qemu data", data_at - 4)
                return QemuRecord(at, checkpoint, sig.decode() + "\\n", data, data_at,
                                  "xenserver")
            data_at = src.pos
            data = src.read_to_eof("qemu data", MAX_QEMU)
            return QemuRecord(at, checkpoint, sig.decode(), data, data_at, "to-eof")
        if sig in (F.QEMU_V2, F.QEMU_REMUS):
            n = self._u32("qemu record length")
            data_at = src.pos
            data = self._bounded(n, MAX_QEMU, "qemu data", data_at - 4)
            return QemuRecord(at, checkpoint, sig.decode(), data, data_at, "length")
        raise StreamError("bad qemu record signature", offset=at,
                          expected="'QemuDeviceModelRecord', 'DeviceModelRecord0002' or "
                                   "'RemusDeviceModelState'",
                          found=repr(sig))

    def _pv_tail(self, checkpoint):
        src, info = self.src, self.pv_info
        at = src.pos
        count = self._u32("PV tail unmapped pfn count")
        if count > F.MAX_UNMAPPED:
            raise StreamError("bad unmapped pfn count", offset=at,
                              expected=f"at most {F.MAX_UNMAPPED}", found=str(count))
        raw = src.read(count * self.width, "unmapped pfn list")
        unmapped = np.frombuffer(raw, dtype="<u8" if self.width == 8 else "<u4").astype(np.uint64)
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

    def close(self):
        self.src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(source, width=None, guest=None, defer_pages=False):  # noqa: A001 - like builtins.open
    """Open a legacy stream: a path, '-', a binary file object or bytes-like.

    width (32|64) and guest ("pv"|"hvm") override what is inferred.  With
    defer_pages, format A page data of a regular-file source is not read but
    described (PageBatch.pages_fd / pages_file_offset; page_data() reads it).
    """
    return LegacyStream(source, width=width, guest=guest, defer_pages=defer_pages)


