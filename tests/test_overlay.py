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
        b.param(-3, 0x1000 * cp)
        b.end()
        b.hvm_tail(magic=(0xfe, 0xff, 0xfd - cp), signature=b"RemusDeviceModelState",
                   qemu=b"QEVM" + bytes([cp]) * 40)
        b.checkpoint_done()
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
    try:
        new = [b"\x11" * PAGE, b"\x22" * PAGE]
        img.apply_compressed(_encode(new), np.array([1, 2], np.uint64), 0)
        assert img._overlay
        assert not img.compare_pages(np.frombuffer(new[0], np.uint8), np.array([1], np.uint64))[0]
        img.apply_compressed(_encode([b"\x33" * PAGE]), np.array([2], np.uint64), 0)
        img.write_pages(np.frombuffer(b"\x44" * PAGE, np.uint8), np.array([2], np.uint64))
        img.commit()
    except BaseException:
        img.abort()
        raise
    got = (tmp_path / "o.img").read_bytes()
    assert got == bytes(PAGE) + new[0] + b"\x44" * PAGE + bytes(PAGE)


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
    """Eight later checkpoints change 64 MiB of distinct pages, from a pipe
    (nothing can be left in the input: every page takes a slot).  Peak RSS
    over an idle interpreter stays within the overlay's 4 MiB budget plus
    one held checkpoint (8 MiB), checkpoint 1's buffers and numpy's
    temporaries: the slots are flushed when full, never grown (unbounded,
    they would hold 64 MiB)."""
    from xlegacy.testing.writer import write_guest
    n = 1 << 14
    base = np.random.default_rng(5).integers(0, 256, (n, PAGE), np.uint8)

    def version(k):
        def pages(pfns):
            out = base[np.asarray(pfns)].copy()
            out[:, :16] = k
            return out
        return pages
    step = n // 8
    cps = [{"pfns": np.arange(step) + i * step, "image": version(i + 2)} for i in range(8)]
    path = tmp_path / "s.bin"
    write_guest(str(path), base, checkpoints=cps, compress=True)
    budget = 4 << 20
    idle = _peak(path, "-", budget)
    out = tmp_path / "out.img"
    peak = _peak(path, out, budget)
    img, _ = xlegacy.restore(str(path))
    assert out.read_bytes() == img.tobytes()
    # measured: +35 MiB (the 64 MiB of pages in unbounded slots: +88 MiB)
    assert peak - idle <= budget + (48 << 20), f"grew by {(peak - idle) >> 20} MiB"
