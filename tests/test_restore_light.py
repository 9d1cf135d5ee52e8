"""`xlegacy restore` to a raw file without numpy (inspector.restore_to_file)
against the restorer's restore_result: the same image bytes, metadata,
messages and errors on every shared sample, writer-built and hostile stream
(torn ones included), and the handover to the restorer where the stream
needs it, without a second copy of checkpoint 1."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from xlegacy import inspector, kernels, restorer
from xlegacy.kernels import _reference

from conftest import SAMPLES
from support.differential import check_same, outcome
from support.hostile_streams import catalogue
from test_inspector import _entries, _writer_streams

NATIVE = kernels.BACKEND == "native"
PAGE = 4096


# ------------------------------------------------------------ the kernel
def _copy(fn, tmp_path, raw, width, p2m, data, image_pages=None, offset=0):
    """(outcome, output bytes) of copying a batch whose page data is `data`."""
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(data)
    dst.write_bytes(b"")
    with open(src, "rb") as a, open(dst, "r+b") as b:
        got = outcome(fn, raw, width, p2m, a.fileno(), offset, b.fileno(),
                      p2m if image_pages is None else image_pages, locate=1000, pages_at=5000)
    return got, dst.read_bytes()


def _data(raw, width, p2m, rng):
    n = _reference.decode_pfns(raw, width, p2m)[2].size if raw else 0
    return rng.randbytes(n * PAGE)


@pytest.mark.skipif(not NATIVE, reason="the native kernel is compared with its twin")
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("bad", [None, 5 << 28, (1 << 28) - 1, 1 << 40])
def test_copy_raw_pages_matches_reference(tmp_path, width, bad):
    from xlegacy.kernels import _light
    if bad == 1 << 40 and width == 4:
        bad = 6 << 28
    rng = random.Random(width * 11 + (bad or 0) % 17)
    p2m = 64            # few pfns: runs, repeats and gaps
    for n in (0, 1, 7, 300, 1024):
        raw = _entries(rng, n, width, p2m, bad if n else None)
        good = _entries(rng, n, width, p2m)
        data = _data(good, width, p2m, rng)
        for entries, pages in ((raw, data), (good, data)):
            a = _copy(_light.copy_raw_pages, tmp_path, entries, width, p2m, pages)
            b = _copy(_reference.copy_raw_pages, tmp_path, entries, width, p2m, pages)
            check_same(f"copy_raw_pages n={n}", a, b)
        if bad is not None and n:
            assert a[0][0] == "ok" or b[1] == b""
        # Runs of consecutive pfns, no-data entries between them: every page
        # at its pfn, the last copy of a repeated pfn winning.
        pfns = _reference.decode_pfns(good, width, p2m)[2]
        out = bytearray(p2m * PAGE)
        for i, p in enumerate(pfns):
            out[int(p) * PAGE:(int(p) + 1) * PAGE] = data[i * PAGE:(i + 1) * PAGE]
        got = _copy(_light.copy_raw_pages, tmp_path, good, width, p2m, data)
        assert got[0] == ("ok", pfns.size)
        assert got[1] == bytes(out[:len(got[1])]) and not any(out[len(got[1]):])


@pytest.mark.skipif(not NATIVE, reason="the native kernel is compared with its twin")
@pytest.mark.parametrize("width", [4, 8])
def test_copy_raw_pages_adversarial(tmp_path, width):
    from xlegacy.kernels import _light
    rng = random.Random(width)
    p2m = 40
    run = b"".join((p | (1 << 28 if p % 3 else 0)).to_bytes(width, "little")
                   for p in range(5, 25))
    with_gaps = run[:3 * width] + (0xF << 28).to_bytes(width, "little") + run[3 * width:]
    data = rng.randbytes(20 * PAGE)
    cases = [
        ("input ends inside a page", run, data[:7 * PAGE + 100], p2m, 0),
        ("input ends on a page boundary", with_gaps, data[:12 * PAGE], p2m, 0),
        ("pages start further in", run, b"\0" * 512 + data, p2m, 512),
        ("image smaller than p2m", run, data, p2m - 1, 0),
        ("image of negative pages", run, data, -1, 0),
        ("image beyond 64-bit offsets", run, data, 1 << 62, 0),
        ("partial entry", run[:-1], data, p2m, 0),
        ("pfn = p2m - 1", (p2m - 1).to_bytes(width, "little"), data[:PAGE], p2m, 0),
        ("pfn = p2m", p2m.to_bytes(width, "little"), data[:PAGE], p2m, 0),
        ("XTAB beyond p2m carries nothing", (0xF << 28 | 999).to_bytes(width, "little"),
         b"", p2m, 0),
    ]
    for what, raw, pages, image_pages, offset in cases:
        a = _copy(_light.copy_raw_pages, tmp_path, raw, width, p2m, pages, image_pages, offset)
        b = _copy(_reference.copy_raw_pages, tmp_path, raw, width, p2m, pages, image_pages,
                  offset)
        if a[0][0] == "err" and a[0][1]["type"] == "KernelFault":
            # Where the input ends inside a page, the kernel has copied its
            # head; the twin copies whole pages only: the fault is the contract.
            check_same(what, a[0], b[0])
        else:
            check_same(what, a, b)
    # A short read is located in the page data, counted in pages.
    got = _copy(_light.copy_raw_pages, tmp_path, run, width, p2m, data[:7 * PAGE + 100])[0]
    assert got[0] == "err" and got[1]["index"] == 7 and got[1]["offset"] == 5000 + 7 * PAGE + 100
    # A bad entry is located in the PFN array, and nothing is copied.
    bad = run[:2 * width] + (6 << 28).to_bytes(width, "little") + run[2 * width:]
    got, out = _copy(_light.copy_raw_pages, tmp_path, bad, width, p2m, data)
    assert got[1]["offset"] == 1000 + 2 * width and out == b""


@pytest.mark.skipif(not NATIVE, reason="the native kernel is compared with its twin")
@pytest.mark.parametrize("width", [4, 8])
def test_copy_raw_pages_passes_over_skipped_pfns(tmp_path, width):
    """skip[p] set: the page of pfn p is not written (its final content is
    another writer's: a later checkpoint's), every other page is, and the
    data pages after a skipped one still come from their own place in the
    input.  The kernel against its twin and against the image built here,
    on random batches (runs, repeats, no-data entries) and skip maps."""
    from xlegacy.kernels import _light
    rng = random.Random(width * 5)
    p2m = 64
    src, dst = tmp_path / "in", tmp_path / "out"
    sentinel = b"\xee" * (p2m * PAGE)
    for n in (1, 7, 300, 1024):
        raw = _entries(rng, n, width, p2m)
        data = _data(raw, width, p2m, rng)
        pfns = _reference.decode_pfns(raw, width, p2m)[2]
        for how in ("none", "all", "odd", "random", "first", "last"):
            skip = bytearray(p2m)
            for p in range(p2m):
                skip[p] = {"none": 0, "all": 1, "odd": p & 1, "random": rng.random() < 0.3,
                           "first": p == int(pfns[0]) if pfns.size else 0,
                           "last": p == int(pfns[-1]) if pfns.size else 0}[how]
            want = bytearray(sentinel)
            for i, p in enumerate(pfns):
                if not skip[int(p)]:
                    want[int(p) * PAGE:(int(p) + 1) * PAGE] = data[i * PAGE:(i + 1) * PAGE]
            got = []
            for fn in (_light.copy_raw_pages, _reference.copy_raw_pages):
                src.write_bytes(data)
                dst.write_bytes(sentinel)
                with open(src, "rb") as a, open(dst, "r+b") as b:
                    r = outcome(fn, raw, width, p2m, a.fileno(), 0, b.fileno(), p2m,
                                skip=skip)
                got.append((r, dst.read_bytes()))
            check_same(f"skip {how} n={n}", *got)
            assert got[0] == (("ok", pfns.size), bytes(want)), (how, n)
    # A map shorter than the p2m is refused before anything is copied; a
    # skipped page the input lacks is not read.
    raw = b"".join(p.to_bytes(width, "little") for p in (3, 4, 5))
    src.write_bytes(b"\1" * 2 * PAGE)
    for fn in (_light.copy_raw_pages, _reference.copy_raw_pages):
        dst.write_bytes(b"")
        with open(src, "rb") as a, open(dst, "r+b") as b:
            short = outcome(fn, raw, width, p2m, a.fileno(), 0, b.fileno(), p2m,
                            skip=bytearray(p2m - 1))
            assert short[0] == "err" and short[1]["type"] in ("KernelFault", "ValueError"), short
            assert dst.read_bytes() == b""
            skip = bytearray(p2m)
            skip[5] = 1
            assert outcome(fn, raw, width, p2m, a.fileno(), 0, b.fileno(), p2m,
                           skip=skip) == ("ok", 3)
        assert dst.read_bytes() == b"\0" * 3 * PAGE + b"\1" * 2 * PAGE


def test_copy_raw_pages_to_a_pipe_goes_through_the_bounce_buffer(tmp_path):
    """copy_file_range refuses a pipe: the bytes arrive all the same."""
    raw = b"".join(p.to_bytes(8, "little") for p in (0, 1))
    src = tmp_path / "in"
    data = bytes(range(256)) * 32
    src.write_bytes(data)
    r, w = os.pipe()
    try:
        with open(src, "rb") as a:
            # A pipe has no offsets: the kernel reports that, after the check.
            got = outcome(kernels.copy_raw_pages, raw, 8, 2, a.fileno(), 0, w, 2)
        assert got[0] == "err" and got[1]["type"] in ("OSError", "KernelFault") \
            or got == ("ok", 2)
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------ whole restores
def _run(fn, source, out, **kw):
    """(outcome of fn's to_dict, image bytes or None): the output removed after."""
    res = outcome(lambda: fn(source, out, **kw))
    meta = ("ok", res[1].to_dict()) if res[0] == "ok" else res
    image = out.read_bytes() if res[0] == "ok" else (None if not out.exists() else "left")
    if out.exists():
        out.unlink()
    return meta, image


def _light(source, out, **kw):
    return inspector.restore_to_file(source, str(out), sync=False, **kw)


def _full(source, out, **kw):
    return restorer.restore_result(source, output=str(out), sync=False, **kw)


def _same(tmp_path, source, name, **kw):
    out = tmp_path / "image.raw"
    a = _run(_light, source, out, **kw)
    b = _run(_full, source, out, **kw)
    check_same(f"{name} {kw}", a, b)
    return a


def _streams(tmp_path):
    streams = {p.name: p for p in sorted(SAMPLES.glob("*.bin"))} if SAMPLES.is_dir() else {}
    streams.update(_writer_streams(tmp_path))
    return streams


def test_light_restore_equals_restorer_everywhere(tmp_path):
    streams = _streams(tmp_path)
    assert len(streams) > 10
    for name, path in streams.items():
        for checkpoint in (None, 1, 2):
            _same(tmp_path, str(path), name, checkpoint=checkpoint)
        # bytes: the pages are not in a file; the restorer takes over at once
        _same(tmp_path, path.read_bytes(), name)


def test_light_restore_of_torn_and_truncated_streams(tmp_path):
    """Cut inside every element of a few streams: checkpoint 1 torn is the
    same error (naming the same offset), a later one torn the same image of
    the last complete checkpoint with the same warning."""
    for name, built in catalogue().items():
        if not name.startswith(("remus", "hvm", "pv64")):
            continue
        path = tmp_path / f"{name}.cut"
        for start, end, what in built.layout[::3]:
            cut = (start + end) // 2
            path.write_bytes(built.data[:max(cut, 1)])
            _same(tmp_path, str(path), f"{name} cut at {cut} ({what})")


def test_light_restore_serves_plain_streams_and_hands_over_the_rest(tmp_path, monkeypatch):
    streams = _writer_streams(tmp_path)
    copied = []
    real = kernels.copy_raw_pages
    monkeypatch.setattr(kernels, "copy_raw_pages",
                        lambda *a, **k: copied.append(real(*a, **k)) or copied[-1])
    out = tmp_path / "image.raw"
    res = inspector.restore_to_file(str(streams["hvm64_xtab"]), str(out))
    assert isinstance(res, inspector.Inspection) and res.image == str(out)
    assert sum(copied) == res.checkpoints[0].data_pages > 0
    # A Remus stream: checkpoint 1 copied by the kernel once, the restorer
    # goes on from there (its own writes are the later checkpoints').
    copied.clear()
    written = []
    for name in ("pwrite_pages", "copy_pages", "scatter_pages"):
        real_k = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _k=real_k, _n=name, **k:
                            written.append(_n) or _k(*a, **k))
    res = inspector.restore_to_file(str(streams["remus_plain"]), str(out))
    assert isinstance(res, restorer.Result) and len(res.checkpoints) == 2
    assert sum(copied) == res.checkpoints[0].data_pages > 0
    assert written == ["pwrite_pages"]          # checkpoint 2's pages only
    assert res.present.base is not None         # checkpoint 1's map, not a copy


def test_light_restore_hands_over_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    """Input and output on file systems copy_file_range cannot join: the
    restorer takes over at the first page batch (pwrite from a mapping)."""
    path = _writer_streams(tmp_path)["pv64_tables"]
    monkeypatch.setattr(inspector, "kernel_copies", lambda a, b: False)
    copied = []
    monkeypatch.setattr(kernels, "copy_raw_pages", lambda *a, **k: copied.append(a))
    _same(tmp_path, str(path), "pv64_tables")
    assert not copied


@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_light_restore_write_errors_read_as_the_restorer_s(tmp_path, monkeypatch, err):
    """A full output names the output, as the restorer's error does; an error
    that may be the input's does not."""
    import errno
    code = getattr(errno, err)

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(kernels, "copy_raw_pages", fail)
    monkeypatch.setattr(kernels, "copy_pages", fail)
    path = _writer_streams(tmp_path)["hvm64_xtab"]
    got = _same(tmp_path, str(path), "hvm64_xtab")
    assert got[0][0] == "err" and got[1] is None      # nothing left behind
    assert (str(tmp_path) in got[0][1]["str"]) == (err == "ENOSPC")


def _cli(capsys, monkeypatch, argv, light):
    from xlegacy.cli import main
    if not light:
        monkeypatch.setattr(inspector, "restore_to_file",
                            lambda s, out, **k: restorer.restore_result(s, output=out, **k))
    rc = outcome(main, argv)
    out = capsys.readouterr()
    monkeypatch.undo()
    return rc, out.out, out.err


def test_cli_restore_light_equals_restorer(tmp_path, capsys, monkeypatch):
    streams = _streams(tmp_path)
    img, meta = tmp_path / "x.img", tmp_path / "x.json"
    for name, path in streams.items():
        for extra in ([], ["--checkpoint", "1"], ["-v"]):
            runs = []
            for light in (True, False):
                argv = ["restore", *extra, str(path), "-o", str(img), "--meta", str(meta)]
                got = _cli(capsys, monkeypatch, argv, light)
                runs.append((got, img.read_bytes() if img.exists() else None,
                             json.loads(meta.read_text()) if meta.exists() else None))
                for p in (img, meta):
                    if p.exists():
                        p.unlink()
            check_same(f"{name} restore {extra}", *runs)


PROBE = """
import sys
from xlegacy.cli import main
rc = main(sys.argv[1:])
assert rc == 0, rc
print("numpy" in sys.modules)
"""


@pytest.mark.skipif(not NATIVE, reason="the reference backend is numpy")
def test_restore_of_a_plain_stream_to_a_raw_file_does_not_import_numpy(tmp_path, samples):
    from conftest import load_sample
    path, _ = load_sample("hvm64_save")
    out = tmp_path / "out.img"

    def numpy_loaded(*args):
        r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()[-1] == "True"
    assert not numpy_loaded("restore", "-q", str(path), "-o", str(out),
                            "--meta", str(tmp_path / "m.json"))
    expected = np.asarray(restorer.restore(str(path))[0])
    assert out.read_bytes() == expected.tobytes()
    # A Remus stream needs the restorer after checkpoint 1.
    remus, _ = load_sample("remus_compressed_3cp")
    assert numpy_loaded("restore", "-q", str(remus), "-o", str(out))


def test_the_restorer_loads_beside_checkpoint_1_where_later_ones_are_proven(tmp_path,
                                                                            monkeypatch):
    """The inference has read the stream through: with later checkpoints
    ahead, the restorer (numpy) is imported in a thread while checkpoint 1
    is copied; never for a stream of one checkpoint, or checkpoint 1 alone."""
    import threading
    from xlegacy.stream.reader import LegacyStream
    streams = _writer_streams(tmp_path)
    for name, proven in (("remus_plain", 2), ("hvm64_xtab", 1), ("cat_remus64_compressed", 3)):
        with LegacyStream(str(streams[name])) as s:
            assert s.proven_checkpoints == proven, name
    with LegacyStream(str(streams["remus_plain"]), width=64, guest="hvm",
                      force_reading=True) as s:
        assert s.proven_checkpoints is None           # not read through
    loads = []

    def load():
        loads.append(1)
        t = threading.Thread(target=lambda: None)
        t.start()
        return t
    monkeypatch.setattr(inspector, "_load_restorer", load)
    out = tmp_path / "image.raw"
    for name, checkpoint, expected in (("remus_plain", None, 1), ("remus_plain", 2, 1),
                                       ("remus_plain", 1, 0), ("hvm64_xtab", None, 0)):
        loads.clear()
        inspector.restore_to_file(str(streams[name]), str(out), checkpoint=checkpoint)
        assert len(loads) == expected, (name, checkpoint)
    # The real thread: the switch interval is given back when it is done.
    before = sys.getswitchinterval()
    monkeypatch.undo()
    inspector._load_restorer().join()
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("kernel", ["copy_raw_pages", "copy_pages"])
def test_a_failed_copy_leaves_nothing_for_the_next(tmp_path, kernel):
    """The pages go through a pipe (splice): a copy the output refuses
    halfway (a read-only descriptor) or whose input ends fails, and the next
    copy writes exactly its own bytes."""
    import numpy as np
    raw = b"".join(p.to_bytes(8, "little") for p in (0, 1, 2, 5, 6))
    pfns = np.array([0, 1, 2, 5, 6], np.uint64)
    data = random.Random(3).randbytes(5 * PAGE)
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(data)
    dst.write_bytes(b"")

    def copy(in_fd, out_fd):
        if kernel == "copy_raw_pages":
            return outcome(kernels.copy_raw_pages, raw, 8, 8, in_fd, 0, out_fd, 8)
        return outcome(kernels.copy_pages, in_fd, 0, pfns, out_fd, 8)
    with open(src, "rb") as a:
        with open(dst, "rb") as ro:
            got = copy(a.fileno(), ro.fileno())
        assert got[0] == "err" and got[1].get("errno") == 9, got          # EBADF
        (tmp_path / "short").write_bytes(data[:2 * PAGE + 7])
        with open(tmp_path / "short", "rb") as short, open(dst, "r+b") as b:
            got = copy(short.fileno(), b.fileno())
        assert got[0] == "err" and got[1]["type"] == "KernelFault", got
        dst.write_bytes(b"")
        with open(dst, "r+b") as b:
            assert copy(a.fileno(), b.fileno()) == ("ok", 5)
    out = dst.read_bytes()
    expected = bytearray(7 * PAGE)
    for i, p in enumerate(pfns):
        expected[int(p) * PAGE:(int(p) + 1) * PAGE] = data[i * PAGE:(i + 1) * PAGE]
    assert out == bytes(expected)


@pytest.mark.skipif(not NATIVE, reason="the native kernels' pipe")
def test_the_copy_pipe_is_open_while_its_thread_lives_and_closed_after(tmp_path):
    import threading
    from xlegacy.kernels import _light

    def is_open(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False
    seen = []

    def work():
        raw = (0).to_bytes(8, "little")
        (tmp_path / "in").write_bytes(b"\1" * PAGE)
        with open(tmp_path / "in", "rb") as a, open(tmp_path / "out", "wb") as b:
            _light.copy_raw_pages(raw, 8, 1, a.fileno(), 0, b.fileno(), 1)
        r, w, size = _light.copy_pipe()
        seen.append((r, w, size, is_open(r), is_open(w)))
    t = threading.Thread(target=work)
    t.start()
    t.join()
    r, w, size, r_open, w_open = seen[0]
    assert (tmp_path / "out").read_bytes() == b"\1" * PAGE
    if size:            # (none where pipe-max-size is below 256 KiB)
        assert size >= _light.MIN_PIPE and r_open and w_open
        import gc
        gc.collect()
        assert not is_open(r) and not is_open(w)


# ------------------------------------------------------------ checkpoint 1 on a thread
def _remus(tmp_path, corrupt=False):
    from support import hostile_streams as H
    path = tmp_path / ("corrupt.bin" if corrupt else "remus.bin")
    kw = dict(bad_page=(1, b"\x81\x00"), bad_checkpoint=2) if corrupt else {}
    path.write_bytes(H.remus_stream(8, 3, True, **kw).data)
    return path


def _ours():
    """xlegacy's threads still alive."""
    import threading
    return [t.name for t in threading.enumerate() if t.name.startswith("xlegacy-")]


def _foreground(monkeypatch):
    monkeypatch.setattr(inspector._PageFile, "background", lambda self, progress=None: None)


def test_checkpoint_1_is_copied_on_a_thread_where_later_ones_follow(tmp_path, monkeypatch):
    """With later checkpoints proven, checkpoint 1's copies run on the
    copier thread, in stream order, while the restorer goes on; the image is
    the restorer's (test_light_restore_equals_restorer_everywhere compares
    every stream), and neither the thread nor the faster switching outlives
    the restore."""
    import threading
    streams = _writer_streams(tmp_path)
    seen = []
    real = kernels.copy_raw_pages

    def spy(*a, **k):
        seen.append((threading.current_thread().name, k["pages_at"]))
        return real(*a, **k)
    monkeypatch.setattr(kernels, "copy_raw_pages", spy)
    before = sys.getswitchinterval()
    out = tmp_path / "image.raw"
    for name, where in (("remus_plain", {"xlegacy-restore-copier"}),
                        ("cat_remus64_compressed", {"xlegacy-restore-copier"}),
                        ("hvm64_xtab", {threading.current_thread().name})):
        seen.clear()
        want = _run(_full, str(streams[name]), out)
        assert _run(_light, str(streams[name]), out) == want, name
        assert seen and {n for n, _ in seen} == where, (name, seen)
        assert [at for _, at in seen] == sorted(at for _, at in seen)
        assert sys.getswitchinterval() == before and not _ours()


def test_later_pages_written_while_checkpoint_1_copies_are_not_overwritten(tmp_path,
                                                                          monkeypatch):
    """Checkpoint 1's copies held up until the restorer writes the later
    checkpoints' pages: those go into the file while the copies are still
    queued, and the copies pass over them (exclude), so the image is still
    the restorer's, on every Remus stream and sample."""
    import threading
    streams = {n: p for n, p in _streams(tmp_path).items() if "remus" in n or "cp" in n}
    from support import hostile_streams as H
    for width in (4, 8):
        path = tmp_path / f"remus{width}.bin"
        path.write_bytes(H.remus_stream(width, 4, True, chunk_size=700).data)
        streams[path.name] = path
    assert len(streams) > 4
    gate = threading.Event()
    real_copy = kernels.copy_raw_pages
    real_exclude = inspector._PageFile.exclude
    excluded = []

    def held(*a, **k):
        gate.wait(10)
        return real_copy(*a, **k)

    def exclude(self, pfns):
        excluded.append(len(pfns))
        gate.set()
        return real_exclude(self, pfns)
    out = tmp_path / "image.raw"
    for name, path in sorted(streams.items()):
        want = _run(_full, str(path), out)
        monkeypatch.setattr(kernels, "copy_raw_pages", held)
        monkeypatch.setattr(inspector._PageFile, "exclude", exclude)
        gate.clear()
        excluded.clear()
        timer = threading.Timer(0.3, gate.set)   # (streams the overlay has nothing for)
        timer.start()
        got = _run(_light, str(path), out)
        timer.cancel()
        timer.join()
        monkeypatch.undo()
        check_same(name, got, want)
        if "compressed" in name and got[0][0] == "ok":
            assert excluded, name


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_copy_error_on_the_thread_is_the_restore_s_error(tmp_path, monkeypatch, fail_at):
    """A copy that fails on the thread (a full disk at checkpoint 1's first
    or second batch) fails the restore with the error it has without the
    thread, although the reader has gone on meanwhile to a later checkpoint
    that is corrupt: the copy comes first in the stream.  Nothing is left
    under the output's name, and no thread lives on."""
    import errno
    import threading
    path = _remus(tmp_path, corrupt=True)
    real = kernels.copy_raw_pages
    calls = []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)
    monkeypatch.setattr(kernels, "copy_raw_pages", full)
    out = tmp_path / "image.raw"
    got = _run(_light, str(path), out)
    calls.clear()
    _foreground(monkeypatch)
    assert _run(_light, str(path), out) == got
    assert got[0][0] == "err" and got[0][1]["type"] == "OSError" and got[1] is None, got
    assert not _ours()
    # Without the failing copy, the corrupt checkpoint is the error.
    monkeypatch.setattr(kernels, "copy_raw_pages", real)
    monkeypatch.undo()
    got = _run(_light, str(path), out)
    assert got[0][1]["type"] == "CorruptCheckpoint" and got[1] is None, got


def test_an_interrupted_restore_stops_its_copies_and_leaves_nothing(tmp_path):
    """Ctrl-C (a progress callback raising KeyboardInterrupt) while checkpoint
    1 is still being copied: the queued copies are dropped, the thread ends
    before the output is removed, and the interrupt is what is raised."""
    import threading
    path = _remus(tmp_path)
    out = tmp_path / "image.raw"
    calls = []

    def interrupt(pos):
        calls.append(pos)
        if len(calls) == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        inspector.restore_to_file(str(path), str(out), progress=interrupt)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    assert not _ours()


def test_progress_never_runs_ahead_of_the_copies(tmp_path, monkeypatch):
    """Progress says how far the copies have got, not how far ahead the
    reader is: with checkpoint 1's first copy held up, the reader goes on
    through the later checkpoints but no report passes the end of that
    first batch; reports never go backwards; the last is the stream's end.
    (The copier is released from the progress callback, or by the ticks of
    the final wait if the reader has nothing more to report.)"""
    import threading
    streams = _writer_streams(tmp_path)
    path = streams["cat_remus64_compressed"]
    gate = threading.Event()
    first = []
    real = kernels.copy_raw_pages

    def held(raw, width, p2m, *a, **k):
        gate.wait(10)
        n = real(raw, width, p2m, *a, **k)
        first.append(k["pages_at"] + n * PAGE)
        return n
    monkeypatch.setattr(kernels, "copy_raw_pages", held)
    reports = []

    def progress(pos):
        reports.append((pos, gate.is_set()))
        if len(reports) == 12:
            gate.set()
    res = inspector.restore_to_file(str(path), str(tmp_path / "image.raw"), progress=progress)
    assert isinstance(res, restorer.Result) and gate.is_set()
    positions = [p for p, _ in reports]
    assert positions == sorted(positions)
    held_up = [p for p, released in reports if not released]
    assert len(held_up) == 12 and max(held_up) <= first[0], (held_up, first[0])
    assert positions[-1] == os.path.getsize(path)


def test_background_drain_ticks_and_switching_nests(monkeypatch):
    import threading
    from xlegacy.outputs.background import Background, switching
    gate = threading.Event()
    ticks = []
    bg = Background(lambda job: gate.wait(5), fast_switch=True)
    bg.put("job", 1)
    threading.Timer(0.05, gate.set).start()
    bg.drain(tick=lambda: ticks.append(1), every=0.01)
    bg.stop()
    assert ticks and not bg.thread.is_alive()
    before = sys.getswitchinterval()
    a = switching()
    b = switching()
    assert sys.getswitchinterval() <= 0.0005
    a.close()
    a.close()                       # closing twice counts once
    assert sys.getswitchinterval() <= 0.0005
    b.close()
    assert sys.getswitchinterval() == before
