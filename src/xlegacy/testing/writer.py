"""Records and guest state -> Xen legacy stream bytes.

Two levels:

* StreamWriter writes the stream element by element, in the order the
  methods are called: wrapper and libxc header (in the constructor), page
  batches, metadata chunks, the end of a body, HVM or PV tails.  Checkpoints
  follow one another: every tail ends one.  Once ENABLE_COMPRESSION was
  written in checkpoint 1, later checkpoints are format B: batches carry the
  PFN array only and their pages go through a Xen-like compressor
  (compress.Compressor) whose COMPRESSED_DATA chunks are interleaved with
  the batches where Xen's saver would put them.

* write_guest() / make_stream() build a whole valid stream from a guest
  image (a numpy array, a memmap or a callable returning pages) and options,
  in the order Xen's xc_domain_save() writes things, and return a
  WriteResult that can rebuild the image a correct restore must produce.

Page data is gathered with numpy, one operation per batch (a contiguous pfn
range is written straight from the image without a copy), and streamed to
the output, so multi-GiB streams are written at file-write speed.

    w = StreamWriter("guest.save", width=8, guest="hvm", p2m_size=1024)
    w.tsc_info(mode=0, nsec=1, khz=2000000, incarnation=1)
    w.send(np.arange(1024), image=img)        # batches of 1024
    w.vcpu_info([0, 1])
    w.hvm_params({"ident_pt": 0xfeffd000})
    w.end_body()
    w.hvm_tail((0xfeff0, 0xfeff1, 0xfeff2), context=hvm_context_blob(2), qemu=qemu_blob())
    w.close()
"""
import hashlib
import io
import os
import struct
from dataclasses import dataclass, field
from collections.abc import Sequence

import numpy as np

from .. import format as F
from .compress import Compressor, is_raw_type

PAGE = F.PAGE_SIZE
ENTRY_PFN_MASK = F.ENTRY_PFN_MASK
BARE_XTAB = F.BARE_XTAB

_DATA_TYPES = np.array(F.DATA_TYPES, dtype=bool)

# Xen's order of the pad+u64 chunks at the end of a body (xc_domain_save).
XEN_PARAM_ORDER = (
    F.HVM_GENERATION_ID_ADDR, F.HVM_IDENT_PT, F.HVM_PAGING_RING_PFN,
    F.HVM_MONITOR_RING_PFN, F.HVM_SHARING_RING_PFN, F.HVM_VM86_TSS,
    F.HVM_CONSOLE_PFN, F.HVM_ACPI_IOPORTS_LOCATION, F.HVM_VIRIDIAN,
    F.HVM_IOREQ_SERVER_PFN, F.HVM_NR_IOREQ_SERVER_PAGES,
)
_PARAM_IDS: dict[str | int, int] = {name: cid for cid, (name, _num) in F.HVM_PARAM_CHUNKS.items()}
_PARAM_IDS.update({F.CHUNK_NAMES[cid]: cid for cid in F.HVM_PARAM_CHUNKS})
_PARAM_IDS.update({num: cid for cid, (_name, num) in F.HVM_PARAM_CHUNKS.items()})
_PARAM_IDS.update({cid: cid for cid in F.HVM_PARAM_CHUNKS})


def _param_id(which):
    """Chunk id of a pad+u64 param given as chunk id (-3), Xen HVM_PARAM_*
    number (12), param name ("ident_pt") or chunk name ("HVM_IDENT_PT")."""
    cid = _PARAM_IDS.get(which)
    if cid is None:
        raise ValueError(f"not a pad+u64 HVM param chunk: {which!r}")
    return cid

# qemu record variants: name -> (signature bytes, layout)
QEMU_VARIANTS = {
    "DeviceModelRecord0002": (F.QEMU_V2, "length"),
    "v2": (F.QEMU_V2, "length"),
    "libxl": (F.QEMU_V2, "length"),
    "RemusDeviceModelState": (F.QEMU_REMUS, "length"),
    "remus": (F.QEMU_REMUS, "length"),
    "QemuDeviceModelRecord": (F.QEMU_TO_EOF, "to-eof"),
    "to-eof": (F.QEMU_TO_EOF, "to-eof"),
    "xend": (F.QEMU_TO_EOF, "to-eof"),
    "xenserver": (F.XENSERVER_QEMU_MAGIC, "xenserver"),
    "QemuDeviceModelRecord\\n": (F.XENSERVER_QEMU_MAGIC, "xenserver"),
}

WRAPPERS = (None, "none", "xl", "xend", "xenserver", "libvirt")


# ----------------------------------------------------------------- helpers
def _bytes(data):
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode("utf-8")
    return bytes(data)


def _filler(n, seed):
    """n deterministic pseudo-random bytes: SHAKE-256 of repr(seed), so the
    bytes never depend on numpy's generator versions."""
    return hashlib.shake_256(repr(seed).encode()).digest(n) if n > 0 else b""


def hvm_context_blob(nr_vcpus=1, seed=0, cpu_size=1024, gtsc_khz=2000000, cr3=None):
    """A plausible hvm_save blob: the header record (typecode 1, magic
    0x54381286), one CPU record (typecode 2, Xen's struct hvm_hw_cpu) per
    vcpu, and the END record.  The vcpus are in 64-bit long mode with 4-level
    paging; cr3 (a physical address, or a list of one per vcpu) defaults to
    0x1000*(v+1).  The FPU area is deterministic filler."""
    from ..cpu import HVM_CPU_LAYOUT, HVM_CPU_NAMES
    out = bytearray()
    hdr = struct.pack("<IIQII", F.HVM_SAVE_MAGIC, 1, 0x1E5E5E5E, 0x000306C3, gtsc_khz)
    out += F.HVM_SAVE_DESC.pack(F.HVM_SAVE_HEADER, 0, len(hdr)) + hdr
    for v in range(nr_vcpus):
        if cr3 is None:
            vcr3 = 0x1000 * (v + 1)
        else:
            vcr3 = cr3[v] if isinstance(cr3, (list, tuple)) else cr3
        regs = dict.fromkeys(HVM_CPU_NAMES, 0)
        regs.update(
            fpu_regs=_filler(512, (seed, v)), rip=0xFFFFFFFF81000000 + 0x40 * v,
            rsp=0xFFFF880000010000 - 0x1000 * v, rflags=0x246,
            cr0=0x80050033, cr3=vcr3, cr4=0x6F0, msr_efer=0xD01,
            cs_sel=0x10, ss_sel=0x18, ds_sel=0x18, es_sel=0x18, tr_sel=0x40,
            cs_limit=0xFFFFFFFF, ss_limit=0xFFFFFFFF, ds_limit=0xFFFFFFFF,
            es_limit=0xFFFFFFFF, tr_limit=0x67, gdtr_limit=0x7F, idtr_limit=0xFFF,
            gdtr_base=0xFFFF880000001000, idtr_base=0xFFFFFFFF81A00000,
            # Xen packs attributes in 12 bits: type,s,dpl,p | avl,l,db,g.
            cs_arbytes=0xA9B, ss_arbytes=0xC93, ds_arbytes=0xC93, es_arbytes=0xC93,
            tr_arbytes=0x8B, tsc=1_000_000 * (v + 1))
        body = bytearray(HVM_CPU_LAYOUT.pack(*(regs[n] for n in HVM_CPU_NAMES)))
        if cpu_size != len(body):
            body = (body + _filler(max(0, cpu_size - len(body)), ("cpu", seed, v)))[:cpu_size]
        out += F.HVM_SAVE_DESC.pack(2, v, cpu_size) + body
    out += F.HVM_SAVE_DESC.pack(F.HVM_SAVE_END, 0, 0)
    return bytes(out)


def qemu_blob(size=6092, seed=0):
    """A stand-in for qemu's device state: "QEVM", version 3, filler."""
    head = b"QEVM" + (3).to_bytes(4, "big")
    return head + _filler(max(0, size - len(head)), ("qemu", seed))


def libxl_toolstack(physmap=(), width=8, leak=b"\xde\xad\xbe\xef"):
    """libxl's version-1 TOOLSTACK record (Xen 4.2-4.5): u32 version, u32
    count, then per physmap entry u64 phys_offset, u64 start_addr, u64 size,
    u32 namelen and the NUL-terminated name; a 64-bit toolstack copies 4
    bytes of struct padding after every name (`leak`)."""
    out = bytearray(struct.pack("<II", 1, len(physmap)))
    for phys, start, size, name in physmap:
        nm = _bytes(name) + b"\0"
        out += struct.pack("<QQQI", phys, start, size, len(nm)) + nm
        if width == 8:
            out += bytes(leak[:4]).ljust(4, b"\0")
    return bytes(out)


def _gather(image, pfns):
    """Pages of `pfns` from an image: an array of p2m_size*4096 bytes (any
    shape, numpy memmap included) or a callable pfns -> (n, 4096) uint8."""
    pfns = np.asarray(pfns, dtype=np.int64)
    if callable(image):
        pages = np.asarray(image(pfns), dtype=np.uint8)
        return pages.reshape(pfns.size, PAGE)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = img.view(np.uint8)
    img = img.reshape(-1, PAGE)
    n = pfns.size
    if n and pfns[-1] - pfns[0] == n - 1 and (n == 1 or np.all(np.diff(pfns) == 1)):
        return img[int(pfns[0]):int(pfns[0]) + n]          # a view: no copy
    return img[pfns]


def _pages_array(pages, n):
    if isinstance(pages, np.ndarray):
        arr = pages if pages.dtype == np.uint8 else pages.view(np.uint8)
    else:
        arr = np.frombuffer(memoryview(pages), dtype=np.uint8)
    if arr.size != n * PAGE:
        raise ValueError(f"{arr.size} bytes of page data given, {n} pages ({n * PAGE} bytes) "
                         "needed")
    return np.ascontiguousarray(arr).reshape(n, PAGE)


# ----------------------------------------------------------------- PV header
@dataclass
class PVOptions:
    """The PV part of the libxc header and the defaults of its tail.

    guest_width:  8 (64-bit guest, "vcpu" block 0x1430) or 4 (32-bit PAE, 0xaf0)
    extended:     False writes the very old form without extended info: the
                  p2m frame list follows p2m_size directly, and guest width and
                  vcpu context size are the toolstack's (guest_width is ignored)
    old_guest_width: the old form with another guest width than the
                  toolstack's (4 or 8): it sets the p2m frame list's length and
                  each tail vcpu context's size, and nothing in the stream
                  says it (a reader infers it from those)
    vcpu_block:   bytes of the "vcpu" extended-info block (None: deterministic)
    extv:         write the "extv" block (each tail vcpu carries 128 more bytes)
    xcnt:         per-vcpu xsave blob size (16 + data); 0 writes no "xcnt" block
    extra_blocks: (id, bytes) blocks written after the known ones (libxc skips them)
    blocks:       the complete block list (id, bytes) in order, overriding the
                  above (vcpu size, extv and xcnt are then taken from it)
    p2m_frames:   the p2m frame list (None: 1, 2, 3, ...)
    """
    guest_width: int = 8
    extended: bool = True
    old_guest_width: int | None = None
    vcpu_block: bytes | None = None
    extv: bool = True
    xcnt: int = 0
    extra_blocks: Sequence = ()
    blocks: Sequence | None = None
    p2m_frames: Sequence | None = None

    def resolve(self, width):
        """-> (blocks, vcpu_size, extv, xcnt, guest_width)"""
        if self.blocks is not None:
            blocks = [(bytes(b[0]), _bytes(b[1])) for b in self.blocks]
            gw, vsize, extv, xcnt = width, None, False, 0
            for bid, data in blocks:
                if bid == b"vcpu":
                    vsize = len(data)
                    gw = 8 if vsize == F.PV_VCPU_SIZE_64 else 4
                elif bid == b"extv":
                    extv = True
                elif bid == b"xcnt":
                    xcnt = F.U32.unpack_from(data, 0)[0]
            if vsize is None:
                vsize = F.PV_VCPU_SIZE_64 if gw == 8 else F.PV_VCPU_SIZE_32
            return blocks, vsize, extv, xcnt, gw
        if not self.extended:
            # Nothing says the guest's width: libxc assumes its own.
            gw = self.old_guest_width or width
            if gw not in (4, 8):
                raise ValueError("old_guest_width must be 4 or 8")
            vsize = F.PV_VCPU_SIZE_64 if gw == 8 else F.PV_VCPU_SIZE_32
            return [], vsize, False, 0, gw
        if self.guest_width not in (4, 8):
            raise ValueError("guest_width must be 4 or 8")
        vsize = F.PV_VCPU_SIZE_64 if self.guest_width == 8 else F.PV_VCPU_SIZE_32
        vblock = _bytes(self.vcpu_block) if self.vcpu_block is not None else \
            _filler(vsize, ("vcpu-block", self.guest_width))
        if len(vblock) != vsize:
            raise ValueError(f"vcpu block must be {vsize} bytes for a "
                             f"{self.guest_width * 8}-bit guest")
        blocks = [(b"vcpu", vblock)]
        if self.extv:
            blocks.append((b"extv", b""))
        if self.xcnt:
            if self.xcnt < 16:
                raise ValueError("xcnt counts mask + size + data: at least 16")
            blocks.append((b"xcnt", F.U32.pack(self.xcnt)))
        blocks += [(bytes(b[0]), _bytes(b[1])) for b in self.extra_blocks]
        return blocks, vsize, self.extv, self.xcnt, self.guest_width


@dataclass
class PVVcpuState:
    """One online vcpu in a PV tail (None fields get deterministic bytes)."""
    context: bytes | None = None
    extended: bytes | None = None
    xsave_mask: int = 3
    xsave: bytes | None = None


# ----------------------------------------------------------------- writer
class StreamWriter:
    """Write a legacy stream piece by piece.

    out:       a path (created/truncated; closed by close()), a binary file
               object, or None for an in-memory buffer (getvalue())
    width:     toolstack unsigned long in bytes, 8 or 4 (64 and 32 accepted)
    guest:     "hvm" or "pv"
    p2m_size:  number of pfn slots
    wrapper:   None, "xl", "xend", "xenserver" or "libvirt"
    config:    the wrapper's configuration (xl config text or JSON, xend SXP,
               libvirt XML); str or bytes, written as given
    json:      xl only: set the JSON mandatory flag (default: config starts with "{")
    xl_optional_flags, libvirt_version: header fields, as named
    pv:        PVOptions (or a dict of its fields) for PV guests
    compress_options: keyword arguments for compress.Compressor
               (page_buffer_pages, cache_pages, outbuf_size, stale_retry)
    defer_metadata: in a compressed checkpoint, hold metadata chunks written
               before end_body() back until the compressed data is out, as
               Xen's saver does (its tail buffer); False writes them in call order
    check:     refuse calls that would make an invalid stream (turn off to
               write malformed streams on purpose)

    Attributes: pos (bytes written), checkpoint (1-based, the one being
    written), layout (list of (kind, offset, detail)), compressor.
    """

    def __init__(self, out=None, width=8, guest="hvm", p2m_size=None, wrapper=None,
                 config=None, *, json=None, xl_optional_flags=0, libvirt_version=1,
                 pv=None, compress_options=None, defer_metadata=True, check=True):
        if width in (32, 64):
            width //= 8
        if width not in (4, 8):
            raise ValueError("width must be 4 or 8 bytes (32 or 64 bits)")
        if guest not in ("hvm", "pv"):
            raise ValueError("guest must be 'hvm' or 'pv'")
        if p2m_size is None or not 1 <= int(p2m_size) <= F.MAX_PFNS:
            raise ValueError("p2m_size must be 1..2^28")
        if wrapper not in WRAPPERS:
            raise ValueError(f"wrapper must be one of {WRAPPERS}")
        self.width = width
        self.guest = guest
        self.p2m_size = int(p2m_size)
        self.wrapper = None if wrapper == "none" else wrapper
        self.check = check
        self.defer_metadata = defer_metadata
        self.compress_options = dict(compress_options or {})
        self._ul = F.ulong(width)
        self._edtype = "<u8" if width == 8 else "<u4"
        self._own = False
        if out is None:
            self.out = io.BytesIO()
        elif isinstance(out, (str, bytes, os.PathLike)):
            self.out = open(out, "wb")
            self._own = True
        else:
            self.out = out
        self.pos = 0
        self.layout = []
        self.checkpoint = 1
        self.compressor = None
        self.compression_enabled = False
        self.finished = False            # a LAST_CHECKPOINT tail was written
        self._online = [0]
        self._deferred = []
        self._last_flag = False
        self._tail_open = False          # HVM tail written, qemu record pending
        self._in_body = True
        self.stats = []                  # per checkpoint: batches, data pages, chunks
        self._new_stats()
        pv_opts = pv if isinstance(pv, PVOptions) else PVOptions(**(pv or {}))
        self.pv = pv_opts if guest == "pv" else None
        self._write_wrapper(config, json, xl_optional_flags, libvirt_version)
        self._write_header()

    # ---------------------------------------------------------- low level
    def _w(self, data):
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data)).cast("B")
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n:
            self.out.write(data)
            self.pos += n
        return n

    def _mark(self, kind, detail=None):
        self.layout.append((kind, self.pos, detail))

    def _new_stats(self):
        self.stats.append({"checkpoint": self.checkpoint, "batches": [], "data_pages": 0,
                           "compressed": False, "chunks": [], "entries": 0})

    @property
    def compressing(self):
        """Is the checkpoint being written format B?"""
        return self.compression_enabled and self.checkpoint > 1

    def getvalue(self):
        """The bytes written so far, for an in-memory writer."""
        self.out.flush()
        return self.out.getvalue()

    def close(self):
        if self._tail_open:
            raise RuntimeError("an HVM tail was started but its qemu record not written")
        self.out.flush()
        if self._own:
            self.out.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._own and not self.out.closed:
            self.out.close()

    # ---------------------------------------------------------- headers
    def _write_wrapper(self, config, json, optional_flags, libvirt_version):
        w = self.wrapper
        if w is None:
            return
        cfg = _bytes(config)
        self._mark("wrapper", w)
        if w == "xl":
            if json is None:
                json = cfg.lstrip()[:1] == b"{"
            opt = F.U32.pack(len(cfg)) + cfg if config is not None else b""
            mandatory = F.XL_FLAG_JSON if json else 0
            self._w(F.XL_MAGIC + F.XL_HEADER.pack(F.XL_BYTEORDER, mandatory, optional_flags,
                                                  len(opt)) + opt)
        elif w == "xend":
            self._w(F.XEND_MAGIC + struct.pack(">i", len(cfg)) + cfg)
        elif w == "xenserver":
            self._w(F.XENSERVER_MAGIC)
        elif w == "libvirt":
            self._w(F.LIBVIRT_MAGIC + F.LIBVIRT_HEADER.pack(libvirt_version, len(cfg)) + cfg)
        self.image_offset = self.pos

    def _write_header(self):
        self.image_offset = self.pos
        self._mark("libxc_header", self.p2m_size)
        self._w(self._ul.pack(self.p2m_size))
        if self.guest != "pv":
            self.vcpu_size = self.extv = self.xcnt = None
            return
        blocks, self.vcpu_size, self.extv, self.xcnt, self.guest_width = \
            self.pv.resolve(self.width)
        nframes = F.p2m_frame_count(self.p2m_size, self.guest_width)
        frames = self.pv.p2m_frames
        frames = np.arange(1, nframes + 1, dtype=np.uint64) if frames is None else \
            np.asarray(frames, dtype=np.uint64)
        if self.check and frames.size != nframes:
            raise ValueError(f"the p2m frame list has {nframes} entries for this p2m_size "
                             f"and guest width, {frames.size} given")
        if self.pv.extended or self.pv.blocks is not None:
            body = b"".join(F.EXT_BLOCK.pack(bid, len(data)) + data for bid, data in blocks)
            self._mark("pv_extended_info", [b[0].decode("latin-1") for b in blocks])
            self._w(self._ul.pack((1 << (8 * self.width)) - 1) + F.U32.pack(len(body)) + body)
        elif self.check and frames.size and int(frames[0]) == (1 << (8 * self.width)) - 1:
            raise ValueError("the first p2m frame cannot be ~0 without extended info")
        self._mark("p2m_frame_list", int(frames.size))
        self._w(frames.astype(self._edtype).tobytes())

    # ---------------------------------------------------------- page batches
    def _entries(self, pfns, types, entries):
        if entries is not None:
            if isinstance(entries, (bytes, bytearray, memoryview)):
                return np.frombuffer(entries, dtype=self._edtype).astype(np.uint64)
            return np.asarray(entries, dtype=np.uint64).reshape(-1)
        pfns = np.asarray(pfns, dtype=np.uint64).reshape(-1)
        t = np.broadcast_to(np.asarray(0 if types is None else types, dtype=np.uint64),
                            pfns.shape)
        if self.check:
            if pfns.size and int(pfns.max()) > ENTRY_PFN_MASK:
                raise ValueError("pfn does not fit the entry's 28 bits")
            if t.size and int(t.max()) > 0xF:
                raise ValueError("a type is a 4-bit nibble")
        return (t << np.uint64(28)) | pfns

    def batch(self, pfns=None, types=None, pages=None, *, image=None, entries=None):
        """Write one page batch (PFN array + page data).

        pfns, types: the entries (types: nibble per entry, one for all, None
                for NOTAB; a bare XTAB entry is pfn 0 with type 0xF); or `entries`: the raw
                ulong values (array or bytes) for odd cases
        pages:  the data pages of the data-carrying entries in entry order,
                (n, 4096) uint8 or bytes; or `image` to gather them from
        In a format B checkpoint the pages go to the compressor (pages=None
        writes the PFN array alone; supply COMPRESSED_DATA yourself).
        """
        ent = self._entries(pfns, types, entries)
        count = int(ent.size)
        t = ((ent >> np.uint64(28)) & np.uint64(0xF)).astype(np.uint8)
        data = _DATA_TYPES[t]
        dpfns = (ent & np.uint64(ENTRY_PFN_MASK))[data].astype(np.int64)
        if self.check:
            if not 1 <= count <= F.MAX_BATCH:
                raise ValueError(f"a batch has 1..{F.MAX_BATCH} entries, not {count}")
            if (ent >> np.uint64(32)).any():
                raise ValueError("entry with bits 63..32 set")
            if np.isin(t, F.INVALID_TYPES).any():
                raise ValueError("invalid page type 5..7")
            pf = ent & np.uint64(ENTRY_PFN_MASK)
            if ((t != F.XTAB) & (pf >= np.uint64(self.p2m_size))).any():
                raise ValueError("pfn >= p2m_size")
        if pages is None and image is not None:
            pages = _gather(image, dpfns)
        elif pages is not None:
            pages = _pages_array(pages, dpfns.size)
        if pages is None and dpfns.size and self.check and not self.compressing:
            raise ValueError(f"{dpfns.size} data pages are needed for this batch")
        if self._deferred and not self.compressing:
            self._flush_deferred()
        st = self.stats[-1]
        st["batches"].append(count)
        st["entries"] += count
        st["data_pages"] += int(dpfns.size)
        compressed = self.compressing
        self._mark("batch", [count, 0 if compressed else int(dpfns.size)])
        raw_entries = ent.astype(self._edtype).tobytes()
        self._w(F.I32.pack(count))
        self._w(raw_entries)
        if compressed:
            st["compressed"] = True
            comp = self._comp()
            comp.note_write(4)
            comp.note_write(self.width * count)
            if pages is not None and dpfns.size:
                self._write_chunks(comp.add_pages(dpfns, pages, is_raw_type(t[data])))
        elif dpfns.size and pages is not None:
            self._w(pages)

    def send(self, pfns, types=None, pages=None, *, image=None, batch_size=F.MAX_BATCH):
        """Write entries in batches of batch_size (pages as for batch())."""
        pfns = np.asarray(pfns, dtype=np.uint64).reshape(-1)
        types = np.broadcast_to(np.asarray(0 if types is None else types, dtype=np.uint8),
                                pfns.shape)
        if pages is not None:
            data = _DATA_TYPES[types]
            pages = _pages_array(pages, int(np.count_nonzero(data)))
            dstart = np.concatenate([[0], np.cumsum(data)])
        for a in range(0, pfns.size, batch_size):
            b = min(pfns.size, a + batch_size)
            if pages is not None:
                self.batch(pfns[a:b], types[a:b], pages[dstart[a]:dstart[b]])
            else:
                self.batch(pfns[a:b], types[a:b], image=image)

    # ---------------------------------------------------------- compression
    def _comp(self):
        if self.compressor is None:
            self.compressor = Compressor(self.p2m_size, width=self.width,
                                         **self.compress_options)
            self.compressor.begin_checkpoint()
        return self.compressor

    def _write_chunks(self, chunks):
        for c in chunks:
            self._mark("chunk", [F.COMPRESSED_DATA, len(c.data), c.pages, c.kinds["full"],
                                 c.kinds["empty"], c.kinds["delta"]])
            self.stats[-1]["chunks"].append(len(c.data))
            self._w(F.I32.pack(F.COMPRESSED_DATA) + self._ul.pack(len(c.data)))
            self._w(c.data)

    def flush_compressed(self):
        """Compress and write the pages buffered so far now (Xen does this
        only when its page buffer is full and at the end of a body)."""
        if self.compressor is not None:
            self._write_chunks(self.compressor.flush())

    # ---------------------------------------------------------- metadata chunks
    def _chunk(self, cid, payload=b""):
        data = F.I32.pack(cid) + payload
        if self.compressing and self.defer_metadata and cid != F.COMPRESSED_DATA:
            self._deferred.append((cid, data))
            return
        self._mark("chunk", cid)
        self._w(data)

    def _flush_deferred(self):
        for cid, data in self._deferred:
            self._mark("chunk", cid)
            self._w(data)
        self._deferred = []

    def raw_chunk(self, cid, payload=b""):
        """Any chunk id with any payload (TMEM, unknown ids, malformed data)."""
        self._chunk(int(cid), _bytes(payload))

    def verify_mode(self):
        """-1 ENABLE_VERIFY_MODE: pages that follow are a verification copy."""
        self._chunk(F.ENABLE_VERIFY_MODE)

    def vcpu_info(self, online=(0,), max_id=None):
        """-2 VCPU_INFO: the online vcpus (ids), max_vcpu_id (default max(online))."""
        online = sorted(int(v) for v in online)
        if max_id is None:
            max_id = max(online) if online else 0
        if self.check and (not 0 <= max_id <= F.MAX_VCPU_ID or
                           any(not 0 <= v <= max_id for v in online)):
            raise ValueError("vcpu ids must be 0..max_id <= 4095")
        words = np.zeros(max_id // 64 + 1, dtype="<u8")
        for v in online:
            words[v // 64] |= np.uint64(1) << np.uint64(v % 64)
        self._online = [v for v in online if v <= max_id]
        self._chunk(F.VCPU_INFO, F.I32.pack(max_id) + words.tobytes())

    def hvm_param(self, which, value, pad=0):
        """A pad+u64 chunk, by chunk id (-3), Xen HVM_PARAM_* number (12),
        param name ("ident_pt") or chunk name ("HVM_IDENT_PT")."""
        self._chunk(_param_id(which), F.PAD_U64.pack(pad, int(value)))

    def hvm_params(self, params):
        """Several params (dict of name or id -> value), in Xen's order."""
        ids = {_param_id(k): v for k, v in params.items()}
        for cid in XEN_PARAM_ORDER:
            if cid in ids:
                self.hvm_param(cid, ids[cid])

    def tsc_info(self, mode=0, nsec=0, khz=0, incarnation=0):
        """-7 TSC_INFO (written in the stream as mode, nsec, khz, incarnation)."""
        self._chunk(F.TSC_INFO, F.TSC_INFO_LAYOUT.pack(mode, nsec, khz, incarnation))

    def last_checkpoint(self):
        """-9 LAST_CHECKPOINT: the checkpoint being written is the last."""
        self._last_flag = True
        self._chunk(F.LAST_CHECKPOINT)

    def compressed_data(self, data):
        """-12 COMPRESSED_DATA with the given bytes, as they are."""
        data = _bytes(data)
        self._mark("chunk", [F.COMPRESSED_DATA, len(data)])
        self._w(F.I32.pack(F.COMPRESSED_DATA) + self._ul.pack(len(data)) + data)

    def enable_compression(self):
        """-13 ENABLE_COMPRESSION: in checkpoint 1 it makes every later
        checkpoint format B."""
        if self.checkpoint == 1:
            self.compression_enabled = True
        self._chunk(F.ENABLE_COMPRESSION)

    def toolstack(self, data):
        """-18 TOOLSTACK: u32 length + the bytes (see libxl_toolstack())."""
        data = _bytes(data)
        self._chunk(F.TOOLSTACK, F.U32.pack(len(data)) + data)

    # ---------------------------------------------------------- end of body, tails
    def end_body(self):
        """The 0 chunk.  In a compressed checkpoint the compressed data left
        in the page buffer and any held-back metadata come first."""
        if self.compressing:
            self._write_chunks(self._comp().flush())
        self._flush_deferred()
        self._mark("end", 0)
        self._w(F.I32.pack(0))
        self._in_body = False

    def _end_checkpoint(self):
        self._mark("checkpoint_end", self.checkpoint)
        if self._last_flag:
            self.finished = True
        self.checkpoint += 1
        self._last_flag = False
        self._in_body = True
        self._new_stats()
        if self.compressor is not None:
            self.compressor.begin_checkpoint()

    def hvm_tail_head(self, magic_pfns=(0, 0, 0), context=b""):
        """The libxc part of an HVM tail: the 3 magic pfns and the HVM
        context.  A qemu_record() must follow."""
        if self.check and self.guest != "hvm":
            raise ValueError("an HVM tail in a PV stream")
        ctx = _bytes(context)
        self._mark("hvm_tail", len(ctx))
        self._w(F.MAGIC_PFNS.pack(*(int(x) for x in magic_pfns)) + F.U32.pack(len(ctx)) + ctx)
        self._tail_open = True

    def qemu_record(self, data=b"", signature=None):
        """The device-model record that ends an HVM checkpoint.

        signature: "DeviceModelRecord0002" (u32 length; libxl), "RemusDeviceModelState"
        (same layout), "QemuDeviceModelRecord" (no length: data to the end of
        the stream; xend) or "xenserver" ("QemuDeviceModelRecord\\n" + big-endian
        u32 length).  Default: by wrapper (xend: to-eof, XenServer: xenserver,
        else DeviceModelRecord0002)."""
        if signature is None:
            signature = {"xend": "to-eof", "xenserver": "xenserver"}.get(self.wrapper,
                                                                         "DeviceModelRecord0002")
        sig, layout = QEMU_VARIANTS[signature]
        data = _bytes(data)
        self._mark("qemu_record", [sig.decode(), len(data)])
        if layout == "length":
            self._w(sig + F.U32.pack(len(data)))
        elif layout == "xenserver":
            self._w(sig + len(data).to_bytes(4, "big"))
        else:
            self._w(sig)
        self._w(data)
        self._tail_open = False
        self._end_checkpoint()

    def hvm_tail(self, magic_pfns=(0, 0, 0), context=b"", qemu=b"", qemu_signature=None):
        """The whole HVM tail: magic pfns, HVM context, qemu record."""
        self.hvm_tail_head(magic_pfns, context)
        self.qemu_record(qemu, qemu_signature)

    def pv_tail(self, unmapped=(), vcpus=None, shared_info=None):
        """The PV tail: unmapped pfns, one entry per online vcpu (the last
        VCPU_INFO's, or vcpu 0), the shared-info page.

        vcpus: list of PVVcpuState, dicts of its fields, or tuples
        (context, extended, xsave_mask, xsave); None fields (and vcpus=None)
        get deterministic bytes of the right sizes.
        """
        if self.check and self.guest != "pv":
            raise ValueError("a PV tail in an HVM stream")
        unmapped = np.asarray(unmapped, dtype=np.uint64).reshape(-1)
        online = self._online
        if vcpus is None:
            vcpus = [PVVcpuState() for _ in online]
        if self.check and len(vcpus) != len(online):
            raise ValueError(f"{len(online)} online vcpus, {len(vcpus)} contexts given")
        self._mark("pv_tail", [int(unmapped.size), len(vcpus)])
        parts = [F.U32.pack(unmapped.size), unmapped.astype(self._edtype).tobytes()]
        for vid, v in zip(online, vcpus):
            if isinstance(v, dict):
                v = PVVcpuState(**v)
            elif isinstance(v, (tuple, list)):
                v = PVVcpuState(*v)
            ctx = _bytes(v.context) if v.context is not None else \
                _filler(self.vcpu_size, ("ctx", self.checkpoint, vid))
            if self.check and len(ctx) != self.vcpu_size:
                raise ValueError(f"vcpu context must be {self.vcpu_size:#x} bytes")
            parts.append(ctx)
            if self.extv:
                ext = _bytes(v.extended) if v.extended is not None else \
                    _filler(F.PV_EXT_VCPU_SIZE, ("ext", self.checkpoint, vid))
                if self.check and len(ext) != F.PV_EXT_VCPU_SIZE:
                    raise ValueError("extended vcpu context must be 128 bytes")
                parts.append(ext)
            if self.xcnt:
                size = self.xcnt - F.XSAVE_HEAD.size
                xs = _bytes(v.xsave) if v.xsave is not None else \
                    _filler(size, ("xsave", self.checkpoint, vid))
                if self.check and len(xs) != size:
                    raise ValueError(f"xsave data must be {size} bytes (xcnt - 16)")
                parts.append(F.XSAVE_HEAD.pack(v.xsave_mask, len(xs)) + xs)
        si = _bytes(shared_info) if shared_info is not None else \
            _filler(PAGE, ("shared_info", self.checkpoint))
        if self.check and len(si) != F.SHARED_INFO_SIZE:
            raise ValueError("the shared-info page is 4096 bytes")
        parts.append(si)
        self._w(b"".join(parts))
        self._end_checkpoint()

    # ---------------------------------------------------------- records
    def write_record(self, rec):
        """Write one reader record (stream/records.py) back, for re-serialising a
        stream read with xlegacy.open().  HVMTail waits for its QemuRecord;
        CheckpointEnd is implied by the tail.  HVM param padding is not kept
        by the reader and is written as 0."""
        from ..stream import records as R
        if isinstance(rec, R.PageBatch):
            self.batch(entries=rec.raw, pages=None if rec.compressed else rec.pages)
        elif isinstance(rec, R.Chunk):
            cid, v = rec.id, rec.value
            if cid in F.HVM_PARAM_CHUNKS:
                self.hvm_param(cid, v)
            elif cid == F.VCPU_INFO:
                self.vcpu_info(v["online"], v["max_id"])
            elif cid == F.TSC_INFO:
                self.tsc_info(v["mode"], v["nsec"], v["khz"], v["incarnation"])
            elif cid == F.TOOLSTACK:
                self.toolstack(v)
            elif cid == F.COMPRESSED_DATA:
                self.compressed_data(v)
            elif cid == F.ENABLE_COMPRESSION:
                self.enable_compression()
            elif cid == F.LAST_CHECKPOINT:
                self.last_checkpoint()
            elif cid == F.ENABLE_VERIFY_MODE:
                self.verify_mode()
            else:
                raise ValueError(f"cannot re-write chunk {cid}")
        elif isinstance(rec, R.EndOfBody):
            self.end_body()
        elif isinstance(rec, R.HVMTail):
            self.hvm_tail_head(rec.magic_pfns, rec.context)
        elif isinstance(rec, R.QemuRecord):
            sig = {"to-eof": "to-eof", "xenserver": "xenserver"}.get(rec.variant,
                                                                     rec.signature)
            self.qemu_record(rec.data, sig)
        elif isinstance(rec, R.PVTail):
            self.pv_tail(rec.unmapped_pfns,
                         [PVVcpuState(v.context, v.extended,
                                      v.xsave_mask if v.xsave_mask is not None else 0,
                                      v.xsave) for v in rec.vcpus],
                         rec.shared_info)
        elif isinstance(rec, R.CheckpointEnd):
            pass
        else:
            raise TypeError(f"not a stream record: {rec!r}")


def rewrite(source, out=None, width=None, guest=None):
    """Read a legacy stream and write it again with StreamWriter (wrapper,
    header, every record).  For a well-formed stream the result is the same
    bytes (HVM param padding aside, which the reader does not keep).  A
    stream cut inside a later checkpoint is re-written up to its last
    complete checkpoint (`out` must then be seekable).  Returns the writer
    (call getvalue() when out is None)."""
    from ..errors import TruncatedStream
    from ..stream.reader import LegacyStream
    from ..stream.records import CheckpointEnd
    s = LegacyStream(source, width=width, guest=guest)
    wr = s.wrapper
    kw = {}
    if wr.kind == "xl":
        kw["json"] = bool(wr.details.get("mandatory_flags", 0) & F.XL_FLAG_JSON)
        kw["xl_optional_flags"] = wr.details.get("optional_flags", 0)
    elif wr.kind == "libvirt":
        kw["libvirt_version"] = wr.details.get("version", 1)
    pv = None
    if s.guest == "pv":
        info = s.pv_info
        pv = PVOptions(extended=info.extended, guest_width=info.guest_width,
                       old_guest_width=None if info.extended else info.guest_width,
                       blocks=[(b.id, b.data) for b in info.blocks] if info.extended else None,
                       p2m_frames=info.p2m_frames)
    w = StreamWriter(out, width=s.width, guest=s.guest, p2m_size=s.p2m_size,
                     wrapper=None if wr.kind == "none" else wr.kind, config=wr.config,
                     pv=pv, defer_metadata=False, check=False, **kw)
    committed = None
    try:
        for rec in s:
            w.write_record(rec)      # at once: a batch's pages live until the next record
            if isinstance(rec, CheckpointEnd):
                committed = w.pos
    except TruncatedStream:
        if committed is None:
            raise
        w.out.flush()
        w.out.seek(committed)
        w.out.truncate()
        w.pos = committed
    finally:
        s.close()
    w.out.flush()
    return w


# ----------------------------------------------------------------- whole guests
@dataclass
class WriteResult:
    """What write_guest() wrote, and what a restore must give back."""
    size: int
    p2m_size: int
    layout: list
    stats: list
    checkpoints: int
    sends: list = field(repr=False, default_factory=list)   # (checkpoint, pfns, source)
    value: bytes | None = field(repr=False, default=None)

    def pfns_with_data(self, checkpoint=None):
        """Sorted pfns that received data in checkpoints 1..checkpoint."""
        last = checkpoint or self.checkpoints
        parts = [p for cp, p, _ in self.sends if cp <= last]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def image_after(self, checkpoint=None, out=None):
        """The image a restore must produce after `checkpoint` (default the
        last): for every pfn the last page sent in checkpoints <= it, zeros
        elsewhere.  uint8[p2m_size * 4096]."""
        last = checkpoint or self.checkpoints
        img = np.zeros(self.p2m_size * PAGE, np.uint8) if out is None else out
        view = img.reshape(-1, PAGE)
        for cp, pfns, src in self.sends:
            if cp <= last and pfns.size:
                view[pfns] = src(pfns)
        return img

    def sha256_after(self, checkpoint=None):
        return hashlib.sha256(self.image_after(checkpoint)).hexdigest()


def _source(image):
    """A pfns -> pages function over an image (array or callable)."""
    if callable(image):
        return lambda pfns: np.asarray(image(np.asarray(pfns, np.int64)),
                                       dtype=np.uint8).reshape(-1, PAGE)
    return lambda pfns: _gather(image, pfns)


def _type_array(types, pfns, p2m_size):
    if types is None:
        return np.zeros(pfns.size, np.uint8)
    if isinstance(types, dict):
        t = np.zeros(pfns.size, np.uint8)
        if types:
            keys = np.fromiter(types.keys(), dtype=np.int64)
            vals = np.fromiter(types.values(), dtype=np.uint8)
            order = np.argsort(keys)
            keys, vals = keys[order], vals[order]
            idx = np.searchsorted(keys, pfns)
            ok = (idx < keys.size) & (keys[np.minimum(idx, keys.size - 1)] == pfns)
            t[ok] = vals[idx[ok]]
        return t
    t = np.asarray(types, dtype=np.uint8)
    if t.ndim == 0:
        return np.full(pfns.size, t, np.uint8)
    if t.size == pfns.size:
        return t
    if t.size == p2m_size:
        return t[pfns]
    raise ValueError("types: one nibble, one per sent pfn, one per p2m slot, or a dict")


def _pass_entries(pfns, types, xtab, xalloc, broken, p2m_size):
    """Merge a pass's entries in pfn order (the saver walks pfns upwards):
    -> (pfns, types) with bare XTAB entries as pfn 0, type 0xF."""
    pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
    t = _type_array(types, pfns, p2m_size)
    keys = [pfns]
    tys = [t]
    for extra, ty in ((xtab, F.XTAB), (xalloc, F.XALLOC), (broken, F.BROKEN)):
        if extra is not None and len(extra):
            e = np.asarray(extra, dtype=np.int64).reshape(-1)
            keys.append(e)
            tys.append(np.full(e.size, ty, np.uint8))
    allp = np.concatenate(keys)
    allt = np.concatenate(tys)
    order = np.argsort(allp, kind="stable")
    allp, allt = allp[order], allt[order]
    if allp.size and (allp.min() < 0 or allp.max() >= p2m_size):
        raise ValueError("pfn outside 0..p2m_size-1")
    entry_pfns = np.where(allt == F.XTAB, 0, allp)
    return allp, entry_pfns, allt


class _Pass:
    """One pass over pfns: entries and a page source."""

    def __init__(self, spec, default_source, p2m_size):
        if isinstance(spec, dict):
            spec = dict(spec)
        else:
            pfns, src = spec[0], spec[1] if len(spec) > 1 else None
            spec = {"pfns": pfns, "pages": src}
        pfns = np.asarray(spec["pfns"], dtype=np.int64).reshape(-1)
        self.sort_pfns, self.entry_pfns, self.types = _pass_entries(
            pfns, spec.get("types"), spec.get("xtab"), spec.get("xalloc"),
            spec.get("broken"), p2m_size)
        data = _DATA_TYPES[self.types]
        self.data_pfns = self.sort_pfns[data]
        pages = spec.get("pages")
        image = spec.get("image")
        if isinstance(pages, np.ndarray) and pages.size == pfns.size * PAGE and \
                pages.size != p2m_size * PAGE:
            # pages given in the order of `pfns`: index them by pfn
            arr = pages.reshape(-1, PAGE)
            order = np.argsort(pfns, kind="stable")
            sp = pfns[order]

            def src(q, arr=arr, order=order, sp=sp):
                return arr[order[np.searchsorted(sp, q)]]
            self.source = src
        elif pages is not None:
            self.source = _source(pages)
        elif image is not None:
            self.source = _source(image)
        else:
            self.source = default_source

    def write(self, w, batch_size):
        n = self.types.size
        data = _DATA_TYPES[self.types]
        for a in range(0, n, batch_size):
            b = min(n, a + batch_size)
            dp = self.sort_pfns[a:b][data[a:b]]
            pages = self.source(dp) if dp.size else None
            w.batch(self.entry_pfns[a:b], self.types[a:b], pages)


def _vcpus_arg(vcpus):
    if vcpus is None or vcpus is False:
        return None
    if isinstance(vcpus, dict):
        return list(vcpus.get("online", [0])), vcpus.get("max_id")
    if isinstance(vcpus, int):
        return list(range(vcpus)), None
    return list(vcpus), None


def _tsc_arg(tsc):
    if tsc is None or tsc is False:
        return None
    if isinstance(tsc, dict):
        return (tsc.get("mode", 0), tsc.get("nsec", 0), tsc.get("khz", 0),
                tsc.get("incarnation", 0))
    return tuple(tsc)


def write_guest(out, image, *, width=8, guest="hvm", p2m_size=None, pfns=None, types=None,
                xtab=None, xalloc=None, broken=None, iterations=(), live=None,
                verify=False, wrapper=None, config=None, json=None,
                vcpus=(0,), tsc=(0, 0, 0, 0), params=None, toolstack=None,
                magic_pfns=None, hvm_context=None, qemu=None, qemu_signature=None,
                pv=None, unmapped=None, pv_vcpus=None, shared_info=None,
                checkpoints=(), compress=False, compress_options=None,
                last_checkpoint=None, batch_size=F.MAX_BATCH):
    """Write a whole legacy stream for a guest, in xc_domain_save()'s order.

    image:       the guest memory at the end of checkpoint 1: an array of
                 p2m_size*4096 bytes (any shape; memmaps welcome) or a
                 callable pfns -> (n, 4096) uint8 (then p2m_size is needed)
    pfns:        pfns of the final pass (default: all); written in pfn order
    types:       their type nibbles: one value, one per pfn, one per p2m slot
                 or a dict pfn -> nibble (PV page tables: 1-4, |8 pinned)
    xtab, xalloc, broken: pfns sent as bare XTAB entries (0xf0000000), XALLOC
                 or BROKEN entries (no data) in the final pass
    iterations:  earlier live passes, each (pfns, pages-or-image) or a dict
                 with pfns, pages/image, types, xtab, xalloc, broken
    live:        TSC_INFO goes before the final pass (default: iterations given)
                 instead of before the first batch
    verify:      ENABLE_VERIFY_MODE and a second copy of the final pass
    wrapper, config, json: see StreamWriter
    vcpus:       online vcpu ids, a count, {"max_id", "online"}, or None (no VCPU_INFO)
    tsc:         (mode, nsec, khz, incarnation) or dict, None for none
    params:      {name, chunk id or HVM_PARAM_* number: value} pad+u64 chunks
                 (HVM), written in Xen's order
    toolstack:   TOOLSTACK bytes (see libxl_toolstack()) or None
    magic_pfns, hvm_context, qemu, qemu_signature: the HVM tail (defaults:
                 the last three pfns, hvm_context_blob(), qemu_blob())
    pv:          PVOptions or dict (PV header); unmapped, pv_vcpus, shared_info: PV tail
    checkpoints: later Remus checkpoints, each a dict with `image` (as above),
                 `pfns` (dirty pfns), optional `types`, `xtab`, `xalloc`,
                 `broken`, and overrides of vcpus, params, toolstack, tsc,
                 magic_pfns, hvm_context, qemu, unmapped, pv_vcpus, shared_info
                 (an override stays in force for the checkpoints after it; params
                 are merged; TSC_INFO only when given, as Xen writes it once)
    compress:    ENABLE_COMPRESSION in checkpoint 1; later checkpoints format B
    compress_options: for compress.Compressor (page_buffer_pages, cache_pages,
                 outbuf_size, stale_retry)
    last_checkpoint: write LAST_CHECKPOINT in the last checkpoint (default:
                 only when there are no later checkpoints, as Xen does)

    Returns a WriteResult (image_after(k) gives the image a restore must
    produce); with out=None its `value` holds the stream bytes.
    """
    if p2m_size is None:
        if callable(image):
            raise ValueError("p2m_size is needed when image is a callable")
        p2m_size = np.asarray(image).nbytes // PAGE
    p2m_size = int(p2m_size)
    default = _source(image)
    is_pv = guest == "pv"
    w = StreamWriter(out, width=width, guest=guest, p2m_size=p2m_size, wrapper=wrapper,
                     config=config, json=json, pv=pv, compress_options=compress_options)
    if pfns is None:
        pfns = np.arange(p2m_size, dtype=np.int64)
    final = _Pass({"pfns": pfns, "types": types, "xtab": xtab, "xalloc": xalloc,
                   "broken": broken}, default, p2m_size)
    earlier = [_Pass(it, default, p2m_size) for it in iterations]
    live = bool(earlier) if live is None else live
    checkpoints = list(checkpoints)
    if last_checkpoint is None:
        last_checkpoint = not checkpoints
    sends = []

    if magic_pfns is None:
        magic_pfns = (max(0, p2m_size - 3), max(0, p2m_size - 2), max(0, p2m_size - 1))
    state = {
        "vcpus": _vcpus_arg(vcpus), "params": dict(params or {}), "toolstack": toolstack,
        "magic_pfns": magic_pfns, "hvm_context": hvm_context, "qemu": qemu,
        "qemu_signature": qemu_signature, "unmapped": unmapped, "pv_vcpus": pv_vcpus,
        "shared_info": shared_info,
    }
    if state["hvm_context"] is None:
        n = len(state["vcpus"][0]) if state["vcpus"] else 1
        state["hvm_context"] = hvm_context_blob(max(1, n))
    if state["qemu"] is None:
        state["qemu"] = qemu_blob()

    def metadata(st, last):
        if st["vcpus"] is not None:
            w.vcpu_info(*st["vcpus"])
        if not is_pv and st["params"]:
            w.hvm_params(st["params"])
        if st["toolstack"] is not None:
            w.toolstack(st["toolstack"])
        if last:
            w.last_checkpoint()

    def tail(st):
        if is_pv:
            w.pv_tail(st["unmapped"] if st["unmapped"] is not None else (),
                      st["pv_vcpus"], st["shared_info"])
        else:
            w.hvm_tail(st["magic_pfns"], st["hvm_context"], st["qemu"], st["qemu_signature"])

    # ---- checkpoint 1
    tsc1 = _tsc_arg(tsc)
    if tsc1 is not None and not live:
        w.tsc_info(*tsc1)
    for p in earlier:
        p.write(w, batch_size)
        sends.append((1, p.data_pfns, p.source))
    if tsc1 is not None and live:
        w.tsc_info(*tsc1)
    final.write(w, batch_size)
    sends.append((1, final.data_pfns, final.source))
    if verify:
        w.verify_mode()
        final.write(w, batch_size)
    metadata(state, last_checkpoint and not checkpoints)
    if compress:
        w.enable_compression()
    w.end_body()
    tail(state)

    # ---- later checkpoints
    for k, cp in enumerate(checkpoints):
        cp = dict(cp)
        st = state                    # what a checkpoint changes stays changed
        for key in ("toolstack", "magic_pfns", "hvm_context", "qemu",
                    "qemu_signature", "unmapped", "pv_vcpus", "shared_info"):
            if key in cp:
                st[key] = cp[key]
        if "params" in cp:
            st["params"] = dict(st["params"], **{k: v for k, v in cp["params"].items()})
        if "vcpus" in cp:
            st["vcpus"] = _vcpus_arg(cp["vcpus"])
        src = _source(cp["image"]) if cp.get("image") is not None else default
        ps = _Pass({"pfns": cp.get("pfns", ()), "types": cp.get("types"),
                    "xtab": cp.get("xtab"), "xalloc": cp.get("xalloc"),
                    "broken": cp.get("broken"), "pages": cp.get("pages")}, src, p2m_size)
        if cp.get("tsc") is not None:
            w.tsc_info(*_tsc_arg(cp["tsc"]))
        ps.write(w, batch_size)
        sends.append((k + 2, ps.data_pfns, ps.source))
        metadata(st, last_checkpoint and k == len(checkpoints) - 1)
        w.end_body()
        tail(st)

    w.out.flush()
    value = w.getvalue() if out is None else None
    res = WriteResult(w.pos, p2m_size, w.layout, w.stats[:-1], 1 + len(checkpoints), sends,
                      value)
    if w._own:
        w.close()
    return res


def make_stream(image, **options):
    """write_guest() into memory: -> (stream bytes, WriteResult)."""
    res = write_guest(None, image, **options)
    return res.value, res
