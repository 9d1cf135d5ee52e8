"""xlegacy convert / xlegacy-convert-legacy-stream: byte-identity with Xen's
convert-legacy-stream on the shared samples, the compressed samples as
plain v3 streams, errors with offsets, pipes and shared descriptors, the
command line, and streams from xlegacy.testing.writer (PV, 32-bit, wrappers, Remus).

An optional differential test runs Xen's own script when it is available
(XLEGACY_XEN_CONVERTER=path/to/convert-legacy-stream, with its python
modules on XLEGACY_XEN_PYTHONPATH; by default /tmp/xendeb as unpacked from
Debian's xen-utils package); it is skipped otherwise."""
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import SAMPLES, load_sample, sample_names

import xlegacy
from xlegacy import format as F
from xlegacy import v2
from xlegacy.converter import convert, libxl_physmap
from xlegacy.cli.convert import fd_or_path, main
from xlegacy.errors import CorruptCheckpoint, StreamError, TruncatedStream, UnsupportedStream

try:
    from xlegacy.testing import writer as W
except ImportError:     # pragma: no cover - the writer is another module's
    W = None

needs_writer = pytest.mark.skipif(W is None, reason="xlegacy.testing.writer not available")


def sha(data):
    return hashlib.sha256(data).hexdigest()


def _xen_cases():
    out = []
    for name in sample_names():
        _, meta = load_sample(name)
        x = meta.get("xen_convert_legacy_stream") or {}
        if not x.get("applicable"):
            continue
        for i, r in enumerate(x["results"]):
            out.append(pytest.param(name, i, id=f"{name}[{' '.join(r['options'])}]"))
    return out or [pytest.param(None, None, marks=pytest.mark.skip(
        reason=f"shared samples not available ({SAMPLES} is missing)"))]


def _run(argv, capsys=None):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


# ====================================================================== samples
@pytest.mark.parametrize("name,index", _xen_cases())
def test_sample_byte_identical_to_xen(name, index, tmp_path, capsys):
    path, meta = load_sample(name)
    result = meta["xen_convert_legacy_stream"]["results"][index]
    out = tmp_path / "out.v2"
    rc, err = _run(["-i", path, "-o", out] + result["options"], capsys)
    expected = result.get("output_sha256")
    if expected is None:            # the script fails on this one: so must we
        assert rc == 1
        assert "offset" in err and "Traceback" not in err
        return
    assert rc == 0, err
    assert sha(out.read_bytes()) == expected


@pytest.mark.parametrize("name,index", _xen_cases())
def test_sample_inferred_and_autodetected(name, index, tmp_path):
    """Without -w/-g (inferred) and without -x (an xl header is recognised and
    copied anyway) the output is the same."""
    path, meta = load_sample(name)
    result = meta["xen_convert_legacy_stream"]["results"][index]
    if result.get("output_sha256") is None:
        pytest.skip("the script fails on this sample")
    opts = result["options"]
    fmt = opts[opts.index("-f") + 1]
    out = tmp_path / "out.v2"
    stats = convert(path, out, fmt=fmt, skip_qemu="--skip-qemu" in opts)
    assert sha(out.read_bytes()) == result["output_sha256"]
    assert stats.width == meta["options"]["toolstack_width_bits"]
    assert stats.guest == meta["options"]["guest_type"]


def test_truncated_page_fails_with_offset(samples, tmp_path, capsys):
    path, meta = load_sample("bad_truncated_page")
    with pytest.raises(TruncatedStream) as ei:
        convert(path, tmp_path / "o", width=64, guest="hvm")
    assert ei.value.offset == meta["error"]["end_of_file"]
    assert f"starts at offset {meta['error']['page_offset']}" in str(ei.value)
    rc, err = _run(["-i", path, "-o", tmp_path / "o2", "-w", "64", "-g", "hvm"], capsys)
    assert rc == 1
    assert f"offset {meta['error']['end_of_file']}" in err


def test_bad_compressed_run_fails_with_offset(samples, tmp_path, capsys):
    path, meta = load_sample("bad_compressed_run")
    e = meta["error"]
    page_start = e["chunk_offset"] + 4 + 8 + e["page_encoding_offset_in_chunk"]
    with pytest.raises(CorruptCheckpoint) as ei:
        convert(path, tmp_path / "o")
    exc = ei.value
    assert exc.checkpoint == e["checkpoint"]
    assert page_start <= exc.offset < page_start + 4097
    assert f"page {e['page_index_in_checkpoint']}" in str(exc)
    rc, err = _run(["-i", path, "-o", tmp_path / "o2"], capsys)
    assert rc == 1 and f"offset {exc.offset}" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize("name", ["remus_compressed_3cp", "remus_compressed_cut_cp3"])
def test_compressed_samples_become_last_checkpoint(samples, name, fmt, tmp_path):
    path, meta = load_sample(name)
    exp = meta["expected"]
    out = tmp_path / "out.v2"
    warnings = []
    stats = convert(path, out, fmt=fmt, warn=warnings.append)
    assert stats.committed_checkpoint == exp["committed_checkpoint"]
    assert stats.compressed
    if exp["complete_checkpoints"] < meta["options"]["checkpoints_in_file"]:
        assert stats.torn and any("incomplete" in w for w in warnings)
    prefix = stats.xl_header["input_length"] if stats.xl_header else 0
    s = v2.read_stream(out.read_bytes(), prefix=prefix)
    assert s.libxl == (fmt == "libxl") and s.version == 3 and s.guest == "hvm"
    image = s.memory_image(exp["p2m_size"])
    assert sha(image) == exp["memory"]["sha256"]
    # the committed checkpoint's tail and metadata
    hvm = exp["hvm"]
    ctx = s.libxc_records(v2.REC_HVM_CONTEXT)
    assert len(ctx) == 1 and sha(ctx[0].body) == hvm["context"]["sha256"]
    params = s.hvm_params()
    assert params[-1] == [(5, hvm["magic_pfns"]["ioreq"]), (6, hvm["magic_pfns"]["bufioreq"]),
                          (1, hvm["magic_pfns"]["store"])]
    got = dict(params[0])
    for pname, value in hvm["params"].items():
        assert got[hvm["param_numbers"][pname]] == value
    if fmt == "libxl":
        emu = s.libxl_records(v2.LREC_EMULATOR_CONTEXT)
        assert len(emu) == 1 and sha(emu[0].body[8:]) == hvm["qemu"]["sha256"]
        assert s.records[-1].name == "END" and not s.trailer
    else:
        assert s.trailer[:21] == v2.QEMU_RAW_SIGNATURE
        n = struct.unpack_from("<I", s.trailer, 21)[0]
        assert n == hvm["qemu"]["length"] and sha(s.trailer[25:25 + n]) == hvm["qemu"]["sha256"]


def test_compressed_from_a_pipe(samples, tmp_path):
    path, meta = load_sample("remus_compressed_3cp")
    with open(path, "rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-m", "xlegacy.cli.convert", "-i", "0", "-o", "1"],
            stdin=stdin, capture_output=True, check=True)
    s = v2.read_stream(proc.stdout, prefix=meta["options"]["libxc_image_offset"])
    assert sha(s.memory_image(meta["expected"]["p2m_size"])) == \
        meta["expected"]["memory"]["sha256"]


def test_pipe_in_pipe_out(samples):
    path, meta = load_sample("xl_hvm_json_physmap")
    result = [r for r in meta["xen_convert_legacy_stream"]["results"]
              if "libxl" in r["options"]][0]
    with open(path, "rb") as f:
        proc = subprocess.run([sys.executable, "-m", "xlegacy.cli.convert", "-i", "0", "-o", "1"]
                              + result["options"], capture_output=True, input=f.read(),
                              check=True)
    assert sha(proc.stdout) == result["output_sha256"]


# ====================================================================== descriptors
def _drain(fd, sink):
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return
        sink.extend(b)


def _xenserver_image(samples):
    path, meta = load_sample("hvm32_toolstack_save")
    qemu_at = [x for x in meta["layout"] if x[0] == "qemu_record"][0][1]
    expected = [r["output_sha256"] for r in meta["xen_convert_legacy_stream"]["results"]
                if "--skip-qemu" in r["options"]][0]
    return b"XenSavedDomain\n" + path.read_bytes(), qemu_at, expected


@pytest.mark.parametrize("kind", ["file", "pipe"])
def test_xenopsd_leaves_the_qemu_record(samples, tmp_path, kind):
    """xenopsd reads "XenSavedDomain\\n" itself, runs the converter with
    --in FD --out FD --width 32 --skip-qemu --guest-type hvm --syslog and then
    reads the qemu record from the same descriptor: nothing of it may be used."""
    data, qemu_at, expected = _xenserver_image(samples)
    if kind == "file":
        img = tmp_path / "xs.img"
        img.write_bytes(data)
        fd = os.open(img, os.O_RDONLY)
        feeder = None
    else:
        fd, wfd = os.pipe()
        feeder = threading.Thread(target=lambda: (os.write(wfd, data), os.close(wfd)))
        feeder.start()
    try:
        assert os.read(fd, 15) == b"XenSavedDomain\n"
        r, w = os.pipe()
        out = bytearray()
        t = threading.Thread(target=_drain, args=(r, out))
        t.start()
        proc = subprocess.run([sys.executable, "-m", "xlegacy.cli.convert", "--in", str(fd),
                               "--out", str(w), "--width", "32", "--skip-qemu", "--guest-type",
                               "hvm", "--syslog", "--verbose"], pass_fds=(fd, w),
                              capture_output=True)
        os.close(w)
        t.join()
        os.close(r)
        assert proc.returncode == 0, proc.stderr
        assert sha(bytes(out)) == expected
        rest = bytearray()
        _drain(fd, rest)
        assert bytes(rest) == data[15 + qemu_at:]
    finally:
        os.close(fd)
        if feeder is not None:
            feeder.join()


def test_fd_or_path_rule():
    assert fd_or_path("3") == 3
    assert fd_or_path(" 7 ") == 7
    assert fd_or_path("+4") == 4
    assert fd_or_path("-1") is None          # a file called "-1", as in Xen's helper
    assert fd_or_path("0x3") is None
    assert fd_or_path("guest.save") is None


# ====================================================================== command line
def test_cli_usage_and_errors(tmp_path, capsys):
    rc, err = _run(["-o", tmp_path / "x"], capsys)
    assert rc == 1 and "--in" in err                    # help on stderr, as Xen's script
    assert _run(["-i", "a", "-o", "b", "-f", "xx"], capsys)[0] == 2
    assert _run(["-i", "a", "-o", "b", "-w", "48"], capsys)[0] == 2
    assert _run(["-i", "a", "-o", "b", "--bogus"], capsys)[0] == 2
    rc, err = _run(["-i", tmp_path / "missing", "-o", tmp_path / "x"], capsys)
    assert rc == 1 and "No such file" in err
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    rc, err = _run(["-i", junk, "-o", tmp_path / "x", "-w", "64", "-g", "hvm"], capsys)
    assert rc == 1 and "error" in err and "Traceback" not in err


def test_cli_stray_arguments_are_ignored(samples, tmp_path, capsys):
    path, meta = load_sample("hvm64_save")
    res = meta["xen_convert_legacy_stream"]["results"][0]
    out = tmp_path / "o"
    rc, err = _run(["-i", path, "stray", "-o", out] + res["options"], capsys)
    assert rc == 0 and sha(out.read_bytes()) == res["output_sha256"]


def test_cli_verbose_summary(samples, tmp_path, capsys):
    path, _ = load_sample("pv64_xl_xsave")
    rc = main(["-i", str(path), "-o", str(tmp_path / "o"), "-v", "-f", "libxl"])
    out = capsys.readouterr().out
    assert rc == 0 and "converted: libxl stream, PV guest" in out


def test_xl_flag_without_xl_header(samples, tmp_path, capsys):
    path, _ = load_sample("hvm64_save")
    rc, err = _run(["-i", path, "-o", tmp_path / "o", "-x"], capsys)
    assert rc == 1 and "no xl header" in err and "offset 0" in err


def test_xl_streamv2_is_refused(tmp_path):
    data = F.XL_MAGIC + F.XL_HEADER.pack(F.XL_BYTEORDER, F.XL_FLAG_STREAMV2, 0, 0) + bytes(64)
    with pytest.raises(UnsupportedStream, match="v2 stream"):
        convert(data, io.BytesIO())


def test_output_to_file_object_and_bytes_input(samples):
    path, meta = load_sample("hvm64_save")
    res = meta["xen_convert_legacy_stream"]["results"][1]       # libxl
    buf = io.BytesIO()
    convert(path.read_bytes(), buf, fmt="libxl", width=64, guest="hvm")
    assert sha(buf.getvalue()) == res["output_sha256"]


def test_libxl_physmap_checks():
    ok = struct.pack("<IIQQQI", 1, 1, 0xF0000000, 0xF0000000, 0x1000, 5) + b"vram\0" + b"LEAK"
    assert libxl_physmap(ok, 8, 0) == (b"physmap/f0000000/start_addr\0f0000000\0"
                                       b"physmap/f0000000/size\0" b"1000\0"
                                       b"physmap/f0000000/name\0vram\0")
    for bad, msg in ((b"\1\0\0\0", "short"), (struct.pack("<II", 2, 0), "version"),
                     (struct.pack("<II", 1, 1) + bytes(20), "too short"),
                     (struct.pack("<IIQQQI", 1, 1, 0, 0, 0, 0), "no name"),
                     (struct.pack("<IIQQQI", 1, 1, 0, 0, 0, 4) + b"vram", "NUL")):
        with pytest.raises(StreamError, match=msg):
            libxl_physmap(bad, 4, 100)


# ====================================================================== writer streams
def _image(p2m, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=p2m * F.PAGE_SIZE, dtype=np.uint8)


def _convert_bytes(data, **kw):
    buf = io.BytesIO()
    stats = convert(data, buf, **kw)
    return buf.getvalue(), stats


@needs_writer
def test_writer_pv32_guest(tmp_path):
    p2m = 300
    img = _image(p2m)
    types = {10: 1, 11: 2, 12: 3 | 8}
    data, res = W.make_stream(img, width=4, guest="pv", p2m_size=p2m, types=types,
                              vcpus=[0, 2], pv={"guest_width": 4, "extv": True, "xcnt": 16 + 64},
                              unmapped=[5, 6])
    out, stats = _convert_bytes(data)
    assert (stats.width, stats.guest) == (32, "pv")
    s = v2.read_stream(out)
    names = [r.name for r in s.records]
    assert names[:3] == ["X86_PV_INFO", "STATIC_DATA_END", "X86_PV_P2M_FRAMES"]
    assert bytes(s.records[0].body[:2]) == b"\x04\x03"      # 32-bit PAE, 3 levels
    frames = s.records[2].body
    assert struct.unpack_from("<II", frames) == (0, p2m - 1)
    assert len(frames) == 8 + 8 * F.p2m_frame_count(p2m, 4)
    basic = s.libxc_records(v2.REC_X86_PV_VCPU_BASIC)
    assert [struct.unpack_from("<I", r.body)[0] for r in basic] == [0, 2]
    assert all(len(r.body) == 8 + F.PV_VCPU_SIZE_32 for r in basic)
    assert all(len(r.body) == 8 + 128 for r in s.libxc_records(v2.REC_X86_PV_VCPU_EXTENDED))
    assert all(len(r.body) == 8 + 64 for r in s.libxc_records(v2.REC_X86_PV_VCPU_XSAVE))
    assert names[-2:] == ["SHARED_INFO", "END"]
    assert sha(s.memory_image(p2m)) == res.sha256_after()
    ents = [e for entries, _ in s.page_data() for e in entries]
    assert (1 << 60) | 10 in ents and ((3 | 8) << 60) | 12 in ents


@needs_writer
@pytest.mark.parametrize("wrapper", ["xend", "xenserver", "libvirt", "xl"])
@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
def test_writer_wrappers(wrapper, fmt):
    p2m = 200
    img = _image(p2m, 2)
    width = 4 if wrapper == "xenserver" else 8
    qemu = W.qemu_blob(3000, seed=5)
    data, res = W.make_stream(img, width=width, guest="hvm", wrapper=wrapper,
                              config="(domain (name x))" if wrapper == "xend" else "name='x'",
                              qemu=qemu, params={"ident_pt": 0xFEFFD000, "viridian": 1})
    out, stats = _convert_bytes(data, fmt=fmt)
    assert stats.wrapper == wrapper
    prefix = stats.xl_header["input_length"] if wrapper == "xl" else 0
    if wrapper == "xl":
        assert out[:32] == F.XL_MAGIC
    s = v2.read_stream(out, prefix=prefix)
    assert sha(s.memory_image(p2m)) == res.sha256_after()
    if fmt == "libxl":
        assert bytes(s.libxl_records(v2.LREC_EMULATOR_CONTEXT)[0].body[8:]) == qemu
    else:
        assert s.trailer == v2.QEMU_RAW_SIGNATURE + struct.pack("<I", len(qemu)) + qemu


@needs_writer
def test_writer_uncompressed_remus_file_and_pipe(tmp_path):
    """A checkpointed stream without compression: from a file the output is
    the last checkpoint; from a pipe the converter stops after the first (as
    Xen's script does: reading on could block a live sender)."""
    p2m = 256
    img1 = _image(p2m, 3)
    img2 = img1.copy()
    img2[5 * 4096:9 * 4096] = 7
    img3 = img2.copy()
    img3[100 * 4096:101 * 4096] = 9
    data, res = W.make_stream(img1, width=8, guest="hvm", params={"viridian": 1},
                              checkpoints=[{"image": img2, "pfns": [5, 6, 7, 8],
                                            "params": {"viridian": 2}},
                                           {"image": img3, "pfns": [100, 6]}])
    path = tmp_path / "remus.bin"
    path.write_bytes(data)
    out, stats = _convert_bytes(str(path))
    assert stats.committed_checkpoint == 3 and not stats.compressed
    s = v2.read_stream(out)
    assert sha(s.memory_image(p2m)) == res.sha256_after(3) == sha(img3)
    assert dict(s.hvm_params()[0])[9] == 2
    r, w = os.pipe()
    t = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    t.start()
    try:
        buf = io.BytesIO()
        stats = convert(r, buf)
    finally:
        t.join()
        os.close(r)
    assert stats.committed_checkpoint == 1
    assert sha(v2.read_stream(buf.getvalue()).memory_image(p2m)) == res.sha256_after(1)


@needs_writer
@pytest.mark.parametrize("width", [4, 8])
def test_writer_compressed_remus(width):
    p2m = 512
    img1 = _image(p2m, 4)
    img2 = img1.copy()
    img2[: 40 * 4096] ^= 1
    img3 = img2.copy()
    img3[10 * 4096 + 100:10 * 4096 + 140] = 0x55            # a small delta
    data, res = W.make_stream(img1, width=width, guest="hvm", compress=True,
                              compress_options={"page_buffer_pages": 16},
                              checkpoints=[{"image": img2, "pfns": range(40)},
                                           {"image": img3, "pfns": range(8, 20)}])
    for fmt in ("libxc", "libxl"):
        out, stats = _convert_bytes(data, fmt=fmt)     # bytes: not a regular file
        assert stats.committed_checkpoint == 3 and stats.compressed
        assert sha(v2.read_stream(out).memory_image(p2m)) == res.sha256_after(3)


@needs_writer
def test_writer_duplicate_pfns_are_split():
    """Xen's script refuses a batch with a repeated entry; libxc applies the
    batch in order.  The converter writes records without repeats."""
    p2m = 64
    img = _image(p2m, 6)
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=p2m)
    first = np.full((1, 4096), 1, np.uint8)
    w.batch([3, 4, 3, 5], pages=np.concatenate([first, img.reshape(-1, 4096)[[4, 3, 5]]]))
    w.end_body()
    w.hvm_tail((61, 62, 63), W.hvm_context_blob(), W.qemu_blob())
    warnings = []
    out, stats = _convert_bytes(w.getvalue(), warn=warnings.append)
    s = v2.read_stream(out)
    pd = s.page_data()
    assert [list(e) for e, _ in pd] == [[3, 4], [3, 5]]
    image = s.memory_image(p2m).reshape(-1, 4096)
    assert (image[3] == img.reshape(-1, 4096)[3]).all()
    assert any("repeats a pfn" in m for m in warnings)


@needs_writer
def test_writer_trailing_bytes_are_ignored(tmp_path):
    p2m = 64
    data, _ = W.make_stream(_image(p2m, 7), width=8, guest="hvm", last_checkpoint=False)
    clean, _ = _convert_bytes(data, fmt="libxl")
    path = tmp_path / "t.bin"
    path.write_bytes(data + b"\x05\x00\x00\x00garbage" * 10)
    warnings = []
    out, stats = _convert_bytes(str(path), fmt="libxl", warn=warnings.append)
    assert out == clean and stats.committed_checkpoint == 1
    assert warnings


@needs_writer
def test_writer_tmem_exit_code(tmp_path, capsys):
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=16)
    w.raw_chunk(F.TMEM, b"")
    path = tmp_path / "tmem.bin"
    path.write_bytes(w.getvalue() + bytes(64))
    rc, err = _run(["-i", path, "-o", tmp_path / "o", "-w", "64", "-g", "hvm"], capsys)
    assert rc == 2 and "TMEM" in err


@needs_writer
@pytest.mark.parametrize("entry", [40, (1 << 40) | 2, (0x5 << 28) | 2],
                         ids=["pfn-range", "upper-bits", "bogus-type"])
def test_writer_odd_entries_refused_as_restore_refuses(entry):
    """Entries libxc refuses (a pfn beyond p2m_size, bits 63..32 set, a bogus
    type): Xen's converter passes them on to a restore that fails later;
    convert fails now, with restore's error at the same offset."""
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=16, check=False)
    pages = bytes(4096 if entry >> 28 == 5 else 8192)
    w.batch(entries=np.array([1, entry], dtype=np.uint64), pages=pages)
    w.end_body()
    w.hvm_tail((13, 14, 15), W.hvm_context_blob(), W.qemu_blob())
    data = w.getvalue()
    with pytest.raises(StreamError) as restored:
        xlegacy.restore(data, width=64, guest="hvm")
    with pytest.raises(StreamError) as converted:
        _convert_bytes(data, width=64, guest="hvm")
    assert type(converted.value) is type(restored.value)
    assert str(converted.value) == str(restored.value)


# ====================================================================== Xen differential
def _xen_script():
    script = os.environ.get("XLEGACY_XEN_CONVERTER",
                            "/tmp/xendeb/u/usr/lib/xen-4.17/bin/convert-legacy-stream")
    pypath = os.environ.get("XLEGACY_XEN_PYTHONPATH", "/tmp/xendeb/fixed")
    if not os.path.isfile(script) or not os.path.isdir(pypath):
        return None
    return script, pypath


XEN = _xen_script()


def _xen_convert(path, out, opts):
    script, pypath = XEN
    env = dict(os.environ, PYTHONPATH=pypath)
    return subprocess.run([sys.executable, script, "-i", str(path), "-o", str(out)] + opts,
                          env=env, capture_output=True).returncode


def _diff_streams():
    if W is None:
        return []
    p2m = 320
    img = _image(p2m, 9)
    xtab = list(range(200, 260))
    return [
        ("hvm64", dict(width=8, guest="hvm", xtab=xtab,
                       pfns=[p for p in range(p2m) if p not in xtab],
                       params={"ident_pt": 1, "vm86_tss": 2, "console_pfn": 300,
                               "viridian": 1, "ioreq_server_pfn": 310,
                               "nr_ioreq_server_pages": 4},
                       toolstack=W.libxl_toolstack([(0xF0000000, 0xF0000000, 0x800000,
                                                     "vga.vram")], width=8)), "64", "hvm"),
        ("hvm32", dict(width=4, guest="hvm", xalloc=[311], broken=[312],
                       pfns=[p for p in range(p2m) if p not in (311, 312)],
                       toolstack=W.libxl_toolstack([(1, 2, 3, "a"), (4, 5, 6, "bb")], width=4)),
         "32", "hvm"),
        ("pv64", dict(width=8, guest="pv", vcpus=[0, 1, 3], types={1: 1, 2: 2, 3: 3, 4: 4 | 8},
                      pv={"xcnt": 16 + 512}, toolstack=W.libxl_toolstack([], width=8)),
         "64", "pv"),
        ("pv32", dict(width=4, guest="pv", vcpus=2, pv={"guest_width": 4, "extv": False}),
         "32", "pv"),
        ("verify", dict(width=8, guest="hvm", verify=True, iterations=[(range(0, 50),)]),
         "64", "hvm"),
        ("xl", dict(width=8, guest="hvm", wrapper="xl", config='{"c_info": {}}'), "64", "hvm"),
    ], img


@pytest.mark.skipif(XEN is None, reason="Xen's convert-legacy-stream is not available")
@needs_writer
@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
def test_differential_against_xen(tmp_path, fmt):
    cases, img = _diff_streams()
    for name, opts, width, guest in cases:
        path = tmp_path / f"{name}.bin"
        W.write_guest(str(path), img, **opts)
        extra = ["-x"] if opts.get("wrapper") == "xl" else []
        for skip in ([], ["--skip-qemu"]) if guest == "hvm" else ([],):
            args = ["-w", width, "-g", guest, "-f", fmt] + extra + skip
            rc_x = _xen_convert(path, tmp_path / "xen.out", args)
            rc_o = main(["-i", str(path), "-o", str(tmp_path / "our.out")] + args)
            assert (rc_x, rc_o) == (0, 0), (name, args)
            assert (tmp_path / "xen.out").read_bytes() == (tmp_path / "our.out").read_bytes(), \
                (name, args)


def test_json_stats_serialisable(samples, tmp_path):
    path, _ = load_sample("hvm64_save")
    stats = convert(path, tmp_path / "o")
    json.dumps(stats.as_dict())


@needs_writer
def test_delta_against_first_checkpoint(tmp_path):
    """A format B page encoded against the receiver's checkpoint-1 copy (Xen's
    compressor never does this: a page goes FULL the first time it passes
    through its cache) is rebuilt from the input file; from a pipe the
    converter says it cannot."""
    p2m = 16
    img = _image(p2m, 11)
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=p2m, defer_metadata=False)
    w.send(np.arange(p2m), image=img)
    w.enable_compression()
    w.end_body()
    w.hvm_tail((13, 14, 15), W.hvm_context_blob(), W.qemu_blob(64))
    w.batch([5], pages=None)
    delta = b"\x01" + b"ABCD" + b"\xff" * 8 + b"\x87"     # RUN 1 word, SKIP 1023 words
    w.compressed_data(delta)
    w.end_body()
    w.hvm_tail((13, 14, 15), W.hvm_context_blob(), W.qemu_blob(64))
    data = w.getvalue()
    path = tmp_path / "d.bin"
    path.write_bytes(data)
    out, stats = _convert_bytes(str(path))
    assert stats.committed_checkpoint == 2
    expect = img.reshape(-1, 4096).copy()
    expect[5, :4] = np.frombuffer(b"ABCD", np.uint8)
    assert sha(v2.read_stream(out).memory_image(p2m)) == sha(expect)
    r, wfd = os.pipe()
    t = threading.Thread(target=lambda: (os.write(wfd, data), os.close(wfd)))
    t.start()
    try:
        with pytest.raises(UnsupportedStream, match="regular file"):
            convert(r, io.BytesIO())
    finally:
        t.join()
        os.close(r)


def test_libxl_helper_arguments(samples):
    """libxl runs LIBXL_CONVERT_HELPER as --in FD --out FD --width 64 --guest hvm
    --format libxl (--guest abbreviates --guest-type, as optparse allows)."""
    path, meta = load_sample("hvm64_save")
    expected = [r["output_sha256"] for r in meta["xen_convert_legacy_stream"]["results"]
                if "libxl" in r["options"]][0]
    fd = os.open(path, os.O_RDONLY)
    try:
        proc = subprocess.run([sys.executable, "-m", "xlegacy.cli.convert", "--in", str(fd),
                               "--out", "1", "--width", "64", "--guest", "hvm",
                               "--format", "libxl"], pass_fds=(fd,), capture_output=True)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert sha(proc.stdout) == expected
