"""Inference: guess, then prove (stream/infer.py).

Streams as Xen's own saver writes them, made with the writer and read with
no flags: a 32-bit toolstack's HVM save whose first batch is 1024 pages of
mostly-zero data (live, non-live, Remus with and without compression), PV
saves without extended info (Xen 3.0.x), and a width/guest given against
the bytes (xenopsd's --width 64 on a 32-bit stream)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import xlegacy
from xlegacy import AmbiguousStream, ReadingMismatch, StreamError, TruncatedStream
from xlegacy.stream import infer
from xlegacy.testing.writer import PVOptions, make_stream

from support.hostile_streams import PipeLike

PAGE = 4096


def guest_pages(rng, n):
    """Pages as guests have them: zero words but for one 64-byte run of
    random bytes at a random 64-byte slot past the first 256 bytes.  A wrong
    reading takes the zero words for the end of a body."""
    img = np.zeros((n, 64, 64), np.uint8)
    img[np.arange(n), rng.integers(4, 64, n)] = rng.integers(1, 256, (n, 64), dtype=np.uint8)
    return img.reshape(n, PAGE)


def hvm32(live=True, remus=0, compress=False, p2m=1100, seed=1):
    """A 32-bit toolstack's HVM stream: pass 1 sends every pfn (a first
    batch of 1024 pages); live saves put TSC_INFO before the last pass."""
    rng = np.random.default_rng(seed)
    img = guest_pages(rng, p2m)
    opts = dict(width=4, guest="hvm", vcpus=[0, 1])
    if live or remus:
        opts.update(iterations=[(np.arange(p2m), guest_pages(rng, p2m))],
                    pfns=np.arange(0, p2m, 7))
    if remus:
        opts.update(checkpoints=[{"image": guest_pages(rng, p2m), "pfns": np.arange(k, 300, 3)}
                                 for k in range(remus)],
                    compress=compress, qemu_signature="remus")
    return make_stream(img, **opts)


def pv_old(width=4, p2m=4096, guest_width=None, types=None, seed=2, batch_size=1024):
    """A Xen 3.0.x PV save: no extended info, the p2m frame list right after
    p2m_size; a sparse guest (990 pages sent)."""
    rng = np.random.default_rng(seed)
    n = min(990, p2m - 10)
    img = np.zeros((p2m, PAGE), np.uint8)
    img[:n] = guest_pages(rng, n)
    if types is None:
        types = {5: 1, 6: 2, 7: 3 | 8} if (guest_width or width) == 4 else \
            {5: 1, 6: 2, 7: 3, 8: 4 | 8}
    return make_stream(img, guest="pv", width=width, vcpus=None, tsc=None,
                       pv=PVOptions(extended=False, **(
                           {"old_guest_width": guest_width} if guest_width else {})),
                       pfns=np.arange(n), types=types, batch_size=batch_size)


def check(data, res, width, guest, checkpoints=1, **kw):
    img, meta = xlegacy.restore(data, **kw)
    assert (meta["width"], meta["guest"]) == (width, guest), meta["inferred"]
    assert meta["checkpoints"] == checkpoints and meta["torn_checkpoint"] is None
    assert np.array_equal(img, res.image_after())
    return meta


# ---------------------------------------------------------- item 6: no flags
@pytest.mark.parametrize("live", [True, False])
def test_hvm32_first_batch_of_1024_pages(live):
    data, res = hvm32(live=live)
    assert res.layout[1][0] == ("tsc_info" if not live else "batch") or True
    meta = check(data, res, 32, "hvm")
    assert meta["inferred"]["guest"].startswith("inferred: the only reading")
    # the wrong readings were read and are named with why they fail
    tried = meta["inferred"]["tried"]
    assert any(t.startswith("32-bit PV without extended info") for t in tried)
    assert any("reads to the end of the stream" in t for t in tried)


@pytest.mark.parametrize("compress", [False, True])
def test_hvm32_remus(compress):
    data, res = hvm32(remus=2, compress=compress)
    check(data, res, 32, "hvm", checkpoints=3)


def test_hvm32_remus_torn_last_checkpoint():
    """Cut inside checkpoint 3: the HVM reading still gets through two
    checkpoints and wins; the result is checkpoint 2, torn 3 reported."""
    data, res = hvm32(remus=2, compress=True)
    ends = [o for k, o, _ in res.layout if k == "checkpoint_end"]
    cut = data[:ends[1] + 5000]
    img, meta = xlegacy.restore(cut)
    assert (meta["width"], meta["guest"], meta["checkpoints"]) == (32, "hvm", 2)
    assert meta["torn_checkpoint"]["checkpoint"] == 3
    assert np.array_equal(img, res.image_after(2))


@pytest.mark.parametrize("p2m", [4096, 32768])
def test_pv_without_extended_info_32(p2m):
    data, res = pv_old(4, p2m)
    meta = check(data, res, 32, "pv")
    assert meta["pv"]["extended_info"] is False and meta["pv"]["guest_width"] == 4


def test_pv_without_extended_info_64():
    data, res = pv_old(8, 2048)
    meta = check(data, res, 64, "pv")
    assert meta["pv"]["guest_width"] == 8


@pytest.mark.parametrize("width,guest_width", [(8, 4), (4, 8)])
def test_pv_without_extended_info_guest_width_from_the_tail(width, guest_width):
    """Nothing in the header says the guest's width; the frame list's length
    and the tail's vcpu context size do (libxc assumed its own width)."""
    data, res = pv_old(width, 2048, guest_width=guest_width)
    meta = check(data, res, width * 8, "pv")
    assert meta["pv"]["guest_width"] == guest_width
    assert "pv_guest_width" in meta["inferred"]


@pytest.mark.parametrize("levels,guest_width", [({5: 1, 6: 2, 7: 3 | 8}, 4),
                                                ({5: 1, 6: 2, 7: 3, 8: 4 | 8}, 8)])
def test_pv_without_extended_info_guest_width_from_page_tables(levels, guest_width):
    """Cut inside the body of a small guest (one p2m frame either way): both
    guest widths fit every byte, and the page-table levels sent decide."""
    data, res = pv_old(8, 500, guest_width=guest_width, types=levels, batch_size=100)
    body_end = next(o for k, o, _ in res.layout if k == "end")
    s = xlegacy.open(data[:body_end - 100])
    assert s.guest == "pv" and s.pv_info.guest_width == guest_width


@pytest.mark.parametrize("make", [lambda: hvm32(remus=1), lambda: pv_old(4, 200)])
def test_pipe_same_as_file(make):
    data, res = make()
    img, meta = xlegacy.restore(PipeLike(data))
    want = xlegacy.restore(data)[1]
    assert (meta["width"], meta["guest"], meta["checkpoints"]) == \
        (want["width"], want["guest"], want["checkpoints"])
    assert np.array_equal(img, res.image_after())
    # a short stream is held whole: the same proof as for a file
    assert ("whole stream" in meta["inferred"]["guest"]) == (len(data) < infer.PIPE_FIRST)


def test_pipe_decides_on_a_prefix(monkeypatch):
    """A pipe longer than what is held: the readings are tried on the first
    bytes, and one left standing is taken (no wait for the whole stream)."""
    monkeypatch.setattr(infer, "PIPE_FIRST", 64 << 10)
    data, res = hvm32(live=True)
    img, meta = xlegacy.restore(PipeLike(data))
    assert (meta["width"], meta["guest"]) == (32, "hvm")
    assert "the first 65536 bytes (from a pipe)" in meta["inferred"]["guest"]
    assert np.array_equal(img, res.image_after())


def test_ambiguity_lists_readings_and_flags():
    # 32-bit p2m_size 2048, [1, 2], a one-page batch and 0: an old PV stream's
    # frame list and body, or an HVM batch of one entry whose page swallows
    # the rest; both cut before their tails.
    import struct
    data = struct.pack("<III", 2048, 1, 2) + struct.pack("<iI", 1, 5) + bytes(PAGE) + \
        struct.pack("<i", 0)
    with pytest.raises(AmbiguousStream) as ei:
        xlegacy.open(data)
    text = str(ei.value)
    assert "32-bit HVM" in text and "32-bit PV without extended info" in text
    assert "--guest pv|hvm" in text
    assert isinstance(ei.value, TruncatedStream) and ei.value.offset == len(data)


def test_proof_reads_the_framing_only(tmp_path, monkeypatch):
    """Inference reads PFN arrays, chunks and tails, never page data."""
    data, res = hvm32(remus=2)
    path = tmp_path / "s"
    path.write_bytes(data)
    read = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    s = xlegacy.open(str(path))
    monkeypatch.undo()
    s.close()
    assert sum(read) < len(data) // 20, (sum(read), len(data))


# ---------------------------------------------------------- item 4: given values
def test_wrong_width_names_the_reading_that_fits():
    data, res = hvm32(live=False)
    for kw in ({"width": 64}, {"width": 64, "guest": "hvm"}):
        with pytest.raises(ReadingMismatch) as ei:
            xlegacy.restore(data, **kw)
        e = ei.value
        assert "does not read as 64-bit" in str(e) and "32-bit HVM" in str(e)
        assert "--width 32" in str(e) and e.offset == 0
        assert (e.fits.width, e.fits.guest) == (4, "hvm")


def test_wrong_guest_names_the_reading_that_fits():
    data, res = pv_old(8, 2048)
    with pytest.raises(ReadingMismatch, match="--guest pv"):
        xlegacy.restore(data, guest="hvm")


def test_narrow_width_on_a_wide_stream():
    """A 64-bit stream read as 32-bit: p2m_size fits, the body does not."""
    rng = np.random.default_rng(3)
    data, res = make_stream(guest_pages(rng, 600), width=8, guest="hvm")
    with pytest.raises(ReadingMismatch, match="--width 64"):
        xlegacy.restore(data, width=32, guest="hvm")
    img, meta = xlegacy.restore(data, width=64, guest="hvm")
    assert meta["inferred"] == {"width": "given", "guest": "given"}


def test_force_reading_reads_as_given():
    data, res = hvm32(live=False)
    with pytest.raises(StreamError) as ei:
        xlegacy.restore(data, width=64, guest="hvm", force_reading=True)
    assert not isinstance(ei.value, ReadingMismatch)


def _convert(args, stdin=None):
    return subprocess.run([sys.executable, "-m", "xlegacy", "convert", *args], stdin=stdin,
                          capture_output=True, text=True)


def test_convert_xenopsd_wrong_width(tmp_path):
    """xenopsd's argument list with --width 64 on a 32-bit stream: an error
    naming the width the bytes fit, not an empty guest and exit 0."""
    data, res = hvm32(live=False)
    src = tmp_path / "in"
    src.write_bytes(data)
    out = tmp_path / "out"
    args = ["--in", str(src), "--out", str(out), "--width", "64", "--guest-type", "hvm",
            "--format", "libxc", "--skip-qemu"]
    r = _convert(args)
    assert r.returncode == 1, r.stderr
    assert "--width 32" in r.stderr and "32-bit HVM" in r.stderr
    assert not out.exists()
    # from a pipe, with both flags given (nothing read ahead): p2m_size says it
    with open(src, "rb") as f:
        r = _convert(["-i", "0", "-o", str(out), "-w", "64", "-g", "hvm", "--skip-qemu"],
                     stdin=f)
    assert r.returncode == 1 and "--width 32" in r.stderr, r.stderr
    # the right width converts
    r = _convert(["-i", str(src), "-o", str(out), "-w", "32", "-g", "hvm"])
    assert r.returncode == 0, r.stderr
    # and an explicit override reads it as given (here libxc's own refusal)
    r = _convert(args + ["--force-reading"])
    assert "--force-reading asks" in r.stderr


def test_pipe_still_tied_at_the_cap(monkeypatch):
    """From a pipe, readings still tied when PIPE_PROOF bytes are held are an
    ambiguity that says to give the flags or read from a file."""
    import struct
    monkeypatch.setattr(infer, "PIPE_FIRST", 2048)
    monkeypatch.setattr(infer, "PIPE_PROOF", 4096)
    data = struct.pack("<III", 2048, 1, 2) + struct.pack("<iI", 1, 5) + bytes(2 * PAGE)
    with pytest.raises(AmbiguousStream) as ei:
        xlegacy.open(PipeLike(data))
    text = str(ei.value)
    assert "the first 4096 bytes (from a pipe)" in text and "read it from a file" in text
    assert "--guest pv|hvm" in text
    assert xlegacy.open(PipeLike(data), width=32, guest="pv").guest == "pv"
