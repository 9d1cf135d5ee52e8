"""vCPU state decoding: HVM context records and CPU records, PV
vcpu_guest_context (64- and 32-bit layouts, folded cr3)."""
import struct

import numpy as np
import pytest

import xlegacy
from xlegacy import cpu

from support import xlbuild as B
from conftest import load_sample, sample_names

try:
    from hypothesis import given, strategies as st
except ImportError:  # pragma: no cover
    given = None


def test_layout_sizes_match_xen_headers():
    assert cpu.HVM_CPU_LAYOUT.size == 1024
    assert cpu.HVM_CPU_COMPAT_LAYOUT.size == 1016
    assert cpu.PV64_LAYOUT.size == 0x1430
    assert cpu.PV32_LAYOUT.size == 0xAF0


def test_hvm_cpu_record_fields():
    rec = B.hvm_cpu_record(**B.LONG, rip=0xFFFFFFFF81000123, rsp=0xFFFF880000123F00,
                           rax=0xAA, r15=0xFF, cr2=0x7FFF0000, cr3=0x1234000 | 0x5,
                           fs_base=0x7F0000000000, gs_base=0xFFFF88003FC00000,
                           shadow_gs=0x7F0000001000, idtr_base=0xFFFFFE0000000000,
                           idtr_limit=0xFFF, gdtr_base=0xFFFF88003FC04000, gdtr_limit=0x7F,
                           dr7=0x400, msr_lstar=0xFFFFFFFF81800000, tsc=123456789,
                           msr_tsc_aux=3)
    s = cpu.decode_hvm_cpu(rec, 2)
    assert s["id"] == 2 and s["source"] == "hvm"
    assert s["rip"] == 0xFFFFFFFF81000123 and s["rsp"] == 0xFFFF880000123F00
    assert s["rflags"] == 0x246
    assert s["gprs"]["rax"] == 0xAA and s["gprs"]["r15"] == 0xFF
    assert (s["cr0"], s["cr2"], s["cr3"], s["cr4"]) == (0x80050033, 0x7FFF0000, 0x1234005,
                                                        B.LONG["cr4"])
    assert s["efer"] == 0xD01
    assert s["mode"] == "long" and s["paging"] == "4-level" and s["cpl"] == 0
    assert s["page_table_base"] == 0x1234000            # PCID/flag bits dropped
    assert s["segments"]["cs"]["selector"] == 0x10 and s["segments"]["ss"]["selector"] == 0x18
    assert s["fs_base"] == 0x7F0000000000
    assert s["gs_base"] == 0xFFFF88003FC00000 and s["kernel_gs_base"] == 0x7F0000001000
    assert s["idtr"] == {"base": 0xFFFFFE0000000000, "limit": 0xFFF}
    assert s["gdtr"] == {"base": 0xFFFF88003FC04000, "limit": 0x7F}
    assert s["debugreg"][7] == 0x400
    assert s["msrs"]["lstar"] == 0xFFFFFFFF81800000 and s["msrs"]["tsc_aux"] == 3
    assert s["tsc"] == 123456789
    assert s["warnings"] == [] and not s["compat_record"]


def test_hvm_cpu_compat_record():
    # Pre-3.4 layout: no msr_tsc_aux, so tsc sits where msr_tsc_aux is now.
    full = bytearray(B.hvm_cpu_record(**B.PAE32, rip=0xC0100000, cr3=0x5000))
    struct.pack_into("<Q", full, 1000, 777)              # tsc (compat offset)
    struct.pack_into("<II", full, 1008, 0x80000E0E, 5)   # pending_event, error_code
    s = cpu.decode_hvm_cpu(bytes(full[:1016]), 0)
    assert s["compat_record"] and s["tsc"] == 777 and s["msrs"]["tsc_aux"] == 0
    assert s["pending_event"] == 0x80000E0E and s["error_code"] == 5
    assert s["paging"] == "pae" and s["mode"] == "protected"
    assert s["page_table_base"] == 0x5000


def test_hvm_cpu_short_record_is_reported():
    s = cpu.decode_hvm_cpu(bytes(100), 1)
    assert "error" in s and "100 bytes" in s["error"]


@pytest.mark.parametrize("regs,mode,base", [
    (dict(cr0=0x11, cr4=0, msr_efer=0, rflags=2), "none", None),
    (dict(B.TWOLEVEL, cr3=0x3FF000 | 0x18), "2-level", 0x3FF000),
    (dict(B.PAE32, cr3=0xFEE0), "pae", 0xFEE0),
    (dict(B.LONG, cr3=0xABC000), "4-level", 0xABC000),
    (dict(B.LONG, cr4=B.LONG["cr4"] | (1 << 12), cr3=0xABC000), "5-level", 0xABC000),
])
def test_paging_modes(regs, mode, base):
    s = cpu.decode_hvm_cpu(B.hvm_cpu_record(**regs), 0)
    assert s["paging"] == mode
    assert s["page_table_base"] == base


def test_implausible_record_is_flagged_not_hidden():
    s = cpu.decode_hvm_cpu(B.hvm_cpu_record(cr0=0xF819BD48CA298068, cr4=0, msr_efer=0,
                                            rflags=0xFFFF88003F800000), 0)
    text = " ".join(s["warnings"])
    assert "cr0" in text and "rflags" in text and "hvm_hw_cpu" in text
    assert s["cr0"] == 0xF819BD48CA298068          # decoded as it is, not "fixed"


def test_hvm_records_and_problems():
    blob = B.hvm_context([(0, B.hvm_cpu_record(**B.LONG)), (1, B.hvm_cpu_record(**B.LONG))],
                         extra=[(5, 0, bytes(24)), (16, 0, bytes(856)), (99, 0, b"xyz")])
    recs, problems = cpu.hvm_records(blob)
    assert problems == []
    assert [(r["name"], r["instance"], r["length"]) for r in recs] == [
        ("HEADER", 0, 24), ("CPU", 0, 1024), ("CPU", 1, 1024), ("LAPIC", 0, 24),
        ("CPU_XSAVE", 0, 856), ("unknown(99)", 0, 3), ("END", 0, 0)]
    assert blob[recs[1]["offset"]:recs[1]["offset"] + 4] == B.hvm_cpu_record(**B.LONG)[:4]
    vcpus, _, _, header = cpu.hvm_vcpus(blob)
    assert [v["id"] for v in vcpus] == [0, 1]
    assert header["magic_ok"] and header["gtsc_khz"] == 2400000
    # truncated inside a record; no END
    recs, problems = cpu.hvm_records(blob[:600])
    assert problems and "claims 1024 bytes" in problems[0]
    recs, problems = cpu.hvm_records(blob[:-8])
    assert problems == ["no END record"]


def test_pv64_context():
    ctx = B.pv64_context(cr3_pfn=0x1234, user_pfn=0x1235)
    s = cpu.decode_pv_context(ctx, 8, 3)
    assert s["id"] == 3 and s["mode"] == "pv64" and s["paging"] == "4-level"
    assert s["cr3_pfn"] == 0x1234 and s["cr3_paddr"] == 0x1234000 and s["cr3"] == 0x1234000
    assert s["user_cr3_pfn"] == 0x1235 and s["user_cr3_paddr"] == 0x1235000
    assert s["rip"] == 0xFFFFFFFF81000123 and s["rsp"] == 0xFFFF880000123F00
    assert s["rflags"] == 0x246 and s["gprs"]["rax"] == 0x1111
    assert s["segments"]["cs"]["selector"] == 0xE033 and s["cpl"] == 0
    assert s["flag_names"] == ["i387_valid", "in_kernel", "online"]
    assert s["ctrlreg"][1] == 1 | (0x1235 << 12)
    assert s["fs_base"] == 0x7F0000001000
    assert s["gs_base"] == 0xFFFF88003FC00000 and s["kernel_gs_base"] == 0   # in kernel mode
    assert s["gdt_frames"] == [7] and s["gdt_ents"] == 16


def test_pv64_without_user_table():
    s = cpu.decode_pv_context(B.pv64_context(cr3_pfn=5), 8, 0)
    assert s["user_cr3_pfn"] is None and s["user_cr3_paddr"] is None


def test_pv32_folded_cr3():
    pfn = 0x1234567                      # above 2^20: folded into cr3's low bits
    ctx = B.pv32_context(cr3_pfn=pfn)
    folded = struct.unpack_from("<I", ctx, 2716 + 12)[0]
    assert folded == ((pfn << 12) | (pfn >> 20)) & 0xFFFFFFFF and folded & 0xFFF
    s = cpu.decode_pv_context(ctx, 4, 0)
    assert s["mode"] == "pv32" and s["paging"] == "pae"
    assert s["cr3_pfn"] == pfn and s["cr3_paddr"] == pfn << 12
    assert s["ctrlreg"][3] == folded
    assert s["rip"] == 0xC0100123 and s["rsp"] == 0xC0123F00 and s["gprs"]["rax"] == 0x2222
    assert s["segments"]["cs"]["selector"] == 0xE019 and s["cpl"] == 1
    assert s["user_cr3_pfn"] is None


def test_pv_short_context():
    with pytest.raises(ValueError):
        cpu.decode_pv_context(bytes(100), 8)


if given is not None:
    @given(st.integers(0, (1 << 32) - 1))
    def test_fold_unfold_32(pfn):
        assert cpu.unfold_cr3(cpu.fold_cr3(pfn, 4), 4) == pfn
        assert cpu.fold_cr3(pfn, 4) == B.fold32(pfn)

    @given(st.integers(0, (1 << 40) - 1))
    def test_fold_unfold_64(pfn):
        assert cpu.unfold_cr3(cpu.fold_cr3(pfn, 8), 8) == pfn


# ---------------------------------------------------------------- through a restore
def test_vcpu_state_hvm_stream():
    rng = np.random.default_rng(1)
    pages = B.random_pages(rng, [0, 1, 2, 10])
    blob = B.hvm_context([(0, B.hvm_cpu_record(**B.LONG, rip=0x1000, cr3=0x2000)),
                          (1, B.hvm_cpu_record(**B.LONG, rip=0x2000, cr3=0x3000))])
    res = xlegacy.restore_result(B.hvm_stream(16, pages, blob, online=(0, 1)),
                                 width=64, guest="hvm")
    states = cpu.vcpu_state(res)
    assert [(s["id"], s["rip"], s["cr3"]) for s in states] == [(0, 0x1000, 0x2000),
                                                                (1, 0x2000, 0x3000)]
    assert all(not k.startswith("_") for s in states for k in s)
    info = cpu.context_records(res)
    assert [r["name"] for r in info["records"]] == ["HEADER", "CPU", "CPU", "END"]
    import json
    json.dumps(states)                           # JSON-ready


def test_vcpu_state_pv_stream_checks_cr3_type():
    rng = np.random.default_rng(2)
    pages = B.random_pages(rng, range(8))
    types = {3: 0xC, 4: 0x4, 5: 0x1}             # pinned L4, L4, L1
    ctx = {0: B.pv64_context(cr3_pfn=3, user_pfn=4), 1: B.pv64_context(cr3_pfn=5)}
    res = xlegacy.restore_result(B.pv_stream(8, pages, ctx, types=types), width=64, guest="pv")
    s0, s1 = cpu.vcpu_state(res)
    assert s0["cr3_type"] == "L4TAB|LPINTAB" and s0["user_cr3_type"] == "L4TAB"
    assert s0["warnings"] == []
    assert s1["cr3_type"] == "L1TAB"
    assert any("not L4TAB" in w for w in s1["warnings"])


def test_vcpu_state_pv32_stream():
    rng = np.random.default_rng(3)
    pages = B.random_pages(rng, range(6))
    res = xlegacy.restore_result(
        B.pv_stream(6, pages, {0: B.pv32_context(cr3_pfn=2)}, guest_width=4, width=4,
                    types={2: 0xB}), width=32, guest="pv")
    (s,) = cpu.vcpu_state(res)
    assert s["mode"] == "pv32" and s["cr3_pfn"] == 2 and s["cr3_type"] == "L3TAB|LPINTAB"


# ---------------------------------------------------------------- shared samples
def _restored(name):
    path, meta = load_sample(name)
    return xlegacy.restore_result(str(path)), meta


@pytest.mark.parametrize("name", [n for n in sample_names() if "pv" in n])
def test_sample_pv_contexts(samples, name):
    res, meta = _restored(name)
    states = cpu.vcpu_state(res)
    assert [s["id"] for s in states] == meta["expected"]["vcpus"]["online"]
    for s in states:
        assert s["mode"] == "pv64"
        # the saver canonicalised cr3 to a pinned L4 page that the stream carries
        assert s["cr3_type"] == "L4TAB|LPINTAB", s
        assert res.present[s["cr3_pfn"]]
        assert s["segments"]["cs"]["selector"] == 0xE033       # FLAT_KERNEL_CS64
        assert s["rflags"] & 0x2 and "online" in s["flag_names"]
        assert s["warnings"] == []


@pytest.mark.parametrize("name", [n for n in sample_names()
                                  if "hvm" in n or "remus" in n or "xl_hvm" in n])
def test_sample_hvm_context_records(samples, name):
    path, meta = load_sample(name)
    if meta["expect"] != "ok":
        pytest.skip("malformed sample")
    res = xlegacy.restore_result(str(path))
    info = cpu.context_records(res)
    assert info["problems"] == [] and info["header"]["magic_ok"]
    assert sum(r["length"] + 8 for r in info["records"]) == meta["expected"]["hvm"]["context"][
        "length"]
    states = cpu.vcpu_state(res)
    # one state per CPU record (Xen's HVM restore loads every one of them); a
    # record for a vcpu that VCPU_INFO marks offline is kept and flagged
    cpu_ids = sorted(r["instance"] for r in info["records"] if r["typecode"] == 2)
    assert [s["id"] for s in states] == cpu_ids
    online = meta["expected"]["vcpus"]["online"]
    assert [s["id"] for s in states if s.get("online", True)] == online
    for s in states:
        assert "error" not in s
        offline_warned = any("marks vcpu" in w and "offline" in w for w in s["warnings"])
        assert offline_warned == (s["id"] not in online), s["warnings"]


def test_summary_lines_and_json():
    import json
    rng = np.random.default_rng(4)
    pages = B.random_pages(rng, range(8))
    ctx = {0: B.pv64_context(cr3_pfn=3, user_pfn=4)}
    res = xlegacy.restore_result(B.pv_stream(8, pages, ctx, types={3: 0xC, 4: 0xC}),
                                 width=64, guest="pv")
    states = cpu.vcpu_state(res)
    json.dumps(states)
    (line,) = cpu.summary_lines(states)
    assert line.startswith("vcpu 0: pv64, 4-level paging, rip 0xffffffff81000123")
    assert "cr3 pfn 0x3 (L4TAB|LPINTAB), user pfn 0x4" in line
    hvm = cpu.summary_lines([cpu.decode_hvm_cpu(B.hvm_cpu_record(cr0=1 << 40), 1)])
    assert "cr3 0x0" in hvm[0] and "warning(s)" in hvm[0]
