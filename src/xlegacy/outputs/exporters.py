"""Restored guest memory in the formats analysis tools read.

    export(fmt, result, image, out_path)

fmt is one of FORMATS; `result` is a restorer.Result (its `present` bitmap
says which PFNs hold a page, its metadata gives the vCPU state); `image` is
the restored memory as a uint8 array with page p at byte p*4096 (an
in-memory image, or a numpy.memmap of a raw restore file, whose pages are
then copied in the kernel).  The output is an output of atomic.py: a file
appears under its name only when complete; a pipe or device is written in
place (every format is written in order, none needs to seek).
Page data is streamed run by run (a run = consecutive present PFNs): memory
use does not grow with the guest.

Formats
-------
elf      ELF64 little-endian ET_CORE, e_machine EM_X86_64 for every guest
         (a 32-bit guest's registers zero-extended).  One PT_NOTE, then one
         PT_LOAD per run: p_paddr = first PFN * 4096, p_vaddr = 0,
         p_filesz = p_memsz = run length, page data at page-aligned
         p_offset.  PFNs without a page are not stored.  From 65534 runs on,
         ELF extended numbering (e_phnum = PN_XNUM, the count in section
         header 0's sh_info).  The PT_NOTE holds, per vCPU:
           "CORE" NT_PRSTATUS  Linux x86_64 struct elf_prstatus (336 bytes),
                               pr_pid = vCPU id + 1, pr_reg = user_regs_struct
           "QEMU" type 0       HVM only: QEMUCPUState version 1 (440 bytes,
                               with kernel_gs_base), the layout of QEMU's
                               dump-guest-memory: crash reads cr3/idtr there
         and once, then per vCPU, our own notes (name "XLEGACY"):
           type 0x584c0001     struct xlegacy_domain (see DOMAIN_NOTE)
           type 0x584c0002     struct xlegacy_vcpu   (see VCPU_NOTE)
lime     LiME: per run a 32-byte header <IIQQQ (magic 0x4C694D45, version 1,
         start address, inclusive end address, 0) and the run's bytes,
         in ascending address order.  No register state (LiME has none).
xc-core  Xen's dump-core format (docs/misc/dump-core-format.txt,
         tools/libxc/xc_core.c): ELF64 ET_CORE with no program headers and
         the sections .shstrtab, .note.Xen (none, header, xen_version,
         format_version 0.1), .xen_prstatus (one 5168-byte
         vcpu_guest_context_any_t per vCPU), .xen_shared_info (PV only),
         .xen_p2m (PV: {pfn, gmfn} with gmfn = pfn, the identity a restored
         image implies: its canonical page tables hold PFNs) or .xen_pfn
         (HVM), and .xen_pages, page-aligned, in ascending PFN order.
         e_machine EM_X86_64, as a 64-bit dom0 writes it.  HVM contexts are
         built from the CPU records as Xen's arch_get_info_guest() does;
         PV contexts are the saved ones (the saver's "valid" bit 0 of
         ctrlreg[1] cleared, as Xen's restore does); a 32-bit PV guest's
         stay in the x86_32 layout at the start of their 5168-byte slots,
         which is what Xen's own dump of such a guest holds.

struct xlegacy_domain (little-endian, 48 bytes):
    u32 version (1); u32 guest (1 HVM, 2 PV); u32 guest_width_bits (PV: 64
    or 32; HVM: 0, not recorded by the stream); u32 toolstack_width_bits;
    u64 p2m_size; u64 nr_pages (PFNs stored); u32 nr_vcpus;
    u32 checkpoint (committed, 1-based); u64 reserved

struct xlegacy_segment (16 bytes): u64 base; u32 limit; u16 selector;
    u16 attr (Xen's packed attributes: type 0-3, s 4, dpl 5-6, p 7, avl 8,
    l 9, db 10, g 11; 0 when the stream does not carry them, as for PV)

struct xlegacy_vcpu (little-endian, 456 bytes):
    u32 version (1); u32 vcpu_id;
    u32 flags: bit0 from an HVM CPU record, bit1 from a PV context,
               bit2 long mode, bit3 CPL 0, bit4 paging on, bit5 the record
               failed a plausibility check (see `xlegacy info --json`);
    u32 paging (0 off, 2 two-level, 3 PAE, 4 four-level, 5 five-level);
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15; u64 rip, rflags;
    u64 cr0, cr2, cr3, cr4, efer (PV: cr3 = cr3 PFN * 4096, efer 0);
    u64 pt_base       physical address of the top-level page table in this
                      image (~0 if paging is off);
    u64 user_pt_base  64-bit PV: the user table (ctrlreg[1]); else ~0;
    xlegacy_segment cs, ds, es, fs, gs, ss, tr, ldtr;
    u64 gdtr_base, idtr_base; u32 gdtr_limit, idtr_limit;
    u64 fs_base, gs_base, kernel_gs_base; u64 dr[8]
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import cpu as _cpu
from ..format import PAGE_SHIFT, PAGE_SIZE
from . import fdio
from .atomic import describe, open_output

FORMATS = ("elf", "lime", "xc-core")

RUN_BLOCK = 1 << 22              # PFNs scanned per step when finding runs
FLUSH_BYTES = 64 << 20           # bytes queued before a writev
IOV_MAX = 1024
COPY_MIN = PAGE_SIZE              # runs of a file-backed image this long go in-kernel
BOUNCE = 4 << 20                  # buffer for image-file runs the kernel will not copy
PN_XNUM = 0xFFFF

# ELF constants
ET_CORE, EM_X86_64 = 4, 62
PT_LOAD, PT_NOTE = 1, 4
SHT_PROGBITS, SHT_STRTAB, SHT_NOTE = 1, 3, 7
NT_PRSTATUS = 1
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
NHDR = struct.Struct("<III")
PHDR_DTYPE = np.dtype([("p_type", "<u4"), ("p_flags", "<u4"), ("p_offset", "<u8"),
                       ("p_vaddr", "<u8"), ("p_paddr", "<u8"), ("p_filesz", "<u8"),
                       ("p_memsz", "<u8"), ("p_align", "<u8")])
assert EHDR.size == 64 and SHDR.size == 64 and PHDR_DTYPE.itemsize == 56

LIME_MAGIC, LIME_VERSION = 0x4C694D45, 1
LIME_HEADER = struct.Struct("<IIQQQ")

XLEGACY_NOTE_NAME = b"XLEGACY"
NT_XLEGACY_DOMAIN, NT_XLEGACY_VCPU = 0x584C0001, 0x584C0002
DOMAIN_NOTE = struct.Struct("<IIIIQQIIQ")
SEGMENT = struct.Struct("<QIHH")
VCPU_NOTE = struct.Struct("<IIII" + "16Q" + "2Q" + "5Q" + "2Q" + "16s" * 8 + "2Q2I" + "3Q" + "8Q")
assert DOMAIN_NOTE.size == 48 and VCPU_NOTE.size == 456

PRSTATUS = struct.Struct("<3ih2xQQ4I64s27QI4x")    # Linux x86_64 struct elf_prstatus
assert PRSTATUS.size == 336
QEMU_SEG = struct.Struct("<IIIIQ")
QEMU_CPU = struct.Struct("<II" + "18Q" + "24s" * 10 + "5Q" + "Q")
assert QEMU_CPU.size == 440

# xc-core (xc_core.h, elfnote.h)
XC_CORE_MAGIC, XC_CORE_MAGIC_HVM = 0xF00FEBED, 0xF00FEBEE
XEN_ELFNOTE_DUMPCORE_NONE = 0x2000000
XEN_ELFNOTE_DUMPCORE_HEADER = 0x2000001
XEN_ELFNOTE_DUMPCORE_XEN_VERSION = 0x2000002
XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION = 0x2000003
XEN_DUMPCORE_FORMAT_VERSION = (0 << 32) | 1
# xen_dumpcore_elfnote_xen_version_desc: u64 major, minor; extraversion char[16];
# compile_info 144; capabilities char[1024]; changeset char[64];
# platform_parameters (ulong virt_start, padded to 8); u64 pagesize
XEN_VERSION_DESC = 1280
VCPU_CONTEXT_ANY = 5168          # sizeof(vcpu_guest_context_any_t) on x86
HYPERVISOR_VIRT_START_64 = 0xFFFF_8000_0000_0000
HYPERVISOR_COMPAT_VIRT_START = 0xF580_0000


# ------------------------------------------------------------------ runs
def iter_runs(present, block=RUN_BLOCK):
    """Yield (starts, ends) int64 arrays of runs of True in `present`
    (ends exclusive), ascending, scanning `block` PFNs at a time."""
    n = int(present.size)
    pending = None                       # a run touching the end of the last block
    for a in range(0, n, block):
        b = min(n, a + block)
        p = np.asarray(present[a:b]).view(np.int8)
        d = np.diff(p, prepend=np.int8(0), append=np.int8(0))
        starts = np.flatnonzero(d == 1).astype(np.int64) + a
        ends = np.flatnonzero(d == -1).astype(np.int64) + a
        if pending is not None:
            if starts.size and starts[0] == a:
                starts[0] = pending       # the run goes on across the block edge
            else:
                yield (np.array([pending], np.int64),
                       np.array([a], np.int64))
            pending = None
        if ends.size and ends[-1] == b and b < n:
            pending = int(starts[-1])
            starts, ends = starts[:-1], ends[:-1]
        if starts.size:
            yield starts, ends
    if pending is not None:
        yield np.array([pending], np.int64), np.array([n], np.int64)


def count_runs(present):
    runs = pages = 0
    for s, e in iter_runs(present):
        runs += int(s.size)
        pages += int((e - s).sum())
    return runs, pages


def iter_pfns(present, block=RUN_BLOCK):
    """Yield the present PFNs, ascending, as uint64 arrays."""
    n = int(present.size)
    for a in range(0, n, block):
        idx = np.flatnonzero(np.asarray(present[a:min(n, a + block)]))
        if idx.size:
            yield idx.astype(np.uint64) + np.uint64(a)


# ------------------------------------------------------------------ output
class _Out:
    """Sequential writer to an output of atomic.py (a file renamed into
    place at commit, or a stream written in place): queued buffers go out
    with writev; page runs of a file-backed image are copied in the kernel
    (copy_file_range to a file, sendfile to a stream)."""

    def __init__(self, output):
        self.output = output
        self.fd = output.fd
        self.iov = []
        self.queued = 0
        self.pos = 0

    def put(self, buf):
        mv = memoryview(buf).cast("B")
        if not len(mv):
            return
        self.iov.append(mv)
        self.queued += len(mv)
        self.pos += len(mv)
        if len(self.iov) >= IOV_MAX or self.queued >= FLUSH_BYTES:
            self.flush()

    def pad_to(self, alignment):
        extra = -self.pos % alignment
        if extra:
            self.put(bytes(extra))

    def flush(self):
        iov, self.iov, self.queued = self.iov, [], 0
        self._guard(fdio.writev_all, self.fd, iov)

    def copy(self, src_fd, offset, count):
        """Append `count` bytes of src_fd from `offset`; False when the
        kernel cannot do it (then nothing was written)."""
        self.flush()
        how = fdio.copy_file_range_all if self.output.seekable else \
            (lambda i, o, f, n: fdio.sendfile_all(f, i, o, n))
        done = self._guard(how, src_fd, offset, self.fd, count)
        if done is None:
            return False
        if done < count:
            raise OSError(errno.EIO, f"the image file ended at byte {offset + done} "
                                     f"(shorter than the image?)")
        self.pos += count
        return True

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, describe(self.output.path)) from exc
            raise


class _Pages:
    """The restored image as a page source: an array (page p at p*4096), a
    file holding the raw image (fd, byte 0 = page 0), or both.

    With a file, runs go in the kernel (copy_file_range) or, where it
    refuses (a pipe, another file system on older kernels), through one
    bounded buffer: the image is never mapped whole, so an export of a
    4 GiB guest needs no more memory than the restore itself."""

    def __init__(self, image, fd=None):
        if image is None and fd is None:
            raise TypeError("give the image as an array or as a file descriptor")
        if image is not None:
            if not isinstance(image, np.ndarray):
                image = np.frombuffer(image, dtype=np.uint8)
            if image.dtype != np.uint8 or image.ndim != 1:
                raise TypeError("image must be a 1-D uint8 array (page p at p*4096)")
        self.image = image
        self.fd = None
        self.base = 0
        self._cfr = hasattr(os, "copy_file_range")
        self._bounce = None
        if fd is not None:              # image[0] is byte 0 of this file
            self.fd = os.dup(fd)
        elif isinstance(image, np.memmap) and self._cfr:
            self.base = self._file_offset(image)
            if self.base is not None:
                try:
                    self.fd = os.open(image.filename, os.O_RDONLY)
                except (OSError, TypeError):
                    self.fd = None

    @staticmethod
    def _file_offset(image):
        """Where image[0] lives in the mapped file (None: unknown), also
        for a slice of a memmap."""
        mm = getattr(image, "_mmap", None)
        if mm is None or not getattr(image, "filename", None) or not image.flags.c_contiguous:
            return None
        try:
            start = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        except (ValueError, TypeError):
            return None
        offset = int(getattr(image, "offset", 0))
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        return aligned + (image.ctypes.data - start)

    def check(self, p2m_size):
        need = p2m_size * PAGE_SIZE
        have = self.image.size if self.image is not None else \
            os.fstat(self.fd).st_size - self.base
        if have < need:
            raise ValueError(f"image holds {have} bytes; the stream's image is "
                             f"{need} (p2m_size * 4096)")

    def write_run(self, out, first, end):
        a, b = first << PAGE_SHIFT, end << PAGE_SHIFT
        if self.fd is not None and self._cfr and (b - a >= COPY_MIN or self.image is None):
            if out.copy(self.fd, self.base + a, b - a):
                return
            self._cfr = False           # the kernel said no: writev / the buffer
            if self.image is not None:
                self.close()
        if self.image is not None:
            out.put(self.image[a:b])
        else:
            self._through_buffer(out, a, b)

    def _through_buffer(self, out, a, b):
        """Bytes [a, b) of the image file to out, BOUNCE bytes at a time."""
        if self._bounce is None:
            self._bounce = memoryview(bytearray(BOUNCE))
        out.flush()

        def put(part):
            out.put(part)
            out.flush()             # the buffer is reused: write it out now
        got = fdio.pread_copy(self.fd, self.base + a, b - a, self._bounce, put)
        if a + got < b:
            raise OSError(errno.EIO, f"the image file ends at byte {self.base + a + got}, "
                                     f"before the image does ({self.base + b})")

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------ vCPU state
def _note(name, ntype, desc):
    nm = name + b"\0"
    return (NHDR.pack(len(nm), len(desc), ntype) + nm + bytes(-len(nm) % 4)
            + desc + bytes(-len(desc) % 4))


def _seg(state, name):
    s = state.get("segments", {}).get(name)
    if s is None:
        return 0, 0, 0, 0
    return s["selector"] & 0xFFFF, s["limit"] & 0xFFFF_FFFF, s["base"], s["attr"] & 0xFFFF


def _u64(v):
    return 0 if v is None else int(v) & 0xFFFF_FFFF_FFFF_FFFF


def _regs(state):
    g = state.get("gprs", {})
    return {k: _u64(g.get(k)) for k in _cpu.GPRS}


def prstatus_note(state):
    g = _regs(state)
    sel = {s: _seg(state, s)[0] for s in ("cs", "ds", "es", "fs", "gs", "ss")}
    reg = [g["r15"], g["r14"], g["r13"], g["r12"], g["rbp"], g["rbx"], g["r11"], g["r10"],
           g["r9"], g["r8"], g["rax"], g["rcx"], g["rdx"], g["rsi"], g["rdi"],
           0xFFFF_FFFF_FFFF_FFFF, _u64(state.get("rip")), sel["cs"], _u64(state.get("rflags")),
           _u64(state.get("rsp")), sel["ss"], _u64(state.get("fs_base")),
           _u64(state.get("gs_base")), sel["ds"], sel["es"], sel["fs"], sel["gs"]]
    pid = (state["id"] or 0) + 1
    desc = PRSTATUS.pack(0, 0, 0, 0, 0, 0, pid, 0, 0, 0, bytes(64), *reg, 0)
    return _note(b"CORE", NT_PRSTATUS, desc)


def _qemu_flags(attr):
    # Xen packed attributes -> descriptor bits 8..23, as QEMU's SegmentCache keeps them
    return ((attr & 0xFF) << 8) | ((attr & 0xF00) << 12)


def qemu_note(state):
    g = _regs(state)
    segs = []
    for s in ("cs", "ds", "es", "fs", "gs", "ss", "ldtr", "tr"):
        sel, limit, base, attr = _seg(state, s)
        segs.append(QEMU_SEG.pack(sel, limit, _qemu_flags(attr), 0, base))
    for t in ("gdtr", "idtr"):
        d = state.get(t) or {"base": 0, "limit": 0}
        segs.append(QEMU_SEG.pack(0, d["limit"], 0, 0, d["base"]))
    cr = [_u64(state.get(k)) for k in ("cr0", "cr2", "cr3", "cr4")]
    desc = QEMU_CPU.pack(1, QEMU_CPU.size,
                         g["rax"], g["rbx"], g["rcx"], g["rdx"], g["rsi"], g["rdi"], g["rsp"],
                         g["rbp"], g["r8"], g["r9"], g["r10"], g["r11"], g["r12"], g["r13"],
                         g["r14"], g["r15"], _u64(state.get("rip")), _u64(state.get("rflags")),
                         *segs, cr[0], 0, cr[1], cr[2], cr[3], _u64(state.get("kernel_gs_base")))
    return _note(b"QEMU", 0, desc)


def xlegacy_vcpu_note(state):
    g = _regs(state)
    flags = 0
    flags |= 1 if state["source"] == "hvm" else 2
    if state.get("mode") in ("long", "compatibility", "pv64"):
        flags |= 4
    if state.get("cpl") == 0:
        flags |= 8
    if state.get("paging", "none") != "none":
        flags |= 16
    if state.get("source") == "hvm" and state.get("warnings"):
        flags |= 32
    nopt = 0xFFFF_FFFF_FFFF_FFFF
    pt = state.get("page_table_base")
    upt = state.get("user_cr3_paddr")
    segs = [SEGMENT.pack(base, limit, sel, attr)
            for sel, limit, base, attr in (_seg(state, s) for s in _cpu.SEGMENTS)]
    gdtr = state.get("gdtr") or {"base": 0, "limit": 0}
    idtr = state.get("idtr") or {"base": 0, "limit": 0}
    dr = [_u64(x) for x in (state.get("debugreg") or [0] * 8)][:8]
    dr += [0] * (8 - len(dr))
    desc = VCPU_NOTE.pack(
        1, state["id"] or 0, flags, _cpu.PAGING_LEVELS.get(state.get("paging"), 0),
        g["rax"], g["rbx"], g["rcx"], g["rdx"], g["rsi"], g["rdi"], g["rbp"], g["rsp"],
        g["r8"], g["r9"], g["r10"], g["r11"], g["r12"], g["r13"], g["r14"], g["r15"],
        _u64(state.get("rip")), _u64(state.get("rflags")),
        *(_u64(state.get(k)) for k in ("cr0", "cr2", "cr3", "cr4", "efer")),
        nopt if pt is None else pt, nopt if upt is None else upt,
        *segs, gdtr["base"], idtr["base"], gdtr["limit"] & 0xFFFF_FFFF,
        idtr["limit"] & 0xFFFF_FFFF,
        _u64(state.get("fs_base")), _u64(state.get("gs_base")),
        _u64(state.get("kernel_gs_base")), *dr)
    return _note(XLEGACY_NOTE_NAME, NT_XLEGACY_VCPU, desc)


def _usable(states):
    return [s for s in states if not s.get("error")]


def elf_notes(result, states, nr_pages):
    s = result.stream
    states = _usable(states)
    guest_width = (s.pv_info.guest_width * 8) if s.guest == "pv" else 0
    dom = DOMAIN_NOTE.pack(1, 1 if s.guest == "hvm" else 2, guest_width, s.width * 8,
                           s.p2m_size, nr_pages, len(states), len(result.checkpoints), 0)
    parts = [prstatus_note(st) for st in states]
    if s.guest == "hvm":          # a PV context is no hardware CPU state: no QEMU note
        parts += [qemu_note(st) for st in states]
    parts.append(_note(XLEGACY_NOTE_NAME, NT_XLEGACY_DOMAIN, dom))
    parts += [xlegacy_vcpu_note(st) for st in states]
    return b"".join(parts)


# ------------------------------------------------------------------ ELF
def _elf_ident():
    return b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)   # ELFCLASS64, LSB, EV_CURRENT, SYSV


def _write_elf(out, pages, result, present, states):
    nruns, npages = count_runs(present)
    notes = elf_notes(result, states, npages)
    phnum = nruns + 1
    xnum = phnum >= PN_XNUM
    phoff = EHDR.size
    shoff = phoff + phnum * PHDR_DTYPE.itemsize if xnum else 0
    notes_at = (shoff + SHDR.size) if xnum else phoff + phnum * PHDR_DTYPE.itemsize
    notes_at += -notes_at % 8
    data_at = notes_at + len(notes)
    data_at += -data_at % PAGE_SIZE
    out.put(EHDR.pack(_elf_ident(), ET_CORE, EM_X86_64, 1, 0, phoff, shoff, 0, EHDR.size,
                      PHDR_DTYPE.itemsize, PN_XNUM if xnum else phnum,
                      SHDR.size if xnum else 0, 1 if xnum else 0, 0))
    note_ph = np.zeros(1, PHDR_DTYPE)
    note_ph[0] = (PT_NOTE, 0, notes_at, 0, 0, len(notes), len(notes), 4)
    out.put(note_ph.tobytes())
    offset = data_at
    for starts, ends in iter_runs(present):
        lens = (ends - starts) << PAGE_SHIFT
        ph = np.zeros(starts.size, PHDR_DTYPE)
        ph["p_type"] = PT_LOAD
        ph["p_flags"] = 7                       # PF_R | PF_W | PF_X
        offs = offset + np.concatenate(([0], np.cumsum(lens)[:-1]))
        ph["p_offset"] = offs
        ph["p_paddr"] = starts << PAGE_SHIFT
        ph["p_filesz"] = lens
        ph["p_memsz"] = lens
        ph["p_align"] = PAGE_SIZE
        out.put(ph.tobytes())
        offset += int(lens.sum())
    if xnum:
        out.put(SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0))
    out.pad_to(8)
    out.put(notes)
    out.pad_to(PAGE_SIZE)
    assert out.pos == data_at
    for starts, ends in iter_runs(present):
        for a, b in zip(starts.tolist(), ends.tolist()):
            pages.write_run(out, a, b)


# ------------------------------------------------------------------ LiME
def _write_lime(out, pages, result, present, states):
    for starts, ends in iter_runs(present):
        for a, b in zip(starts.tolist(), ends.tolist()):
            out.put(LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, a << PAGE_SHIFT,
                                     (b << PAGE_SHIFT) - 1, 0))
            pages.write_run(out, a, b)


# ------------------------------------------------------------------ xc-core
def _xc_note(ntype, desc):
    return NHDR.pack(4, len(desc), ntype) + b"Xen\0" + desc


def _pack_pv64(values):
    fields = []
    for name, count in _cpu.PV64_NAMES:
        v = values.get(name)
        if count == 1:
            if name in ("fpu_ctxt", "trap_ctxt"):
                fields.append(bytes(v or b""))
            else:
                fields.append(_u64(v))
        else:
            v = list(v or [])
            fields.extend(_u64(x) for x in (v + [0] * count)[:count])
    return _cpu.PV64_LAYOUT.pack(*fields)


def hvm_guest_context(state):
    """A 64-bit vcpu_guest_context for an HVM vCPU, the way Xen's
    arch_get_info_guest() fills it from the HVM state."""
    g = state["gprs"]
    seg = state["segments"]
    ring0 = (seg["cs"]["selector"] & 3) == 0
    gs_base, shadow = state["gs_base"], state["kernel_gs_base"]
    values = dict(g)
    values.update({
        "fpu_ctxt": state.get("_fpu", b""),
        "flags": _cpu.VGCF_ONLINE | _cpu.VGCF_I387_VALID,
        "rip": state["rip"], "rflags": state["rflags"], "rsp": state["rsp"],
        "cs": seg["cs"]["selector"] & 0xFFFF, "ss": seg["ss"]["selector"] & 0xFFFF,
        "ds": seg["ds"]["selector"] & 0xFFFF, "es": seg["es"]["selector"] & 0xFFFF,
        "fs": seg["fs"]["selector"] & 0xFFFF, "gs": seg["gs"]["selector"] & 0xFFFF,
        "ctrlreg": [state["cr0"], 0, state["cr2"], state["cr3"], state["cr4"], 0, 0, 0],
        "debugreg": state["debugreg"],
        "fs_base": state["fs_base"],
        "gs_base_kernel": gs_base if ring0 else shadow,
        "gs_base_user": shadow if ring0 else gs_base,
    })
    return _pack_pv64(values)


def xc_core_contexts(result):
    """The .xen_prstatus bytes: one vcpu_guest_context_any_t per vCPU."""
    s, m = result.stream, result.meta
    out = []
    if s.guest == "hvm":
        for st in _usable(_cpu.vcpu_states(result, private=True)):
            out.append(hvm_guest_context(st))
    elif m.pv_tail is not None:
        width = s.pv_info.guest_width
        for v in m.pv_tail.vcpus:
            ctx = bytearray(v.context)
            if width == 8:
                off = _pv64_offset("ctrlreg") + 8          # ctrlreg[1]
                cr1 = int.from_bytes(ctx[off:off + 8], "little")
                ctx[off:off + 8] = (cr1 & ~1).to_bytes(8, "little")
            out.append(bytes(ctx) + bytes(VCPU_CONTEXT_ANY - len(ctx)))
    return out


def _pv64_offset(field):
    pos = 0
    for name, fmt in _cpu._PV64_FIELDS:
        if name == field:
            return pos
        pos += struct.calcsize("<" + fmt)
    raise KeyError(field)


def _xen_version_desc(result):
    s = result.stream
    virt = HYPERVISOR_COMPAT_VIRT_START if (s.guest == "pv" and s.pv_info.guest_width == 4) \
        else HYPERVISOR_VIRT_START_64
    desc = bytearray(XEN_VERSION_DESC)
    struct.pack_into("<Q", desc, 1264, virt)          # platform_parameters.virt_start
    struct.pack_into("<Q", desc, 1272, PAGE_SIZE)     # pagesize
    return bytes(desc)


def _write_xc_core(out, pages, result, present, states):
    s = result.stream
    pv = s.guest == "pv"
    contexts = xc_core_contexts(result)
    nr_pages = int(np.count_nonzero(present))
    shared = bytes(result.meta.pv_tail.shared_info) if pv and result.meta.pv_tail else None
    notes = b"".join([
        _xc_note(XEN_ELFNOTE_DUMPCORE_NONE, b""),
        _xc_note(XEN_ELFNOTE_DUMPCORE_HEADER, struct.pack(
            "<4Q", XC_CORE_MAGIC if pv else XC_CORE_MAGIC_HVM, len(contexts), nr_pages,
            PAGE_SIZE)),
        _xc_note(XEN_ELFNOTE_DUMPCORE_XEN_VERSION, _xen_version_desc(result)),
        _xc_note(XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION,
                 struct.pack("<Q", XEN_DUMPCORE_FORMAT_VERSION)),
    ])
    map_name = ".xen_p2m" if pv else ".xen_pfn"
    entsize = 16 if pv else 8
    sections = [("", 0, 0, 0, 0)]                        # name, type, size, align, entsize
    sections.append((".shstrtab", SHT_STRTAB, None, 0, 0))
    sections.append((".note.Xen", SHT_NOTE, len(notes), 0, 0))
    sections.append((".xen_prstatus", SHT_PROGBITS, VCPU_CONTEXT_ANY * len(contexts), 8,
                     VCPU_CONTEXT_ANY))
    if shared is not None:
        sections.append((".xen_shared_info", SHT_PROGBITS, PAGE_SIZE, 8, PAGE_SIZE))
    sections.append((map_name, SHT_PROGBITS, entsize * nr_pages, 8, entsize))
    sections.append((".xen_pages", SHT_PROGBITS, PAGE_SIZE * nr_pages, PAGE_SIZE, PAGE_SIZE))
    # The string table lists the names in section order, as xc_core does:
    # Volatility finds sections by position in the NUL-split table.
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n, *_ in sections[1:])
    name_at, pos = {}, 1
    for n, *_ in sections[1:]:
        name_at[n] = pos
        pos += len(n) + 1
    offset = EHDR.size + SHDR.size * len(sections)
    layout = {}
    for n, _typ, size, _align, _ent in sections[2:]:
        if n == ".xen_pages":
            offset += -offset % PAGE_SIZE
        layout[n] = offset
        offset += size
    layout[".shstrtab"] = offset
    shdrs = []
    for n, typ, size, align, ent in sections:
        if not n:
            shdrs.append(SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
            continue
        if n == ".shstrtab":
            size = len(strtab)
        shdrs.append(SHDR.pack(name_at[n], typ, 0, 0, layout[n], size, 0, 0, align, ent))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0, 1]) + bytes(7)   # ..., ELFOSABI_SYSV, ABI version 1
    out.put(EHDR.pack(ident, ET_CORE, EM_X86_64, 1, 0, 0, EHDR.size, 0, EHDR.size, 56, 0,
                      SHDR.size, len(sections), 1))
    out.put(b"".join(shdrs))
    assert out.pos == layout[".note.Xen"]
    out.put(notes)
    for c in contexts:
        out.put(c)
    if shared is not None:
        out.put(shared)
    assert out.pos == layout[map_name]
    for pfns in iter_pfns(present):
        if pv:
            out.put(np.repeat(pfns, 2).astype("<u8").tobytes())     # {pfn, gmfn = pfn}
        else:
            out.put(pfns.astype("<u8").tobytes())
    out.pad_to(PAGE_SIZE)
    assert out.pos == layout[".xen_pages"]
    for starts, ends in iter_runs(present):
        for a, b in zip(starts.tolist(), ends.tolist()):
            pages.write_run(out, a, b)
    assert out.pos == layout[".shstrtab"]
    out.put(strtab)


if TYPE_CHECKING:
    from ..restorer import Result


_WRITERS = {"elf": _write_elf, "lime": _write_lime, "xc-core": _write_xc_core}


def export(fmt: str, result: Result, image: np.ndarray | None, out: Any,
           image_fd: int | None = None) -> str:
    """Write the restored image in format `fmt` (one of FORMATS) to `out`:
    a path (written atomically, see atomic.py) or an output opened by the
    caller (outputs.atomic.open_output / Outputs; the caller commits it).
    Every format is written in order, so `out` may be a pipe or device.
    image_fd: a file whose byte 0 is image[0], for in-kernel page copies;
    with image None, the pages are read from it alone (copy_file_range, else
    a 4 MiB buffer: the image is never mapped).
    Returns the output's path."""
    fmt = fmt.lower()
    if fmt not in _WRITERS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    present = np.asarray(result.present, dtype=np.bool_)
    pages = _Pages(image, image_fd)
    try:
        pages.check(result.stream.p2m_size)
        states = _cpu.vcpu_states(result, private=True)
        own = not hasattr(out, "fd")
        output = open_output(out) if own else out
        try:
            w = _Out(output)
            _WRITERS[fmt](w, pages, result, present[:result.stream.p2m_size], states)
            w.flush()
            if own:
                output.commit()
        except BaseException:
            if own:
                output.abort()
            raise
    finally:
        pages.close()
    return output.path
