"""xlegacy.testing.writer: streams written from a model restore to that model.

Round trips writer -> xlegacy.restore / xlegacy.open for both toolstack
widths, HVM and PV, every wrapper, live iterations, verify mode, Remus with
and without compression (image after every checkpoint), plus a
byte-for-byte re-serialisation of the shared samples.
"""
import hashlib
import io
import json
import os
import struct

import numpy as np
import pytest

import conftest
import xlegacy
from xlegacy import format as F
from xlegacy.stream.records import Chunk, HVMTail, PageBatch, QemuRecord
from xlegacy.testing.writer import (PVOptions, PVVcpuState, StreamWriter, hvm_context_blob,
                            libxl_toolstack, make_stream, qemu_blob, rewrite, write_guest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = str(conftest.SAMPLES)     # honours $XLEGACY_SAMPLES
PAGE = 4096


def _image(rng, p2m):
    return rng.integers(0, 256, (p2m, PAGE), dtype=np.uint8)


def _sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()


def _mutate(rng, img, pfns, frac=0.6):
    """A new version of img where some of pfns changed a little."""
    out = img.copy()
    for p in pfns[rng.random(pfns.size) < frac]:
        w = out[p].view("<u4")
        a = int(rng.integers(0, 1024))
        w[a:a + int(rng.integers(1, 300))] ^= np.uint32(rng.integers(1, 2 ** 32))
    return out


# ------------------------------------------------------------------ HVM
WRAPPERS = [
    (None, None),
    ("xl", "name = 'g'\nmemory = 2\n"),
    ("xl", '{"c_info": {"name": "g"}}\0'),
    ("xend", "(domain (name g) (image (hvm)))"),
    ("xenserver", None),
    ("libvirt", "<domain type='xen'><name>g</name></domain>\0"),
]


@pytest.mark.parametrize("width", [8, 4])
@pytest.mark.parametrize("wrapper,config", WRAPPERS)
def test_hvm_roundtrip(width, wrapper, config):
    rng = np.random.default_rng(100 + width)
    p2m = 700
    img = _image(rng, p2m)
    holes = np.arange(0xA0, 0xC0)
    pfns = np.setdiff1d(np.arange(p2m), holes)
    params = {"ident_pt": 0xFEFFD000, "vm86_tss": 0xFEFFC000, "console_pfn": 690,
              "acpi_ioports_location": 1, "viridian": 1, "vm_generation_id_addr": 0xFC00,
              "paging_ring_pfn": 680, "monitor_ring_pfn": 681, "sharing_ring_pfn": 682,
              "ioreq_server_pfn": 683, "nr_ioreq_server_pages": 2}
    ts = libxl_toolstack([(0xF0000000, 0xF1000000, 0x800000, "vga.vram"),
                          (0xF2000000, 0xF3000000, 0x10000, "vga.rom")], width=width)
    ctx = hvm_context_blob(3, seed=width)
    qemu = qemu_blob(3000, seed=width)
    data, res = make_stream(img, width=width, pfns=pfns, xtab=holes, wrapper=wrapper,
                            config=config, vcpus=[0, 2, 3], tsc=(1, 10 ** 12, 2400000, 7),
                            params=params, toolstack=ts, magic_pfns=(697, 698, 699),
                            hvm_context=ctx, qemu=qemu)
    out, meta = xlegacy.restore(data)
    assert np.array_equal(out, res.image_after())
    assert meta["wrapper"] == (wrapper or "none")
    assert meta["width"] == width * 8 and meta["guest"] == "hvm"
    if config is not None:
        assert meta["config"] == config.rstrip("\0")
    assert meta["pfns"] == pfns.size
    assert meta["entry_counts"] == {"NOTAB": pfns.size, "XTAB": holes.size}
    assert (meta["vcpus"]["max_id"], meta["vcpus"]["online"]) == (3, [0, 2, 3])
    assert meta["tsc_info"] == {"mode": 1, "nsec": 10 ** 12, "khz": 2400000, "incarnation": 7}
    assert meta["hvm_params"] == params
    assert meta["toolstack"]["sha256"] == _sha(ts)
    assert [e["name"] for e in meta["toolstack"]["libxl_v1_physmap"]] == ["vga.vram", "vga.rom"]
    assert meta["hvm"]["magic_pfns"] == {"ioreq": 697, "bufioreq": 698, "store": 699}
    assert meta["hvm"]["context"]["sha256"] == _sha(ctx)
    assert meta["qemu"]["sha256"] == _sha(qemu)
    sig = {"xend": "QemuDeviceModelRecord",
           "xenserver": "QemuDeviceModelRecord\\n"}.get(wrapper, "DeviceModelRecord0002")
    assert meta["qemu"]["signature"] == sig
    assert meta["last_checkpoint_flag"] and meta["checkpoints"] == 1


@pytest.mark.parametrize("sig", ["DeviceModelRecord0002", "RemusDeviceModelState",
                                 "QemuDeviceModelRecord", "xenserver"])
def test_qemu_signatures(sig):
    img = np.zeros((16, PAGE), np.uint8)
    img[:, 0] = np.arange(16)
    q = b"QEVM" + bytes(range(200))
    data, res = make_stream(img, qemu=q, qemu_signature=sig, last_checkpoint=False)
    recs = [r for r in xlegacy.open(data) if isinstance(r, QemuRecord)]
    assert len(recs) == 1 and recs[0].data == q
    assert recs[0].variant == {"QemuDeviceModelRecord": "to-eof",
                               "xenserver": "xenserver"}.get(sig, "length")


# ------------------------------------------------------------------ PV
@pytest.mark.parametrize("width,guest_width", [(8, 8), (8, 4), (4, 4)])
@pytest.mark.parametrize("form", ["full", "plain", "old"])
def test_pv_roundtrip(width, guest_width, form):
    rng = np.random.default_rng(width * 10 + guest_width)
    p2m = 1100                                  # > 512: two p2m frames for 64-bit guests
    img = _image(rng, p2m)
    pt = {50: 4 | 8, 51: 3, 52: 2, 53: 1, 54: 1 | 8, 55: 8}
    unmapped = np.arange(1000, 1100)
    if form == "full":
        pv = PVOptions(guest_width=guest_width, extv=True, xcnt=16 + 832,
                       extra_blocks=[(b"zzzz", b"hello")])
    elif form == "plain":
        pv = PVOptions(guest_width=guest_width, extv=False)
    else:
        if guest_width != width:
            pytest.skip("the old form has no vcpu block: guest width = toolstack width")
        pv = PVOptions(extended=False)
    vsize = F.PV_VCPU_SIZE_64 if guest_width == 8 else F.PV_VCPU_SIZE_32
    online = [0, 1, 3] if form != "old" else [0]
    vcpus = [PVVcpuState(context=bytes([v]) * vsize,
                         extended=bytes([0x40 + v]) * 128 if form == "full" else None,
                         xsave_mask=7, xsave=bytes([0x80 + v]) * 832 if form == "full" else None)
             for v in online]
    shared = bytes(range(256)) * 16
    data, res = make_stream(img, guest="pv", width=width, pv=pv, pfns=np.arange(990),
                            types=pt, xalloc=[995], broken=[996], xtab=[997],
                            vcpus=online if form != "old" else None, unmapped=unmapped,
                            pv_vcpus=vcpus, shared_info=shared)
    if form == "old":
        # nothing in an old-form stream tells the width: the reader must be told
        out, meta = xlegacy.restore(data, width=width * 8, guest="pv")
    else:
        out, meta = xlegacy.restore(data)
    assert np.array_equal(out, res.image_after())
    assert meta["guest"] == "pv" and meta["width"] == width * 8
    assert meta["xalloc_pfns"] == [995] and meta["broken_pfns"] == [996]
    assert meta["entry_counts"]["XTAB"] == 1
    pvm = meta["pv"]
    assert pvm["guest_width"] == (guest_width if form != "old" else width)
    assert pvm["extended_info"] == (form != "old")
    assert pvm["p2m_frame_list"] == list(range(1, F.p2m_frame_count(p2m, pvm["guest_width"]) + 1))
    assert pvm["unmapped_pfns"] == unmapped.tolist()
    assert [v["id"] for v in pvm["vcpus"]] == online
    assert [v["context_sha256"] for v in pvm["vcpus"]] == [_sha(v.context) for v in vcpus]
    if form == "full":
        ids = [b["id"] for b in pvm["extended_info_blocks"]]
        assert ids == ["vcpu", "extv", "xcnt", "zzzz"]
        assert pvm["vcpus"][1]["xsave_sha256"] == _sha(vcpus[1].xsave)
        assert pvm["vcpus"][1]["xsave_mask"] == 7
        assert pvm["vcpus"][2]["extended_sha256"] == _sha(vcpus[2].extended)
    assert pvm["shared_info_sha256"] == _sha(shared)
    assert pvm["pagetables"]["counts"] == {"L1TAB": 2, "L2TAB": 1, "L3TAB": 1, "L4TAB": 1}
    assert pvm["pagetables"]["pinned"] == {"L1TAB": 1, "L4TAB": 1}


def _old_form_pv(width):
    img = np.zeros((1100, PAGE), np.uint8)
    img[:, 0] = 1
    data, _ = make_stream(img, guest="pv", width=width, pv=PVOptions(extended=False),
                          pfns=np.arange(990), vcpus=None)
    return data


def test_old_form_pv_64bit_is_read_as_pv():
    """The body after the p2m frame list checks out only for the PV reading."""
    out, meta = xlegacy.restore(_old_form_pv(8))
    assert meta["guest"] == "pv" and meta["pfns"] == 990


def test_old_form_pv_32bit_not_misread_as_hvm():
    """Small canonical pfns in the frame list also parse as an HVM batch of 1
    entry: the reader must then refuse to guess (or read it as PV)."""
    data = _old_form_pv(4)
    try:
        out, meta = xlegacy.restore(data)
    except xlegacy.AmbiguousStream as exc:
        assert "--guest" in str(exc)
        out, meta = xlegacy.restore(data, guest="pv")
    assert meta["guest"] == "pv" and meta["pfns"] == 990


# ------------------------------------------------------------------ live, verify
def test_live_iterations_resend_and_verify():
    rng = np.random.default_rng(7)
    p2m = 1500
    v1 = _image(rng, p2m)
    v2 = _mutate(rng, v1, np.arange(p2m))
    final = _mutate(rng, v2, np.arange(p2m))
    it2 = np.sort(rng.choice(p2m, 300, replace=False))
    last = np.sort(rng.choice(it2, 50, replace=False))
    only_early = np.array([1499])
    its = [(np.arange(p2m - 1), v1), {"pfns": it2, "image": v2, "xalloc": [1499]}]
    data, res = make_stream(final, iterations=its, pfns=last, verify=True, tsc=(0, 5, 6, 7))
    out, meta = xlegacy.restore(data)
    expect = v1.copy()
    expect[it2] = v2[it2]
    expect[last] = final[last]
    expect[only_early] = 0
    assert np.array_equal(out.reshape(-1, PAGE), expect)
    assert np.array_equal(out, res.image_after())
    assert meta["verify"]["pages"] == last.size and meta["verify"]["matched"] == last.size
    assert meta["xalloc_pfns"] == [1499]
    kinds = [k for k, _, d in res.layout if k in ("batch", "chunk")]
    assert kinds.index("chunk") == 3           # TSC_INFO before the last iteration when live
    recs = list(xlegacy.open(data))
    verify_batches = [r for r in recs if isinstance(r, PageBatch) and r.verify]
    assert sum(b.n_data for b in verify_batches) == last.size


# ------------------------------------------------------------------ Remus
def _remus_history(rng, p2m, n, ndirty, pt=None):
    imgs = [_image(rng, p2m)]
    cps = []
    for k in range(n):
        dirty = np.sort(rng.choice(p2m, ndirty, replace=False))
        new = _mutate(rng, imgs[-1], dirty)
        cp = {"image": new, "pfns": dirty}
        if pt is not None:
            cp["types"] = pt
        if k == 1:
            cp["vcpus"] = [0, 1]
            cp["params"] = {"ident_pt": 42}
        cps.append(cp)
        imgs.append(new)
    return imgs, cps


@pytest.mark.parametrize("width", [8, 4])
@pytest.mark.parametrize("compress", [True, False])
def test_remus_hvm_every_checkpoint(width, compress):
    rng = np.random.default_rng(width + 2 * compress)
    p2m = 1200
    imgs, cps = _remus_history(rng, p2m, 4, 500)
    data, res = make_stream(imgs[0], width=width, checkpoints=cps, compress=compress,
                            params={"ident_pt": 1}, vcpus=[0],
                            qemu_signature="RemusDeviceModelState",
                            compress_options={"page_buffer_pages": 100})
    assert res.checkpoints == 5
    for cp in range(1, 6):
        out, meta = xlegacy.restore(data, checkpoint=cp)
        assert np.array_equal(out, res.image_after(cp)), cp
        det = meta["checkpoint_details"][-1]
        assert det["compressed"] == (compress and cp > 1)
        assert meta["hvm_params"]["ident_pt"] == (42 if cp >= 3 else 1)
        assert meta["vcpus"]["online"] == ([0, 1] if cp >= 3 else [0])
    assert meta["compressed"] == compress and not meta["last_checkpoint_flag"]
    if compress:
        kinds = meta["checkpoint_details"][-1]["page_kinds"]
        assert kinds["delta"] and kinds["empty"] and kinds["full"]
        # chunks come right after the PFN array that filled the page buffer
        layout = [(k, d) for k, _, d in res.layout]
        i = layout.index(("batch", [500, 0]))          # 5 x 100-page buffers
        assert [k for k, _ in layout[i + 1:i + 7]] == ["chunk"] * 5 + ["chunk"]
        assert [d[2] for _, d in layout[i + 1:i + 6]] == [100] * 5
        assert layout[i + 6][1] == F.VCPU_INFO


def test_remus_pv_compressed_pagetables_and_last_checkpoint():
    rng = np.random.default_rng(77)
    p2m = 600
    pt = np.zeros(p2m, np.uint8)
    pt[10:20] = 1
    pt[20:22] = 2 | 8
    imgs, cps = _remus_history(rng, p2m, 3, 250, pt=pt)
    for cp in cps:
        cp["pfns"] = np.union1d(cp["pfns"], np.arange(10, 22))   # page tables resent
    cps[-1]["unmapped"] = [599]
    data, res = make_stream(imgs[0], guest="pv", pv=PVOptions(xcnt=16 + 64), vcpus=[0, 1],
                            types=pt, checkpoints=cps, compress=True, last_checkpoint=True,
                            compress_options={"page_buffer_pages": 64})
    data += b"ignored trailing bytes"
    for cp in range(1, 5):
        out, meta = xlegacy.restore(data, checkpoint=cp)
        assert np.array_equal(out, res.image_after(cp)), cp
    assert meta["last_checkpoint_flag"] and meta["pv"]["unmapped_pfns"] == [599]
    assert any("ignored" in w for w in meta["warnings"])
    # page tables always travel as FULL_PAGE
    assert meta["checkpoint_details"][-1]["page_kinds"]["full"] >= 12


def test_remus_cut_stream_gives_last_complete_checkpoint():
    rng = np.random.default_rng(3)
    imgs, cps = _remus_history(rng, 300, 2, 120)
    data, res = make_stream(imgs[0], checkpoints=cps, compress=True)
    ends = [o for k, o, d in res.layout if k == "checkpoint_end"]
    cut = data[:ends[2] - 100]
    out, meta = xlegacy.restore(cut)
    assert meta["checkpoints"] == 2 and meta["torn_checkpoint"]
    assert np.array_equal(out, res.image_after(2))


# ------------------------------------------------------------------ low level
def test_streamwriter_api_order_and_chunks():
    rng = np.random.default_rng(1)
    img = _image(rng, 64)
    w = StreamWriter(None, width=8, guest="hvm", p2m_size=64)
    w.raw_chunk(F.HVM_ACPI_IOPORTS_LOCATION, struct.pack("<IQ", 0, 1))
    w.batch(np.arange(10), 0, img[:10])
    w.batch([0, 12, 13, 14, 15], [0xF, 0xE, 0xD, 0x8, 0x0], image=img)
    w.vcpu_info([0])
    w.hvm_params({17: 3, "HVM_VIRIDIAN": 1})     # HVM_PARAM_CONSOLE_PFN is 17
    w.tsc_info(1, 2, 3, 4)
    w.toolstack(b"opaque")
    w.last_checkpoint()
    w.end_body()
    w.hvm_tail((1, 2, 3), b"ctx", b"qemu")
    w.close()
    data = w.getvalue()
    recs = list(xlegacy.open(data))
    ids = [r.id for r in recs if isinstance(r, Chunk)]
    assert ids == [-10, -2, -8, -11, -7, -18, -9]   # params in Xen's order
    b = [r for r in recs if isinstance(r, PageBatch)][1]
    assert b.types.tolist() == [0xF, 0xE, 0xD, 0x8, 0x0]
    assert int.from_bytes(b.raw[:8], "little") == 0xF0000000
    assert b.data_pfns.tolist() == [14, 15]
    out, meta = xlegacy.restore(data)
    assert np.array_equal(out.reshape(-1, PAGE)[[14, 15]], img[[14, 15]])
    assert meta["hvm_params"] == {"acpi_ioports_location": 1, "console_pfn": 3, "viridian": 1}
    tail = [r for r in recs if isinstance(r, HVMTail)][0]
    assert tail.magic_pfns == (1, 2, 3) and tail.context == b"ctx"


def test_streamwriter_checks():
    w = StreamWriter(None, p2m_size=8)
    with pytest.raises(ValueError):
        w.batch(np.arange(1025) % 8, 0, np.zeros((1025, PAGE), np.uint8))
    with pytest.raises(ValueError):
        w.batch([8], 0, np.zeros((1, PAGE), np.uint8))          # pfn >= p2m_size
    with pytest.raises(ValueError):
        w.batch([1], 5, None)                                   # bogus type
    with pytest.raises(ValueError):
        w.batch([1, 2], 0, np.zeros((1, PAGE), np.uint8))       # one page short
    with pytest.raises(ValueError):
        StreamWriter(None, width=6, p2m_size=8)
    # check=False writes what it is told: the reader then refuses it
    w = StreamWriter(None, p2m_size=8, check=False)
    w.batch([9], 0, np.zeros((1, PAGE), np.uint8))
    with pytest.raises(xlegacy.StreamError):
        list(xlegacy.open(w.getvalue(), width=64, guest="hvm"))


def test_tmem_chunk_is_written_and_refused():
    w = StreamWriter(None, p2m_size=8)
    w.raw_chunk(F.TMEM, b"\0" * 16)
    w.end_body()
    w.hvm_tail()
    with pytest.raises(xlegacy.UnsupportedStream):
        list(xlegacy.open(w.getvalue()))


def test_compressed_checkpoint_defers_metadata_like_xen():
    img = np.zeros((40, PAGE), np.uint8)
    w = StreamWriter(None, p2m_size=40, compress_options={"page_buffer_pages": 8})
    w.send(np.arange(40), image=img)
    w.enable_compression()
    w.end_body()
    w.hvm_tail()
    assert w.checkpoint == 2 and w.compressing
    w.vcpu_info([0])                          # held back until the compressed data is out
    w.batch(np.arange(20), 0, img[:20] + 1)
    w.end_body()
    w.hvm_tail()
    kinds = [(k, d if k != "chunk" else (d if isinstance(d, int) else d[0]))
             for k, _, d in w.layout if k in ("batch", "chunk", "end")]
    cp2 = kinds[kinds.index(("end", 0)) + 1:]
    assert cp2 == [("batch", [20, 0]), ("chunk", -12), ("chunk", -12), ("chunk", -12),
                   ("chunk", -2), ("end", 0)]
    out, meta = xlegacy.restore(w.getvalue())
    assert (out.reshape(-1, PAGE)[:20] == 1).all() and meta["checkpoints"] == 2


def test_write_to_path_and_callable_image(tmp_path):
    p2m = 3000
    def pages(pfns):
        out = np.zeros((pfns.size, PAGE), np.uint8)
        out.view("<u8")[:, 0] = pfns
        return out
    path = tmp_path / "g.xlsave"
    res = write_guest(str(path), pages, p2m_size=p2m, wrapper="xl", config="x=1\n")
    assert path.stat().st_size == res.size
    out, meta = xlegacy.restore(str(path))
    assert np.array_equal(out.reshape(-1, PAGE).view("<u8")[:, 0], np.arange(p2m))
    # file objects work too
    buf = io.BytesIO()
    write_guest(buf, pages, p2m_size=p2m)
    assert xlegacy.restore(buf.getvalue())[1]["pfns"] == p2m


# ------------------------------------------------------------------ samples, demo
def _samples():
    if not os.path.isdir(SAMPLES):
        return []
    return sorted(f[:-5] for f in os.listdir(SAMPLES) if f.endswith(".json"))


@pytest.mark.parametrize("name", _samples() or ["(none)"])
def test_rewrite_samples_byte_for_byte(name):
    if name == "(none)":
        pytest.skip("shared samples not available")
    with open(os.path.join(SAMPLES, name + ".json")) as f:
        info = json.load(f)
    with open(os.path.join(SAMPLES, info["file"]), "rb") as f:
        data = f.read()
    if name == "bad_truncated_page":          # cut inside checkpoint 1
        with pytest.raises(xlegacy.TruncatedStream):
            rewrite(data)
        return
    got = rewrite(data).getvalue()
    if info.get("options", {}).get("truncated_at"):
        assert data.startswith(got) and len(got) < len(data)
        assert got == data[:len(got)]
        out, meta = xlegacy.restore(got)
        assert meta["checkpoints"] == info["expected"]["committed_checkpoint"]
    else:
        assert got == data


def test_demo_is_reproducible():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_demo",
                                                  os.path.join(ROOT, "tools", "make_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.build()
    path = os.path.join(ROOT, "src", "xlegacy", "data", "demo.xlsave")
    with open(path, "rb") as f:
        assert f.read() == data, "demo.xlsave is stale: run tools/make_demo.py"
    assert 100_000 < len(data) < 300_000
    out, meta = xlegacy.restore(data)
    assert meta["wrapper"] == "xl" and meta["wrapper_details"]["config_format"] == "json"
    assert meta["width"] == 64 and meta["guest"] == "hvm"
    assert meta["vcpus"]["online"] == [0, 1] and meta["tsc_info"]["khz"] == 2394000
    assert len(meta["hvm_params"]) >= 5
    assert meta["toolstack"]["libxl_v1_physmap"][0]["name"] == "vga.vram"
    assert meta["qemu"]["signature"] == "DeviceModelRecord0002"
    assert meta["p2m_size"] == 320 and meta["pfns"] == 60
