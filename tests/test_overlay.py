"""Later Remus checkpoints restored to a file through the page overlay
(overlay.py): every page the same as the in-memory restore gives and the
stream's own model says, whatever the overlay's budget, from a file (FULL
pages left in the input) or a pipe (everything in slots); torn and corrupt
checkpoints as before; memory bounded by the budget."""
import os

import numpy as np
import pytest

import xlegacy
from xlegacy import image as image_mod
from xlegacy.errors import CorruptCheckpoint, StreamError
from xlegacy.overlay import PageOverlay

from support import hostile_streams as H
from support.hostile_streams import PipeLike, entry

PAGE = 4096


def _churn_stream(checkpoints=6, p2m_size=40, seed=21, chunk_size=1 << 20, full_every=4):
    """A compressed Remus stream whose later checkpoints send the same hot
    pfns again and again (FULL, delta and EMPTY), a few new ones each time,
    and within one checkpoint the same pfn twice (delta then FULL, FULL
    then delta, delta then delta)."""
    b = H.Builder(8, "hvm", p2m_size, seed)
    b.hvm_header()
    b.vcpu_info(0, [0])
    b.batch([entry(p) for p in range(0, p2m_size, 2)])      # odd pfns: holes until later
    b.marker(-13)
    b.end()
    b.hvm_tail(signature=b"RemusDeviceModelState")
    b.checkpoint_done()
    hot = [3, 4, 5, 6, 17, 30]
    for cp in range(2, checkpoints + 2):
        cold = [(cp * 7 + k) % p2m_size for k in range(3)]
        first = hot + [p for p in cold if p not in hot]
        b.batch([entry(p) for p in first], compressed=True)
        # the same pfns again in the same checkpoint: new versions and an
        # unchanged one (EMPTY)
        again = [hot[cp % len(hot)], hot[(cp + 1) % len(hot)]]
        pages = [b.next_page(again[0]), b.next_page(again[1])]
        b.batch([entry(p) for p in again], compressed=True, pages=pages)
        b.batch([entry(hot[0])], compressed=True, pages=[pages[0] if again[0] == hot[0]
                                                         else b.next_page(hot[0])])
        b.flush_compressed(chunk_size, full_every=full_every)
        b.remus_checkpoint_end(cp)
    return b.build()


STREAMS = {
    "whole-pages": lambda: _churn_stream(),                    # FULL pages left in the input
    "split-pages": lambda: _churn_stream(chunk_size=1000),     # pages cross chunks: slots
    "all-full": lambda: _churn_stream(full_every=1),
    "catalogue": lambda: H.catalogue()["remus64_compressed"],
    "catalogue32": lambda: H.catalogue()["remus32_compressed"],
}


@pytest.fixture(params=[1, 3, 64, None], ids=["budget1", "budget3", "budget64", "default"])
def budget(request, monkeypatch):
    """The overlay's slots, in pages (None: the default 64 MiB)."""
    if request.param is not None:
        monkeypatch.setattr(image_mod.FileImage, "budget", request.param * PAGE)
    return request.param


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("source", ["file", "pipe"])
def test_overlay_restores_what_memory_restores(name, source, budget, tmp_path):
    built = STREAMS[name]()
    path = tmp_path / "s.bin"
    path.write_bytes(built.data)
    img, meta = xlegacy.restore(str(path))
    assert img.tobytes() == built.image
    out = tmp_path / "out.img"
    src = str(path) if source == "file" else PipeLike(built.data)
    _, fmeta = xlegacy.restore(src, output=str(out))
    assert out.read_bytes() == built.image
    assert fmeta == meta


@pytest.mark.parametrize("name", ["whole-pages", "split-pages"])
def test_overlay_stops_at_the_checkpoint_asked_for(name, budget, tmp_path):
    built = STREAMS[name]()
    path = tmp_path / "s.bin"
    path.write_bytes(built.data)
    for k in range(1, len(built.images) + 1):
        out = tmp_path / f"out{k}.img"
        xlegacy.restore(str(path), output=str(out), checkpoint=k)
        assert out.read_bytes() == built.images[k - 1], k


@pytest.mark.parametrize("name", ["whole-pages", "split-pages"])
def test_torn_later_checkpoint_leaves_the_last_complete_one(name, budget, tmp_path):
    """Cut inside checkpoint k (k >= 2): the file holds checkpoint k-1,
    exactly as the in-memory restore does."""
    built = STREAMS[name]()
    starts = built.checkpoint_starts
    for k in range(2, len(built.images) + 1):
        cut = (starts[k - 1] + built.checkpoint_ends[k - 1]) // 2
        path = tmp_path / f"cut{k}.bin"
        path.write_bytes(built.data[:cut])
        out = tmp_path / f"cut{k}.img"
        _, meta = xlegacy.restore(str(path), output=str(out))
        assert out.read_bytes() == built.images[k - 2], k
        assert meta["torn_checkpoint"]["checkpoint"] == k


def test_corrupt_later_checkpoint_fails_and_leaves_no_output(budget, tmp_path):
    built = H.remus_stream(8, 4, True, bad_page=(2, b"\x05" + bytes(8)), bad_checkpoint=3)
    path = tmp_path / "bad.bin"
    path.write_bytes(built.data)
    out = tmp_path / "out.img"
    with pytest.raises(CorruptCheckpoint) as info:
        xlegacy.restore(str(path), output=str(out))
    assert info.value.checkpoint == 3 and info.value.last_good == 2
    assert not out.exists() and os.listdir(tmp_path) == ["bad.bin"]


# ------------------------------------------------------------ the overlay alone
def _encode(pages):
    """FULL_PAGE encodings of pages, as one compressed buffer."""
    return np.frombuffer(b"".join(b"\x80" + p for p in pages), np.uint8)


class _Origin:
    """A CompressedMap stand-in: the whole buffer is one payload at `base`
    of the input file `fd`."""

    def __init__(self, fd, base, size):
        self.fd, self.base, self.size = fd, base, size

    def in_file(self, offs, n):
        return np.where(offs + n <= self.size, self.base + offs, -1)


def _apply(ov, data, pfns, origin=None):
    from xlegacy import kernels
    starts, _ = kernels.delta_index(data, len(pfns))
    ov.apply(data, starts, np.array(pfns, np.uint64), 0, origin)


def test_input_that_shrinks_before_the_flush_is_a_clear_error(tmp_path):
    """FULL pages left in the input are read at the end: an input cut
    meanwhile is an error naming that, not a short or wrong image."""
    pages = [bytes([i + 1]) * PAGE for i in range(3)]
    data = _encode(pages)
    inp = tmp_path / "in"
    inp.write_bytes(b"HEAD" + data.tobytes())
    img = tmp_path / "img"
    img.write_bytes(bytes(8 * PAGE))
    fd, ifd = os.open(img, os.O_RDWR), os.open(inp, os.O_RDONLY)
    ov = PageOverlay(fd, 8, budget=PAGE)
    try:
        _apply(ov, data, [1, 5, 6], _Origin(ifd, 4, data.size))
        assert ov and ov.used == 0                 # all three left in the input
        os.truncate(inp, 10)
        with pytest.raises(StreamError, match="input file changed"):
            ov.flush()
    finally:
        ov.close()
        os.close(fd)
        os.close(ifd)


def test_file_access_flushes_the_overlay_first(tmp_path):
    """A page written (or read) through the image's other calls after the
    overlay took a newer copy: the overlay is written out first, so the
    later write wins and a read sees the overlay's page."""
    img = image_mod.FileImage(str(tmp_path / "o.img"), 4 * PAGE, sync=False)

    def delta(fill):          # a page of zeros but its first 64 bytes: a delta
        page = bytes([fill]) * 64 + bytes(PAGE - 64)
        return page, H.encode_page(bytes(PAGE), page)
    try:
        (a, da), (_, db), (_, dc) = delta(0x11), delta(0x22), delta(0x33)
        img.apply_compressed(np.frombuffer(da + db, np.uint8), np.array([1, 2], np.uint64), 0)
        assert img._overlay.used == 2                        # both in slots
        assert not img.compare_pages(np.frombuffer(a, np.uint8), np.array([1], np.uint64))[0]
        img.apply_compressed(np.frombuffer(dc, np.uint8), np.array([2], np.uint64), 0)
        assert img._overlay.used == 1
        img.write_pages(np.frombuffer(b"\x44" * PAGE, np.uint8), np.array([2], np.uint64))
        img.commit()
    except BaseException:
        img.abort()
        raise
    got = (tmp_path / "o.img").read_bytes()
    assert got == bytes(PAGE) + a + b"\x44" * PAGE + bytes(PAGE)


def test_deltas_on_overlay_pages_and_input_pages(tmp_path):
    """A delta whose base is a slot, a page left in the input, or the file."""
    base = bytes(range(256)) * 16
    changed = bytearray(base)
    changed[8:16] = b"ABCDEFGH"
    delta = H.encode_page(base, bytes(changed))
    assert delta[0] not in (0x00, 0x80)
    img = tmp_path / "img"
    img.write_bytes(base * 4)                      # the file holds `base` everywhere
    inp = tmp_path / "in"
    full = _encode([base, base])
    inp.write_bytes(full.tobytes())
    fd, ifd = os.open(img, os.O_RDWR), os.open(inp, os.O_RDONLY)
    ov = PageOverlay(fd, 4, budget=2 * PAGE)
    try:
        _apply(ov, full, [1, 2], _Origin(ifd, 0, full.size))     # 1, 2: in the input
        assert ov.used == 0
        # 0: base from the file; 1: from the input; both slots taken, so the
        # second delta on 0 comes after a flush, its base from the file again
        _apply(ov, np.frombuffer(delta * 3, np.uint8), [0, 1, 0])
        assert ov.used == 1
        _apply(ov, np.frombuffer(delta, np.uint8), [2])          # base from the input
        ov.flush()
    finally:
        ov.close()
        os.close(fd)
        os.close(ifd)
    got = img.read_bytes()
    assert got == bytes(changed) * 3 + base


# ------------------------------------------------------------ memory
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the
# forked parent, the test process with its own big arrays.
_RSS = r"""
import sys
import numpy, xlegacy, xlegacy.image, xlegacy.restorer
out, budget = sys.argv[1], int(sys.argv[2])
xlegacy.image.FileImage.budget = budget
if out != "-":
    xlegacy.restore("-", output=out)
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))
"""


def _peak(stream, out, budget):
    """Peak RSS of a child restoring `stream` through a pipe (out "-": an
    idle child with the same imports)."""
    import subprocess
    import sys
    cat = subprocess.Popen(["cat", str(stream)], stdout=subprocess.PIPE)
    try:
        r = subprocess.run([sys.executable, "-c", _RSS, str(out), str(budget)],
                           stdin=cat.stdout, capture_output=True, text=True, check=True)
    finally:
        cat.stdout.close()
        cat.wait()
    return int(r.stdout)


@pytest.mark.skipif(bool(os.environ.get("XLEGACY_SANITIZE")),
                    reason="RSS is not meaningful under AddressSanitizer")
def test_overlay_memory_is_bounded_by_its_budget(tmp_path):
    """Sixteen later checkpoints, from a pipe: each block of 2048 pfns is
    sent FULL (written at once) and, in the next checkpoint, as deltas,
    whose results take slots: 64 MiB of them if the slots grew.  Peak RSS
    over an idle interpreter stays within the overlay's 4 MiB budget plus a
    held checkpoint (8 MiB), checkpoint 1's buffers and numpy's
    temporaries: the slots are flushed when full, never grown."""
    from xlegacy.testing.writer import write_guest
    n = 1 << 14
    base = np.random.default_rng(5).integers(0, 256, (n, PAGE), np.uint8)

    def version(k):
        def pages(pfns):
            out = base[np.asarray(pfns)].copy()
            out[:, :16] = k
            return out
        return pages
    step = 2048
    cps = [{"pfns": np.arange(step) + (i // 2) * step, "image": version(i + 2)}
           for i in range(16)]
    path = tmp_path / "s.bin"
    write_guest(str(path), base, checkpoints=cps, compress=True)
    budget = 4 << 20
    idle = _peak(path, "-", budget)
    out = tmp_path / "out.img"
    peak = _peak(path, out, budget)
    img, meta = xlegacy.restore(str(path))
    assert out.read_bytes() == img.tobytes()
    assert sum(c["page_kinds"]["delta"] for c in meta["checkpoint_details"][1:]) == n
    # measured: +35 MiB (unbounded slots: +88 MiB)
    assert peak - idle <= budget + (48 << 20), f"grew by {(peak - idle) >> 20} MiB"


# ------------------------------------------------------------ pages read in place
def _xen_like(tmp_path, checkpoints=4, n=96, seed=3):
    """A writer-made compressed Remus stream whose checkpoints span several
    COMPRESSED_DATA chunks (a small output buffer), each ending on a page
    boundary as Xen's do, PFN arrays between them; hot pages give deltas
    and EMPTY pages."""
    from xlegacy.testing.writer import write_guest
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, PAGE), np.uint8)
    hot = np.arange(0, n, 3)

    def version(k):
        def pages(pfns):
            out = base[np.asarray(pfns)].copy()
            out[np.asarray(pfns) % 4 != 0, 100:140] = k        # the others stay EMPTY
            return out
        return pages
    cps = [{"pfns": np.union1d(hot, rng.choice(n, 8, replace=False)), "image": version(k)}
           for k in range(2, checkpoints + 2)]
    path = tmp_path / "xen.bin"
    res = write_guest(str(path), base, checkpoints=cps, compress=True,
                      compress_options={"outbuf_size": 5 * PAGE, "page_buffer_pages": 16})
    return path, res


def test_pages_read_in_place_from_the_input(tmp_path, monkeypatch, budget):
    """A regular-file input's compressed payloads are not copied into the
    hold: they are read from a mapping of the input at commit, chunk by
    chunk, with the same image and metadata as the in-memory restore."""
    from xlegacy import checkpoints
    path, res = _xen_like(tmp_path)
    calls = {"mapped": 0, "copied": 0}
    mapped, materialize = checkpoints.Held.map_compressed, checkpoints.Held.materialize

    def counting_map(self, *a):
        got = mapped(self, *a)
        calls["mapped"] += got is not None
        return got

    def counting_materialize(self):
        calls["copied"] += bool(self.left)
        return materialize(self)
    monkeypatch.setattr(checkpoints.Held, "map_compressed", counting_map)
    monkeypatch.setattr(checkpoints.Held, "materialize", counting_materialize)
    img, meta = xlegacy.restore(str(path))
    out = tmp_path / "out.img"
    _, fmeta = xlegacy.restore(str(path), output=str(out))
    assert out.read_bytes() == img.tobytes() == res.image_after().tobytes()
    assert fmeta == meta
    assert calls == {"mapped": 4, "copied": 0}
    kinds = [c["page_kinds"] for c in meta["checkpoint_details"][1:]]
    assert all(k["delta"] for k in kinds[1:]) and any(k["empty"] for k in kinds[1:])
    assert sum(c["compressed_chunks"] for c in meta["checkpoint_details"][1:]) > 8


def test_checkpoint_buffer_limits_the_mapping(tmp_path, monkeypatch):
    """A checkpoint whose payloads span more than checkpoint_buffer bytes of
    the input is copied into the hold (which spills beyond the budget) as
    before: the same image."""
    from xlegacy import checkpoints
    path, res = _xen_like(tmp_path)
    mapped = checkpoints.Held.map_compressed
    got = []
    def counting_map(self, *a):
        m = mapped(self, *a)
        got.append(m is not None)
        return m
    monkeypatch.setattr(checkpoints.Held, "map_compressed", counting_map)
    for limit, used in ((0, False), (1 << 20, True)):
        got.clear()
        out = tmp_path / f"out{limit}.img"
        xlegacy.restore(str(path), output=str(out), checkpoint_buffer=limit)
        assert out.read_bytes() == res.image_after().tobytes()
        assert got == [used] * 4


def test_corrupt_page_read_in_place_fails_as_before(tmp_path):
    """A broken encoding in a payload read in place: the same
    CorruptCheckpoint (checkpoint, last good, offset) as in memory."""
    path, _ = _xen_like(tmp_path, checkpoints=3)
    data = bytearray(path.read_bytes())
    from xlegacy.stream.reader import LegacyStream
    from xlegacy.stream.records import Chunk
    s = LegacyStream(str(path))
    target = [r for r in s if isinstance(r, Chunk) and r.id == -12 and r.checkpoint == 3][1]
    s.close()
    at = target.offset + target.size - len(target.value)
    data[at] = 0x81 if data[at] != 0x80 else 0x00     # a FULL page becomes a bad delta
    data[at + 1] = 0x00
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as mem:
        xlegacy.restore(str(bad))
    with pytest.raises(CorruptCheckpoint) as fil:
        xlegacy.restore(str(bad), output=str(tmp_path / "out.img"))
    assert (fil.value.checkpoint, fil.value.last_good, fil.value.offset) == \
        (mem.value.checkpoint, mem.value.last_good, mem.value.offset) == \
        (3, 2, mem.value.offset)
    assert not (tmp_path / "out.img").exists()


def test_input_cut_before_the_commit_is_not_a_sigbus(tmp_path):
    """The mapping is made resident before any byte is read: payloads the
    file no longer has make map_compressed give up (the hold path then
    reports the cut), never a SIGBUS."""
    from xlegacy.checkpoints import Held, Hold
    payload = b"\x80" + bytes(range(256)) * 16
    inp = tmp_path / "in"
    inp.write_bytes(b"x" * 5000 + payload * 3)
    fd = os.open(inp, os.O_RDONLY)
    held = Held(2, Hold())
    try:
        held.left = [(5000, 5000, len(payload) * 3)]
        held._fd = fd
        data, starts, locate, origin = held.map_compressed(3, None)
        at = 5000 - 4096                           # the mapping starts at a page boundary
        assert [int(x) for x in starts] == [at, at + 4097, at + 2 * 4097, 0]
        assert locate(at + 4097) == 5000 + 4097
        assert origin.in_file(np.array([at + 1]), PAGE)[0] == 5001
        assert bytes(data[at:at + len(payload)]) == payload
        del data
        held.unmap()
        os.truncate(inp, 6000)
        assert held.map_compressed(3, None) is None
        with pytest.raises(StreamError):
            held.materialize()                     # a TruncatedStream: the engine's torn rule
    finally:
        held.unmap()
        held.hold.close()
        os.close(fd)


def test_each_changed_page_is_written_once(tmp_path, monkeypatch):
    """The hot pfns a stream's later checkpoints send again and again reach
    the file once each, at the end; a delta's base is read once per pfn
    (before the overlay: once per checkpoint for both)."""
    from collections import Counter
    from xlegacy import kernels
    built = _churn_stream(checkpoints=8)
    path = tmp_path / "s.bin"
    path.write_bytes(built.data)
    writes, reads = Counter(), Counter()
    pwrite_at, gather, pread_at = kernels.pwrite_at, kernels.gather_pages, kernels.pread_at

    def counting_pwrite_at(fd, src, at, pfns, *a):
        writes.update(int(p) for p in pfns)
        return pwrite_at(fd, src, at, pfns, *a)

    def counting_gather(fd, pfns, *a, **k):
        reads.update(int(p) for p in pfns)
        return gather(fd, pfns, *a, **k)

    def counting_pread_at(fd, offs, *a):
        reads.update(("input", int(o)) for o in offs)
        return pread_at(fd, offs, *a)
    monkeypatch.setattr(kernels, "pwrite_at", counting_pwrite_at)
    monkeypatch.setattr(kernels, "gather_pages", counting_gather)
    monkeypatch.setattr(kernels, "pread_at", counting_pread_at)
    out = tmp_path / "out.img"
    _, meta = xlegacy.restore(str(path), output=str(out))
    assert out.read_bytes() == built.image
    later = meta["checkpoint_details"][1:]
    sent = sum(c["page_kinds"]["full"] + c["page_kinds"]["delta"] for c in later)
    assert sent > 2 * len(writes)                  # the hot pfns come again and again
    assert set(writes.values()) == {1}
    assert set(reads.values()) <= {1}
