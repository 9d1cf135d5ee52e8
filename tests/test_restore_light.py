"""`xlegacy restore` to a raw file without numpy: the kernel that copies a
batch's pages by its raw PFN array (copy_raw_pages) against its twin."""
import os
import random

import pytest

from xlegacy import kernels
from xlegacy.kernels import _reference

from support.differential import check_same, outcome
from test_inspector import _entries

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
