"""The v2/v3 migration stream that Xen 4.6 and later restore: record type
numbers, writers for the headers and records the legacy converter emits, and
a small reader used by the tests (and handy for checking a converted file).

Layouts follow Xen's docs/specs/libxc-migration-stream.pandoc (revision 3)
and libxl-migration-stream.pandoc (revision 2):

* libxc image header, 24 bytes, big-endian: marker ~0 (u64), id "XENF",
  version (u32), options (u16: bit 0 = big-endian), reserved u16 + u32.
* libxc domain header, 16 bytes, little-endian: type (1 x86 PV, 2 x86 HVM),
  page_shift (u16), reserved u16, xen_major, xen_minor.  A converted stream
  says xen_major 0 (converted) and xen_minor 1 (the converter's version).
* records: u32 type, u32 body_length, body, zero padding to a multiple of 8.
  Padding depends only on the body length, never on the file offset.
* libxl stream header, 16 bytes, big-endian: ident "LibxlFmt", version 2,
  options (bit 0 big-endian, bit 1 legacy: converted from a legacy stream).
  libxl records use the same framing; LIBXC_CONTEXT is empty and the whole
  libxc stream follows it inline.

This module imports nothing heavy: the converter's fast path depends on it.
"""
import struct

from . import format as F
from .errors import V2Error

# ---------------------------------------------------------------- libxc
IHDR = struct.Struct(">QIIHHI")          # marker, id, version, options, res16, res32
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46                     # "XENF"
IHDR_VERSION = 3
IHDR_OPT_BIG_ENDIAN = 1 << 0

DHDR = struct.Struct("<IHHII")           # type, page_shift, reserved, major, minor
DHDR_TYPE_X86_PV = 1
DHDR_TYPE_X86_HVM = 2
CONVERTER_XEN_MAJOR = 0                  # "converted from a legacy stream"
CONVERTER_XEN_MINOR = 1                  # Xen's convert-legacy-stream version

RH = struct.Struct("<II")                # record header: type, body_length

REC_END = 0x00
REC_PAGE_DATA = 0x01
REC_X86_PV_INFO = 0x02
REC_X86_PV_P2M_FRAMES = 0x03
REC_X86_PV_VCPU_BASIC = 0x04
REC_X86_PV_VCPU_EXTENDED = 0x05
REC_X86_PV_VCPU_XSAVE = 0x06
REC_SHARED_INFO = 0x07
REC_X86_TSC_INFO = 0x08
REC_HVM_CONTEXT = 0x09
REC_HVM_PARAMS = 0x0A
REC_TOOLSTACK = 0x0B
REC_X86_PV_VCPU_MSRS = 0x0C
REC_VERIFY = 0x0D
REC_CHECKPOINT = 0x0E
REC_CHECKPOINT_DIRTY_PFN_LIST = 0x0F
REC_STATIC_DATA_END = 0x10
REC_X86_CPUID_POLICY = 0x11
REC_X86_MSR_POLICY = 0x12

LIBXC_RECORD_NAMES = {
    REC_END: "END", REC_PAGE_DATA: "PAGE_DATA", REC_X86_PV_INFO: "X86_PV_INFO",
    REC_X86_PV_P2M_FRAMES: "X86_PV_P2M_FRAMES", REC_X86_PV_VCPU_BASIC: "X86_PV_VCPU_BASIC",
    REC_X86_PV_VCPU_EXTENDED: "X86_PV_VCPU_EXTENDED", REC_X86_PV_VCPU_XSAVE: "X86_PV_VCPU_XSAVE",
    REC_SHARED_INFO: "SHARED_INFO", REC_X86_TSC_INFO: "X86_TSC_INFO",
    REC_HVM_CONTEXT: "HVM_CONTEXT", REC_HVM_PARAMS: "HVM_PARAMS", REC_TOOLSTACK: "TOOLSTACK",
    REC_X86_PV_VCPU_MSRS: "X86_PV_VCPU_MSRS", REC_VERIFY: "VERIFY",
    REC_CHECKPOINT: "CHECKPOINT", REC_CHECKPOINT_DIRTY_PFN_LIST: "CHECKPOINT_DIRTY_PFN_LIST",
    REC_STATIC_DATA_END: "STATIC_DATA_END", REC_X86_CPUID_POLICY: "X86_CPUID_POLICY",
    REC_X86_MSR_POLICY: "X86_MSR_POLICY",
}

PAGE_DATA_HEAD = struct.Struct("<II")    # count, reserved
X86_PV_INFO = struct.Struct("<BBHI")     # guest_width, pt_levels, reserved, reserved
P2M_FRAMES_HEAD = struct.Struct("<II")   # p2m_start_pfn, p2m_end_pfn
VCPU_HEAD = struct.Struct("<II")         # vcpu_id, reserved
TSC_INFO = struct.Struct("<IIQII")       # mode, khz, nsec, incarnation, reserved
HVM_PARAMS_HEAD = struct.Struct("<II")   # count, reserved
HVM_PARAM = struct.Struct("<QQ")         # index, value

# PAGE_DATA entries: type in bits 63..60, pfn in bits 51..0 (the legacy
# stream's 4-bit type moves from bits 31..28 up to 63..60).
PAGE_TYPE_SHIFT = 60
PFN_MASK = (1 << 52) - 1

# ---------------------------------------------------------------- libxl
LIBXL_HDR = struct.Struct(">QII")        # ident, version, options
LIBXL_IDENT = 0x4C6962786C466D74         # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1

LREC_END = 0
LREC_LIBXC_CONTEXT = 1
LREC_EMULATOR_XENSTORE_DATA = 2
LREC_EMULATOR_CONTEXT = 3
LREC_CHECKPOINT_END = 4
LREC_CHECKPOINT_STATE = 5

LIBXL_RECORD_NAMES = {
    LREC_END: "END", LREC_LIBXC_CONTEXT: "LIBXC_CONTEXT",
    LREC_EMULATOR_XENSTORE_DATA: "EMULATOR_XENSTORE_DATA",
    LREC_EMULATOR_CONTEXT: "EMULATOR_CONTEXT", LREC_CHECKPOINT_END: "CHECKPOINT_END",
    LREC_CHECKPOINT_STATE: "CHECKPOINT_STATE",
}

EMULATOR_HEAD = struct.Struct("<II")     # emulator id, index
EMULATOR_ID_UNKNOWN = 0

# Legacy-style qemu record that Xen's converter appends, raw, after the libxc
# END record when writing a bare libxc stream (the libxl layer of Xen 4.5
# wrote it that way): signature, u32 length, data.  No framing, no padding.
QEMU_RAW_SIGNATURE = b"DeviceModelRecord0002"


# ---------------------------------------------------------------- writers
def padding(length):
    """Zero bytes that align a body of `length` bytes to 8."""
    return (8 - (length & 7)) & 7


_ZEROS = bytes(8)


def record(rtype, *parts):
    """A whole record: header, body parts and padding, as one bytes object."""
    body = b"".join(parts)
    return RH.pack(rtype, len(body)) + body + _ZEROS[:padding(len(body))]


def image_header(version=IHDR_VERSION):
    return IHDR.pack(IHDR_MARKER, IHDR_ID, version, 0, 0, 0)


def domain_header(guest):
    dtype = DHDR_TYPE_X86_PV if guest == "pv" else DHDR_TYPE_X86_HVM
    return DHDR.pack(dtype, 12, 0, CONVERTER_XEN_MAJOR, CONVERTER_XEN_MINOR)


def libxl_header():
    return LIBXL_HDR.pack(LIBXL_IDENT, LIBXL_VERSION, LIBXL_OPT_LEGACY)


def page_data_head(count, data_pages):
    """Record header + PAGE_DATA header for `count` entries and that many pages."""
    return RH.pack(REC_PAGE_DATA, 8 + 8 * count + 4096 * data_pages) + \
        PAGE_DATA_HEAD.pack(count, 0)


def pv_info(guest_width, levels):
    return record(REC_X86_PV_INFO, X86_PV_INFO.pack(guest_width, levels, 0, 0))


def p2m_frames(p2m_size, frames_le64):
    """X86_PV_P2M_FRAMES; frames_le64 = the frame numbers as little-endian u64s."""
    return record(REC_X86_PV_P2M_FRAMES, P2M_FRAMES_HEAD.pack(0, p2m_size - 1), frames_le64)


def vcpu_record(rtype, vcpu_id, data):
    return record(rtype, VCPU_HEAD.pack(vcpu_id, 0), data)


def tsc_info(mode, khz, nsec, incarnation):
    return record(REC_X86_TSC_INFO, TSC_INFO.pack(mode, khz, nsec, incarnation, 0))


def hvm_params(pairs):
    """HVM_PARAMS from (index, value) pairs, in the given order."""
    body = [HVM_PARAMS_HEAD.pack(len(pairs), 0)]
    body.extend(HVM_PARAM.pack(i, v) for i, v in pairs)
    return record(REC_HVM_PARAMS, *body)


def emulator_record(rtype, payload, emulator=EMULATOR_ID_UNKNOWN, index=0):
    return record(rtype, EMULATOR_HEAD.pack(emulator, index), payload)


def end_record():
    return RH.pack(REC_END, 0)


# ---------------------------------------------------------------- reader
class V2Record:
    __slots__ = ("layer", "type", "offset", "body")

    def __init__(self, layer, rtype, offset, body):
        self.layer = layer        # "libxc" or "libxl"
        self.type = rtype
        self.offset = offset      # where the record header starts
        self.body = body          # memoryview of the body (no padding)

    @property
    def name(self):
        names = LIBXC_RECORD_NAMES if self.layer == "libxc" else LIBXL_RECORD_NAMES
        return names.get(self.type, f"unknown({self.type:#x})")

    def __repr__(self):
        return f"<{self.layer} {self.name} @{self.offset} len {len(self.body)}>"


class V2Stream:
    """A parsed v2/v3 stream held in memory (for tests and small files).

    prefix:       bytes before the libxl/libxc header (a copied xl header)
    libxl:        True when the stream has a libxl layer
    version:      libxc image version; guest: "pv" | "hvm"; xen_major/minor
    records:      every record of both layers, in file order
    trailer:      bytes after the last END (Xen's raw qemu record, libxc format)
    """

    def __init__(self, data, prefix=0):
        mv = memoryview(data).cast("B")
        self.data = mv
        self.prefix = bytes(mv[:prefix])
        self.records = []
        pos = prefix
        self.libxl = False
        if len(mv) >= pos + LIBXL_HDR.size and \
                LIBXL_HDR.unpack_from(mv, pos)[0] == LIBXL_IDENT:
            ident, version, options = LIBXL_HDR.unpack_from(mv, pos)
            if version != LIBXL_VERSION:
                raise V2Error(f"libxl version {version}, expected 2", pos + 8)
            self.libxl = True
            self.libxl_options = options
            pos += LIBXL_HDR.size
            while True:
                rec, pos = self._record(mv, pos, "libxl")
                self.records.append(rec)
                if rec.type == LREC_LIBXC_CONTEXT:
                    pos = self._libxc(mv, pos)
                elif rec.type == LREC_END:
                    break
        else:
            pos = self._libxc(mv, pos)
        self.end = pos
        self.trailer = bytes(mv[pos:])

    @staticmethod
    def _record(mv, pos, layer):
        if pos + RH.size > len(mv):
            raise V2Error(f"truncated {layer} record header", pos)
        rtype, length = RH.unpack_from(mv, pos)
        end = pos + RH.size + length + padding(length)
        if end > len(mv):
            raise V2Error(f"truncated {layer} record (type {rtype:#x}, {length} bytes)", pos)
        pad = mv[pos + RH.size + length:end]
        if any(pad):
            raise V2Error("non-zero record padding", pos + RH.size + length)
        return V2Record(layer, rtype, pos, mv[pos + RH.size:pos + RH.size + length]), end

    def _libxc(self, mv, pos):
        if pos + IHDR.size + DHDR.size > len(mv):
            raise V2Error("truncated libxc image header", pos)
        marker, ident, version, options, r16, r32 = IHDR.unpack_from(mv, pos)
        if marker != IHDR_MARKER or ident != IHDR_ID:
            raise V2Error("no libxc image header (marker + 'XENF')", pos)
        if version not in (2, 3):
            raise V2Error(f"unknown libxc stream version {version}", pos + 12)
        if options & IHDR_OPT_BIG_ENDIAN:
            raise V2Error("big-endian stream", pos + 16)
        self.version = version
        dtype, shift, _res, major, minor = DHDR.unpack_from(mv, pos + IHDR.size)
        self.guest = {DHDR_TYPE_X86_PV: "pv", DHDR_TYPE_X86_HVM: "hvm"}.get(dtype)
        if self.guest is None or shift != 12:
            raise V2Error(f"unsupported domain header (type {dtype}, page_shift {shift})",
                          pos + IHDR.size)
        self.xen_major, self.xen_minor = major, minor
        pos += IHDR.size + DHDR.size
        while True:
            rec, pos = self._record(mv, pos, "libxc")
            self.records.append(rec)
            if rec.type == REC_END:
                return pos

    def libxc_records(self, rtype=None):
        return [r for r in self.records
                if r.layer == "libxc" and (rtype is None or r.type == rtype)]

    def libxl_records(self, rtype=None):
        return [r for r in self.records
                if r.layer == "libxl" and (rtype is None or r.type == rtype)]

    def page_data(self):
        """(entries u64 list, page bytes) for every PAGE_DATA record, in order."""
        out = []
        for r in self.libxc_records(REC_PAGE_DATA):
            count, _ = PAGE_DATA_HEAD.unpack_from(r.body, 0)
            entries = struct.unpack_from(f"<{count}Q", r.body, 8)
            out.append((entries, r.body[8 + 8 * count:]))
        return out

    def memory_image(self, p2m_size):
        """The guest image the PAGE_DATA records build (last write wins),
        p2m_size * 4096 bytes with page p at p * 4096, as a numpy array."""
        import numpy as np
        image = np.zeros(p2m_size * 4096, dtype=np.uint8)
        view = image.reshape(-1, 4096)
        for r in self.libxc_records(REC_PAGE_DATA):
            count, _ = PAGE_DATA_HEAD.unpack_from(r.body, 0)
            entries = np.frombuffer(r.body, dtype="<u8", count=count, offset=8)
            types = entries >> np.uint64(PAGE_TYPE_SHIFT)
            pfns = (entries & np.uint64(PFN_MASK)).astype(np.int64)
            data = pfns[np.array(F.DATA_TYPES)[types]]
            pages = np.frombuffer(r.body, dtype=np.uint8, offset=8 + 8 * count)
            if pages.size != data.size * 4096:
                raise V2Error("PAGE_DATA length disagrees with its entries", r.offset)
            pages = pages.reshape(-1, 4096)
            # in order, so that a pfn repeated inside one record ends with its last copy
            _, last = np.unique(data[::-1], return_index=True)
            keep = data.size - 1 - last
            view[data[keep]] = pages[keep]
        return image

    def hvm_params(self):
        """Every HVM_PARAMS record's (index, value) pairs, in order."""
        out = []
        for r in self.libxc_records(REC_HVM_PARAMS):
            count, _ = HVM_PARAMS_HEAD.unpack_from(r.body, 0)
            flat = struct.unpack_from(f"<{2 * count}Q", r.body, 8)
            out.append(list(zip(flat[0::2], flat[1::2])))
        return out


def read_stream(data, prefix=0):
    """Parse a v2/v3 stream (bytes-like or a path); `prefix` bytes are skipped
    first (the length of a copied xl header)."""
    if isinstance(data, str) or hasattr(data, "__fspath__"):
        with open(data, "rb") as f:
            data = f.read()
    return V2Stream(data, prefix)
