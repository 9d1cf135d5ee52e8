"""Guest virtual -> guest physical, by walking the guest's own page tables in
a restored image.

Paging modes: 2-level (32-bit, 4 KiB pages and, with CR4.PSE, 4 MiB pages
incl. PSE-36 high bits), PAE (3 levels, 2 MiB large pages), 4-level and
5-level (long mode, 2 MiB and 1 GiB large pages).  The walk starts at a
vCPU's CR3: for HVM guests the CPU record's cr3; for PV guests the PFN the
saver left in ctrlreg[3] (the page tables of a PV image are canonical: their
entries hold PFNs, so the walk stays inside the restored image).

`xlegacy translate STREAM VADDR... [--vcpu N]` reads the page tables where
they lie in the save file, through its page index (xlegacy.pagemap; a pipe
is restored in memory instead, and --image reads an already restored raw
image), and prints the physical address of each VADDR.
"""
from dataclasses import dataclass, field

from . import cpu as _cpu
from .errors import XLegacyError
from .format import PAGE_SHIFT, PAGE_SIZE

ADDR_MASK = 0x000F_FFFF_FFFF_F000
NX_BIT = 1 << 63
P, RW, US, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7

LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}


class TranslationError(XLegacyError):
    """A virtual address does not translate (not mapped, or a table is missing)."""

    def __init__(self, message, vaddr=None, steps=None):
        self.vaddr = vaddr
        self.steps = steps or []
        super().__init__(message)


@dataclass
class Step:
    level: int                  # 5..1 (PML5..PT); 3 is the PDPT also in PAE mode
    table: int                  # physical address of the table
    index: int
    entry_addr: int
    entry: int

    @property
    def name(self):
        return LEVEL_NAMES[self.level]

    def as_dict(self):
        return {"level": self.name, "table": self.table, "index": self.index,
                "entry_addr": self.entry_addr, "entry": self.entry}


@dataclass
class Translation:
    vaddr: int
    paddr: int
    page_size: int
    mode: str
    writable: bool = True
    user: bool = True
    nx: bool = False
    present_in_image: bool = True
    steps: list[Step] = field(default_factory=list)

    def as_dict(self):
        return {"vaddr": self.vaddr, "paddr": self.paddr, "pfn": self.paddr >> PAGE_SHIFT,
                "page_size": self.page_size, "mode": self.mode, "writable": self.writable,
                "user": self.user, "nx": self.nx, "present_in_image": self.present_in_image,
                "steps": [s.as_dict() for s in self.steps]}


def _table_page(mem, paddr):
    """The PFN of the page-table page at paddr in `mem` (a PhysMemory or
    PageMapMemory), or LookupError saying why the memory lacks it."""
    pfn = paddr >> PAGE_SHIFT
    if not mem.has_page(pfn):
        why = "beyond the image" if (pfn + 1) * PAGE_SIZE > mem.size else \
            "never sent in the stream"
        raise LookupError(f"page-table page at {paddr & ~0xFFF:#x} (PFN {pfn}) is {why}")
    return pfn


class PhysMemory:
    """Reads guest-physical bytes from a restored image (uint8 array, page p
    at p*4096) and knows which pages the stream actually carried."""

    def __init__(self, image, present=None):
        self.image = image
        self.present = present
        self.size = int(image.size)

    def has_page(self, pfn):
        if pfn < 0 or (pfn + 1) * PAGE_SIZE > self.size:
            return False
        return self.present is None or bool(self.present[pfn])

    def read_entry(self, paddr, size):
        _table_page(self, paddr)
        return int.from_bytes(self.image[paddr:paddr + size].tobytes(), "little")


class PageMapMemory:
    """PhysMemory's interface over a PageMap: page-table entries are read
    where they lie in the save file, with no restore."""

    def __init__(self, pagemap):
        self.pm = pagemap
        self.size = pagemap.p2m_size * PAGE_SIZE

    def has_page(self, pfn):
        return 0 <= pfn and pfn in self.pm

    def read_entry(self, paddr, size):
        pfn = _table_page(self, paddr)
        at = paddr & (PAGE_SIZE - 1)
        return int.from_bytes(self.pm.page(pfn)[at:at + size].tobytes(), "little")


def _canonical(vaddr, bits):
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (64 - bits + 1)) - 1


def walk(mem, root, vaddr, mode, pse=True, nxe=True):
    """Translate `vaddr` through the tables at physical address `root`.

    mode: "none", "2-level", "pae", "4-level", "5-level".  pse: honour the
    PS bit of 2-level PDEs (CR4.PSE).  nxe: report bit 63 as NX (EFER.NXE).
    Returns a Translation; raises TranslationError when the address is not
    mapped or a page-table page is not in the image.
    """
    vaddr = int(vaddr)
    if vaddr < 0 or vaddr >> 64:
        raise TranslationError(f"{vaddr:#x} is not a 64-bit address", vaddr)
    if mode == "none":
        return Translation(vaddr, vaddr, PAGE_SIZE, mode,
                           present_in_image=mem.has_page(vaddr >> PAGE_SHIFT))
    if mode in ("4-level", "5-level"):
        levels = 5 if mode == "5-level" else 4
        bits = 57 if levels == 5 else 48
        if not _canonical(vaddr, bits):
            raise TranslationError(f"{vaddr:#x} is not canonical for {mode} paging", vaddr)
        esize, shifts = 8, [12 + 9 * (lv - 1) for lv in range(levels, 0, -1)]
        idx_bits = [9] * levels
        level_ids = list(range(levels, 0, -1))
        table = root & ADDR_MASK
    elif mode == "pae":
        if vaddr >> 32:
            raise TranslationError(f"{vaddr:#x} is beyond 4 GiB: PAE paging is 32-bit", vaddr)
        esize, shifts, idx_bits, level_ids = 8, [30, 21, 12], [2, 9, 9], [3, 2, 1]
        # 32-byte aligned PDPT; an HVM CR3 is 32-bit, but a PV guest's L3 page
        # (its unfolded ctrlreg[3]) may sit anywhere.
        table = root & 0x000F_FFFF_FFFF_FFE0
    elif mode == "2-level":
        if vaddr >> 32:
            raise TranslationError(f"{vaddr:#x} is beyond 4 GiB: 2-level paging is 32-bit",
                                   vaddr)
        esize, shifts, idx_bits, level_ids = 4, [22, 12], [10, 10], [2, 1]
        table = root & 0xFFFF_F000
    else:
        raise ValueError(f"unknown paging mode {mode!r}")

    steps = []
    writable = user = True
    nx = False
    for shift, nbits, level in zip(shifts, idx_bits, level_ids):
        index = (vaddr >> shift) & ((1 << nbits) - 1)
        entry_addr = table + index * esize
        try:
            entry = mem.read_entry(entry_addr, esize)
        except LookupError as exc:
            raise TranslationError(f"{vaddr:#x}: {LEVEL_NAMES[level]} lookup failed: {exc}",
                                   vaddr, steps) from None
        steps.append(Step(level, table, index, entry_addr, entry))
        if not entry & P:
            raise TranslationError(
                f"{vaddr:#x} is not mapped: {LEVEL_NAMES[level]} entry {index} "
                f"({entry:#x} at {entry_addr:#x}) is not present", vaddr, steps)
        pae_pdpte = mode == "pae" and level == 3
        if not pae_pdpte:          # PAE PDPTEs carry no R/W, U/S or NX bits
            writable &= bool(entry & RW)
            user &= bool(entry & US)
            if esize == 8 and nxe:
                nx |= bool(entry & NX_BIT)
        large = level > 1 and not pae_pdpte and entry & PS and (level <= 3)
        if large and esize == 4 and not pse:
            large = False
        if large:
            size = 1 << shift
            if esize == 4:       # 4 MiB page; PSE-36/40 bits 20:13 give address bits 39:32
                base = (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32)
            else:
                base = entry & ADDR_MASK & ~(size - 1)
            paddr = base | (vaddr & (size - 1))
            return Translation(vaddr, paddr, size, mode, writable, user, nx,
                               mem.has_page(paddr >> PAGE_SHIFT), steps)
        if level == 1:
            paddr = (entry & (ADDR_MASK if esize == 8 else 0xFFFF_F000)) | (vaddr & 0xFFF)
            return Translation(vaddr, paddr, PAGE_SIZE, mode, writable, user, nx,
                               mem.has_page(paddr >> PAGE_SHIFT), steps)
        table = entry & (ADDR_MASK if esize == 8 else 0xFFFF_F000)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ vCPU glue
def vcpu_walk_params(state, user=False):
    """(root table address, mode, pse, nxe) for a decoded vCPU state."""
    if state.get("error"):
        raise TranslationError(f"vcpu {state['id']}: {state['error']}")
    if state["source"] == "pv":
        if user:
            if state.get("user_cr3_paddr") is None:
                raise TranslationError(f"vcpu {state['id']} has no user page table "
                                       "(ctrlreg[1]; 64-bit PV guests only)")
            root = state["user_cr3_paddr"]
        else:
            root = state["cr3_paddr"]
        return root, state["paging"], True, True
    if user:
        raise TranslationError("--user applies to 64-bit PV guests only")
    cr4 = state["cr4"]
    efer = state["efer"] or 0
    root = state["page_table_base"]
    return (state["cr3"] if root is None else root), state["paging"], bool(cr4 & _cpu.CR4_PSE), \
        bool(efer & _cpu.EFER_NXE)


def translate(result, image, vaddrs, vcpu=None, user=False, cr3=None, mode=None):
    """Translate each of `vaddrs` for a restore Result and its image.
    Returns a list of Translation or TranslationError (one per address)."""
    return translate_in(PhysMemory(image, result.present), lambda: _cpu.vcpu_states(result),
                        vaddrs, vcpu, user, cr3, mode)


def translate_in(mem, get_states, vaddrs, vcpu=None, user=False, cr3=None, mode=None):
    """translate() on any physical memory (PhysMemory, PageMapMemory) with
    the vCPU states from get_states() (called only when needed)."""
    pse, nxe = True, True
    state = None
    if cr3 is None or mode is None:
        states = get_states()
        if not states:
            raise TranslationError("the stream holds no vCPU state; give --cr3 and --paging")
        if vcpu is None:
            state = states[0]
        else:
            match = [s for s in states if s["id"] == vcpu]
            if not match:
                raise TranslationError(f"no state for vcpu {vcpu}: the stream has vcpus "
                                       f"{[s['id'] for s in states]}")
            state = match[0]
        root, vmode, pse, nxe = vcpu_walk_params(state, user)
        if cr3 is None:
            cr3 = root
        if mode is None:
            mode = vmode
    out = []
    for va in vaddrs:
        try:
            out.append(walk(mem, cr3, va, mode, pse=pse, nxe=nxe))
        except TranslationError as exc:
            out.append(exc)
    return out, state, cr3, mode
