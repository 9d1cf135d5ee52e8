"""restore --format elf|lime|xc-core: the files parse as their formats say,
hold exactly the restored pages, carry the vCPU state, and are read back by
the real consumers: Volatility 3 (its ELF, LiME and Xen core-dump layers)
and, where installed, libkdumpfile (the library under crash-python/drgn).

Known consumer quirks, tested as they are:
* Volatility 3's XenCoreDumpLayer skips PFN 0 (`if entry and ...` on the
  .xen_pfn entries), so PFN 0 of an HVM xc-core is not readable through it.
* Volatility 3's XenCoreDumpLayer cannot stack a PV dump at all: its ISF
  declares .xen_p2m entries as plain u64 and then asks them for `.pfn`
  (AttributeError).  The PV xc-core is checked with our parser and
  libkdumpfile instead; use --format elf (or lime) for Volatility.
* Volatility 3's Elf64Layer reads e_phnum as is, so an ELF with more than
  65534 runs (extended numbering) is truncated there; libkdumpfile follows
  the extension.
* libkdumpfile (0.5.1) reads a PFN that lies between two PT_LOADs of an ELF
  as a page of zeros; through an xc-core it reports such a PFN missing.
"""
import errno
import hashlib
import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

import xlegacy
from xlegacy import cli, cpu
from xlegacy.outputs import exporters

from support import xlbuild as B
from conftest import load_sample, sample_names, vol_context

try:
    from hypothesis import given, strategies as st
except ImportError:  # pragma: no cover
    given = None

PAGE = 4096
FORMATS = ["elf", "lime", "xc-core"]


# ---------------------------------------------------------------- test guests
def _hvm_result():
    rng = np.random.default_rng(11)
    pfns = [0, 1, 2, 3, 10] + list(range(12, 101)) + [200, 599]
    pages = B.random_pages(rng, pfns)
    blob = B.hvm_context([
        (0, B.hvm_cpu_record(**B.LONG, rip=0xFFFFFFFF81000123, rsp=0xFFFF880000123F00,
                             rax=0xA0, cr3=0x5000, gs_base=0xFFFF88003FC00000,
                             shadow_gs=0x7F0000002000, idtr_base=0xFFFFFE0000000000,
                             idtr_limit=0xFFF, fs_base=0x7F0000001000)),
        (2, B.hvm_cpu_record(**B.LONG, rip=0xFFFFFFFF81000456, rsp=0xFFFF880000456F00,
                             rax=0xA2, cr3=0x6000))])
    stream = B.hvm_stream(600, pages, blob, online=(0, 2))
    return xlegacy.restore_result(stream, width=64, guest="hvm"), stream


def _pv_result(guest_width=8):
    rng = np.random.default_rng(12)
    pfns = [0, 1, 5] + list(range(8, 80)) + [99]
    pages = B.random_pages(rng, pfns)
    if guest_width == 8:
        ctx = {0: B.pv64_context(cr3_pfn=8, user_pfn=9), 1: B.pv64_context(cr3_pfn=8, rax=7)}
        types = {8: 0xC, 9: 0xC}
    else:
        ctx = {0: B.pv32_context(cr3_pfn=8)}
        types = {8: 0xB}
    stream = B.pv_stream(100, pages, ctx, guest_width=guest_width, width=8, types=types,
                         shared_info=bytes([0x5A]) * PAGE)
    return xlegacy.restore_result(stream, width=64, guest="pv"), stream


@pytest.fixture(scope="module")
def hvm():
    return _hvm_result()[0]


@pytest.fixture(scope="module")
def pv():
    return _pv_result()[0]


def _page(res, pfn):
    return res.image[pfn * PAGE:(pfn + 1) * PAGE].tobytes()


# ---------------------------------------------------------------- our own parsers
def parse_elf(path):
    data = pathlib.Path(path).read_bytes()
    ident = data[:16]
    assert ident[:4] == b"\x7fELF" and ident[4] == 2 and ident[5] == 1
    (e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize,
     e_phnum, e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    phnum = e_phnum
    if e_phnum == exporters.PN_XNUM:                   # extended numbering
        phnum = struct.unpack_from("<I", data, e_shoff + 44)[0]
    phdrs = [struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
             for i in range(phnum)]
    notes = []
    for p_type, _, off, _, _, filesz, _, _ in phdrs:
        if p_type == 4:
            pos = off
            while pos < off + filesz:
                namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
                pos += 12
                name = data[pos:pos + namesz].rstrip(b"\0")
                pos += (namesz + 3) & ~3
                notes.append((name, ntype, data[pos:pos + descsz]))
                pos += (descsz + 3) & ~3
    return {"type": e_type, "machine": e_machine, "e_phnum": e_phnum, "phdrs": phdrs,
            "notes": notes, "data": data,
            "loads": [(p[4], p[2], p[5], p[6]) for p in phdrs if p[0] == 1]}


def parse_lime(path):
    data = pathlib.Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        magic, version, start, end, res = struct.unpack_from("<IIQQQ", data, pos)
        assert (magic, version, res) == (0x4C694D45, 1, 0)
        out.append((start, end, pos + 32))
        pos += 32 + end - start + 1
    assert pos == len(data)
    return out, data


def parse_xc_core(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 32)
    e_phnum, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHHH", data, 56)
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
             for i in range(e_shnum)]
    strtab = shdrs[e_shstrndx]
    names = data[strtab[4]:strtab[4] + strtab[5]]
    sections = {}
    for sh in shdrs[1:]:
        name = names[sh[0]:names.index(b"\0", sh[0])].decode()
        sections[name] = {"type": sh[1], "offset": sh[4], "size": sh[5], "align": sh[8],
                          "entsize": sh[9]}
    note = sections[".note.Xen"]
    notes, pos = {}, note["offset"]
    while pos < note["offset"] + note["size"]:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        assert namesz == 4 and data[pos + 12:pos + 16] == b"Xen\0"
        notes[ntype] = data[pos + 16:pos + 16 + descsz]
        pos += 16 + descsz
    return {"type": e_type, "machine": e_machine, "phnum": e_phnum, "sections": sections,
            "notes": notes, "data": data, "names": names}


# ---------------------------------------------------------------- runs
def test_iter_runs_basic():
    present = np.zeros(20, bool)
    present[[0, 1, 2, 5, 7, 8, 19]] = True
    runs = [(int(a), int(b)) for s, e in exporters.iter_runs(present, block=4)
            for a, b in zip(s, e)]
    assert runs == [(0, 3), (5, 6), (7, 9), (19, 20)]
    assert exporters.count_runs(present) == (4, 7)
    assert list(exporters.iter_runs(np.zeros(5, bool))) == []
    full = [(int(a), int(b)) for s, e in exporters.iter_runs(np.ones(10, bool), block=3)
            for a, b in zip(s, e)]
    assert full == [(0, 10)]


if given is not None:
    @given(st.lists(st.booleans(), max_size=200), st.integers(1, 17))
    def test_iter_runs_matches_naive(bits, block):
        present = np.array(bits, dtype=bool)
        runs = [(int(a), int(b)) for s, e in exporters.iter_runs(present, block=block)
                for a, b in zip(s, e)]
        naive, start = [], None
        for i, b in enumerate(bits + [False]):
            if b and start is None:
                start = i
            elif not b and start is not None:
                naive.append((start, i))
                start = None
        assert runs == naive


# ---------------------------------------------------------------- ELF
def test_elf_layout_and_pages(hvm, tmp_path):
    out = tmp_path / "g.elf"
    exporters.export("elf", hvm, hvm.image, out)
    e = parse_elf(out)
    assert e["type"] == 4 and e["machine"] == 62
    assert e["phdrs"][0][0] == 4                                  # PT_NOTE first
    runs = [(0, 4), (10, 11), (12, 101), (200, 201), (599, 600)]
    assert [(p, fs, ms) for p, _, fs, ms in e["loads"]] == [
        (a * PAGE, (b - a) * PAGE, (b - a) * PAGE) for a, b in runs]
    for paddr, off, size, _ in e["loads"]:
        assert off % PAGE == 0
        assert e["data"][off:off + size] == hvm.image[paddr:paddr + size].tobytes()
    last = e["loads"][-1]
    assert len(e["data"]) == last[1] + last[2]                    # nothing else stored


def test_elf_notes_carry_vcpu_state(hvm, tmp_path):
    out = tmp_path / "g.elf"
    exporters.export("elf", hvm, hvm.image, out)
    notes = parse_elf(out)["notes"]
    kinds = [(n, t) for n, t, _ in notes]
    assert kinds == [(b"CORE", 1)] * 2 + [(b"QEMU", 0)] * 2 + [
        (b"XLEGACY", 0x584C0001)] + [(b"XLEGACY", 0x584C0002)] * 2
    # NT_PRSTATUS: pr_pid = vcpu + 1; pr_reg[16] = rip, [19] = rsp, [10] = rax
    pr = [d for n, t, d in notes if n == b"CORE"]
    assert len(pr[0]) == 336
    assert struct.unpack_from("<i", pr[1], 32)[0] == 3
    reg = struct.unpack_from("<27Q", pr[0], 112)
    assert (reg[16], reg[19], reg[10], reg[22]) == (0xFFFFFFFF81000123, 0xFFFF880000123F00,
                                                   0xA0, 0xFFFF88003FC00000)
    # QEMUCPUState: version 1, size 440, rip at 152, cr[3] at 424-8*2 ...
    q = [d for n, t, d in notes if n == b"QEMU"][0]
    version, size = struct.unpack_from("<II", q, 0)
    assert (version, size) == (1, 440)
    assert struct.unpack_from("<Q", q, 8 + 16 * 8)[0] == 0xFFFFFFFF81000123       # rip
    cr = struct.unpack_from("<5Q", q, 8 + 18 * 8 + 10 * 24)
    assert cr[3] == 0x5000 and cr[0] == B.LONG["cr0"] and cr[4] == B.LONG["cr4"]
    idt_base = struct.unpack_from("<Q", q, 8 + 18 * 8 + 9 * 24 + 16)[0]
    assert idt_base == 0xFFFFFE0000000000
    assert struct.unpack_from("<Q", q, 432)[0] == 0x7F0000002000                 # kernel_gs_base
    # our domain note
    dom = [d for n, t, d in notes if t == 0x584C0001][0]
    assert struct.unpack("<IIIIQQIIQ", dom) == (1, 1, 0, 64, 600, 96, 2, 1, 0)
    # our vCPU note: id, flags, paging, rip, cr3, pt_base
    v = [d for n, t, d in notes if t == 0x584C0002]
    assert len(v[1]) == 456
    vid, flags, paging = struct.unpack_from("<III", v[1], 4)
    assert (vid, paging) == (2, 4) and flags & 1 and flags & 4 and flags & 8 and flags & 16
    rip, rflags, cr0, cr2, cr3, cr4, efer, pt_base, user_pt = struct.unpack_from("<9Q", v[1],
                                                                                16 + 128)
    assert (rip, cr3, efer, pt_base, user_pt) == (0xFFFFFFFF81000456, 0x6000, 0xD01, 0x6000,
                                                  2 ** 64 - 1)


def test_elf_pv_notes(pv, tmp_path):
    out = tmp_path / "pv.elf"
    exporters.export("elf", pv, pv.image, out)
    notes = parse_elf(out)["notes"]
    dom = [d for n, t, d in notes if t == 0x584C0001][0]
    assert struct.unpack("<IIIIQQIIQ", dom)[:3] == (1, 2, 64)
    v0 = [d for n, t, d in notes if t == 0x584C0002][0]
    flags, paging = struct.unpack_from("<II", v0, 8)
    assert flags & 2 and paging == 4
    cr3, cr4, efer, pt_base, user_pt = struct.unpack_from("<5Q", v0, 16 + 128 + 32)
    assert (cr3, pt_base, user_pt) == (8 * PAGE, 8 * PAGE, 9 * PAGE)


def test_elf_extended_numbering(hvm, tmp_path, monkeypatch):
    """The PN_XNUM path, exercised with a lowered threshold."""
    monkeypatch.setattr(exporters, "PN_XNUM", 4)
    out = tmp_path / "x.elf"
    exporters.export("elf", hvm, hvm.image, out)
    data = out.read_bytes()
    e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHH", data, 56)
    e_shoff = struct.unpack_from("<Q", data, 40)[0]
    assert (e_phnum, e_shentsize, e_shnum) == (4, 64, 1) and e_shoff
    assert struct.unpack_from("<I", data, e_shoff + 44)[0] == 6       # sh_info = real count
    monkeypatch.setattr(exporters, "PN_XNUM", 4)
    e = parse_elf(out)
    assert len(e["loads"]) == 5


# ---------------------------------------------------------------- LiME
def test_lime_layout_and_pages(hvm, tmp_path):
    out = tmp_path / "g.lime"
    exporters.export("lime", hvm, hvm.image, out)
    segs, data = parse_lime(out)
    assert [(s, e) for s, e, _ in segs] == [(0, 4 * PAGE - 1), (10 * PAGE, 11 * PAGE - 1),
                                            (12 * PAGE, 101 * PAGE - 1),
                                            (200 * PAGE, 201 * PAGE - 1),
                                            (599 * PAGE, 600 * PAGE - 1)]
    for s, e, off in segs:
        assert data[off:off + e - s + 1] == hvm.image[s:e + 1].tobytes()


# ---------------------------------------------------------------- xc-core
def test_xc_core_hvm(hvm, tmp_path):
    out = tmp_path / "g.xc"
    exporters.export("xc-core", hvm, hvm.image, out)
    x = parse_xc_core(out)
    assert x["type"] == 4 and x["machine"] == 62 and x["phnum"] == 0
    # section names in section order (Volatility locates them by position)
    assert x["names"].split(b"\0")[1:-1] == [b".shstrtab", b".note.Xen", b".xen_prstatus",
                                             b".xen_pfn", b".xen_pages"]
    magic, nr_vcpus, nr_pages, page_size = struct.unpack("<4Q", x["notes"][0x2000001])
    assert (magic, nr_vcpus, nr_pages, page_size) == (0xF00FEBEE, 2, 96, 4096)
    assert x["notes"][0x2000000] == b"" and len(x["notes"][0x2000002]) == 1280
    assert struct.unpack("<Q", x["notes"][0x2000003])[0] == 1
    s = x["sections"]
    pfns = np.frombuffer(x["data"], "<u8", nr_pages, s[".xen_pfn"]["offset"])
    assert list(pfns) == list(np.flatnonzero(hvm.present))
    pg = s[".xen_pages"]
    assert pg["offset"] % PAGE == 0 and pg["size"] == nr_pages * PAGE
    for i, p in enumerate(pfns):
        off = pg["offset"] + i * PAGE
        assert x["data"][off:off + PAGE] == _page(hvm, int(p))
    pr = s[".xen_prstatus"]
    assert pr["entsize"] == 5168 and pr["size"] == 2 * 5168
    ctx = x["data"][pr["offset"]:pr["offset"] + 5168]
    st = cpu.decode_pv_context(ctx, 8)
    assert st["rip"] == 0xFFFFFFFF81000123 and st["ctrlreg"][3] == 0x5000
    assert st["ctrlreg"][0] == B.LONG["cr0"] and st["gprs"]["rax"] == 0xA0
    # ring 0 (cs RPL 0): gs_base_kernel = GS base, gs_base_user = shadow GS (arch_get_info_guest)
    assert struct.unpack_from("<3Q", ctx, 5144) == (0x7F0000001000, 0xFFFF88003FC00000,
                                                   0x7F0000002000)
    assert "online" in st["flag_names"]
    assert ctx[:512] == bytes(range(256)) * 2                       # FXSAVE area carried
    assert ".xen_shared_info" not in s


@pytest.mark.parametrize("guest_width", [8, 4])
def test_xc_core_pv(tmp_path, guest_width):
    res, _ = _pv_result(guest_width)
    out = tmp_path / "pv.xc"
    exporters.export("xc-core", res, res.image, out)
    x = parse_xc_core(out)
    s = x["sections"]
    assert x["names"].split(b"\0")[1:-1] == [b".shstrtab", b".note.Xen", b".xen_prstatus",
                                             b".xen_shared_info", b".xen_p2m", b".xen_pages"]
    magic, nr_vcpus, nr_pages, _ = struct.unpack("<4Q", x["notes"][0x2000001])
    assert magic == 0xF00FEBED and nr_vcpus == len(res.meta.pv_tail.vcpus)
    p2m = np.frombuffer(x["data"], "<u8", 2 * nr_pages, s[".xen_p2m"]["offset"]).reshape(-1, 2)
    assert list(p2m[:, 0]) == list(np.flatnonzero(res.present))
    assert (p2m[:, 0] == p2m[:, 1]).all()                          # identity gmfn
    assert x["data"][s[".xen_shared_info"]["offset"]:][:PAGE] == bytes([0x5A]) * PAGE
    ctx = x["data"][s[".xen_prstatus"]["offset"]:][:5168]
    saved = res.meta.pv_tail.vcpus[0].context
    if guest_width == 8:
        st = cpu.decode_pv_context(ctx, 8)
        assert st["ctrlreg"][1] == 9 << 12            # the saver's "valid" bit 0 cleared
        assert st["ctrlreg"][3] == 8 << 12
        assert ctx[:4984] == saved[:4984]
    else:
        assert ctx[:0xAF0] == saved and ctx[0xAF0:] == bytes(5168 - 0xAF0)
    pages = s[".xen_pages"]
    for i, p in enumerate(p2m[:, 0]):
        off = pages["offset"] + i * PAGE
        assert x["data"][off:off + PAGE] == _page(res, int(p))


# ---------------------------------------------------------------- mechanics
def test_memmap_source_copy_file_range_is_byte_identical(hvm, tmp_path, monkeypatch):
    raw = tmp_path / "g.raw"
    raw.write_bytes(hvm.image.tobytes())
    calls = []
    real = os.copy_file_range

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(os, "copy_file_range", spy)
    for fmt in FORMATS:
        a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        exporters.export(fmt, hvm, hvm.image, a)
        exporters.export(fmt, hvm, np.memmap(raw, dtype=np.uint8, mode="r"), b)
        assert a.read_bytes() == b.read_bytes(), fmt
    assert calls                                    # runs went in-kernel


def test_copy_file_range_refused_falls_back(hvm, tmp_path, monkeypatch):
    raw = tmp_path / "g.raw"
    raw.write_bytes(hvm.image.tobytes())

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    a, b = tmp_path / "a.elf", tmp_path / "b.elf"
    exporters.export("elf", hvm, hvm.image, a)
    exporters.export("elf", hvm, np.memmap(raw, dtype=np.uint8, mode="r"), b)
    assert a.read_bytes() == b.read_bytes()


def test_failed_export_leaves_nothing(hvm, tmp_path, monkeypatch):
    def boom(self, out, first, end):
        if first >= 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        out.put(self.image[first * PAGE:end * PAGE])

    monkeypatch.setattr(exporters._Pages, "write_run", boom)
    target = tmp_path / "g.elf"
    with pytest.raises(OSError):
        exporters.export("elf", hvm, hvm.image, target)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(hvm, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        exporters.export("vmdk", hvm, hvm.image, tmp_path / "x")
    with pytest.raises(ValueError, match="image holds"):
        exporters.export("elf", hvm, hvm.image[:PAGE], tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_cli_restore_formats(tmp_path, hvm):
    _, stream = _hvm_result()
    src = tmp_path / "g.save"
    src.write_bytes(stream)
    for fmt in FORMATS:
        out = tmp_path / f"cli.{fmt}"
        assert cli.main(["restore", str(src), "-o", str(out), "--format", fmt, "-q"]) == 0
        ref = tmp_path / f"ref.{fmt}"
        exporters.export(fmt, hvm, hvm.image, ref)
        assert out.read_bytes() == ref.read_bytes(), fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["g.save"] + [f"cli.{f}" for f in FORMATS] + [f"ref.{f}" for f in FORMATS])


# ---------------------------------------------------------------- Volatility 3
def _vol_stack(path):
    vol = pytest.importorskip("volatility3")
    import volatility3.framework as fw
    from volatility3.framework import interfaces
    from volatility3.framework.automagic import stacker
    from volatility3.framework.layers import physical
    fw.import_files(sys.modules["volatility3.framework.layers"], True)
    ctx = vol_context()
    ctx.config["base.location"] = pathlib.Path(path).as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    # every file-format stacker Volatility has (not the OS page-table scanners)
    stackers = [c for c in fw.class_subclasses(interfaces.automagic.StackerLayerInterface)
                if c.__module__.startswith("volatility3.framework.layers.")]
    names = stacker.LayerStacker.stack_layer(ctx, "base", stackers)
    return ctx.layers[names[0]], vol


EXPECTED_LAYER = {"elf": "Elf64Layer", "lime": "LimeLayer", "xc-core": "XenCoreDumpLayer"}


def _check_volatility(res, path, fmt):
    layer, vol = _vol_stack(path)
    assert type(layer).__name__ == EXPECTED_LAYER[fmt]
    present = np.flatnonzero(res.present)
    skipped = set()
    if fmt == "xc-core" and res.present[0] and not layer.is_valid(0):
        skipped.add(0)     # Volatility quirk: see test_volatility_xen_layer_pfn0_quirk
    for p in present:
        if int(p) in skipped:
            continue
        assert layer.read(int(p) * PAGE, PAGE) == _page(res, int(p)), (fmt, int(p))
    for p in np.flatnonzero(~res.present):
        assert not layer.is_valid(int(p) * PAGE), (fmt, int(p))
    # a read spanning a whole run, and one crossing into a hole
    runs = [(int(a), int(b)) for s, e in exporters.iter_runs(res.present) for a, b in zip(s, e)]
    a, b = max(runs, key=lambda r: r[1] - r[0])
    a = max(a, 1)
    assert layer.read(a * PAGE, (b - a) * PAGE) == res.image[a * PAGE:b * PAGE].tobytes()
    if b < res.present.size:
        with pytest.raises(vol.framework.exceptions.InvalidAddressException):
            layer.read((b - 1) * PAGE, 2 * PAGE)
        padded = layer.read((b - 1) * PAGE, 2 * PAGE, pad=True)
        assert padded == _page(res, b - 1) + bytes(PAGE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_volatility_reads_hvm(hvm, tmp_path, fmt):
    out = tmp_path / f"g.{fmt}"
    exporters.export(fmt, hvm, hvm.image, out)
    _check_volatility(hvm, out, fmt)


@pytest.mark.parametrize("fmt", ["elf", "lime"])
def test_volatility_reads_pv(pv, tmp_path, fmt):
    out = tmp_path / f"pv.{fmt}"
    exporters.export(fmt, pv, pv.image, out)
    _check_volatility(pv, out, fmt)


def test_volatility_xen_layer_pfn0_quirk(hvm, tmp_path):
    """Our .xen_pfn lists PFN 0 and .xen_pages holds it; Volatility 3's
    XenCoreDumpLayer drops the entry (`if entry and entry != 0xFFFFFFFF`).
    Reported as XFAIL while that is so; checks the page once it reads it."""
    out = tmp_path / "g.xc"
    exporters.export("xc-core", hvm, hvm.image, out)
    x = parse_xc_core(out)
    pfn_off = x["sections"][".xen_pfn"]["offset"]
    assert hvm.present[0] and struct.unpack_from("<Q", x["data"], pfn_off)[0] == 0
    pages_off = x["sections"][".xen_pages"]["offset"]
    assert x["data"][pages_off:pages_off + PAGE] == _page(hvm, 0)
    layer, _ = _vol_stack(out)
    if not layer.is_valid(0):
        pytest.xfail("volatility3 XenCoreDumpLayer skips PFN 0 of .xen_pfn")
    assert layer.read(0, PAGE) == _page(hvm, 0)


def test_volatility_xen_layer_pv_quirk(pv, tmp_path):
    """Volatility 3's XenCoreDumpLayer reads .xen_p2m entries as plain u64
    and then asks them for `.pfn`: a PV dump-core does not stack.  Should a
    later Volatility fix that, this test checks the pages instead."""
    pytest.importorskip("volatility3")
    from volatility3.framework.layers import physical, xen
    out = tmp_path / "pv.xc"
    exporters.export("xc-core", pv, pv.image, out)
    ctx = vol_context()
    ctx.config["base.location"] = out.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    try:
        layer = xen.XenCoreDumpStacker.stack(ctx, "base")
    except AttributeError as exc:
        assert "pfn" in str(exc)
        pytest.xfail("volatility3 XenCoreDumpLayer cannot read .xen_p2m (PV) dumps: " + str(exc))
    ctx.add_layer(layer)
    _check_volatility(pv, out, "xc-core")


SAMPLES_OK = []
for _n in sample_names():
    if load_sample(_n)[1]["expect"] == "ok":
        SAMPLES_OK.append(_n)


@pytest.fixture(scope="module")
def sample_results():
    cache = {}

    def get(name):
        if name not in cache:
            path, _ = load_sample(name)
            cache[name] = xlegacy.restore_result(str(path))
        return cache[name]
    return get


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", SAMPLES_OK)
def test_samples_export_and_volatility(samples, sample_results, tmp_path, name, fmt):
    res = sample_results(name)
    out = tmp_path / f"s.{fmt}"
    exporters.export(fmt, res, res.image, out)
    n = int(np.count_nonzero(res.present))
    if fmt == "elf":
        e = parse_elf(out)
        assert sum(fs for _, _, fs, _ in e["loads"]) == n * PAGE
    elif fmt == "lime":
        segs, _ = parse_lime(out)
        assert sum(e - s + 1 for s, e, _ in segs) == n * PAGE
    else:
        x = parse_xc_core(out)
        assert struct.unpack("<4Q", x["notes"][0x2000001])[2] == n
    if fmt == "xc-core" and res.stream.guest == "pv":
        return                          # Volatility quirk, see test_volatility_xen_layer_pv_quirk
    if importlib.util.find_spec("volatility3") is not None:
        _check_volatility(res, out, fmt)


# ---------------------------------------------------------------- libkdumpfile
_KD_SCRIPT = r"""
import hashlib, json, sys, kdumpfile
path, space, pfns = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
k = kdumpfile.kdumpfile(path)
a = k.attr
as_ = kdumpfile.KDUMP_MACHPHYSADDR if space == "mach" else kdumpfile.KDUMP_KPHYSADDR
pages = {}
for p in pfns:
    try:
        pages[p] = hashlib.sha256(k.read(as_, p * 4096, 4096)).hexdigest()
    except Exception as exc:
        pages[p] = None
regs = []
for i in range(int(a["cpu.number"])):
    r = a["cpu.%d.reg" % i]
    regs.append({n: int(r[n]) for n in ("rip", "rsp", "rax", "cr3") if n in r})
print(json.dumps({"format": str(a["file.format"]), "arch": str(a["arch.name"]),
                  "pages": pages, "regs": regs}))
"""


def _kdumpfile_python():
    candidates = [sys.executable, "/usr/bin/python3"]
    for py in candidates:
        if py and os.path.exists(py):
            r = subprocess.run([py, "-c", "import kdumpfile"], capture_output=True)
            if r.returncode == 0:
                return py
    pytest.skip("libkdumpfile Python bindings not installed (Debian: python3-libkdumpfile)")


def _kdump(path, space, pfns):
    py = _kdumpfile_python()
    r = subprocess.run([py, "-c", _KD_SCRIPT, str(path), space, json.dumps(pfns)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    obj["pages"] = {int(k): v for k, v in obj["pages"].items()}
    return obj


def _sha(b):
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("which,fmt", [("hvm", "elf"), ("hvm", "xc-core"), ("pv", "elf"),
                                       ("pv", "xc-core")])
def test_libkdumpfile_reads(tmp_path, hvm, pv, which, fmt):
    res = hvm if which == "hvm" else pv
    out = tmp_path / f"g.{fmt}"
    exporters.export(fmt, res, res.image, out)
    pfns = [int(p) for p in range(res.present.size)]
    got = _kdump(out, "mach" if fmt == "elf" else "kphys", pfns)
    assert got["arch"] == "x86_64"
    assert got["format"] == ("elf" if fmt == "elf" else "xc_core_elf")
    zero = _sha(bytes(PAGE))
    for p in pfns:
        if res.present[p]:
            assert got["pages"][p] == _sha(_page(res, p)), p
        elif fmt == "xc-core":
            assert got["pages"][p] is None, p
        else:
            # libkdumpfile's ELF reader zero-fills holes between PT_LOADs
            assert got["pages"][p] in (None, zero), p
    states = cpu.vcpu_state(res)
    assert [r["rip"] for r in got["regs"]] == [s["rip"] for s in states]
    assert [r["rsp"] for r in got["regs"]] == [s["rsp"] for s in states]
    if fmt == "xc-core":          # cr3 from .xen_prstatus: HVM raw, PV the (identity) frame
        assert [r["cr3"] for r in got["regs"]] == [
            s["cr3"] if which == "hvm" else s["ctrlreg"][3] for s in states]


def test_memmap_slice_source(hvm, tmp_path):
    """A memmap that starts inside its file (offset, or a slice) is copied
    from the right place."""
    raw = tmp_path / "g.raw"
    raw.write_bytes(bytes(3 * PAGE) + hvm.image.tobytes())
    a, b, c = tmp_path / "a.elf", tmp_path / "b.elf", tmp_path / "c.elf"
    exporters.export("elf", hvm, hvm.image, a)
    exporters.export("elf", hvm, np.memmap(raw, dtype=np.uint8, mode="r", offset=3 * PAGE), b)
    exporters.export("elf", hvm, np.memmap(raw, dtype=np.uint8, mode="r")[3 * PAGE:], c)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_elf_pv_has_no_qemu_note(pv, tmp_path):
    out = tmp_path / "pv.elf"
    exporters.export("elf", pv, pv.image, out)
    kinds = [(n, t) for n, t, _ in parse_elf(out)["notes"]]
    assert (b"QEMU", 0) not in kinds and kinds.count((b"CORE", 1)) == 2
