"""Small builders for legacy streams with known vCPU state and page tables,
for the export / cpu / translate tests.

Register offsets are written as literal numbers taken from Xen's public
headers (hvm/save.h struct hvm_hw_cpu; xen-x86_64.h / xen-x86_32.h and
arch-x86/xen.h vcpu_guest_context), on purpose independent of the layouts
in xlegacy.cpu, so the tests check the decoder against the headers.
"""
import struct

import numpy as np

PAGE = 4096

# ---------------------------------------------------------------- HVM CPU record
# struct hvm_hw_cpu offsets (bytes)
HVM_OFF = {
    "rax": 512, "rbx": 520, "rcx": 528, "rdx": 536, "rbp": 544, "rsi": 552, "rdi": 560,
    "rsp": 568, "r8": 576, "r15": 632,
    "rip": 640, "rflags": 648, "cr0": 656, "cr2": 664, "cr3": 672, "cr4": 680,
    "dr0": 688, "dr7": 728,
    "cs_sel": 736, "ds_sel": 740, "ss_sel": 756, "tr_sel": 760,
    "cs_limit": 768, "idtr_limit": 800, "gdtr_limit": 804,
    "cs_base": 808, "fs_base": 832, "gs_base": 840, "idtr_base": 872, "gdtr_base": 880,
    "cs_arbytes": 888, "ss_arbytes": 908,
    "shadow_gs": 944, "msr_lstar": 960, "msr_efer": 992, "msr_tsc_aux": 1000, "tsc": 1008,
}
HVM_U32 = {k for k in HVM_OFF if k.endswith(("_sel", "_limit", "_arbytes"))}


def hvm_cpu_record(**regs):
    rec = bytearray(1024)
    rec[:512] = bytes(range(256)) * 2          # recognisable FXSAVE area
    for name, value in regs.items():
        fmt = "<I" if name in HVM_U32 else "<Q"
        struct.pack_into(fmt, rec, HVM_OFF[name], value)
    return bytes(rec)


def hvm_context(cpus, extra=()):
    """An hvm_save blob: HEADER, one CPU record per (instance, bytes), the
    `extra` (typecode, instance, data) records, END."""
    def rec(t, i, data):
        return struct.pack("<HHI", t, i, len(data)) + data
    out = rec(1, 0, struct.pack("<IIQII", 0x54381286, 1, 0x1234, 0x306C3, 2400000))
    for inst, data in cpus:
        out += rec(2, inst, data)
    for t, i, data in extra:
        out += rec(t, i, data)
    return out + rec(0, 0, b"")


# Long mode, paging, PAE, NX: a 64-bit guest in its kernel.
LONG = dict(cr0=0x80050033, cr4=0x000406F0 | (1 << 5), msr_efer=0xD01, rflags=0x246,
            cs_sel=0x10, ss_sel=0x18, cs_arbytes=0xA9B, ss_arbytes=0xC93)
PAE32 = dict(cr0=0x80050033, cr4=0x6F0 | (1 << 5), msr_efer=0x800, rflags=0x202,
             cs_sel=0x60, ss_sel=0x68, cs_arbytes=0xC9B, ss_arbytes=0xC93)
TWOLEVEL = dict(cr0=0x80050033, cr4=0x690 | (1 << 4), msr_efer=0, rflags=0x202,
                cs_sel=0x60, ss_sel=0x68, cs_arbytes=0xC9B, ss_arbytes=0xC93)

# ---------------------------------------------------------------- PV contexts
PV64_OFF = {"flags": 512, "rax": 600, "rip": 648, "cs": 656, "rflags": 664, "rsp": 672,
            "ss": 680, "gdt_frames": 4832, "gdt_ents": 4960, "kernel_ss": 4968,
            "ctrlreg": 4984, "fs_base": 5144, "gs_base_kernel": 5152, "gs_base_user": 5160}
PV32_OFF = {"flags": 512, "eax": 540, "eip": 548, "cs": 552, "eflags": 556, "esp": 560,
            "ss": 564, "gdt_frames": 2640, "gdt_ents": 2704, "ctrlreg": 2716}


def pv64_context(cr3_pfn, user_pfn=None, rip=0xFFFFFFFF81000123, rsp=0xFFFF880000123F00,
                 rax=0x1111, gdt_frame=7):
    c = bytearray(0x1430)
    struct.pack_into("<Q", c, PV64_OFF["flags"], 0x25)           # i387_valid|in_kernel|online
    struct.pack_into("<Q", c, PV64_OFF["rax"], rax)
    struct.pack_into("<Q", c, PV64_OFF["rip"], rip)
    struct.pack_into("<H", c, PV64_OFF["cs"], 0xE033)
    struct.pack_into("<Q", c, PV64_OFF["rflags"], 0x246)
    struct.pack_into("<Q", c, PV64_OFF["rsp"], rsp)
    struct.pack_into("<H", c, PV64_OFF["ss"], 0xE02B)
    struct.pack_into("<Q", c, PV64_OFF["gdt_frames"], gdt_frame)
    struct.pack_into("<Q", c, PV64_OFF["gdt_ents"], 16)
    ctrl = [0x80050033, 0, 0, cr3_pfn << 12, 0x2660, 0, 0, 0]
    if user_pfn is not None:
        ctrl[1] = 1 | (user_pfn << 12)
    struct.pack_into("<8Q", c, PV64_OFF["ctrlreg"], *ctrl)
    struct.pack_into("<3Q", c, PV64_OFF["fs_base"], 0x7F0000001000, 0xFFFF88003FC00000, 0)
    return bytes(c)


def fold32(pfn):
    return ((pfn << 12) | (pfn >> 20)) & 0xFFFFFFFF


def pv32_context(cr3_pfn, eip=0xC0100123, esp=0xC0123F00, eax=0x2222):
    c = bytearray(0xAF0)
    struct.pack_into("<I", c, PV32_OFF["flags"], 0x25)
    struct.pack_into("<I", c, PV32_OFF["eax"], eax)
    struct.pack_into("<I", c, PV32_OFF["eip"], eip)
    struct.pack_into("<H", c, PV32_OFF["cs"], 0xE019)
    struct.pack_into("<I", c, PV32_OFF["eflags"], 0x246)
    struct.pack_into("<I", c, PV32_OFF["esp"], esp)
    struct.pack_into("<H", c, PV32_OFF["ss"], 0xE021)
    struct.pack_into("<8I", c, PV32_OFF["ctrlreg"], 0x8005003B, 0, 0, fold32(cr3_pfn), 0x6F0,
                     0, 0, 0)
    return bytes(c)


# ---------------------------------------------------------------- page tables
class PageTables:
    """Builds x86 page tables inside a dict pfn -> bytearray(4096).

    mode: "4-level", "5-level", "pae", "2-level".  Entries hold physical
    addresses (for PV images: pseudo-physical, i.e. canonical)."""

    FLAGS = 0x67                      # P | RW | US | A | D

    def __init__(self, mode, pages, next_pfn, types=None):
        self.mode = mode
        self.pages = pages
        self.next = next_pfn
        self.types = types if types is not None else {}
        if mode == "pae":
            self.esize, self.shifts, self.bits = 8, [30, 21, 12], [2, 9, 9]
        elif mode == "2-level":
            self.esize, self.shifts, self.bits = 4, [22, 12], [10, 10]
        else:
            n = 5 if mode == "5-level" else 4
            self.esize, self.bits = 8, [9] * n
            self.shifts = [12 + 9 * i for i in range(n - 1, -1, -1)]
        self.root = self._alloc(len(self.shifts))

    def _alloc(self, level):
        pfn = self.next
        self.next += 1
        self.pages[pfn] = bytearray(PAGE)
        self.types[pfn] = level
        return pfn

    def _get(self, pfn, index):
        off = index * self.esize
        return int.from_bytes(self.pages[pfn][off:off + self.esize], "little")

    def _set(self, pfn, index, value):
        off = index * self.esize
        self.pages[pfn][off:off + self.esize] = value.to_bytes(self.esize, "little")

    def map(self, vaddr, paddr, size=PAGE, flags=None, nx=False):
        flags = self.FLAGS if flags is None else flags
        table = self.root
        nlev = len(self.shifts)
        for depth, (shift, bits) in enumerate(zip(self.shifts, self.bits)):
            level = nlev - depth
            index = (vaddr >> shift) & ((1 << bits) - 1)
            if size == 1 << shift:
                entry = paddr | flags
                if size != PAGE:
                    entry |= 0x80                       # PS
                    if self.esize == 4 and paddr >> 32:  # PSE-36: bits 39:32 in 20:13
                        entry = (paddr & 0xFFC00000) | ((paddr >> 32) << 13) | flags | 0x80
                if nx:
                    entry |= 1 << 63
                self._set(table, index, entry)
                return
            entry = self._get(table, index)
            if not entry & 1:
                child = self._alloc(level - 1)
                pae_top = self.mode == "pae" and depth == 0
                entry = (child << 12) | (0x1 if pae_top else self.FLAGS)
                self._set(table, index, entry)
            table = (entry & 0x000FFFFFFFFFF000) >> 12
        raise ValueError("size does not match a page size of this mode")


# ---------------------------------------------------------------- streams
def _ul(width):
    return "<Q" if width == 8 else "<I"


def _batches(pages, types, width):
    """Page batches (<= 1024 entries) for pfn -> bytes, with page types."""
    out = bytearray()
    pfns = sorted(pages)
    for i in range(0, len(pfns), 1024):
        chunk = pfns[i:i + 1024]
        out += struct.pack("<i", len(chunk))
        for p in chunk:
            out += struct.pack(_ul(width), p | (types.get(p, 0) << 28))
        for p in chunk:
            out += bytes(pages[p])
    return out


def _vcpu_info(online):
    max_id = max(online)
    words = [0] * (max_id // 64 + 1)
    for v in online:
        words[v // 64] |= 1 << (v % 64)
    return struct.pack("<ii", -2, max_id) + b"".join(struct.pack("<Q", w) for w in words)


def hvm_stream(p2m_size, pages, context, width=8, online=(0,), magic=(0, 0, 0)):
    out = bytearray(struct.pack(_ul(width), p2m_size))
    out += _vcpu_info(online)
    out += _batches(pages, {}, width)
    out += struct.pack("<i", 0)
    out += struct.pack("<3Q", *magic) + struct.pack("<I", len(context)) + context
    out += b"DeviceModelRecord0002" + struct.pack("<I", 4) + b"QEVM"
    return bytes(out)


def pv_stream(p2m_size, pages, contexts, guest_width=8, width=8, types=None,
              shared_info=None):
    """contexts: {vcpu id: context bytes}; types: {pfn: type nibble}."""
    ul = _ul(width)
    vsize = 0x1430 if guest_width == 8 else 0xAF0
    out = bytearray(struct.pack(ul, p2m_size))
    out += struct.pack(ul, (1 << (8 * width)) - 1)
    blocks = b"vcpu" + struct.pack("<I", vsize) + bytes(vsize)
    out += struct.pack("<I", len(blocks)) + blocks
    nframes = (p2m_size - 1) // (PAGE // guest_width) + 1
    out += b"".join(struct.pack(ul, 100 + i) for i in range(nframes))
    out += _vcpu_info(sorted(contexts))
    out += _batches(pages, types or {}, width)
    out += struct.pack("<i", 0)
    out += struct.pack("<I", 0)                          # no unmapped pfns
    for v in sorted(contexts):
        assert len(contexts[v]) == vsize
        out += contexts[v]
    out += shared_info if shared_info is not None else bytes(range(256)) * 16
    return bytes(out)


def random_pages(rng, pfns):
    return {int(p): rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes() for p in pfns}
