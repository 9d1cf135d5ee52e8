"""vCPU state carried by a legacy stream, decoded.

HVM guests: the tail's HVM context blob is Xen's hvm_save format, a list of
records `uint16 typecode, uint16 instance, uint32 length` + data, ending with
typecode 0.  Typecode 2 (CPU) is `struct hvm_hw_cpu` of
xen/include/public/arch-x86/hvm/save.h, one per vCPU (instance = vCPU id):
the FXSAVE area, the general registers, rip/rflags, cr0/cr2/cr3/cr4, debug
registers, segment selectors/limits/bases/attributes, sysenter and syscall
MSRs, EFER, TSC and the pending event.  1024 bytes; 1016 in the pre-3.4
"compat" form that lacks msr_tsc_aux.

PV guests: the PV tail holds one `vcpu_guest_context` per online vCPU, in the
guest's layout (xen/include/public/arch-x86/xen-x86_64.h / xen-x86_32.h and
arch-x86/xen.h): 0x1430 bytes for a 64-bit guest, 0xaf0 for a 32-bit PAE
guest.  The saver (xc_domain_save) canonicalised three things in it: the GDT
frames and ctrlreg[3] hold PFNs instead of MFNs, ctrlreg[3] in Xen's "folded"
cr3 form (pfn << 12 for a 64-bit guest; for a 32-bit guest the bits of the
pfn above 20 are folded into the low 12 bits), and for a 64-bit guest
ctrlreg[1] holds the user-mode top-level table as `1 | (pfn << 12)` (bit 0 =
"valid") or 0.  We report the PFN and its physical address in the restored
image (pfn << 12); page-table pages in the image are canonical too (their
entries hold PFNs), so that address is the one to walk from.

Everything here is pure decoding of bytes the stream already carried: no
values are invented.  A CPU record whose control registers break the
architecture's reserved-bit rules is still decoded, with a warning, because a
record that does not follow save.h decodes to garbage silently otherwise.
"""
import struct

from . import format as F

# --------------------------------------------------------------- hvm_save
HVM_TYPES = {
    0: "END", 1: "HEADER", 2: "CPU", 3: "PIC", 4: "IOAPIC", 5: "LAPIC", 6: "LAPIC_REGS",
    7: "PCI_IRQ", 8: "ISA_IRQ", 9: "PCI_LINK", 10: "PIT", 11: "RTC", 12: "HPET",
    13: "PMTIMER", 14: "MTRR", 15: "VIRIDIAN_DOMAIN", 16: "CPU_XSAVE", 17: "VIRIDIAN_VCPU",
    18: "VMCE_VCPU", 19: "TSC_ADJUST", 20: "CPU_MSR",
}
HVM_CPU = 2
HVM_HEADER_LAYOUT = struct.Struct("<IIQII")   # magic, version, changeset, cpuid, gtsc_khz

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")
GPRS = ("rax", "rbx", "rcx", "rdx", "rbp", "rsi", "rdi", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _layout(fields):
    """(names, struct) from (name, format) pairs; '<' so there is no hidden
    padding: every C padding byte is spelled out as an 'x' field."""
    fmt = "<" + "".join(f for _, f in fields)
    names = [n for n, f in fields if not f.endswith("x")]
    return names, struct.Struct(fmt)


def _hvm_cpu_fields(compat):
    fields = [("fpu_regs", "512s")]
    fields += [(r, "Q") for r in GPRS]
    fields += [("rip", "Q"), ("rflags", "Q"),
               ("cr0", "Q"), ("cr2", "Q"), ("cr3", "Q"), ("cr4", "Q"),
               ("dr0", "Q"), ("dr1", "Q"), ("dr2", "Q"), ("dr3", "Q"), ("dr6", "Q"), ("dr7", "Q")]
    fields += [(f"{s}_sel", "I") for s in SEGMENTS]
    fields += [(f"{s}_limit", "I") for s in SEGMENTS + ("idtr", "gdtr")]
    fields += [(f"{s}_base", "Q") for s in SEGMENTS + ("idtr", "gdtr")]
    fields += [(f"{s}_arbytes", "I") for s in SEGMENTS]
    fields += [("sysenter_cs", "Q"), ("sysenter_esp", "Q"), ("sysenter_eip", "Q"),
               ("shadow_gs", "Q"), ("msr_flags", "Q"), ("msr_lstar", "Q"), ("msr_star", "Q"),
               ("msr_cstar", "Q"), ("msr_syscall_mask", "Q"), ("msr_efer", "Q")]
    if not compat:
        fields.append(("msr_tsc_aux", "Q"))
    fields += [("tsc", "Q"), ("pending_event", "I"), ("error_code", "I")]
    return fields


HVM_CPU_NAMES, HVM_CPU_LAYOUT = _layout(_hvm_cpu_fields(False))
HVM_CPU_COMPAT_NAMES, HVM_CPU_COMPAT_LAYOUT = _layout(_hvm_cpu_fields(True))
assert HVM_CPU_LAYOUT.size == 1024 and HVM_CPU_COMPAT_LAYOUT.size == 1016

# --------------------------------------------------------------- PV contexts
_PV64_FIELDS = (
    [("fpu_ctxt", "512s"), ("flags", "Q")]
    # struct cpu_user_regs (x86_64), 200 bytes
    + [(r, "Q") for r in ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
                          "rax", "rcx", "rdx", "rsi", "rdi")]
    + [("error_code", "I"), ("entry_vector", "I"), ("rip", "Q"), ("cs", "H"), ("_p0", "2x"),
       ("saved_upcall_mask", "B"), ("_p1", "3x"), ("rflags", "Q"), ("rsp", "Q"),
       ("ss", "H"), ("_p2", "6x"), ("es", "H"), ("_p3", "6x"), ("ds", "H"), ("_p4", "6x"),
       ("fs", "H"), ("_p5", "6x"), ("gs", "H"), ("_p6", "6x")]
    + [("trap_ctxt", "4096s"), ("ldt_base", "Q"), ("ldt_ents", "Q"), ("gdt_frames", "16Q"),
       ("gdt_ents", "Q"), ("kernel_ss", "Q"), ("kernel_sp", "Q"), ("ctrlreg", "8Q"),
       ("debugreg", "8Q"), ("event_callback_eip", "Q"), ("failsafe_callback_eip", "Q"),
       ("syscall_callback_eip", "Q"), ("vm_assist", "Q"),
       ("fs_base", "Q"), ("gs_base_kernel", "Q"), ("gs_base_user", "Q")])
_PV32_FIELDS = (
    [("fpu_ctxt", "512s"), ("flags", "I")]
    # struct cpu_user_regs (x86_32), 68 bytes
    + [(r, "I") for r in ("ebx", "ecx", "edx", "esi", "edi", "ebp", "eax")]
    + [("error_code", "H"), ("entry_vector", "H"), ("eip", "I"), ("cs", "H"),
       ("saved_upcall_mask", "B"), ("_p0", "x"), ("eflags", "I"), ("esp", "I"),
       ("ss", "H"), ("_p1", "2x"), ("es", "H"), ("_p2", "2x"), ("ds", "H"), ("_p3", "2x"),
       ("fs", "H"), ("_p4", "2x"), ("gs", "H"), ("_p5", "2x")]
    + [("trap_ctxt", "2048s"), ("ldt_base", "I"), ("ldt_ents", "I"), ("gdt_frames", "16I"),
       ("gdt_ents", "I"), ("kernel_ss", "I"), ("kernel_sp", "I"), ("ctrlreg", "8I"),
       ("debugreg", "8I"), ("event_callback_cs", "I"), ("event_callback_eip", "I"),
       ("failsafe_callback_cs", "I"), ("failsafe_callback_eip", "I"), ("vm_assist", "I")])


def _pv_layout(fields):
    fmt = "<" + "".join(f for _, f in fields)
    names = []          # (name, count) in unpack order
    for n, f in fields:
        if f.endswith("x") or f.endswith("s"):
            if f.endswith("s"):
                names.append((n, 1))
            continue
        count = int(f[:-1]) if len(f) > 1 else 1
        names.append((n, count))
    return names, struct.Struct(fmt)


PV64_NAMES, PV64_LAYOUT = _pv_layout(_PV64_FIELDS)
PV32_NAMES, PV32_LAYOUT = _pv_layout(_PV32_FIELDS)
assert PV64_LAYOUT.size == F.PV_VCPU_SIZE_64 and PV32_LAYOUT.size == F.PV_VCPU_SIZE_32

VGCF_FLAGS = {0: "i387_valid", 2: "in_kernel", 3: "failsafe_disables_events",
              4: "syscall_disables_events", 5: "online"}
VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_ONLINE = 1 << 5

# Architectural bits.
CR0_PE, CR0_PG = 1 << 0, 1 << 31
CR4_PSE, CR4_PAE, CR4_PCIDE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 17, 1 << 12
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
# SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE
EFER_KNOWN = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) \
    | (1 << 15)
ADDR_MASK_52 = 0x000F_FFFF_FFFF_F000

PAGING_LEVELS = {"none": 0, "2-level": 2, "pae": 3, "4-level": 4, "5-level": 5}


# --------------------------------------------------------------- helpers
def fold_cr3(pfn, guest_width):
    """Xen's FOLD_CR3: the ctrlreg[3] value that names `pfn`."""
    if guest_width == 8:
        return (pfn << 12) & 0xFFFF_FFFF_FFFF_FFFF
    pfn &= 0xFFFF_FFFF
    return ((pfn << 12) | (pfn >> 20)) & 0xFFFF_FFFF


def unfold_cr3(cr3, guest_width):
    """Xen's UNFOLD_CR3 (xen_cr3_to_pfn): the PFN a ctrlreg[3] value names."""
    if guest_width == 8:
        return cr3 >> 12
    cr3 &= 0xFFFF_FFFF
    return ((cr3 >> 12) | (cr3 << 20)) & 0xFFFF_FFFF


def paging_mode(cr0, cr4, efer):
    """The x86 paging mode these control registers select."""
    if not cr0 & CR0_PG:
        return "none"
    if efer & EFER_LMA or (efer & EFER_LME and cr4 & CR4_PAE):
        return "5-level" if cr4 & CR4_LA57 else "4-level"
    if cr4 & CR4_PAE:
        return "pae"
    return "2-level"


def table_base(cr3, mode):
    """Physical address of the top-level page table a CR3 value names."""
    if mode == "none":
        return None
    if mode == "pae":
        return cr3 & 0xFFFF_FFE0
    if mode == "2-level":
        return cr3 & 0xFFFF_F000
    return cr3 & ADDR_MASK_52


def _attr_dpl(arbytes):
    # Xen's packed segment attributes: type 0-3, s 4, dpl 5-6, p 7, avl 8, l 9, db 10, g 11.
    return (arbytes >> 5) & 3


# --------------------------------------------------------------- HVM context
def hvm_records(blob):
    """The records of an hvm_save blob: a list of dicts (typecode, instance,
    length, name, offset of the data), and a list of problems (empty for a
    well-formed blob).  Stops at the END record or the first inconsistency."""
    walked, stop, pos = F.walk_hvm_save(blob)
    out = [{"typecode": t, "instance": i, "length": n,
            "name": HVM_TYPES.get(t, f"unknown({t})"), "offset": at + F.HVM_SAVE_DESC.size}
           for at, t, i, n in walked]
    problems = []
    if stop == "overrun":
        typecode, instance, length = F.HVM_SAVE_DESC.unpack_from(blob, pos)
        name = HVM_TYPES.get(typecode, f"unknown({typecode})")
        problems.append(f"record {name}/{instance} at offset {pos} claims {length} "
                        f"bytes, only {len(blob) - pos - F.HVM_SAVE_DESC.size} remain")
    elif stop == "short":
        problems.append("no END record")
    if out and out[0]["typecode"] != F.HVM_SAVE_HEADER:
        problems.append("the first record is not HEADER")
    return out, problems


def decode_hvm_header(data):
    if len(data) < HVM_HEADER_LAYOUT.size:
        return None
    magic, version, changeset, cpuid, khz = HVM_HEADER_LAYOUT.unpack_from(data, 0)
    return {"magic": magic, "magic_ok": magic == F.HVM_SAVE_MAGIC, "version": version,
            "changeset": changeset, "cpuid": cpuid, "gtsc_khz": khz}


def decode_hvm_cpu(data, vcpu_id=None):
    """One CPU record (struct hvm_hw_cpu, or its 1016-byte compat form) ->
    a vCPU state dict (see vcpu_state for the keys)."""
    n = len(data)
    if n >= HVM_CPU_LAYOUT.size:
        names, layout, compat = HVM_CPU_NAMES, HVM_CPU_LAYOUT, False
    elif n >= HVM_CPU_COMPAT_LAYOUT.size:
        names, layout, compat = HVM_CPU_COMPAT_NAMES, HVM_CPU_COMPAT_LAYOUT, True
    else:
        return {"id": vcpu_id, "source": "hvm", "error":
                f"CPU record of {n} bytes: expected 1024 (or 1016, pre-3.4 compat)"}
    r = dict(zip(names, layout.unpack_from(data, 0)))
    if compat:
        r["msr_tsc_aux"] = 0
    warnings = []
    if n not in (HVM_CPU_LAYOUT.size, HVM_CPU_COMPAT_LAYOUT.size):
        warnings.append(f"CPU record is {n} bytes; decoded its first {layout.size}")
    cr0, cr4, efer = r["cr0"], r["cr4"], r["msr_efer"]
    if cr0 >> 32:
        warnings.append(f"cr0 {cr0:#x} has reserved bits 63:32 set")
    if cr4 >> 32:
        warnings.append(f"cr4 {cr4:#x} has reserved bits 63:32 set")
    if efer & ~EFER_KNOWN:
        warnings.append(f"efer {efer:#x} has undefined bits set")
    if not r["rflags"] & 2 or r["rflags"] >> 32:
        warnings.append(f"rflags {r['rflags']:#x} is not a valid RFLAGS value "
                        "(bit 1 must be set, bits 63:32 clear)")
    if warnings:
        warnings.append("the record may not follow struct hvm_hw_cpu "
                        "(xen/include/public/arch-x86/hvm/save.h)")
    mode = paging_mode(cr0, cr4, efer)
    long_mode = bool(efer & EFER_LMA) and bool(cr0 & CR0_PG)
    if not cr0 & CR0_PE:
        cpu_mode = "real"
    elif long_mode:
        cpu_mode = "long" if (r["cs_arbytes"] >> 9) & 1 else "compatibility"
    else:
        cpu_mode = "protected"
    segments = {s: {"selector": r[f"{s}_sel"], "base": r[f"{s}_base"], "limit": r[f"{s}_limit"],
                    "attr": r[f"{s}_arbytes"]} for s in SEGMENTS}
    cpl = _attr_dpl(r["ss_arbytes"])
    gs_base = r["gs_base"]
    state = {
        "id": vcpu_id,
        "source": "hvm",
        "mode": cpu_mode,
        "paging": mode,
        "cpl": cpl,
        "rip": r["rip"], "rsp": r["rsp"], "rflags": r["rflags"],
        "cr0": cr0, "cr2": r["cr2"], "cr3": r["cr3"], "cr4": cr4, "efer": efer,
        "page_table_base": table_base(r["cr3"], mode),
        "gprs": {g: r[g] for g in GPRS},
        "segments": segments,
        "gdtr": {"base": r["gdtr_base"], "limit": r["gdtr_limit"]},
        "idtr": {"base": r["idtr_base"], "limit": r["idtr_limit"]},
        "fs_base": r["fs_base"], "gs_base": gs_base, "kernel_gs_base": r["shadow_gs"],
        "debugreg": [r["dr0"], r["dr1"], r["dr2"], r["dr3"], 0, 0, r["dr6"], r["dr7"]],
        "msrs": {"sysenter_cs": r["sysenter_cs"], "sysenter_esp": r["sysenter_esp"],
                 "sysenter_eip": r["sysenter_eip"], "star": r["msr_star"],
                 "lstar": r["msr_lstar"], "cstar": r["msr_cstar"],
                 "syscall_mask": r["msr_syscall_mask"], "tsc_aux": r["msr_tsc_aux"],
                 "flags": r["msr_flags"]},
        "tsc": r["tsc"],
        "pending_event": r["pending_event"], "error_code": r["error_code"],
        "record_length": n,
        "compat_record": compat,
        "warnings": warnings,
        "_fpu": r["fpu_regs"],
    }
    return state


def hvm_vcpus(blob):
    """(vcpu states, records, problems, header) of an HVM context blob."""
    records, problems = hvm_records(blob)
    header = None
    vcpus = []
    for rec in records:
        data = blob[rec["offset"]:rec["offset"] + rec["length"]]
        if rec["typecode"] == F.HVM_SAVE_HEADER and header is None:
            header = decode_hvm_header(data)
        elif rec["typecode"] == HVM_CPU:
            vcpus.append(decode_hvm_cpu(data, rec["instance"]))
    if header is not None and not header["magic_ok"]:
        problems.append(f"HEADER magic {header['magic']:#x}, expected {F.HVM_SAVE_MAGIC:#x}")
    vcpus.sort(key=lambda v: v["id"])
    return vcpus, records, problems, header


# --------------------------------------------------------------- PV context
def _unpack_pv(data, guest_width):
    names, layout = (PV64_NAMES, PV64_LAYOUT) if guest_width == 8 else (PV32_NAMES, PV32_LAYOUT)
    if len(data) < layout.size:
        raise ValueError(f"vcpu context of {len(data)} bytes: the {guest_width * 8}-bit "
                         f"layout needs {layout.size}")
    values = layout.unpack_from(data, 0)
    out, i = {}, 0
    for name, count in names:
        if count == 1:
            out[name] = values[i]
        else:
            out[name] = list(values[i:i + count])
        i += count
    return out


def decode_pv_context(data, guest_width, vcpu_id=None, last_type=None):
    """A PV vcpu_guest_context (as the saver canonicalised it) -> a vCPU state
    dict.  guest_width: 8 (64-bit guest, 0x1430 bytes) or 4 (32-bit PAE
    guest, 0xaf0 bytes).  last_type: the restore's per-PFN page types, to
    say what the cr3 PFNs point at."""
    r = _unpack_pv(data, guest_width)
    if guest_width == 4:
        gprs = {"rax": r["eax"], "rbx": r["ebx"], "rcx": r["ecx"], "rdx": r["edx"],
                "rbp": r["ebp"], "rsi": r["esi"], "rdi": r["edi"], "rsp": r["esp"]}
        rip, rflags = r["eip"], r["eflags"]
    else:
        gprs = {g: r[g] for g in GPRS}
        rip, rflags = r["rip"], r["rflags"]
    ctrl = r["ctrlreg"]
    warnings = []
    cr3_pfn = unfold_cr3(ctrl[3], guest_width)
    user_pfn = None
    if guest_width == 8 and ctrl[1] & 1:
        user_pfn = unfold_cr3(ctrl[1] & ~1, guest_width)
    elif guest_width == 8 and ctrl[1]:
        warnings.append(f"ctrlreg[1] {ctrl[1]:#x} lacks the saver's 'valid' bit 0")
    flags = r["flags"]
    in_kernel = bool(flags & VGCF_IN_KERNEL)
    if guest_width == 8:
        fs_base = r["fs_base"]
        gs_base = r["gs_base_kernel"] if in_kernel else r["gs_base_user"]
        kgs = r["gs_base_user"] if in_kernel else r["gs_base_kernel"]
    else:
        fs_base = gs_base = kgs = 0
    segments = {s: {"selector": r[s], "base": 0, "limit": 0, "attr": 0}
                for s in ("cs", "ds", "es", "fs", "gs", "ss")}
    segments["fs"]["base"] = fs_base
    segments["gs"]["base"] = gs_base
    mode = "4-level" if guest_width == 8 else "pae"
    frames = r["gdt_frames"][:(r["gdt_ents"] + 511) // 512]
    state = {
        "id": vcpu_id,
        "source": "pv",
        "mode": "pv64" if guest_width == 8 else "pv32",
        "paging": mode,
        "cpl": (r["cs"] & 3) if guest_width == 4 else (0 if in_kernel else 3),
        "rip": rip, "rsp": gprs["rsp"], "rflags": rflags,
        "cr0": ctrl[0], "cr2": ctrl[2], "cr3": cr3_pfn << 12, "cr4": ctrl[4], "efer": None,
        "page_table_base": cr3_pfn << 12,
        "cr3_pfn": cr3_pfn,
        "cr3_paddr": cr3_pfn << 12,
        "user_cr3_pfn": user_pfn,
        "user_cr3_paddr": None if user_pfn is None else user_pfn << 12,
        "gprs": gprs,
        "segments": segments,
        "fs_base": fs_base, "gs_base": gs_base, "kernel_gs_base": kgs,
        "debugreg": list(r["debugreg"]),
        "ctrlreg": list(ctrl),
        "flags": flags,
        "flag_names": [name for bit, name in VGCF_FLAGS.items() if flags & (1 << bit)],
        "saved_upcall_mask": r["saved_upcall_mask"],
        "gdt_frames": frames, "gdt_ents": r["gdt_ents"],
        "ldt_base": r["ldt_base"], "ldt_ents": r["ldt_ents"],
        "kernel_ss": r["kernel_ss"], "kernel_sp": r["kernel_sp"],
        "event_callback_eip": r["event_callback_eip"],
        "failsafe_callback_eip": r["failsafe_callback_eip"],
        "vm_assist": r["vm_assist"],
        "warnings": warnings,
        "_fpu": r["fpu_ctxt"],
    }
    if guest_width == 8:
        state["syscall_callback_eip"] = r["syscall_callback_eip"]
    else:
        state["event_callback_cs"] = r["event_callback_cs"]
        state["failsafe_callback_cs"] = r["failsafe_callback_cs"]
    if last_type is not None:
        want = 4 if guest_width == 8 else 3
        for key, pfn in (("cr3_pfn", cr3_pfn), ("user_cr3_pfn", user_pfn)):
            if pfn is None:
                continue
            if pfn >= len(last_type) or last_type[pfn] == 0xFF:
                state[key.replace("_pfn", "_type")] = None
                warnings.append(f"{key} {pfn} has no page in the stream")
                continue
            t = int(last_type[pfn])
            state[key.replace("_pfn", "_type")] = F.TYPE_NAMES.get(t, hex(t))
            if t & 0x7 != want:
                warnings.append(f"{key} {pfn} is a {F.TYPE_NAMES.get(t, hex(t))} page, not "
                                f"L{want}TAB as Xen's restore requires")
    return state


# --------------------------------------------------------------- public API
def _public(state):
    return {k: v for k, v in state.items() if not k.startswith("_")}


def _mark_hvm_offline(vcpus, vcpu_info):
    """Flag HVM CPU records of vCPUs that VCPU_INFO marks offline.  Xen's HVM
    restore never consults VCPU_INFO: every CPU record in the context is
    loaded and its vCPU started, so the record is the state the guest gets;
    the mismatch is reported, not hidden (Xen's own hvm_save skips down
    vCPUs, so it means the context and the map disagree at the source)."""
    if not vcpu_info:
        return
    online = set(vcpu_info["online"])
    for v in vcpus:
        v["online"] = v["id"] in online
        if not v["online"]:
            v.setdefault("warnings", []).append(
                f"VCPU_INFO marks vcpu {v['id']} offline, but the HVM context carries its "
                f"CPU state (Xen's HVM restore loads it and starts the vcpu)")


def vcpu_states(result, private=False):
    """The decoded vCPU states of a restore Result, in vCPU id order.
    private=True keeps the raw FPU area under '_fpu' (for exporters)."""
    s, m = result.stream, result.meta
    if s.guest == "hvm":
        if m.hvm_tail is None:
            return []
        vcpus = hvm_vcpus(bytes(m.hvm_tail.context))[0]
        _mark_hvm_offline(vcpus, m.vcpus)
    else:
        if m.pv_tail is None:
            return []
        width = s.pv_info.guest_width
        vcpus = []
        for v in m.pv_tail.vcpus:
            try:
                vcpus.append(decode_pv_context(v.context, width, v.id, result.last_type))
            except ValueError as exc:
                vcpus.append({"id": v.id, "source": "pv", "error": str(exc)})
    return vcpus if private else [_public(v) for v in vcpus]


def vcpu_state(result):
    """`info --json` detail for every vCPU with saved state (JSON-ready)."""
    return vcpu_states(result)


def context_records(result):
    """The HVM context blob's records (typecode, instance, length, name,
    offset within the blob) and any structural problems, or None for PV."""
    m = result.meta
    if result.stream.guest != "hvm" or m.hvm_tail is None:
        return None
    blob = bytes(m.hvm_tail.context)
    vcpus, records, problems, header = hvm_vcpus(blob)
    return {"records": records, "problems": problems, "header": header}


def summary_lines(states):
    """One human-readable line per vCPU state (for `xlegacy info`)."""
    out = []
    for s in states:
        if s.get("error"):
            out.append(f"vcpu {s['id']}: {s['error']}")
            continue
        text = (f"vcpu {s['id']}: {s['mode']}, {s['paging']} paging, rip {s['rip']:#x}, "
                f"rsp {s['rsp']:#x}")
        if s["source"] == "pv":
            text += f", cr3 pfn {s['cr3_pfn']:#x}"
            if s.get("cr3_type"):
                text += f" ({s['cr3_type']})"
            if s.get("user_cr3_pfn") is not None:
                text += f", user pfn {s['user_cr3_pfn']:#x}"
        else:
            text += f", cr3 {s['cr3']:#x}"
        if s.get("warnings"):
            text += f"  [{len(s['warnings'])} warning(s)]"
        out.append(text)
    return out
