"""Bounded resources on streams that repeat themselves (issue 14 items 2-4).

Memory is measured from outside: each command runs in a child process and
its peak RSS comes from wait4().  Bounds are checked by scaling: the same
stream with 4x the repeated body must not need more memory, up to a small
slack (what a per-entry list would need is many times that).
"""
import json
import os
import subprocess
import sys
import threading

import pytest

from support import bulk_streams as B

SANITIZED = bool(os.environ.get("XLEGACY_SANITIZE"))
pytestmark = pytest.mark.skipif(SANITIZED, reason="RSS is not meaningful under AddressSanitizer")
MiB = 1 << 20


def run_cli(args, stdin_path=None, pipe=False, limit_as=None):
    """Run `python -m xlegacy ARGS` in a child; returns (rc, stdout, peak RSS
    in bytes).  pipe=True feeds stdin_path through a real pipe."""
    def preexec():
        if limit_as:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    stdin = subprocess.PIPE if pipe else None
    proc = subprocess.Popen([sys.executable, "-m", "xlegacy"] + list(args), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec if limit_as else None)
    feeder = None
    if pipe:
        def feed():
            try:
                with open(stdin_path, "rb") as f:
                    while True:
                        block = f.read(1 << 20)
                        if not block:
                            break
                        proc.stdin.write(block)
            except BrokenPipeError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    out = []
    err = []
    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read())),
               threading.Thread(target=lambda: err.append(proc.stderr.read()))]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    if feeder:
        feeder.join()
    proc.stdout.close()
    proc.stderr.close()
    return proc.returncode, out[0].decode(), err[0].decode(), usage.ru_maxrss * 1024


def _growth(tmp_path, body, n, args, pipe=False, **kw):
    """Peak RSS of the command on n and 4n repeats of body; returns the
    two results of the larger run and the RSS growth."""
    rss = []
    for k in (n, 4 * n):
        path = tmp_path / f"s{k}"
        B.write_repeated(path, body, k, **kw)
        full = [a.replace("{in}", "-" if pipe else str(path))
                .replace("{out}", str(tmp_path / "out.img")) for a in args]
        rc, out, err, peak = run_cli(full, path, pipe=pipe)
        path.unlink()
        rss.append(peak)
    return rc, out, err, rss[1] - rss[0]


# ------------------------------------------------------------ item 2
# 1024 XALLOC entries, repeated: before, every entry of them was kept in
# a Python list (about 35 bytes of RSS per stream byte here).
@pytest.mark.parametrize("args,pipe", [
    (["info", "--json", "{in}"], False),
    (["verify", "--json", "{in}"], False),
    (["restore", "{in}", "-o", "{out}", "--no-sync", "-q"], False),
    (["info", "--json", "{in}"], True),
])
def test_repeated_xalloc_entries_memory_is_bounded(tmp_path, args, pipe):
    body = B.xalloc_batch(8, 1024)          # 8 KiB of stream each
    rc, out, err, growth = _growth(tmp_path, body, 600, args, pipe=pipe)
    assert rc == 0, err
    # 1800 more batches are 14.8 MB more stream, 1.8M more entries.
    assert growth < 6 * MiB, f"RSS grew by {growth / MiB:.1f} MiB with the stream"
    if args[0] == "info":
        meta = json.loads(out)
        assert meta["xalloc_pfns"] == list(range(1024))
        assert meta["entry_counts"] == {"XALLOC": 2400 * 1024}
        assert meta["checkpoint_details"][0]["batches"] == 2400


def test_verify_keeps_first_problems_of_a_kind_and_counts_the_rest(tmp_path):
    """One warning per chunk used to be kept (1M HVM_IDENT_PT chunks in a
    PV stream: 358 MB, 33 MB of JSON)."""
    from xlegacy.verifier import KEEP_PER_KIND, verify
    path = tmp_path / "params"
    B.write_repeated(path, B.param_chunk(), 3000, guest="pv")
    rep = verify(str(path))
    rules = [p["rule"] for p in rep["problems"]]
    # (+ the cpu-record warnings of the builder's vCPU context)
    assert rep["warnings"] == 3000 + rules.count("cpu-record")
    assert rep["errors"] == 0 and rep["valid"]
    assert rules.count("hvm-param-in-pv") == KEEP_PER_KIND + 1
    last = rep["problems"][-1]
    assert last["omitted"] == 3000 - KEEP_PER_KIND and "not listed" in last["message"]
    assert len(json.dumps(rep)) < 64 << 10


def test_verify_problem_memory_is_bounded(tmp_path):
    rc, out, err, growth = _growth(tmp_path, B.param_chunk(), 40000,
                                   ["verify", "--json", "{in}"], guest="pv")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["warnings"] == 160000 + [p["rule"] for p in rep["problems"]].count("cpu-record")
    assert growth < 6 * MiB, f"RSS grew by {growth / MiB:.1f} MiB with the stream"


# ------------------------------------------------------------ item 3
import struct  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import given, strategies as st  # noqa: E402

from support import hostile_streams as H  # noqa: E402
from xlegacy.kernels import _native, _reference  # noqa: E402
from xlegacy.stream import reader as _reader  # noqa: E402


def _entry_words(width, entries):
    return b"".join(struct.pack("<Q" if width == 8 else "<I", e) for e in entries)


@st.composite
def _runs(draw):
    """A buffer of batches, mostly no-data, with a few things that stop a run."""
    width = draw(st.sampled_from([4, 8]))
    p2m = draw(st.integers(1, 64))
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["nodata", "nodata", "nodata", "data", "chunk",
                                     "bad", "junk"]))
        n = draw(st.integers(1, 5))
        if kind == "nodata":
            ents = [H.entry(draw(st.integers(0, p2m + 2)), draw(st.sampled_from(H.NO_DATA)))
                    for _ in range(n)]
        elif kind == "data":
            ents = [H.entry(draw(st.integers(0, p2m - 1)))] * n
        elif kind == "bad":
            ents = [draw(st.integers(0, (1 << (8 * width)) - 1)) for _ in range(n)]
        if kind == "chunk":
            out += struct.pack("<i", draw(st.sampled_from([0, -1, -3, 1025, 2000])))
        elif kind == "junk":
            out += draw(st.binary(max_size=12))
        else:
            out += struct.pack("<i", n) + _entry_words(width, ents)
    cut = draw(st.integers(0, len(out)))
    return width, p2m, out[:cut] if draw(st.booleans()) else out


@given(_runs())
def test_scan_nodata_native_matches_reference(case):
    width, p2m, buf = case
    a = _native.scan_nodata(buf, width, p2m)
    b = _reference.scan_nodata(buf, width, p2m)
    assert a[:2] == b[:2]
    for x, y in zip(a[2:], b[2:]):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_scan_nodata_stops_before_anything_else():
    nd = struct.pack("<i", 2) + _entry_words(8, [H.entry(3, H.XALLOC), H.entry(9, H.XTAB)])
    data = struct.pack("<i", 1) + _entry_words(8, [H.entry(1)])
    out_of_range = struct.pack("<i", 1) + _entry_words(8, [H.entry(40, H.BROKEN)])
    for tail, why in ((data, "a batch with a page"), (out_of_range, "a pfn >= p2m_size"),
                      (struct.pack("<i", -3), "a chunk"), (nd[:-1], "a cut batch")):
        nb, used, counts, types, pfns = _native.scan_nodata(nd * 3 + tail, 8, 32)
        assert (nb, used) == (3, 3 * len(nd)), why
        assert counts.tolist() == [2, 2, 2] and types.tolist() == [0xE, 0xF] * 3
        assert pfns.tolist() == [3, 9] * 3
    with pytest.raises(ValueError):
        _native.scan_nodata(nd, 5, 32)


def _tiny_stream(tmp_path, n, width=4, typ=H.XALLOC, extra=b""):
    body = struct.pack("<i", 1) + _entry_words(width, [H.entry(5, typ)])
    path = tmp_path / "tiny"
    B.write_repeated(path, body, n, width=width, p2m_size=64)
    if extra:   # one more record before the tail
        head, tail = B._frame(width, "hvm", 64)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - len(tail)] + extra + tail)
    return path


def test_tiny_batches_are_read_in_runs_not_one_record_each(tmp_path, monkeypatch):
    """1.25M one-entry batches (11 MB) took 78 s to restore: ~60 us of
    Python per batch.  Batches without pages now come as BatchRun records,
    each read by one kernel call; a per-batch record is made only where a
    run starts."""
    from xlegacy.restorer import restore_result
    calls = []
    real = _reader.LegacyStream._batch

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(_reader.LegacyStream, "_batch", counting)
    n = 20000
    path = _tiny_stream(tmp_path, n)
    res = restore_result(str(path), width=32, guest="hvm", inspect_only=True)
    meta = res.to_dict()
    assert meta["entry_counts"] == {"XALLOC": n}
    assert meta["xalloc_pfns"] == [5]
    assert meta["checkpoint_details"][0]["batches"] == n
    assert meta["checkpoint_details"][0]["entries"] == n
    assert len(calls) < 50, f"{len(calls)} per-batch records for {n} batches"


@pytest.mark.parametrize("how", ["file", "bytes", "pipe", "pipelike"])
def test_batch_runs_give_the_same_result_as_batch_records(tmp_path, how):
    """Every source: the same metadata as a reader that yields one record
    per batch, with data batches, chunks and a verify pass mixed in."""
    from xlegacy.restorer import restore_result
    b = H.Builder(8, "hvm", 64, seed=5)
    b.hvm_header()
    for i in range(300):
        b.batch([H.entry(i % 64, H.XALLOC), H.entry(i % 7, H.BROKEN), H.entry(99, H.XTAB)])
        if i % 50 == 7:
            b.batch([H.entry(i % 64), H.entry(3, H.XALLOC)])
        if i % 90 == 3:
            b.param(-3, i)
    b.marker(-1)                    # ENABLE_VERIFY_MODE
    b.batch([H.entry(1, H.XALLOC)])
    b.batch([H.entry(2, H.XALLOC)])
    b.end()
    b.hvm_tail()
    data = bytes(b.buf)
    path = tmp_path / "mixed"
    path.write_bytes(data)

    def run(coalesce):
        if how == "file":
            src = str(path)
        elif how == "bytes":
            src = data
        elif how == "pipelike":
            src = H.PipeLike(data, step=37)
        else:
            r, w = os.pipe()
            threading.Thread(target=lambda: (os.write(w, data), os.close(w))).start()
            src = r
        s = _reader.LegacyStream(src, coalesce=coalesce)
        try:
            return restore_result(s, inspect_only=True).to_dict()
        finally:
            s.close()
            if how == "pipe":
                os.close(src)
    assert run(True) == run(False)


def test_error_after_a_run_is_reported_where_it_is(tmp_path):
    """A bad entry after thousands of good no-data batches: the same error,
    at the same offset, as when every batch is a record."""
    from xlegacy.errors import StreamError
    from xlegacy.restorer import restore_result
    bad = struct.pack("<i", 1) + _entry_words(4, [H.entry(70, H.XALLOC)])   # pfn >= 64
    path = _tiny_stream(tmp_path, 5000, extra=bad)
    errs = []
    for coalesce in (True, False):
        s = _reader.LegacyStream(str(path), width=32, guest="hvm", coalesce=coalesce)
        with pytest.raises(StreamError) as ei:
            restore_result(s, inspect_only=True)
        s.close()
        errs.append((str(ei.value), ei.value.offset))
    assert errs[0] == errs[1]
    assert errs[0][1] == path.stat().st_size - len(B._frame(4, "hvm", 64)[1]) - 4


def test_verify_finds_repeated_pfns_inside_a_run(tmp_path):
    from xlegacy.verifier import verify
    ok = struct.pack("<i", 2) + _entry_words(4, [H.entry(1, H.XALLOC), H.entry(2, H.XALLOC)])
    dup = struct.pack("<i", 3) + _entry_words(4, [H.entry(4, H.XALLOC), H.entry(9, H.BROKEN),
                                                   H.entry(4, H.XALLOC)])
    head, tail = B._frame(4, "hvm", 64)
    body = ok * 100 + dup + ok * 10 + dup
    path = tmp_path / "dups"
    path.write_bytes(head + body + struct.pack("<i", 0) + tail[4:])
    rep = verify(str(path), width=32, guest="hvm")
    found = [p for p in rep["problems"] if p["rule"] == "dup-pfn"]
    assert [p["offset"] for p in found] == [len(head) + 100 * len(ok),
                                            len(head) + 110 * len(ok) + len(dup)]
    assert "repeats 1 pfn(s): [4]" in found[0]["message"]


# ------------------------------------------------------------ issue 13 item 2: copy once
def _page_stream(tmp_path, npages=300, p2m=4096):
    b = H.Builder(8, "hvm", p2m, seed=11)
    b.hvm_header()
    pfns = [(i * 7) % p2m for i in range(npages)]
    for i in range(0, npages, 100):
        b.batch([H.entry(p) for p in pfns[i:i + 100]])
    b.end()
    b.hvm_tail()
    path = tmp_path / "pages.xl"
    path.write_bytes(bytes(b.buf))
    return path, b.render()


def test_restore_to_file_does_not_read_page_data_into_user_buffers(tmp_path, monkeypatch):
    """Page data goes from the input to the output by one pwrite from a
    read-only mapping of the input: the process reads only the framing."""
    from xlegacy.restorer import restore_result
    path, expected = _page_stream(tmp_path, npages=2000)     # 8 MB of pages
    read = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, off):
        data = real_pread(fd, n, off)
        read.append(len(data))
        return data

    def preadv(fd, bufs, off, *a):
        got = real_preadv(fd, bufs, off, *a)
        read.append(got)
        return got
    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    out = tmp_path / "out.img"
    restore_result(str(path), output=str(out), sync=False)
    monkeypatch.undo()
    assert out.read_bytes() == expected
    # The framing, and the first MiB once to tell what the stream is.
    assert sum(read) < (1 << 20) + (64 << 10), f"{sum(read)} bytes read into user space"


def test_restore_to_file_without_a_mappable_input_copies_in_the_kernel(tmp_path, monkeypatch):
    from xlegacy.restorer import restore_result
    from xlegacy.stream import window
    path, expected = _page_stream(tmp_path)
    monkeypatch.setattr(window.InputWindow, "view", lambda self, fd, off, n: None)
    out = tmp_path / "out.img"
    restore_result(str(path), output=str(out), sync=False)
    assert out.read_bytes() == expected


def test_restore_to_file_copies_in_the_kernel_without_mapping_the_input(tmp_path, monkeypatch):
    """Input and output on one file system: copy_file_range moves the pages
    (as cp does); the input is not mapped."""
    from xlegacy import image
    from xlegacy.restorer import restore_result
    from xlegacy.stream import window
    path, expected = _page_stream(tmp_path, npages=300)
    out = tmp_path / "out.img"
    with open(path, "rb") as a, open(out, "wb") as b:
        if not image.kernel_copies(a.fileno(), b.fileno()):
            pytest.skip("copy_file_range refuses these files here")
    mapped = []
    real_view = window.InputWindow.view
    monkeypatch.setattr(window.InputWindow, "view",
                        lambda self, *a: mapped.append(a) or real_view(self, *a))
    restore_result(str(path), output=str(out), sync=False)
    assert out.read_bytes() == expected
    assert not mapped


def test_restore_to_file_the_kernel_cannot_copy_to_pwrites_from_a_mapping(tmp_path, monkeypatch):
    """Files the kernel cannot copy between (fileio.kernel_copies): one
    pwrite from a read-only mapping of the input, not a bounce buffer."""
    from xlegacy import image
    from xlegacy.restorer import restore_result
    from xlegacy.stream import window
    path, expected = _page_stream(tmp_path, npages=300)
    mapped = []
    real_view = window.InputWindow.view
    monkeypatch.setattr(window.InputWindow, "view",
                        lambda self, *a: mapped.append(a) or real_view(self, *a))
    monkeypatch.setattr(image, "kernel_copies", lambda a, b: False)
    out = tmp_path / "out.img"
    restore_result(str(path), output=str(out), sync=False)
    assert out.read_bytes() == expected
    assert mapped


def test_kernel_copies_asks_the_kernel_about_the_pair(tmp_path):
    from xlegacy.image import kernel_copies
    (tmp_path / "a").write_bytes(b"x" * 4096)
    with open(tmp_path / "a", "rb") as a, open(tmp_path / "b", "wb") as b:
        r, w = os.pipe()
        try:
            assert not kernel_copies(a.fileno(), w)        # a pipe: EINVAL
            assert not kernel_copies(a.fileno(), a.fileno() + 1000)   # EBADF
        finally:
            os.close(r)
            os.close(w)
        # Two regular files: spliced through a pipe, on any file systems.
        assert kernel_copies(a.fileno(), b.fileno())
    assert (tmp_path / "b").read_bytes() == b""         # nothing was copied


_SHRINK = r"""
import os, sys
import numpy as np
from xlegacy import kernels
from xlegacy.stream.window import InputWindow
src, dst = sys.argv[1], sys.argv[2]
with open(src, "wb") as f:
    f.write(b"\x5a" * (64 << 10))
fd = os.open(src, os.O_RDWR)
out = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
w = InputWindow()
view = w.view(fd, 4096, 8 * 4096)
os.ftruncate(fd, 0)                     # the input shrinks under the mapping
try:
    kernels.pwrite_pages(out, view, np.arange(8, dtype=np.uint64), 16)
    print("no error")
except OSError as exc:
    print("OSError", exc.errno)
"""


def test_input_that_shrinks_under_the_mapping_is_an_error_not_a_crash(tmp_path):
    """The mapped bytes are only handed to the kernel: a truncated input
    makes pwrite fail (EFAULT), it does not kill the process (SIGBUS)."""
    proc = subprocess.run([sys.executable, "-c", _SHRINK, str(tmp_path / "in"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() in ("OSError 14", "no error"), proc.stdout


def test_input_window_is_bounded(tmp_path):
    from xlegacy.stream.window import WINDOW, InputWindow
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(3 * WINDOW)
    fd = os.open(path, os.O_RDONLY)
    try:
        w = InputWindow()
        assert len(w.view(fd, 5, 4096)) == 4096
        assert w._hi - w._lo == WINDOW
        assert len(w.view(fd, 2 * WINDOW + 3, 4 << 20)) == 4 << 20
        assert w._hi - w._lo <= WINDOW + (4 << 20)
        assert w.view(fd, 3 * WINDOW - 10, 4096) is None        # beyond the end
        w.close()
    finally:
        os.close(fd)


# ------------------------------------------------------------ item 4
def _sparse_guest(tmp_path, p2m, verify_pass=True):
    """A guest of p2m pages (4 GiB for 1M) holding a few pages, and a
    verify pass over them (xl migrate --debug)."""
    b = H.Builder(8, "hvm", p2m, seed=13)
    b.hvm_header()
    pfns = [0, 1, 2, 500, p2m // 2, p2m - 1]
    b.batch([H.entry(p) for p in pfns])
    if verify_pass:
        b.marker(-1)
        b.batch([H.entry(p) for p in pfns], pages=[b.model[p] for p in pfns], verify=True)
    b.end()
    b.hvm_tail()
    path = tmp_path / "sparse.xl"
    path.write_bytes(bytes(b.buf))
    return path


@pytest.mark.parametrize("fmt", ["elf", "lime", "xc-core", "raw"])
def test_exports_and_verify_pass_of_a_4g_guest_fit_under_rlimit_as(tmp_path, fmt):
    """Exports and the verify pass used to map the whole image: a 4 GiB
    guest failed under RLIMIT_AS=4G.  Here 3 GiB of address space must do
    for a 4 GiB guest, as for a raw restore."""
    from xlegacy.outputs import exporters
    from xlegacy.restorer import restore_result
    path = _sparse_guest(tmp_path, 1 << 20)
    out = tmp_path / f"out.{fmt}"
    rc, stdout, err, _ = run_cli(["restore", str(path), "-o", str(out), "--format", fmt,
                                  "--no-sync", "--meta", str(tmp_path / "m.json")],
                                 limit_as=3 << 30)
    assert rc == 0, err
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["verify"]["pages"] == 6 and meta["verify"]["matched"] == 6
    assert meta["verify"]["checked"]
    if fmt == "raw":
        return
    res = restore_result(str(path))              # in memory, unlimited
    ref = tmp_path / f"ref.{fmt}"
    exporters.export(fmt, res, res.image, str(ref))
    assert out.read_bytes() == ref.read_bytes()


def test_verify_pages_of_a_4g_guest_fits_under_rlimit_as(tmp_path):
    path = _sparse_guest(tmp_path, 1 << 20)
    rc, stdout, err, _ = run_cli(["verify", "--pages", "--json", str(path)],
                                 limit_as=3 << 30)
    assert rc == 0, err
    rep = json.loads(stdout)
    assert rep["valid"] and rep["summary"]["verify"]["matched"] == 6


def test_export_from_an_image_file_through_the_buffer(tmp_path, monkeypatch):
    """Where copy_file_range is refused, pages of the image file go through
    one bounded buffer (never a mapping of the whole image)."""
    from xlegacy.outputs import exporters
    from xlegacy.restorer import restore_result
    path = _sparse_guest(tmp_path, 4096, verify_pass=False)
    raw = tmp_path / "raw.img"
    res = restore_result(str(path), output=str(raw), sync=False)
    mem = restore_result(str(path))
    monkeypatch.setattr(exporters, "BOUNCE", 8192)
    monkeypatch.setattr(exporters._Out, "copy", lambda self, fd, off, n: False)
    for fmt in ("elf", "lime", "xc-core"):
        a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        fd = os.open(raw, os.O_RDONLY)
        try:
            exporters.export(fmt, res, None, str(a), image_fd=fd)
        finally:
            os.close(fd)
        exporters.export(fmt, mem, mem.image, str(b))
        assert a.read_bytes() == b.read_bytes(), fmt


def test_full_batches_without_pages_are_read_in_runs_too(tmp_path, monkeypatch):
    """A 1024-entry 64-bit batch (8196 bytes) must fit the smallest window,
    else every such batch would be a record of its own."""
    from xlegacy.restorer import restore_result
    calls = []
    real = _reader.LegacyStream._batch

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(_reader.LegacyStream, "_batch", counting)
    path = tmp_path / "full"
    B.write_repeated(path, B.xalloc_batch(8, 1024), 300)
    meta = restore_result(str(path), inspect_only=True).to_dict()
    assert meta["entry_counts"] == {"XALLOC": 300 * 1024}
    assert len(calls) < 30, f"{len(calls)} per-batch records for 300 batches"
