"""The converter's ways of moving page data give the same stream.

Output.copy_range picks a method by the kinds of input and output (a
private pipe and splice() between regular files, sendfile() to a pipe,
writev() from a mapping to a device, pread()/write() when the kernel
refuses the others); a pipe input is spliced.  Every method, and every
fallback after a refusal, must write the bytes the plain read/write path
writes -- or fail with the same error -- on the shared samples, the small
hostile-stream catalogue (Remus compressed and not, PV, 32-bit, xl), torn
and corrupt Remus streams, and a stream whose batches are larger than the
pipe."""
import errno
import os
import threading

import numpy as np
import pytest
from conftest import load_sample, sample_names

from xlegacy import format as F
from xlegacy.converter import Output, convert
from xlegacy.outputs import fdio

from support import hostile_streams as H
from support.differential import check_same, outcome

try:
    from xlegacy.testing import writer as W
except ImportError:     # pragma: no cover - the writer is another module's
    W = None


def _corpus():
    out = {}
    for name in sample_names():
        path, _meta = load_sample(name)
        out[f"sample:{name}"] = path.read_bytes()
    for name, built in H.catalogue().items():
        out[name] = built.data
        if len(built.checkpoint_ends) > 2:
            # torn inside the last checkpoint, and cut inside checkpoint 1
            out[f"{name}:torn"] = built.data[:built.checkpoint_ends[-1] - 7]
            out[f"{name}:cut-cp1"] = built.data[:built.checkpoint_ends[0] // 2]
    out["remus64_compressed:corrupt"] = H.remus_stream(
        8, 3, True, bad_page=(1, b"\x81\x00"), bad_checkpoint=3).data
    if W is not None:
        # batches of 1024 pages (4 MiB): several fills of the 1 MiB pipe
        p2m = 2048 + 37
        rng = np.random.default_rng(11)
        img = rng.integers(0, 256, size=p2m * F.PAGE_SIZE, dtype=np.uint8)
        img2 = img.copy()
        img2[3 * 4096:1500 * 4096] ^= 0x5A
        out["writer:big"] = W.make_stream(img, width=8, guest="hvm")[0]
        out["writer:big-remus"] = W.make_stream(
            img, width=8, guest="hvm", compress=True,
            checkpoints=[{"image": img2, "pfns": range(3, 1500)}])[0]
        out["writer:big-remus-plain"] = W.make_stream(
            img, width=8, guest="hvm", checkpoints=[{"image": img2, "pfns": range(3, 1500)}])[0]
        for width in (4, 8):
            # a batch that repeats a pfn (written as two records), ordinary pages
            w = W.StreamWriter(None, width=width, guest="hvm", p2m_size=64)
            pages = img[:4 * F.PAGE_SIZE].reshape(4, F.PAGE_SIZE)
            w.batch([3, 4, 3, 5], pages=pages)
            w.end_body()
            w.hvm_tail((61, 62, 63), W.hvm_context_blob(), W.qemu_blob())
            out[f"writer:repeated-pfn-{width * 8}"] = w.getvalue()
    return out


CORPUS = _corpus()


def _outcome(fn):
    """The output bytes, or the error a conversion raised (type and text)."""
    try:
        return fn()
    except Exception as exc:   # noqa: BLE001 - the outcome is compared, not judged
        return (type(exc).__name__, str(exc))


def _file_to_path(src, tmp_path, fmt):
    out = tmp_path / "out.v3"
    if out.exists():
        out.unlink()

    def run():
        convert(str(src), str(out), fmt=fmt)
        return out.read_bytes()
    return _outcome(run)


def _file_to_fd(src, tmp_path, fmt, flags=0):
    out = tmp_path / "out.fd"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        def run():
            convert(str(src), fd, fmt=fmt)
            return out.read_bytes()
        return _outcome(run)
    finally:
        os.close(fd)


def _into_pipe(source, fmt):
    """Convert `source` (a path or a descriptor) to the write end of a pipe."""
    r, w = os.pipe()
    got = []
    t = threading.Thread(target=lambda: got.append(_drain(r)))
    t.start()
    try:
        res = _outcome(lambda: convert(source, w, fmt=fmt))
    finally:
        os.close(w)
        t.join()
        os.close(r)
    return got[0] if not isinstance(res, tuple) else res


def _drain(fd):
    parts = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)


def _from_pipe(data, make_out):
    r, w = os.pipe()
    t = threading.Thread(target=lambda: (_write_quietly(w, data), os.close(w)))
    t.start()
    try:
        return make_out(r)
    finally:
        os.close(r)
        t.join()


def _write_quietly(fd, data):
    try:
        fdio.write_all(fd, data)
    except BrokenPipeError:
        pass        # the converter stopped reading (an error, or the first checkpoint)


@pytest.fixture
def no_splice_pipe(monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EPERM, "no pipe for you")
    monkeypatch.setattr(fdio, "SplicePipe", refuse)


def _plain(monkeypatch):
    """Force the read/write path everywhere: the reference outcome."""
    monkeypatch.setattr(fdio, "SplicePipe", lambda: (_ for _ in ()).throw(OSError(errno.EPERM,
                                                                                  "off")))
    monkeypatch.setattr(Output, "_window", lambda self, *a: None)
    monkeypatch.setattr(fdio, "sendfile_all", lambda *a: None)
    monkeypatch.setattr(os, "splice", _refuse_splice)


def _refuse_splice(*a, **k):
    raise OSError(errno.EINVAL, "splice refused (test)")


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_copy_method_writes_the_same(name, fmt, tmp_path, monkeypatch):
    data = CORPUS[name]
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    got = {"path (splice)": _file_to_path(src, tmp_path, fmt),
           "fd (splice)": _file_to_fd(src, tmp_path, fmt),
           # splice() refuses an O_APPEND output after the pipe was filled
           "O_APPEND fd": _file_to_fd(src, tmp_path, fmt, os.O_APPEND),
           "pipe out (sendfile)": _into_pipe(str(src), fmt)}
    from_pipe = {"pipe in, path out": _from_pipe(data, lambda r: _outcome(
                     lambda: (convert(r, str(tmp_path / "p.v3"), fmt=fmt),
                              (tmp_path / "p.v3").read_bytes())[1])),
                 "pipe in, pipe out": _from_pipe(data, lambda r: _into_pipe(r, fmt))}
    with monkeypatch.context() as m:
        _plain(m)
        ref = _file_to_path(src, tmp_path, fmt)
        ref_pipe = _from_pipe(data, lambda r: _outcome(
            lambda: (convert(r, str(tmp_path / "q.v3"), fmt=fmt),
                     (tmp_path / "q.v3").read_bytes())[1]))
        ref_bytes = _outcome(lambda: _to_bytes(data, fmt))
    assert isinstance(ref, bytes) or name.endswith(("cut-cp1", "corrupt")) \
        or name.startswith("sample:bad_"), ref
    for how, res in got.items():
        assert res == ref, how
    # (a pipe input stops after checkpoint 1 of an uncompressed Remus
    # stream, as Xen's script does: it is compared with its own kind)
    for how, res in from_pipe.items():
        assert res == ref_pipe, how
    assert ref_bytes == ref_pipe


def _to_bytes(data, fmt):
    import io
    buf = io.BytesIO()
    convert(data, buf, fmt=fmt)
    return buf.getvalue()


def test_no_pipe_falls_back_to_read_and_write(no_splice_pipe, tmp_path):
    data = CORPUS["hvm64"]
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    stats = convert(str(src), str(tmp_path / "o"))
    assert stats.copy_methods == ["pread+write"]


def test_regular_files_are_spliced(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(CORPUS["hvm64"])
    assert convert(str(src), str(tmp_path / "o")).copy_methods == ["splice"]


@pytest.mark.skipif(fdio._splice_append() is None, reason="the compiled kernel is compared")
def test_splice_pipe_kernel_matches_the_splice_loop(tmp_path, monkeypatch):
    """SplicePipe.copy by the compiled kernel (one call without the GIL)
    against its loop of os.splice calls: the same count, refusal and output
    bytes, for ranges that end inside, at and past the input's end, into a
    file with bytes in it and into one opened O_APPEND (which refuses
    splice: the pipe's bytes are written, the rest left to the caller)."""
    import random
    rng = random.Random(7)
    src = tmp_path / "in"
    payload = os.urandom(5 * (1 << 20) + 4321)
    src.write_bytes(payload)
    fd = os.open(src, os.O_RDONLY)
    cases = [(0, len(payload)), (77, len(payload)), (5, 1 << 20), (3, (1 << 20) + 1),
             (len(payload) - 10, 100), (len(payload), 5), (len(payload) + 9, 5), (9, 0)]
    cases += [(rng.randrange(len(payload)), rng.randrange(3 << 20)) for _ in range(6)]
    try:
        for offset, n in cases:
            for append in (False, True):
                got = []
                for native in (True, False):
                    if not native:
                        monkeypatch.setattr(fdio, "_splice_append", lambda: None)
                    path = tmp_path / f"out-{native}"
                    path.write_bytes(b"head")
                    flags = os.O_WRONLY | (os.O_APPEND if append else 0)
                    out = os.open(path, flags)
                    os.lseek(out, 0, os.SEEK_END)
                    p = fdio.SplicePipe()
                    try:
                        k = outcome(p.copy, fd, offset, out, n)
                        got.append((k, p.refused, path.read_bytes()))
                    finally:
                        p.close()
                        os.close(out)
                    monkeypatch.undo()
                check_same(f"offset {offset} n {n} append {append}", *got)
                k, refused, data = got[0]
                assert data == b"head" + payload[offset:offset + k[1]]
    finally:
        os.close(fd)


def test_splice_pipe_copies_and_reports_refusal(tmp_path):
    src = tmp_path / "in"
    payload = os.urandom(3 * (1 << 20) + 12345)
    src.write_bytes(payload)
    fd = os.open(src, os.O_RDONLY)
    try:
        p = fdio.SplicePipe()
        assert p.size >= fdio.SplicePipe.MIN_SIZE
        with open(tmp_path / "a", "wb") as f:
            f.write(b"head")
            f.flush()
            assert p.copy(fd, 77, f.fileno(), len(payload)) == len(payload) - 77   # input ends
            assert not p.refused
        assert (tmp_path / "a").read_bytes() == b"head" + payload[77:]
        # O_APPEND: the first fill of the pipe is written out, then refused
        out = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            k = p.copy(fd, 5, out, 2 << 20)
        finally:
            os.close(out)
        assert p.refused and 0 < k < 2 << 20
        assert (tmp_path / "b").read_bytes() == payload[5:5 + k]
        p.close()
    finally:
        os.close(fd)


# ====================================================== the background writer
_FSIZE_CHILD = r"""
import os, resource, signal, sys
from xlegacy import converter
from xlegacy.converter import convert
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit: EFBIG
if sys.argv[3] == "foreground":
    converter.Output.background = lambda self: False
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
try:
    convert(sys.argv[1], sys.argv[2])
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc.filename is not None, os.path.exists(sys.argv[2]))
else:
    print("converted")
"""


@pytest.mark.parametrize("limit", [100, 40000, 3 << 20])
def test_a_write_error_in_the_background_is_the_foregrounds(limit, tmp_path):
    """A failing write (EFBIG past RLIMIT_FSIZE, as ENOSPC would) on the
    writer thread fails the conversion as it fails without the thread, and
    nothing is left under the output's name."""
    import subprocess
    import sys
    src = tmp_path / "in.bin"
    src.write_bytes(CORPUS.get("writer:big-remus") or CORPUS["remus64_compressed"])
    got = {}
    for how in ("background", "foreground"):
        r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(src), str(tmp_path / how),
                            how, str(limit)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        got[how] = r.stdout.strip()
    assert got["background"] == got["foreground"] == f"OSError {errno.EFBIG} True False"


def test_background_stops_at_the_first_error_and_drops_the_rest(tmp_path):
    from xlegacy.outputs.background import Background
    done = []

    def write(op):
        if op[1] == b"bad":
            raise OSError(errno.ENOSPC, "full")
        done.append(bytes(op[1]))

    bg = Background(write)
    bg.put(("bytes", b"a"), 1)
    bg.put(("bytes", b"bad"), 3)
    with pytest.raises(OSError):
        for _ in range(1000):          # raised by a put() once seen, else by drain()
            bg.put(("bytes", b"c"), 1)
        bg.drain()
    bg.stop()
    assert not bg.thread.is_alive()
    assert done == [b"a"]


def test_no_writer_thread_outlives_a_conversion(tmp_path):
    """Nor the faster thread switching of its later checkpoints."""
    import sys
    src = tmp_path / "in.bin"
    src.write_bytes(CORPUS["remus64_compressed:corrupt"])
    before = threading.active_count()
    interval = sys.getswitchinterval()
    from xlegacy.errors import CorruptCheckpoint
    with pytest.raises(CorruptCheckpoint):
        convert(str(src), str(tmp_path / "o"))
    assert sys.getswitchinterval() == interval
    src.write_bytes(CORPUS["remus64_compressed"])
    convert(str(src), str(tmp_path / "o"))
    assert threading.active_count() == before
    assert sys.getswitchinterval() == interval


# ====================================================== the shadow's overlay
_COMPRESSED = sorted(n for n in CORPUS if "compressed" in n or n == "writer:big-remus")


@pytest.mark.parametrize("budget", [4096, 3 * 4096])
@pytest.mark.parametrize("name", _COMPRESSED)
def test_shadow_overlay_input_pages_slots_and_file_agree(name, budget, tmp_path, monkeypatch):
    """Later compressed checkpoints: from a regular file the shadow leaves
    FULL pages in the input; from bytes or a pipe every page goes through
    memory slots; with a budget of one or three pages the slots spill to
    the shadow file at once.  All give the same stream (or error) as the
    default, whose image is the one xlegacy.restore makes of the stream."""
    import xlegacy
    from xlegacy import v2
    from xlegacy.image import ShadowImage
    data = CORPUS[name]
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    ref = _file_to_path(src, tmp_path, "libxc")
    if not isinstance(ref, tuple):
        want, _meta = xlegacy.restore(str(src))
        # (a copied xl header: 48 bytes and its optional data)
        prefix = 48 + int.from_bytes(ref[44:48], "little") if ref.startswith(F.XL_MAGIC) else 0
        img = v2.read_stream(ref, prefix=prefix).memory_image(want.size // F.PAGE_SIZE)
        assert bytes(img) == bytes(want)
    with monkeypatch.context() as m:
        m.setattr(ShadowImage, "overlay_budget", budget)
        assert _file_to_path(src, tmp_path, "libxc") == ref
        streamed = [_outcome(lambda: _to_bytes(data, "libxc")),
                    _from_pipe(data, lambda r: _into_pipe(r, "libxc"))]
    streamed.append(_outcome(lambda: _to_bytes(data, "libxc")))
    for res in streamed:
        # (deltas against checkpoint-1 pages need a file to read them back)
        if not (isinstance(res, tuple) and res[0] == "UnsupportedStream"):
            assert res == ref


# ====================================================== numpy-free page entries
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_numpy_free_entries_write_what_the_numpy_path_writes(name, tmp_path, monkeypatch):
    """A batch of ordinary pages has its v2 entries made without numpy
    (page_entries' fast path); with that path switched off every batch goes
    through numpy: the same stream, or the same error, from a file and from
    a pipe."""
    from xlegacy import converter
    data = CORPUS[name]
    src = tmp_path / "in.bin"
    src.write_bytes(data)

    def both():
        return (_file_to_path(src, tmp_path, "libxl"),
                _from_pipe(data, lambda r: _into_pipe(r, "libxc")))
    fast = both()
    monkeypatch.setattr(converter, "_NOTAB_BYTES", b"")     # no batch qualifies
    assert both() == fast


@pytest.mark.skipif(W is None, reason="xlegacy.testing.writer not available")
@pytest.mark.skipif(os.environ.get("XLEGACY_BACKEND", "native").strip().lower()
                    not in ("", "native"), reason="the reference backend is numpy")
def test_converting_ordinary_pages_imports_no_numpy(tmp_path):
    """The start-up item of issue 13: a stream of ordinary pages converts
    (width and guest inferred) without loading numpy."""
    import subprocess
    import sys
    pytest.importorskip("xlegacy._ffi", reason="the native backend is not built")
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=300 * F.PAGE_SIZE, dtype=np.uint8)
    src = tmp_path / "in.bin"
    src.write_bytes(W.make_stream(img, width=8, guest="hvm")[0])
    code = ("import sys\nfrom xlegacy.cli import main\n"
            f"rc = main(['convert', '-i', {str(src)!r}, '-o', {str(tmp_path / 'o')!r}])\n"
            "print(rc, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["0", "False"], r.stderr


@pytest.mark.parametrize("background", [False, True])
def test_output_whose_last_write_fails_is_not_committed(background, tmp_path, monkeypatch):
    """Output.close(ok=True) whose final flush fails (ENOSPC) removes the
    file instead of giving it its name."""
    path = tmp_path / "out.v3"
    o = Output(str(path))
    if background:
        assert o.background()
    real = fdio.write_all

    def full(fd, data):
        if fd == o.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(fdio, "write_all", full)
    o.write(b"x" * 100)
    with pytest.raises(OSError):
        o.close(ok=True)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_compressed_payloads_in_place_or_in_the_hold_agree(tmp_path, monkeypatch):
    """A regular-file input's COMPRESSED_DATA payloads are read where they
    lie (Held.map_compressed) when every page lies whole in one payload, else
    copied into the hold; with in-place reading switched off, or a
    checkpoint_buffer too small for the mapping, the stream is the same."""
    from xlegacy import checkpoints, converter
    mapped = []
    real_map = checkpoints.Held.map_compressed

    def spy(self, npages, limit):
        got = real_map(self, npages, limit)
        mapped.append(got is not None)
        return got
    monkeypatch.setattr(checkpoints.Held, "map_compressed", spy)
    real_begin = converter._Later.begin
    for name in _COMPRESSED:
        src = tmp_path / "in.bin"
        src.write_bytes(CORPUS[name])

        def run(src=src, **kw):
            out = tmp_path / "o.v3"
            if out.exists():
                out.unlink()
            return _outcome(lambda: (convert(str(src), str(out), **kw), out.read_bytes())[1])
        ref = run()
        assert run(checkpoint_buffer=4096) == ref, name
        with monkeypatch.context() as m:
            m.setattr(converter._Later, "begin",
                      lambda self, held: (real_begin(self, held),
                                          setattr(held, "in_place", False)))
            assert run() == ref, name
    assert any(mapped) and not all(mapped)      # both paths were taken
