"""Framing: wrappers, inference, truncation, records and their offsets,
using the shared samples (byte surgery on them where a variant is needed)."""
import struct

import pytest

import xlegacy
from xlegacy.stream import records as R
from xlegacy.errors import AmbiguousStream, StreamError, TruncatedStream, UnsupportedStream

from conftest import load_sample


def _bin(name):
    path, meta = load_sample(name)
    return path.read_bytes(), meta


def test_record_offsets_match_layout(samples):
    data, meta = _bin("xl_hvm_json_physmap")
    s = xlegacy.open(data)
    assert s.wrapper.kind == "xl" and s.wrapper.config_format == "json"
    kinds = []
    for rec in s:
        if isinstance(rec, R.PageBatch):
            kinds.append(["batch", rec.offset, [rec.count, rec.n_data]])
        elif isinstance(rec, R.Chunk):
            kinds.append(["chunk", rec.offset, rec.id])
        elif isinstance(rec, R.EndOfBody):
            kinds.append(["end", rec.offset, 0])
    want = [x for x in meta["layout"] if x[0] in ("batch", "chunk", "end")]
    assert kinds == want


def test_bare_image_equals_wrapped(samples):
    data, meta = _bin("pv64_xl_xsave")
    img_w, m_w = xlegacy.restore(data)
    img_b, m_b = xlegacy.restore(data[meta["options"]["libxc_image_offset"]:])
    assert m_b["wrapper"] == "none" and m_w["wrapper"] == "xl"
    assert (img_w == img_b).all()


@pytest.mark.parametrize("name", ["hvm64_save", "hvm32_toolstack_save", "pv64_xl_xsave"])
def test_forced_wrong_width_is_an_error(name, samples):
    data, meta = _bin(name)
    wrong = 64 if meta["options"]["toolstack_width_bits"] == 32 else 32
    with pytest.raises(StreamError):
        xlegacy.restore(data, width=wrong)


def test_explicit_flags_agree(samples):
    data, meta = _bin("hvm32_toolstack_save")
    img, m = xlegacy.restore(data, width=32, guest="hvm")
    assert m["inferred"] == {"width": "given", "guest": "given"}


def test_too_short_to_tell():
    with pytest.raises(StreamError):
        xlegacy.restore(struct.pack("<I", 16))


def test_ambiguous_asks_for_the_flag():
    # 32-bit p2m_size 2048, then [1, 2] and a one-page batch: the p2m frame
    # list of an old PV stream and its body, or an HVM batch of one entry
    # (pfn 2) whose page swallows the rest.  Both end in a 0 chunk.
    data = struct.pack("<III", 2048, 1, 2) + struct.pack("<iI", 1, 5) + bytes(4096) + \
        struct.pack("<i", 0)
    with pytest.raises(AmbiguousStream, match="--guest"):
        xlegacy.open(data)
    assert xlegacy.open(data, guest="pv").guest == "pv"


def test_truncated_everywhere(samples):
    data, meta = _bin("hvm64_save")
    cuts = sorted({x[1] for x in meta["layout"]} | {x[1] + 3 for x in meta["layout"]})
    for cut in cuts:
        if cut <= 8 or cut >= len(data):
            continue
        with pytest.raises(TruncatedStream) as ei:
            xlegacy.restore(data[:cut])
        assert ei.value.offset == cut, (cut, str(ei.value))


@pytest.mark.parametrize("magic,what", [
    (b"XenSavedDomv2-\n", "XenServer v2"),
    (b"\xff" * 8 + b"XENF" + b"\0" * 8, "libxc v2"),      # Xen's real magics
    (b"LibxlFmt" + b"\0" * 10, "libxl v2"),
])
def test_v2_streams_named(magic, what):
    with pytest.raises(UnsupportedStream) as ei:
        xlegacy.open(magic + b"\0" * 64)
    assert what.split()[0].lower() in str(ei.value).lower()


def test_xl_streamv2_flag(samples):
    data, _ = _bin("xl_hvm_json_physmap")
    bad = bytearray(data)
    struct.pack_into("<I", bad, 36, 2 | 1)
    with pytest.raises(UnsupportedStream, match="STREAMv2"):
        xlegacy.open(bytes(bad))
    struct.pack_into("<I", bad, 36, 1 | 8)
    with pytest.raises(StreamError, match="mandatory") as ei:
        xlegacy.open(bytes(bad))
    assert ei.value.offset == 36


def test_xenserver_and_xend_wrappers(samples):
    data, meta = _bin("hvm32_toolstack_save")
    img0, m0 = xlegacy.restore(data)
    xs = b"XenSavedDomain\n" + data
    img1, m1 = xlegacy.restore(xs)
    assert m1["wrapper"] == "xenserver" and (img0 == img1).all()
    cfg = b"(domain (name x))"
    xend = b"LinuxGuestRecord" + struct.pack(">i", len(cfg)) + cfg + data
    img2, m2 = xlegacy.restore(xend)
    assert m2["wrapper"] == "xend" and m2["config"] == cfg.decode() and (img0 == img2).all()
    xml = b"<domain/>\0"
    lv = b"libvirt-xml\n \0 \r" + struct.pack("<II40x", 1, len(xml)) + xml + data
    img3, m3 = xlegacy.restore(lv)
    assert m3["wrapper"] == "libvirt" and (img0 == img3).all()


def test_xenserver_qemu_record(samples):
    """XenServer ends an HVM image with 'QemuDeviceModelRecord\\n' + BE length."""
    data, meta = _bin("hvm64_save")
    qemu_at = [x for x in meta["layout"] if x[0] == "qemu_record"][0][1]
    (n,) = struct.unpack_from("<I", data, qemu_at + 21)
    payload = data[qemu_at + 25:qemu_at + 25 + n]
    xs = b"XenSavedDomain\n" + data[:qemu_at] + b"QemuDeviceModelRecord\n" + \
        struct.pack(">I", n) + payload
    _, m = xlegacy.restore(xs)
    assert m["qemu"]["length"] == n and m["qemu"]["signature"].startswith("QemuDeviceModelRecord")
    # the classic xend/old-libxc form runs to the end of the stream
    old = data[:qemu_at] + b"QemuDeviceModelRecord" + payload
    _, m = xlegacy.restore(old)
    assert m["qemu"]["length"] == n and m["qemu"]["signature"] == "QemuDeviceModelRecord"


def test_bad_qemu_signature(samples):
    data, meta = _bin("hvm64_save")
    qemu_at = [x for x in meta["layout"] if x[0] == "qemu_record"][0][1]
    bad = data[:qemu_at] + b"NotAQemuRecordAtAll!!" + data[qemu_at + 21:]
    with pytest.raises(StreamError, match="qemu record signature") as ei:
        xlegacy.restore(bad)
    assert ei.value.offset == qemu_at


def test_batch_too_large_and_unknown_chunk(samples):
    data, meta = _bin("hvm64_save")
    at = [x for x in meta["layout"] if x[0] == "batch"][0][1]
    bad = bytearray(data)
    struct.pack_into("<i", bad, at, 1025)
    with pytest.raises(StreamError, match="MAX_BATCH") as ei:
        xlegacy.restore(bytes(bad))
    assert ei.value.offset == at
    struct.pack_into("<i", bad, at, -21)
    with pytest.raises(StreamError, match="unknown chunk id") as ei:
        xlegacy.restore(bytes(bad))
    assert ei.value.offset == at


def test_pfn_beyond_p2m(samples):
    data, meta = _bin("hvm64_save")
    at = [x for x in meta["layout"] if x[0] == "batch"][0][1]
    bad = bytearray(data)
    struct.pack_into("<Q", bad, at + 4, 896)     # first entry: pfn == p2m_size
    with pytest.raises(StreamError, match="out of range") as ei:
        xlegacy.restore(bytes(bad))
    assert ei.value.offset == at + 4


def test_tmem_refused(samples):
    data, meta = _bin("hvm64_save")
    at = [x for x in meta["layout"] if x[0] == "chunk"][0][1]
    bad = bytearray(data)
    struct.pack_into("<i", bad, at, -5)
    with pytest.raises(UnsupportedStream, match="TMEM") as ei:
        xlegacy.restore(bytes(bad))
    assert ei.value.offset == at


def test_stream_iterates_once(samples):
    data, _ = _bin("hvm64_save")
    s = xlegacy.open(data)
    list(s)
    with pytest.raises(RuntimeError):
        iter(s)


# ---------------------------------------------------------------- numpy-free framing
def test_count_data_agrees_with_decode(impl):
    """count_data checks entries exactly as decode_pfns does (same fault,
    entry and offset) and counts the data entries it would return."""
    import numpy as np
    rng = np.random.default_rng(3)
    for width in (4, 8):
        for _ in range(200):
            n = int(rng.integers(0, 40))
            ents = rng.integers(0, 64, n, dtype=np.uint64) | \
                (rng.choice(np.array([0, 1, 4, 8, 0xC, 0xD, 0xE, 0xF, 5], np.uint64), n)
                 << np.uint64(28))
            if width == 8 and n and rng.random() < 0.1:
                ents[int(rng.integers(0, n))] |= np.uint64(1 << 40)
            raw = ents.astype("<u8" if width == 8 else "<u4").tobytes()
            try:
                want = ("ok", int(impl.decode_pfns(raw, width, 48, locate=7)[2].size))
            except StreamError as exc:
                want = ("fault", exc.code, exc.index, exc.offset)
            try:
                got = ("ok", impl.count_data(raw, width, 48, locate=7))
            except StreamError as exc:
                got = ("fault", exc.code, exc.index, exc.offset)
            assert got == want, (width, ents)
    with pytest.raises(ValueError):
        impl.count_data(b"\0" * 6, 4, 10)


def test_framing_needs_no_numpy(samples):
    """Opening and iterating a stream (inference included) leaves numpy
    unloaded until a consumer asks for a batch's arrays."""
    import subprocess
    import sys
    from xlegacy import kernels
    if kernels.BACKEND != "native":
        pytest.skip("the reference kernels are numpy code")
    path, _ = load_sample("xl_hvm_json_physmap")
    code = ("import sys, xlegacy\n"
            f"recs = list(xlegacy.open({str(path)!r}))\n"
            "assert 'numpy' not in sys.modules, 'numpy loaded'\n"
            "b = [r for r in recs if type(r).__name__ == 'PageBatch'][0]\n"
            "assert b.data_pfns.size == b.n_data and 'numpy' in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_leave_data_lookahead_and_observer(samples):
    """leave_data leaves page data and the qemu payload in the source (skipped
    unless the consumer moves them); lookahead=False reads nothing past the
    qemu record of a pipe; the observer sees every record."""
    import os
    import threading
    data, meta = _bin("hvm64_save")
    qemu_at = [x for x in meta["layout"] if x[0] == "qemu_record"][0][1]
    plain = list(xlegacy.open(data))
    r, w = os.pipe()
    tail = b"not part of the stream"
    feeder = threading.Thread(target=lambda: (os.write(w, data + tail), os.close(w)))
    feeder.start()
    try:
        seen = []
        s = xlegacy.open(r, width=64, guest="hvm", leave_data=True, lookahead=False,
                         observer=seen.append)
        recs = []
        for rec in s:
            recs.append(rec)
            if isinstance(rec, R.QemuRecord):
                assert rec.data is None and rec.data_offset == qemu_at + 25
                assert s.qemu_data(rec) == plain[-2].data
            if isinstance(rec, R.CheckpointEnd):
                assert rec.last == plain[-1].last and rec.trailing == 0
                break
        assert seen == recs
        assert [(type(a).__name__, a.offset) for a in recs] == \
            [(type(b).__name__, b.offset) for b in plain]
        assert all(b.pages is None for b in recs if isinstance(b, R.PageBatch))
        assert os.read(r, 100) == tail          # nothing beyond the stream was read
    finally:
        feeder.join()
        os.close(r)


def test_lenient_passes_odd_entries(samples):
    data, meta = _bin("hvm64_save")
    at = [x for x in meta["layout"] if x[0] == "batch"][0][1]
    bad = bytearray(data)
    struct.pack_into("<Q", bad, at + 4, 896)     # first entry: pfn == p2m_size
    with pytest.raises(StreamError, match="out of range"):
        list(xlegacy.open(bytes(bad)))
    s = xlegacy.open(bytes(bad), width=64, guest="hvm", lenient=True)
    b = next(r for r in s if isinstance(r, R.PageBatch))
    good = next(r for r in xlegacy.open(data) if isinstance(r, R.PageBatch))
    assert b.odd.offset == at + 4 and b.n_data == good.n_data
    assert int(b.data_pfns[0]) == 896
