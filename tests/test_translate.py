"""Page walks in restored images: HVM 4-level / 5-level / PAE / 2-level from
the CPU record's CR3, PV canonical tables from ctrlreg[3] (incl. the folded
32-bit form), the `xlegacy translate` command, and a cross-check against
Volatility 3's own Intel translation layers."""
import json
import pathlib

import numpy as np
import pytest

import xlegacy
from xlegacy import cli, translate as T
from xlegacy.outputs import exporters

from support import xlbuild as B
from conftest import load_sample, sample_names, vol_context

G = 1 << 30
M2 = 2 << 20
M4 = 4 << 20


def _hvm(mode_regs, mode, maps, p2m_size, data_pfns=(), extra_pages=None):
    """An HVM stream whose vCPU 0 has `mode` page tables mapping `maps`
    [(vaddr, paddr, size, nx)], plus random data pages."""
    rng = np.random.default_rng(7)
    pages = B.random_pages(rng, data_pfns)
    pt = B.PageTables(mode, pages, next_pfn=1)
    for va, pa, size, nx in maps:
        pt.map(va, pa, size, nx=nx)
    if extra_pages:
        pages.update(extra_pages)
    blob = B.hvm_context([(0, B.hvm_cpu_record(**mode_regs, cr3=pt.root << 12,
                                               rip=maps[0][0] if maps else 0))])
    stream = B.hvm_stream(p2m_size, pages, blob)
    res = xlegacy.restore_result(stream, width=64, guest="hvm")
    return res, pt, stream


LONG_MAPS = [
    (0xFFFFFFFF81000000, 0x200 << 12, 4096, False),
    (0xFFFFFFFF81001000, 0x201 << 12, 4096, True),
    (0xFFFF880000000000, 0x400 << 12, M2, False),      # 2 MiB page
    (0xFFFF880040000000, 3 * G, G, True),              # 1 GiB page, beyond the image
    (0x0000000000400000, 0x202 << 12, 4096, False),
    (0x00007FFFFFFFF000, 0x203 << 12, 4096, False),
]


def test_4level_hvm():
    res, pt, _ = _hvm(B.LONG, "4-level", LONG_MAPS, 0x800, data_pfns=[0x200, 0x201, 0x202])
    va = [m[0] + 0x123 for m in LONG_MAPS] + [0xFFFF880000000000 + 0x1ABCDE]
    out, state, cr3, mode = T.translate(res, res.image, va)
    assert mode == "4-level" and cr3 == pt.root << 12 and state["id"] == 0
    got = [r.paddr for r in out]
    assert got == [m[1] + 0x123 for m in LONG_MAPS] + [(0x400 << 12) + 0x1ABCDE]
    assert [r.page_size for r in out[:4]] == [4096, 4096, M2, G]
    assert not out[0].nx and out[1].nx and out[3].nx
    assert out[0].present_in_image and not out[3].present_in_image
    assert [s.name for s in out[0].steps] == ["PML4", "PDPT", "PD", "PT"]
    assert [s.name for s in out[3].steps] == ["PML4", "PDPT"]


def test_4level_faults():
    res, pt, _ = _hvm(B.LONG, "4-level", LONG_MAPS, 0x800)
    out, *_ = T.translate(res, res.image, [0xFFFFFFFF82000000, 0x0000800000000000,
                                           0x0000008000000000])
    assert all(isinstance(r, T.TranslationError) for r in out)
    assert "not present" in str(out[0]) and out[0].steps[-1].name == "PD"
    assert "not canonical" in str(out[1])
    assert "PML4 entry 1 " in str(out[2]) and len(out[2].steps) == 1


def test_table_page_missing_from_stream():
    # a PDPT entry pointing at a PFN the stream never sent
    res, pt, _ = _hvm(B.LONG, "4-level", LONG_MAPS[:1], 0x800)
    mem = T.PhysMemory(res.image, res.present)
    root = pt.root << 12
    l4 = int.from_bytes(res.image[root + 8 * 511:root + 8 * 512].tobytes(), "little")
    assert l4 & 1
    image = res.image.copy()
    entry = (0x7F0 << 12 | 0x67).to_bytes(8, "little")
    image[root + 8 * 256:root + 8 * 257] = np.frombuffer(entry, np.uint8)
    with pytest.raises(T.TranslationError, match="never sent"):
        T.walk(T.PhysMemory(image, res.present), root, 0xFFFF800000000000, "4-level")
    with pytest.raises(T.TranslationError, match="beyond the image"):
        T.walk(mem, 0x900 << 12, 0x1000, "4-level")


def test_5level_walk():
    pages = {}
    pt = B.PageTables("5-level", pages, next_pfn=1)
    pt.map(0xFF00000000001000, 0x55 << 12)
    pt.map(0x00F0000000200000, 0x600 << 12, M2)
    image = np.zeros(0x800 * 4096, np.uint8)
    present = np.zeros(0x800, bool)
    for p, data in pages.items():
        image[p * 4096:(p + 1) * 4096] = np.frombuffer(bytes(data), np.uint8)
        present[p] = True
    mem = T.PhysMemory(image, present)
    r = T.walk(mem, pt.root << 12, 0xFF00000000001ABC, "5-level")
    assert r.paddr == (0x55 << 12) + 0xABC and len(r.steps) == 5 and r.steps[0].name == "PML5"
    r = T.walk(mem, pt.root << 12, 0x00F0000000212345, "5-level")
    assert r.paddr == (0x600 << 12) + 0x12345 and r.page_size == M2
    with pytest.raises(T.TranslationError, match="not canonical"):
        T.walk(mem, pt.root << 12, 0x0100000000000000, "5-level")


def test_pae_hvm_with_unaligned_pdpt():
    maps = [(0xC0100000, 0x180 << 12, 4096, False), (0xC0400000, 0x400 << 12, M2, True),
            (0x08048000, 0x181 << 12, 4096, False)]
    rng = np.random.default_rng(8)
    pages = B.random_pages(rng, [0x180])
    pt = B.PageTables("pae", pages, next_pfn=1)
    for va, pa, size, nx in maps:
        pt.map(va, pa, size, nx=nx)
    # PAE CR3 names a 32-byte aligned PDPT: move the 4 entries to offset 0x60
    root = pages[pt.root]
    root[0x60:0x80] = root[0:0x20]
    root[0:0x20] = bytes(0x20)
    cr3 = (pt.root << 12) | 0x60
    blob = B.hvm_context([(0, B.hvm_cpu_record(**B.PAE32, cr3=cr3))])
    res = xlegacy.restore_result(B.hvm_stream(0x800, pages, blob), width=64, guest="hvm")
    out, state, root_addr, mode = T.translate(res, res.image, [m[0] + 0x10 for m in maps]
                                              + [0x1_0000_0000])
    assert mode == "pae" and root_addr == cr3
    assert [r.paddr for r in out[:3]] == [m[1] + 0x10 for m in maps]
    assert out[1].page_size == M2 and out[1].nx
    assert "beyond 4 GiB" in str(out[3])


def test_2level_hvm_pse_and_pse36():
    maps = [(0xC0000000, 0x100 << 12, 4096, False), (0xC0400000, 0x400 << 12, M4, False),
            (0xC0800000, (1 << 32) | (0x800 << 12), M4, False)]   # PSE-36: above 4 GiB
    res, pt, _ = _hvm(B.TWOLEVEL, "2-level", maps, 0x800, data_pfns=[0x100])
    out, state, cr3, mode = T.translate(res, res.image, [m[0] + 0x321 for m in maps])
    assert mode == "2-level"
    assert [r.paddr for r in out] == [m[1] + 0x321 for m in maps]
    assert [r.page_size for r in out] == [4096, M4, M4]
    assert [s.name for s in out[0].steps] == ["PD", "PT"]
    # without CR4.PSE the PS bit means nothing: the PDE points at a page table
    mem = T.PhysMemory(res.image, res.present)
    with pytest.raises(T.TranslationError):
        T.walk(mem, cr3, 0xC0400321, "2-level", pse=False)


def test_paging_off_is_identity():
    blob = B.hvm_context([(0, B.hvm_cpu_record(cr0=0x11, cr4=0, msr_efer=0, rflags=2))])
    res = xlegacy.restore_result(B.hvm_stream(8, {1: bytes(4096)}, blob), width=64, guest="hvm")
    (r,), state, cr3, mode = T.translate(res, res.image, [0x1234])
    assert mode == "none" and r.paddr == 0x1234 and r.present_in_image


def test_explicit_cr3_and_mode_override():
    res, pt, _ = _hvm(B.LONG, "4-level", LONG_MAPS, 0x800)
    (r,), state, cr3, mode = T.translate(res, res.image, [0xFFFFFFFF81000010],
                                         cr3=pt.root << 12, mode="4-level")
    assert state is None and r.paddr == (0x200 << 12) + 0x10


def _pv64_stream():
    rng = np.random.default_rng(9)
    pages = B.random_pages(rng, [0x30, 0x31, 0x32])
    types = {}
    kern = B.PageTables("4-level", pages, next_pfn=0x10, types=types)
    kern.map(0xFFFFFFFF81000000, 0x30 << 12)
    kern.map(0xFFFF880000000000, 0x31 << 12)
    user = B.PageTables("4-level", pages, next_pfn=kern.next, types=types)
    user.map(0x400000, 0x32 << 12)
    types[kern.root] |= 0x8                       # pinned
    types[user.root] |= 0x8
    ctx = {0: B.pv64_context(cr3_pfn=kern.root, user_pfn=user.root),
           2: B.pv64_context(cr3_pfn=kern.root)}
    return B.pv_stream(0x40, pages, ctx, types=types), kern, user


def test_pv64_canonical_tables_kernel_and_user():
    stream, kern, user = _pv64_stream()
    res = xlegacy.restore_result(stream, width=64, guest="pv")
    out, state, cr3, mode = T.translate(res, res.image, [0xFFFFFFFF81000042, 0xFFFF880000000FFF,
                                                         0x400042])
    assert cr3 == kern.root << 12 and mode == "4-level"
    assert out[0].paddr == (0x30 << 12) + 0x42 and out[1].paddr == (0x31 << 12) + 0xFFF
    assert isinstance(out[2], T.TranslationError)       # user mapping not in kernel table
    (r,), state, cr3, _ = T.translate(res, res.image, [0x400042], user=True)
    assert cr3 == user.root << 12 and r.paddr == (0x32 << 12) + 0x42
    with pytest.raises(T.TranslationError, match="no user page table"):
        T.translate(res, res.image, [0x400042], vcpu=2, user=True)
    with pytest.raises(T.TranslationError, match="no state for vcpu 1"):
        T.translate(res, res.image, [0x400042], vcpu=1)


def test_pv32_pae_folded_cr3_above_2_pow_20():
    """A 32-bit PV guest whose L3 sits above PFN 2^20: ctrlreg[3] holds the
    folded form, and the walk must start at the unfolded PFN."""
    base = (1 << 20) + 0x10                      # PFNs beyond 4 GiB
    p2m = base + 0x40
    rng = np.random.default_rng(10)
    pages = B.random_pages(rng, [base + 0x30])
    types = {}
    pt = B.PageTables("pae", pages, next_pfn=base, types=types)
    pt.map(0xC0100000, (base + 0x30) << 12)
    types[pt.root] = 0xB                          # pinned L3
    ctx = B.pv32_context(cr3_pfn=pt.root)
    res = xlegacy.restore_result(B.pv_stream(p2m, pages, {0: ctx}, guest_width=4, width=4,
                                             types=types), width=32, guest="pv")
    (r,), state, cr3, mode = T.translate(res, res.image, [0xC0100ABC])
    assert state["cr3_pfn"] == pt.root and state["ctrlreg"][3] == B.fold32(pt.root)
    assert mode == "pae" and cr3 == pt.root << 12
    assert r.paddr == ((base + 0x30) << 12) + 0xABC


# ---------------------------------------------------------------- CLI
def test_cli_translate(tmp_path, capsys):
    stream, kern, user = _pv64_stream()
    src = tmp_path / "pv.save"
    src.write_bytes(stream)
    rc = cli.main(["translate", str(src), "0xffffffff81000042", "--json"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["results"][0]["paddr"] == (0x30 << 12) + 0x42 and obj["paging"] == "4-level"
    rc = cli.main(["translate", str(src), "0x400042", "0xffffffff81000042", "-v"])
    text = capsys.readouterr().out
    assert rc == 1 and "not mapped" in text and f"{(0x30 << 12) + 0x42:#x}" in text
    assert "PML4" in text
    # against an already restored raw image
    raw = tmp_path / "pv.raw"
    assert cli.main(["restore", str(src), "-o", str(raw), "-q"]) == 0
    rc = cli.main(["translate", str(src), "0x400042", "--user", "--image", str(raw)])
    assert rc == 0 and f"{(0x32 << 12) + 0x42:#x}" in capsys.readouterr().out


# ---------------------------------------------------------------- real samples
@pytest.mark.parametrize("name", [n for n in sample_names() if n.startswith("pv")])
def test_sample_pv_walks_visit_typed_tables(samples, name):
    """Every table a walk visits in a PV sample is a page the saver typed as
    that level (L4 -> L3 -> L2 -> L1): the canonical tables are consistent."""
    path, meta = load_sample(name)
    res = xlegacy.restore_result(str(path))
    mem = T.PhysMemory(res.image, res.present)
    walked = 0
    for state in T._cpu.vcpu_states(res):
        for root in (state["cr3_paddr"], state["user_cr3_paddr"]):
            if root is None:
                continue
            top = res.image[root:root + 4096].view("<u8")
            for i in np.flatnonzero(top & 1)[:8]:
                va = int(i) << 39
                if va >> 47:
                    va |= 0xFFFF << 48
                try:
                    r = T.walk(mem, root, va, "4-level")
                except T.TranslationError as exc:
                    steps = exc.steps
                else:
                    steps = r.steps
                    walked += 1
                for s in steps:
                    assert res.last_type[s.table >> 12] & 0x7 == s.level
    assert walked


# ---------------------------------------------------------------- Volatility 3
def _vol_translate(elf_path, layer_cls, cr3, vaddrs):
    from volatility3.framework.layers import elf, physical
    ctx = vol_context()
    ctx.config["base.location"] = pathlib.Path(elf_path).as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["mem.base_layer"] = "base"
    ctx.add_layer(elf.Elf64Layer(ctx, "mem", "mem"))
    ctx.config["virt.memory_layer"] = "mem"
    ctx.config["virt.page_map_offset"] = cr3
    ctx.add_layer(layer_cls(ctx, "virt", "virt"))
    out = []
    for va in vaddrs:
        try:
            out.append(ctx.layers["virt"].translate(va)[0])
        except Exception:
            out.append(None)
    return out


@pytest.mark.parametrize("kind", ["4-level", "pae", "2-level"])
def test_volatility_intel_layers_agree(tmp_path, kind):
    pytest.importorskip("volatility3")
    from volatility3.framework.layers import intel
    if kind == "4-level":
        regs, maps, cls = B.LONG, LONG_MAPS[:3] + LONG_MAPS[4:], intel.Intel32e
        extra_va = [0xFFFFFFFF82000000, 0xFFFF880000100000 + 0x5]
        data = [0x200, 0x201, 0x202, 0x400, 0x500]
    elif kind == "pae":
        regs, cls = B.PAE32, intel.IntelPAE
        maps = [(0xC0100000, 0x180 << 12, 4096, False), (0xC0400000, 0x400 << 12, M2, False),
                (0x08048000, 0x181 << 12, 4096, False)]
        extra_va = [0xC0500000, 0x10000000]
        data = [0x180, 0x181, 0x400]
    else:
        regs, cls = B.TWOLEVEL, intel.Intel
        maps = [(0xC0000000, 0x100 << 12, 4096, False), (0xC0400000, 0x400 << 12, M4, False)]
        extra_va = [0xC0800000, 0xC0401234]
        data = [0x100, 0x400, 0x401]
    res, pt, _ = _hvm(regs, kind, maps, 0x800, data_pfns=data)
    out_path = tmp_path / "g.elf"
    exporters.export("elf", res, res.image, out_path)
    vaddrs = [m[0] + 0x77 for m in maps] + extra_va
    ours, state, cr3, mode = T.translate(res, res.image, vaddrs)
    theirs = _vol_translate(out_path, cls, cr3, vaddrs)
    # Volatility maps an address only when the page it lands on is in the file
    assert [r.paddr if isinstance(r, T.Translation) and r.present_in_image else None
            for r in ours] == theirs
    assert sum(x is not None for x in theirs) >= 3


# ---------------------------------------------------------------- the project's writer
def test_writer_remus_checkpoints_change_the_mapping():
    """A compressed Remus stream from xlegacy.testing.writer whose checkpoint 2
    rewrites one PTE: the walk follows the committed checkpoint, and
    --checkpoint 1 still sees the old mapping."""
    W = pytest.importorskip("xlegacy.testing.writer")
    rng = np.random.default_rng(13)
    pages = B.random_pages(rng, [0x100, 0x101, 0x102])
    pt = B.PageTables("4-level", pages, next_pfn=1)
    va = 0xFFFFFFFF81000000
    pt.map(va, 0x100 << 12)
    pt.map(va + 0x1000, 0x101 << 12)
    leaf = max(pt.types)                               # the PT page (allocated last)
    blob = B.hvm_context([(0, B.hvm_cpu_record(**B.LONG, cr3=pt.root << 12, rip=va))])
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=0x200)
    w.vcpu_info([0])
    pfns = sorted(pages)
    w.send(pfns, pages=b"".join(bytes(pages[p]) for p in pfns))
    w.enable_compression()
    w.end_body()
    w.hvm_tail((0, 0, 0), context=blob, qemu=b"QEVM")
    # checkpoint 2 (format B): va now maps PFN 0x102
    pt.map(va, 0x102 << 12)
    w.vcpu_info([0])
    w.send([leaf], pages=bytes(pages[leaf]))
    w.end_body()
    w.hvm_tail((0, 0, 0), context=blob, qemu=b"QEVM")
    stream = w.getvalue()
    res = xlegacy.restore_result(stream)
    assert len(res.checkpoints) == 2 and res.checkpoints[1].compressed
    (r, r2), *_ = T.translate(res, res.image, [va + 5, va + 0x1005])
    assert r.paddr == (0x102 << 12) + 5 and r2.paddr == (0x101 << 12) + 5
    old = xlegacy.restore_result(stream, checkpoint=1)
    (r,), *_ = T.translate(old, old.image, [va + 5])
    assert r.paddr == (0x100 << 12) + 5


def test_info_pagetables_lists_pv_tables(tmp_path, capsys):
    stream, kern, user = _pv64_stream()
    src = tmp_path / "pv.save"
    src.write_bytes(stream)
    assert cli.main(["info", str(src), "--pagetables", "--json", "-q"]) == 0
    obj = json.loads(capsys.readouterr().out)
    tables = obj["pagetable_pfns"]
    assert [kern.root, True] in tables["L4TAB"] and [user.root, True] in tables["L4TAB"]
    levels = {lv: sorted(p for p, t in kern.types.items() if t & 7 == lv) for lv in (1, 2, 3)}
    for lv in (1, 2, 3):
        assert set(levels[lv]) <= {p for p, _ in tables[f"L{lv}TAB"]}
