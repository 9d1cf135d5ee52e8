"""Constants and binary layouts of the legacy stream, as Xen's legacy libxc
code (xc_domain_save.c, xc_domain_restore.c, xg_save_restore.h; removed in
Xen 4.6 by commit b15bc4345e) writes and reads them."""
import struct

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_BATCH = 1024                 # MAX_BATCH_SIZE in xg_save_restore.h
MAX_PFNS = 1 << 28               # 28 bits of PFN in a PFN-array entry
MAX_VCPU_ID = 4095               # XC_SR_MAX_VCPUS - 1 in libxc
MAX_UNMAPPED = 1 << 28           # libxc's bound on the PV tail's pfn count

# Page type nibbles (bits 31..28 of an entry), XEN_DOMCTL_PFINFO_* >> 28.
NOTAB, L1TAB, L2TAB, L3TAB, L4TAB = 0x0, 0x1, 0x2, 0x3, 0x4
LPINTAB = 0x8
BROKEN, XALLOC, XTAB = 0xD, 0xE, 0xF
INVALID_TYPES = (0x5, 0x6, 0x7)
NO_DATA_TYPES = (BROKEN, XALLOC, XTAB)
# Which type nibbles carry a data page, indexed by nibble (the invalid ones
# do not: libxc stops on them before it looks for data).
DATA_TYPES = tuple(t not in NO_DATA_TYPES and t not in INVALID_TYPES for t in range(16))

# A PFN-array entry: type nibble in bits 31..28, pfn in bits 27..0; with
# 8-byte ulongs bits 63..32 must be zero.
ENTRY_TYPE_SHIFT = 28
ENTRY_PFN_MASK = 0x0FFFFFFF
ENTRY_TYPE_MASK = 0xF0000000
BARE_XTAB = XTAB << ENTRY_TYPE_SHIFT     # what the saver writes for unmappable pages


def entry_type(entry):
    """The type nibble of a PFN-array entry."""
    return (entry >> ENTRY_TYPE_SHIFT) & 0xF


def entry_pfn(entry):
    """The pfn of a PFN-array entry."""
    return entry & ENTRY_PFN_MASK


TYPE_NAMES = {
    0x0: "NOTAB", 0x1: "L1TAB", 0x2: "L2TAB", 0x3: "L3TAB", 0x4: "L4TAB",
    0x8: "NOTAB|LPINTAB", 0x9: "L1TAB|LPINTAB", 0xA: "L2TAB|LPINTAB",
    0xB: "L3TAB|LPINTAB", 0xC: "L4TAB|LPINTAB",
    0xD: "BROKEN", 0xE: "XALLOC", 0xF: "XTAB",
}

# Metadata chunk ids (XC_SAVE_ID_*).
ENABLE_VERIFY_MODE = -1
VCPU_INFO = -2
HVM_IDENT_PT = -3
HVM_VM86_TSS = -4
TMEM = -5
TMEM_EXTRA = -6
TSC_INFO = -7
HVM_CONSOLE_PFN = -8
LAST_CHECKPOINT = -9
HVM_ACPI_IOPORTS_LOCATION = -10
HVM_VIRIDIAN = -11
COMPRESSED_DATA = -12
ENABLE_COMPRESSION = -13
HVM_GENERATION_ID_ADDR = -14
HVM_PAGING_RING_PFN = -15
HVM_MONITOR_RING_PFN = -16
HVM_SHARING_RING_PFN = -17
TOOLSTACK = -18
HVM_IOREQ_SERVER_PFN = -19
HVM_NR_IOREQ_SERVER_PAGES = -20

CHUNK_NAMES = {
    -1: "ENABLE_VERIFY_MODE", -2: "VCPU_INFO", -3: "HVM_IDENT_PT",
    -4: "HVM_VM86_TSS", -5: "TMEM", -6: "TMEM_EXTRA", -7: "TSC_INFO",
    -8: "HVM_CONSOLE_PFN", -9: "LAST_CHECKPOINT",
    -10: "HVM_ACPI_IOPORTS_LOCATION", -11: "HVM_VIRIDIAN",
    -12: "COMPRESSED_DATA", -13: "ENABLE_COMPRESSION",
    -14: "HVM_GENERATION_ID_ADDR", -15: "HVM_PAGING_RING_PFN",
    -16: "HVM_MONITOR_RING_PFN", -17: "HVM_SHARING_RING_PFN",
    -18: "TOOLSTACK", -19: "HVM_IOREQ_SERVER_PFN",
    -20: "HVM_NR_IOREQ_SERVER_PAGES",
}

# pad+u64 chunks: chunk id -> (param name, Xen HVM_PARAM_* number).
HVM_PARAM_CHUNKS = {
    HVM_IDENT_PT: ("ident_pt", 12),
    HVM_VM86_TSS: ("vm86_tss", 15),
    HVM_CONSOLE_PFN: ("console_pfn", 17),
    HVM_ACPI_IOPORTS_LOCATION: ("acpi_ioports_location", 19),
    HVM_VIRIDIAN: ("viridian", 9),
    HVM_GENERATION_ID_ADDR: ("vm_generation_id_addr", 34),
    HVM_PAGING_RING_PFN: ("paging_ring_pfn", 27),
    HVM_MONITOR_RING_PFN: ("monitor_ring_pfn", 28),
    HVM_SHARING_RING_PFN: ("sharing_ring_pfn", 29),
    HVM_IOREQ_SERVER_PFN: ("ioreq_server_pfn", 32),
    HVM_NR_IOREQ_SERVER_PAGES: ("nr_ioreq_server_pages", 33),
}
HVM_PARAM_NUMBERS = {name: num for name, num in HVM_PARAM_CHUNKS.values()}
# The HVM tail's three magic pfns and the params they are.
MAGIC_PFN_PARAMS = (("ioreq", "ioreq_pfn", 5), ("bufioreq", "bufioreq_pfn", 6),
                    ("store", "store_pfn", 1))

# Fixed layouts.
I32 = struct.Struct("<i")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
PAD_U64 = struct.Struct("<IQ")            # pad+u64 chunk payload
TSC_INFO_LAYOUT = struct.Struct("<IQII")  # mode, nsec, khz, incarnation
EXT_BLOCK = struct.Struct("<4sI")         # extended-info block header
XSAVE_HEAD = struct.Struct("<QQ")         # xfeature_mask, size
MAGIC_PFNS = struct.Struct("<3Q")

# Metadata chunks whose payload has a fixed size: chunk id -> bytes after the id.
FIXED_CHUNK_SIZES = {cid: PAD_U64.size for cid in HVM_PARAM_CHUNKS}
FIXED_CHUNK_SIZES.update({TSC_INFO: TSC_INFO_LAYOUT.size, ENABLE_VERIFY_MODE: 0,
                          LAST_CHECKPOINT: 0, ENABLE_COMPRESSION: 0})

PV_VCPU_SIZE_64 = 0x1430   # vcpu_guest_context of a 64-bit PV guest
PV_VCPU_SIZE_32 = 0xAF0    # ... of a 32-bit PAE PV guest
PV_EXT_VCPU_SIZE = 128
SHARED_INFO_SIZE = PAGE_SIZE

# qemu record signatures (21 bytes each).
QEMU_SIG_LEN = 21
QEMU_TO_EOF = b"QemuDeviceModelRecord"
QEMU_V2 = b"DeviceModelRecord0002"
QEMU_REMUS = b"RemusDeviceModelState"

# Wrapper magics.
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_HEADER = struct.Struct("<4I")   # byteorder, mandatory, optional, optional_data_len
XL_BYTEORDER = 0x01020304
XL_FLAG_JSON = 1 << 0
XL_FLAG_STREAMV2 = 1 << 1
XEND_MAGIC = b"LinuxGuestRecord"
XENSERVER_MAGIC = b"XenSavedDomain\n"
XENSERVER_V2_MAGIC = b"XenSavedDomv2-\n"
XENSERVER_QEMU_MAGIC = b"QemuDeviceModelRecord\n"
LIBVIRT_MAGIC = b"libvirt-xml\n \0 \r"
LIBVIRT_HEADER = struct.Struct("<II40x")  # version, xml_len, unused

# HVM context (hvm_save) records.
HVM_SAVE_DESC = struct.Struct("<HHI")     # typecode, instance, length
HVM_SAVE_END = 0
HVM_SAVE_HEADER = 1
HVM_SAVE_MAGIC = 0x54381286


def walk_hvm_save(blob):
    """The record headers of an hvm_save blob, walked as Xen reads them.

    Returns (records, stop, pos): records is a list of (offset, typecode,
    instance, length) whose data lies inside the blob, in order, END
    included; stop says why the walk ended: "end" (an END record; pos is the
    offset after it), "short" (no room for a record header at pos) or
    "overrun" (the record header at pos claims more bytes than remain; it is
    not in records)."""
    records = []
    pos, n = 0, len(blob)
    while pos + HVM_SAVE_DESC.size <= n:
        typecode, instance, length = HVM_SAVE_DESC.unpack_from(blob, pos)
        if pos + HVM_SAVE_DESC.size + length > n:
            return records, "overrun", pos
        records.append((pos, typecode, instance, length))
        pos += HVM_SAVE_DESC.size + length
        if typecode == HVM_SAVE_END:
            return records, "end", pos
    return records, "short", pos


def ulong(width):
    """struct for the toolstack's unsigned long (width in bytes)."""
    return U64 if width == 8 else U32


def p2m_frame_count(p2m_size, guest_width):
    """Entries in the PV p2m frame list (P2M_FL_ENTRIES in libxc)."""
    return (p2m_size - 1) // (PAGE_SIZE // guest_width) + 1
