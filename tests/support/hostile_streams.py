"""Small legacy streams built byte by byte for the hostile-input tests and the
fuzz harnesses, each with a map of its structure and the images a correct
restore must give.

Every field the reader reads separately is one element of `layout`:
(start, end, what) where `what` is the text the reader puts in its
"stream truncated in ..." message for that field.  Truncating a stream at
any byte of an element of checkpoint 1 must raise TruncatedStream naming
that element, at the offset where the data ends; truncating inside a later
checkpoint must give the image of the checkpoint before it.

This is test scaffolding, independent of xlegacy's own writer on purpose:
the tests must not share a misunderstanding of the format with the code
under test.
"""
import struct

import numpy as np

PAGE = 4096
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"

NOTAB, L1TAB, L2TAB, L3TAB, L4TAB = 0x0, 0x1, 0x2, 0x3, 0x4
LPINTAB = 0x8
BROKEN, XALLOC, XTAB = 0xD, 0xE, 0xF
NO_DATA = (BROKEN, XALLOC, XTAB)

PARAM_NAMES = {-3: "HVM_IDENT_PT", -4: "HVM_VM86_TSS", -8: "HVM_CONSOLE_PFN",
               -10: "HVM_ACPI_IOPORTS_LOCATION", -11: "HVM_VIRIDIAN",
               -14: "HVM_GENERATION_ID_ADDR", -15: "HVM_PAGING_RING_PFN",
               -16: "HVM_MONITOR_RING_PFN", -17: "HVM_SHARING_RING_PFN",
               -19: "HVM_IOREQ_SERVER_PFN", -20: "HVM_NR_IOREQ_SERVER_PAGES"}


def entry(pfn, typ=NOTAB):
    return (typ << 28) | pfn


def page_bytes(seed, pfn, version):
    """Deterministic page contents; half of each page is a repeating pattern
    so that deltas against an older version have both RUNs and SKIPs."""
    rng = np.random.default_rng([seed, pfn, version])
    words = rng.integers(0, 1 << 32, PAGE // 4, dtype=np.uint32)
    keep = np.random.default_rng([seed, pfn]).random(PAGE // 4) < 0.5
    words[keep] = pfn * 2654435761 % (1 << 32)
    return words.astype("<u4").tobytes()


def encode_page(old, new, full=False):
    """One format B page encoding of `new` for a receiver holding `old`
    (the encoder of xc_compression.c, rewritten: RUN copies, SKIP keeps)."""
    if new == old and not full:
        return b"\x00"
    if full:
        return b"\x80" + new
    o = np.frombuffer(old, "<u4")
    n = np.frombuffer(new, "<u4")
    same = o == n
    out = bytearray()
    i = 0
    while i < n.size:
        j = i
        while j < n.size and same[j] == same[i] and j - i < 127:
            j += 1
        if same[i]:
            out.append(0x80 | (j - i))
        else:
            out.append(j - i)
            out += new[4 * i:4 * j]
        i = j
    if len(out) >= 1 + PAGE:
        return b"\x80" + new
    return bytes(out)


class Built:
    """A finished stream: `data`, `layout`, `images[k]` = the image after
    checkpoint k+1, and what the reader needs (width in bytes, guest)."""

    def __init__(self, b):
        self.data = bytes(b.buf)
        self.layout = list(b.layout)
        self.width = b.width
        self.guest = b.guest
        self.p2m_size = b.p2m_size
        self.images = list(b.images)
        self.checkpoint_ends = list(b.checkpoint_ends)
        self.image_offset = b.image_offset
        self.marks = dict(b.marks)

    @property
    def image(self):
        return self.images[-1]

    def element_at(self, offset):
        for start, end, what in self.layout:
            if start <= offset < end:
                return start, end, what
        return None

    def checkpoint_of(self, offset):
        """1-based checkpoint whose bytes contain `offset` (0: header)."""
        if offset < self.checkpoint_starts[0]:
            return 0
        for k, end in enumerate(self.checkpoint_ends):
            if offset < end:
                return k + 1
        return len(self.checkpoint_ends) + 1

    @property
    def checkpoint_starts(self):
        return [self.marks["body"]] + self.checkpoint_ends[:-1]


class Builder:
    """Append-only stream builder; see the module docstring."""

    def __init__(self, width=8, guest="hvm", p2m_size=64, seed=1, wrapper=None,
                 config=b"name = 'hostile'\n"):
        self.width = width
        self.guest = guest
        self.p2m_size = p2m_size
        self.seed = seed
        self.buf = bytearray()
        self.layout = []
        self.images = []
        self.checkpoint_ends = []
        self.marks = {}
        self.model = {}            # pfn -> bytes, the receiver's state so far
        self.version = {}
        self.pending = []          # format B pages of the open checkpoint: (pfn, bytes)
        self.vcpus = [0]
        self.vcpu_size = 0x1430
        self.extv = False
        self.xcnt = 0
        if wrapper == "xl":
            self.put(XL_MAGIC, "xl magic")
            opt = struct.pack("<I", len(config)) + config
            self.put(struct.pack("<4I", 0x01020304, 0, 0, len(opt)), "xl header")
            self.put(opt, "xl optional data")
        self.image_offset = len(self.buf)
        self.put(self.ul(p2m_size), "libxc header (p2m_size)")

    # -------------------------------------------------------------- bytes
    def ul(self, v):
        return struct.pack("<Q" if self.width == 8 else "<I", v)

    def put(self, data, what):
        start = len(self.buf)
        self.buf += data
        if data:
            self.layout.append((start, len(self.buf), what))
        return start

    def mark(self, name):
        self.marks[name] = len(self.buf)

    # -------------------------------------------------------------- PV header
    def pv_header(self, guest_width=8, extv=False, xcnt=0, extra_blocks=(), extended=True):
        self.vcpu_size = 0x1430 if guest_width == 8 else 0xAF0
        self.extv = extv
        self.xcnt = xcnt
        nframes = (self.p2m_size - 1) // (PAGE // guest_width) + 1
        frames = [0x1000 + i for i in range(nframes)]
        if not extended:
            self.put(self.ul(frames[0]), "PV extended-info marker")
            self.put(b"".join(self.ul(f) for f in frames[1:]), "p2m frame list")
            self.mark("body")
            return
        blocks = [(b"vcpu", bytes(range(256)) * (self.vcpu_size // 256)
                   + bytes(self.vcpu_size % 256))]
        if extv:
            blocks.append((b"extv", b""))
        if xcnt:
            blocks.append((b"xcnt", struct.pack("<II", xcnt, 0)))
        blocks.extend(extra_blocks)
        total = sum(8 + len(d) for _, d in blocks)
        self.put(self.ul((1 << (8 * self.width)) - 1), "PV extended-info marker")
        self.put(struct.pack("<I", total), "extended-info size")
        for bid, d in blocks:
            self.put(struct.pack("<4sI", bid, len(d)), "extended-info block")
            self.put(d, f"extended-info block {bid!r}")
        self.put(b"".join(self.ul(f) for f in frames), "p2m frame list")
        self.mark("body")

    def hvm_header(self):
        self.mark("body")

    # -------------------------------------------------------------- body
    def chunk_id(self, cid):
        return self.put(struct.pack("<i", cid), "chunk id")

    def batch(self, entries, compressed=False, pages=None, verify=False):
        """A PFN array; data pages are generated (or taken from `pages`)."""
        at = self.chunk_id(len(entries))
        self.put(b"".join(self.ul(e) for e in entries), "PFN array")
        data_pfns = [e & 0x0FFFFFFF for e in entries if (e >> 28) & 0xF not in NO_DATA]
        if pages is None:
            pages = [self.next_page(p) for p in data_pfns]
        if compressed:
            self.pending.extend(zip(data_pfns, pages))
        else:
            for i, (p, pg) in enumerate(zip(data_pfns, pages)):
                self.put(pg, f"data page {i} (pfn {p})")
                if not verify:
                    self.model[p] = pg
        return at

    def next_page(self, pfn):
        v = self.version.get(pfn, 0) + 1
        self.version[pfn] = v
        return page_bytes(self.seed, pfn, v)

    def model_after(self, pfn):
        """The receiver's page once everything sent so far is applied."""
        staged = getattr(self, "_staged", None) or self.model
        return staged.get(pfn, bytes(PAGE))

    def param(self, cid, value):
        at = self.chunk_id(cid)
        self.put(struct.pack("<IQ", 0, value), PARAM_NAMES[cid])
        return at

    def vcpu_info(self, max_id, online):
        at = self.chunk_id(-2)
        self.put(struct.pack("<i", max_id), "VCPU_INFO max_vcpu_id")
        words = [0] * (max_id // 64 + 1)
        for v in online:
            words[v // 64] |= 1 << (v % 64)
        self.put(struct.pack(f"<{len(words)}Q", *words), "VCPU_INFO map")
        self.vcpus = sorted(online)
        return at

    def tsc_info(self, mode=1, nsec=123456789, khz=2400000, incarnation=3):
        at = self.chunk_id(-7)
        self.put(struct.pack("<IQII", mode, nsec, khz, incarnation), "TSC_INFO")
        return at

    def toolstack(self, data):
        at = self.chunk_id(-18)
        self.put(struct.pack("<I", len(data)), "TOOLSTACK length")
        self.put(data, "TOOLSTACK data")
        return at

    def marker(self, cid):
        """A chunk with no payload: -1, -9, -13."""
        return self.chunk_id(cid)

    def compressed_chunk(self, data):
        at = self.chunk_id(-12)
        self.put(self.ul(len(data)), "COMPRESSED_DATA length")
        self.put(data, "COMPRESSED_DATA")
        return at

    def flush_compressed(self, chunk_size=3000, full_every=5, bad_page=None):
        """Encode the pending format B pages into COMPRESSED_DATA chunks.
        The receiver applies them only at the end of the checkpoint.
        bad_page=(i, encoding) replaces page i's encoding; its stream offset
        is kept in marks["bad_page"]."""
        enc = bytearray()
        staged = dict(getattr(self, "_staged", None) or self.model)
        bad_at = None
        for i, (p, pg) in enumerate(self.pending):
            old = staged.get(p, bytes(PAGE))
            if bad_page is not None and i == bad_page[0]:
                bad_at = len(enc)
                enc += bad_page[1]
            else:
                enc += encode_page(old, pg, full=(full_every and i % full_every == 0))
            staged[p] = pg
        self.pending = []
        for i in range(0, len(enc), chunk_size):
            self.compressed_chunk(bytes(enc[i:i + chunk_size]))
            if bad_at is not None and i <= bad_at < i + chunk_size:
                self.marks["bad_page"] = len(self.buf) - len(enc[i:i + chunk_size]) \
                    + (bad_at - i)
        self._staged = staged

    def end(self):
        self.chunk_id(0)

    # -------------------------------------------------------------- tails
    def hvm_tail(self, magic=(0xfe, 0xff, 0xfd), context=None, qemu=b"QEVM" + bytes(60),
                 signature=b"DeviceModelRecord0002"):
        if context is None:
            context = struct.pack("<HHI", 1, 0, 8) + struct.pack("<II", 0x54381286, 1) \
                + struct.pack("<HHI", 0, 0, 0)
        self.put(struct.pack("<3Q", *magic), "HVM tail magic pfns")
        self.put(struct.pack("<I", len(context)), "HVM context length")
        self.put(context, "HVM context")
        self.put(signature, "qemu record signature")
        if signature == b"QemuDeviceModelRecord":
            self.put(qemu, "qemu data")
        else:
            self.put(struct.pack("<I", len(qemu)), "qemu record length")
            self.put(qemu, "qemu data")

    def pv_tail(self, unmapped=(3, 5)):
        self.put(struct.pack("<I", len(unmapped)), "PV tail unmapped pfn count")
        self.put(b"".join(self.ul(p) for p in unmapped), "unmapped pfn list")
        for v in self.vcpus:
            self.put(bytes([v + 1]) * self.vcpu_size, f"vcpu {v} context")
            if self.extv:
                self.put(bytes([v + 2]) * 128, f"vcpu {v} extended context")
            if self.xcnt:
                self.put(struct.pack("<QQ", 3, self.xcnt - 16) + bytes([v + 3]) * (self.xcnt - 16),
                         f"vcpu {v} xsave area")
        self.put(bytes([0x5A]) * PAGE, "shared info page")

    def remus_checkpoint_end(self, cp):
        """What closes Remus checkpoint cp in these streams: a TSC-style param
        chunk, the end of the chunks, an HVM tail whose magic pfns and qemu
        record say which checkpoint it is, and the checkpoint's end."""
        self.param(-3, 0x1000 * cp)
        self.end()
        self.hvm_tail(magic=(0xfe, 0xff, 0xfd - cp), signature=b"RemusDeviceModelState",
                      qemu=b"QEVM" + bytes([cp]) * 40)
        self.checkpoint_done()

    def checkpoint_done(self):
        staged = getattr(self, "_staged", None)
        if staged is not None:
            self.model = staged
            self._staged = None
        self.checkpoint_ends.append(len(self.buf))
        self.images.append(self.render())

    def render(self):
        img = bytearray(self.p2m_size * PAGE)
        for p, pg in self.model.items():
            img[p * PAGE:(p + 1) * PAGE] = pg
        return bytes(img)

    def build(self):
        return Built(self)


# ---------------------------------------------------------------- catalogue
def hvm_stream(width=8, wrapper=None, p2m_size=48, seed=1, qemu_sig=b"DeviceModelRecord0002"):
    """A non-checkpointed HVM save with most kinds of chunk."""
    b = Builder(width, "hvm", p2m_size, seed, wrapper)
    b.hvm_header()
    b.tsc_info()
    b.vcpu_info(2, [0, 2])
    b.batch([entry(0), entry(1), entry(2, XTAB), entry(3), entry(0xfff, XTAB) & 0xF0000000,
             entry(4, XALLOC), entry(5, BROKEN), entry(6)])
    b.param(-3, 0xfeffc000)
    b.param(-11, 1)
    b.toolstack(struct.pack("<II", 1, 0))
    b.batch([entry(7), entry(1), entry(9)])     # pfn 1 re-sent: the last copy wins
    b.marker(-9)
    b.end()
    b.hvm_tail(signature=qemu_sig)
    b.checkpoint_done()
    return b.build()


def pv_stream(width=8, guest_width=8, extv=True, xcnt=592, p2m_size=40, seed=2):
    """A non-checkpointed PV save with extended info and a full tail."""
    b = Builder(width, "pv", p2m_size, seed)
    b.pv_header(guest_width=guest_width, extv=extv, xcnt=xcnt)
    b.vcpu_info(1, [0, 1])
    b.batch([entry(0, L4TAB | LPINTAB), entry(1, L3TAB), entry(2, L2TAB), entry(3, L1TAB),
             entry(4), entry(5, XTAB), entry(6)])
    b.batch([entry(8), entry(9)])
    b.end()
    b.pv_tail()
    b.checkpoint_done()
    return b.build()


def remus_stream(width=8, checkpoints=3, compressed=True, p2m_size=32, seed=3,
                 chunk_size=3000, bad_page=None, bad_checkpoint=None):
    """A Remus stream: checkpoint 1 a plain migration (with
    ENABLE_COMPRESSION when `compressed`), later ones format B or A.
    bad_page=(i, encoding) corrupts page i of checkpoint bad_checkpoint."""
    b = Builder(width, "hvm", p2m_size, seed)
    b.hvm_header()
    b.vcpu_info(0, [0])
    b.batch([entry(p) for p in range(0, 12)])
    b.batch([entry(p) for p in range(12, 20)] + [entry(21, XTAB)])
    if compressed:
        b.marker(-13)
    b.end()
    b.hvm_tail(signature=b"RemusDeviceModelState")
    b.checkpoint_done()
    for cp in range(2, checkpoints + 1):
        dirty = [p for p in range(p2m_size) if (p * 7 + cp) % 3 == 0]
        first, second = dirty[:len(dirty) // 2], dirty[len(dirty) // 2:]
        b.batch([entry(p) for p in first], compressed=compressed)
        if compressed:
            b.flush_compressed(chunk_size,
                               bad_page=bad_page if cp == bad_checkpoint else None)
        # first[0] is sent again unchanged (an EMPTY_PAGE in format B)
        pages = [b.next_page(p) for p in second] + [b.model_after(first[0])]
        b.batch([entry(p) for p in second] + [entry(first[0])], compressed=compressed,
                pages=pages)
        if compressed:
            b.flush_compressed(chunk_size)
        b.remus_checkpoint_end(cp)
    return b.build()


def catalogue():
    """name -> Built, the small streams the truncation corpus walks."""
    return {
        "hvm64": hvm_stream(8),
        "hvm32": hvm_stream(4, p2m_size=40, seed=5),
        "hvm64_xl": hvm_stream(8, wrapper="xl", seed=6),
        "pv64": pv_stream(8),
        "pv32_pae": pv_stream(4, guest_width=4, extv=False, xcnt=0, seed=7),
        "remus64_compressed": remus_stream(8, 3, True),
        "remus32_compressed": remus_stream(4, 3, True, seed=8, chunk_size=700),
        "remus64_plain": remus_stream(8, 3, False, seed=9),
    }


def reader_args(built):
    return {"width": built.width * 8, "guest": built.guest}


class PipeLike:
    """No size, short reads: how a pipe or a socket looks to the reader."""

    def __init__(self, data, step=5003):
        self.data = memoryview(data)
        self.pos = 0
        self.step = step

    def readinto(self, buf):
        n = min(len(buf), self.step, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n
