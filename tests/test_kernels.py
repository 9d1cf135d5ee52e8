"""Differential tests of every kernel: the native cffi module against its
reference twin, on random and adversarial inputs, every error path with its
exact fault (class, code, index, offset, message), and the argument checks
at the Python/C boundary (wrong dtype, '>u8', F order, read-only, strided
and short arrays).

The reference twins define what the C code must do, so wherever the two
disagree the test fails; known disagreements are xfail(strict=True) with the
fix in the reason.
"""
import errno
import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from support import hostile_streams as H
from support.hypothesis_budget import budget
from support.differential import check_same, outcome
from xlegacy.kernels import _reference, faults
from xlegacy.errors import StreamError
from xlegacy.kernels.faults import KernelFault

try:
    from xlegacy.kernels import _native
except ImportError:  # pragma: no cover - reference-only installs
    _native = None

PAGE = 4096
needs_native = pytest.mark.skipif(_native is None, reason="native backend not built")
IMPLS = [pytest.param("native", marks=needs_native), "reference"]


def impl_of(name):
    return _native if name == "native" else _reference


def both(fn, *args, **kwargs):
    """Run kernel `fn` natively and in the reference; they must agree.
    Array arguments are copied per side so in-place writes can be compared."""
    if _native is None:
        pytest.skip("native backend not built")
    sides = []
    for mod in (_native, _reference):
        a = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
        kw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
        sides.append((outcome(getattr(mod, fn), *a, **kw), a, kw))
    (ra, aa, ka), (rb, ab, kb) = sides
    check_same(fn, ra, rb)
    # Whatever the kernel wrote into caller-owned arrays must agree as well
    # (the image is caller-visible even after a fault).
    check_same(f"{fn} arguments after the call", (aa, ka), (ab, kb))
    return ra, aa


def fault_of(fn, *args, **kwargs):
    with pytest.raises(KernelFault) as info:
        fn(*args, **kwargs)
    return info.value


def entries(width, values):
    return struct.pack(f"<{len(values)}{'Q' if width == 8 else 'I'}", *values)


# =========================================================== decode_pfns
ENTRY = st.one_of(
    st.integers(0, 0xFFFFFFFF),                                   # any 32-bit entry
    st.builds(lambda t, p: (t << 28) | p, st.sampled_from([0, 1, 2, 3, 4, 8, 9, 0xC, 0xD,
                                                           0xE, 0xF]), st.integers(0, 70)),
    st.just(0xF0000000),                                          # bare XTAB
)


@given(width=st.sampled_from([4, 8]), values=st.lists(ENTRY, max_size=40),
       p2m=st.sampled_from([0, 1, 16, 64, 71, 0x0FFFFFFF, 1 << 28, (1 << 64) - 1]),
       upper=st.integers(0, 40))
@budget(300)
def test_decode_pfns_random(width, values, p2m, upper):
    vals = list(values)
    if width == 8 and upper < len(vals):
        vals[upper] |= 1 << (32 + upper % 32)
    raw = entries(width, vals)
    r, _ = both("decode_pfns", raw, width, p2m, locate=1000)
    if r[0] == "ok":
        types, pfns, data = r[1]
        assert types.dtype == np.uint8 and pfns.dtype == np.uint64 and data.dtype == np.uint64
        assert types.size == pfns.size == len(vals)


@given(st.binary(max_size=200), st.sampled_from([4, 8]), st.integers(0, 1 << 29))
@budget(200)
def test_decode_pfns_raw_bytes(raw, width, p2m):
    both("decode_pfns", raw, width, p2m)


# =========================================================== v2_entries
def _v2_both(raw, width):
    """v2_entries natively (numpy-free, _light) and in the reference: the
    same kept raw values, v2 bytes and repeat flag."""
    if _native is None:
        pytest.skip("native backend not built")
    from xlegacy.kernels import _light
    a, b = (outcome(fn, raw, width) for fn in (_light.v2_entries, _reference.v2_entries))
    norm = [r if r[0] != "ok" else ("ok", ([int(x) for x in r[1][0]], r[1][1], r[1][2]))
            for r in (a, b)]
    check_same("v2_entries", *norm)
    return norm[0]


@given(width=st.sampled_from([4, 8]), values=st.lists(ENTRY, max_size=60),
       upper=st.integers(0, 60), repeat=st.integers(0, 60))
@budget(300)
def test_v2_entries_random(width, values, upper, repeat):
    vals = list(values)
    if width == 8 and upper < len(vals):
        vals[upper] |= 1 << (32 + upper % 32)        # bits 63..32: dropped in v2
    if vals and repeat < len(vals):
        vals.append(vals[repeat])
    got = _v2_both(entries(width, vals), width)
    assert got[0] == "ok"
    kept, v2, repeats = got[1]
    assert kept == [v for v in vals if v != 0xF0000000]
    assert v2 == b"".join(struct.pack("<Q", ((v >> 28 & 0xF) << 60) | (v & 0x0FFFFFFF))
                          for v in kept)
    assert repeats == (len(set(kept)) != len(kept))


@pytest.mark.parametrize("width", [4, 8])
def test_v2_entries_adversarial(width):
    full = entries(width, [(t << 28) | p for t in range(16) for p in (0, 1, 0x0FFFFFFF)])
    cases = [b"", entries(width, [0xF0000000] * 1024), full, full + full[:width],
             entries(width, [0xF0000001, 0xF0000000, 0xF0000001]),
             entries(width, list(range(1024))), b"\xff" * (8 * width)]
    for raw in cases:
        assert _v2_both(raw, width)[0] == "ok"
    assert _v2_both(full + b"\0", width)[0] == "err"          # not whole entries
    assert _v2_both(full, 6)[0] == "err"                       # no such width


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("width", [4, 8])
def test_decode_pfns_values(impl, width):
    k = impl_of(impl)
    vals = [0x00000001, 0x10000002, 0xF0000000, 0xEFFFFFFF & 0xE000000F, 0xD0000004,
            0x90000005, 0xC0000006, 0x80000007, 0xF0000123]
    types, pfns, data = k.decode_pfns(entries(width, vals), width, 16)
    assert types.tolist() == [0, 1, 0xF, 0xE, 0xD, 9, 0xC, 8, 0xF]
    assert pfns.tolist() == [1, 2, 0, 0xF, 4, 5, 6, 7, 0x123]
    assert data.tolist() == [1, 2, 5, 6, 7]      # not XTAB, XALLOC, BROKEN


DECODE_FAULTS = [
    # (width, entries, p2m, code, index, message fragment, found fragment)
    (8, [1, 2, 0x50000003], 16, faults.BAD_TYPE, 2, "bogus page type in PFN entry 2",
     "entry 0x50000003 (type 5)"),
    (4, [0x70000001], 16, faults.BAD_TYPE, 0, "bogus page type in PFN entry 0", "(type 7)"),
    (8, [1, (1 << 32) | 2], 16, faults.UPPER_BITS, 1, "PFN entry 1 has bits 63..32 set",
     "entry 0x100000002"),
    (8, [1, 0x6000000000000001], 16, faults.UPPER_BITS, 1, "bits 63..32", None),
    (8, [3, 16], 16, faults.PFN_RANGE, 1, "pfn out of range in PFN entry 1", "pfn 16"),
    (4, [0x9000000F, 0x90000010], 16, faults.PFN_RANGE, 1, "PFN entry 1", "pfn 16"),
    (4, [0xE0000020], 16, faults.PFN_RANGE, 0, "PFN entry 0", "pfn 32"),   # XALLOC checked
    (4, [0xD0000020], 16, faults.PFN_RANGE, 0, "PFN entry 0", "pfn 32"),   # BROKEN checked
    (8, [0], 0, faults.PFN_RANGE, 0, "PFN entry 0", "pfn 0"),
    # upper bits win over a bad type, a bad type over the range
    (8, [(1 << 40) | 0x50000099], 4, faults.UPPER_BITS, 0, "bits 63..32", None),
    (8, [0x50000099], 4, faults.BAD_TYPE, 0, "bogus page type", None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DECODE_FAULTS, ids=lambda c: f"{c[3]}-{c[4]}-{c[0]}")
def test_decode_pfns_faults(impl, case):
    width, vals, p2m, code, index, msg, found = case
    exc = fault_of(impl_of(impl).decode_pfns, entries(width, vals), width, p2m, locate=500)
    assert isinstance(exc, StreamError) and isinstance(exc, ValueError)
    assert (exc.code, exc.index, exc.offset) == (code, index, 500 + index * width)
    assert msg in str(exc)
    if found:
        assert found in exc.found
    assert str(exc).endswith(f"at offset {500 + index * width}")


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_pfns_xtab_ignores_range(impl):
    types, pfns, data = impl_of(impl).decode_pfns(entries(8, [0xFFFFFFFF]), 8, 1)
    assert types.tolist() == [0xF] and pfns.tolist() == [0x0FFFFFFF] and data.size == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_pfns_locate_callable(impl):
    exc = fault_of(impl_of(impl).decode_pfns, entries(4, [1, 2, 99]), 4, 10,
                   locate=lambda off: 7000 + 2 * off)
    assert exc.offset == 7000 + 2 * 8


# =========================================================== page movers
def _pages(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n * PAGE, dtype=np.uint8)


@given(n=st.integers(0, 6), image_pages=st.integers(0, 9),
       pfns=st.lists(st.integers(0, 11), min_size=6, max_size=6), seed=st.integers(0, 5))
@budget(200)
def test_scatter_and_compare_random(n, image_pages, pfns, seed):
    pages = _pages(n, seed)
    p = np.array(pfns[:n], dtype=np.uint64)
    image = _pages(image_pages, seed + 1)
    r, args = both("scatter_pages", pages, p, image, locate=40)
    after = args[2]
    if r[0] == "err":
        assert np.array_equal(after, image), "a failed scatter_pages wrote to the image"
        assert r[1]["code"] == faults.PFN_RANGE
    else:
        for i in range(n):       # the last copy of a repeated pfn wins
            last = max(j for j in range(n) if pfns[j] == pfns[i])
            assert np.array_equal(after[pfns[i] * PAGE:(pfns[i] + 1) * PAGE],
                                  pages[last * PAGE:(last + 1) * PAGE])
    both("compare_pages", pages, p, image)


@pytest.mark.parametrize("impl", IMPLS)
def test_scatter_fault(impl):
    image = np.zeros(4 * PAGE, np.uint8)
    exc = fault_of(impl_of(impl).scatter_pages, _pages(3), np.array([0, 3, 4], np.uint64),
                   image, locate=9000)
    assert (exc.code, exc.index, exc.offset) == (faults.PFN_RANGE, 2, 9000)
    assert "pfn out of range in page 2" in str(exc) and exc.found == "pfn 4"
    assert not image.any(), "nothing may be written when a pfn is out of range"


@pytest.mark.parametrize("impl", IMPLS)
def test_compare_pages(impl):
    image = _pages(4, 3)
    pages = np.concatenate([image[2 * PAGE:3 * PAGE], _pages(1, 9), image[:PAGE]])
    before = image.copy()
    image.flags.writeable = False          # compare never writes
    d = impl_of(impl).compare_pages(pages, np.array([2, 1, 0], np.uint64), image)
    assert d.dtype == np.bool_ and d.tolist() == [False, True, False]
    assert np.array_equal(image, before)


@pytest.mark.parametrize("impl", IMPLS)
def test_pwrite_pages(impl, tmp_path):
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pages = _pages(4, 5)
        assert impl_of(impl).pwrite_pages(fd, pages, np.array([5, 6, 1, 5], np.uint64), 8) == 4
        data = path.read_bytes()
        assert len(data) == 7 * PAGE
        assert data[5 * PAGE:6 * PAGE] == pages[3 * PAGE:].tobytes()      # last copy wins
        assert data[6 * PAGE:7 * PAGE] == pages[PAGE:2 * PAGE].tobytes()
        assert data[PAGE:2 * PAGE] == pages[2 * PAGE:3 * PAGE].tobytes()
        exc = fault_of(impl_of(impl).pwrite_pages, fd, pages[:PAGE],
                       np.array([8], np.uint64), 8, locate=77)
        assert (exc.code, exc.index, exc.offset) == (faults.PFN_RANGE, 0, 77)
        assert path.read_bytes() == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_pwrite_pages_errno(impl, tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            impl_of(impl).pwrite_pages(fd, _pages(1), np.array([0], np.uint64), 4)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        impl_of(impl).pwrite_pages(fd, _pages(1), np.array([0], np.uint64), 4)  # closed
    assert info.value.errno == errno.EBADF


# Found here: pfns[i] * 4096 wrapped in uint64 when the caller's image_pages
# exceeded 2^51, so page 2^52+1 was written at byte 4096 (fixed: XL_E_BAD_ARG
# when image_pages > INT64_MAX / 4096, ValueError in both twins).
@pytest.mark.parametrize("impl", IMPLS)
def test_pwrite_pages_offset_overflow(impl, tmp_path):
    path = tmp_path / "wrap"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError):
            impl_of(impl).pwrite_pages(fd, _pages(1), np.array([(1 << 52) + 1], np.uint64),
                                       1 << 62)
    finally:
        os.close(fd)
    assert path.stat().st_size == 0, "the page went to a wrapped offset"


# =========================================================== file -> image kernels


def _datafile(tmp_path, npages, seed=3, extra=0):
    data = _pages(npages, seed).tobytes() + b"\x07" * extra
    path = tmp_path / f"in{seed}"
    path.write_bytes(b"HEAD" * 25 + data)      # pages start at offset 100
    return path, data


@given(n=st.integers(0, 6), pfns=st.lists(st.integers(0, 9), min_size=6, max_size=6),
       short=st.integers(0, 3), image_pages=st.integers(0, 10))
@budget(80)
def test_pread_pages_random(tmp_path_factory, n, pfns, short, image_pages):
    tmp = tmp_path_factory.mktemp("pread")
    path, data = _datafile(tmp, max(n - short, 0), extra=100 if short else 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        image = _pages(image_pages, 9)
        r, args = both("pread_pages", fd, 100, np.array(pfns[:n], np.uint64), image,
                       locate=1000)
        if r[0] == "err" and r[1]["type"] == "KernelFault" and r[1]["code"] == faults.PFN_RANGE:
            assert np.array_equal(args[3], image), "a pfn fault wrote to the image"
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_pread_pages_short_read(impl, tmp_path):
    path, data = _datafile(tmp_path, 2, extra=1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        image = np.zeros(8 * PAGE, np.uint8)
        exc = fault_of(impl_of(impl).pread_pages, fd, 100,
                       np.array([4, 5, 6, 1], np.uint64), image, locate=5000)
        assert (exc.code, exc.index) == (faults.SHORT_READ, 2)
        assert exc.offset == 5000 + 2 * PAGE + 1000
        assert "stream ends inside data page 2" in str(exc)
        assert image[4 * PAGE:6 * PAGE].tobytes() == data[:2 * PAGE]
    finally:
        os.close(fd)


@given(n=st.integers(0, 6), pfns=st.lists(st.integers(0, 9), min_size=6, max_size=6),
       short=st.integers(0, 2))
@budget(60)
def test_copy_pages_random(tmp_path_factory, n, pfns, short):
    if _native is None:
        pytest.skip("native backend not built")
    tmp = tmp_path_factory.mktemp("copy")
    path, data = _datafile(tmp, max(n - short, 0), extra=10 if short else 0)
    fd = os.open(path, os.O_RDONLY)
    outs = [tmp / "a", tmp / "b"]
    try:
        results = []
        for mod, out in zip((_native, _reference), outs):
            ofd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                results.append(outcome(mod.copy_pages, fd, 100, np.array(pfns[:n], np.uint64),
                                       ofd, 8, locate=7))
            finally:
                os.close(ofd)
        check_same("copy_pages", results[0], results[1])
        if results[0][0] == "ok":
            assert outs[0].read_bytes() == outs[1].read_bytes()
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_pages_result(impl, tmp_path):
    path, data = _datafile(tmp_path, 4)
    fd = os.open(path, os.O_RDONLY)
    out = tmp_path / "out"
    ofd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert impl_of(impl).copy_pages(fd, 100, np.array([3, 4, 0, 3], np.uint64), ofd, 6) == 4
        got = out.read_bytes()
        assert got[3 * PAGE:4 * PAGE] == data[3 * PAGE:4 * PAGE]     # the last copy wins
        assert got[4 * PAGE:5 * PAGE] == data[PAGE:2 * PAGE]
        assert got[:PAGE] == data[2 * PAGE:3 * PAGE]
        exc = fault_of(impl_of(impl).copy_pages, fd, 100, np.array([6], np.uint64), ofd, 6)
        assert exc.code == faults.PFN_RANGE
        with pytest.raises(ValueError):
            impl_of(impl).copy_pages(fd, 100, np.array([0], np.uint64), ofd, 1 << 62)
    finally:
        os.close(fd)
        os.close(ofd)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", ["pread_pages", "copy_pages"])
@pytest.mark.parametrize("back", [PAGE, 3 * PAGE, 2 * PAGE + 1])
def test_file_offset_near_int64_max(impl, kernel, back, tmp_path):
    """/dev/zero reads at any offset, so runs succeed up to the end of the
    int64 offset range: the kernels must stop with a clear error there, with
    no wrapped offset (and, in the sanitizer run, no signed overflow)."""
    fd = os.open("/dev/zero", os.O_RDONLY)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pfns = np.array([0, 5, 6, 2], np.uint64)
        with pytest.raises((ValueError, OSError)):
            if kernel == "pread_pages":
                impl_of(impl).pread_pages(fd, (1 << 63) - back, pfns, np.zeros(8 * PAGE, np.uint8))
            else:
                impl_of(impl).copy_pages(fd, (1 << 63) - back, pfns, out, 8)
        assert os.fstat(out).st_size <= 7 * PAGE
    finally:
        os.close(fd)
        os.close(out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", ["pread_pages", "copy_pages"])
def test_file_negative_offset(impl, kernel, tmp_path):
    path, _ = _datafile(tmp_path, 1)
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises((ValueError, OSError)):
            if kernel == "pread_pages":
                impl_of(impl).pread_pages(fd, -4096, [0], np.zeros(PAGE, np.uint8))
            else:
                impl_of(impl).copy_pages(fd, -4096, [0], out, 1)
    finally:
        os.close(fd)
        os.close(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_file_kernels_bad_fds(impl, tmp_path):
    """XL_E_IO: the errno arrives as OSError.errno, nothing is half-done."""
    k = impl_of(impl)
    path, data = _datafile(tmp_path, 2)
    fd = os.open(path, os.O_RDONLY)
    ro = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        image = np.zeros(4 * PAGE, np.uint8)
        with pytest.raises(OSError) as info:
            k.pread_pages(-1, 100, [0, 1], image)
        assert info.value.errno == errno.EBADF and not image.any()
        with pytest.raises(OSError) as info:
            k.copy_pages(fd, 100, [0, 1], ro, 4)          # output not writable
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError) as info:
            k.copy_pages(-1, 100, [0, 1], ro, 4)
        assert info.value.errno == errno.EBADF
        assert os.fstat(ro).st_size == 0
    finally:
        os.close(fd)
        os.close(ro)


# =========================================================== delta (format B)
def _enc(old, new, full=False):
    return H.encode_page(old.tobytes(), new.tobytes(), full)


def _mutated(old, rng, frac):
    new = old.copy().view("<u4")
    idx = rng.random(new.size) < frac
    new[idx] = rng.integers(0, 1 << 32, int(idx.sum()), dtype=np.uint32)
    return new.view(np.uint8)


@given(n=st.integers(0, 6), seed=st.integers(0, 1000),
       fracs=st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.9, 1.0]), min_size=6, max_size=6),
       fulls=st.lists(st.booleans(), min_size=6, max_size=6))
@budget(120)
def test_delta_roundtrip(n, seed, fracs, fulls):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, 8 * PAGE, dtype=np.uint8)
    pfns = rng.permutation(8)[:n].astype(np.uint64)
    want = image.copy()
    buf = b""
    for i, p in enumerate(pfns):
        old = image[int(p) * PAGE:(int(p) + 1) * PAGE]
        new = _mutated(old, rng, fracs[i])
        buf += _enc(old, new, fulls[i])
        want[int(p) * PAGE:(int(p) + 1) * PAGE] = new
    r, _ = both("delta_index", buf, n, locate=100)
    assert r[0] == "ok", r
    starts, kinds = r[1]
    assert int(starts[-1]) == len(buf) and sum(kinds.values()) == n
    r, args = both("delta_apply", buf, starts, pfns, image)
    assert r == ("ok", n)
    assert np.array_equal(args[3], want)


@given(buf=st.binary(max_size=300), n=st.integers(0, 5))
@budget(300)
def test_delta_index_random_bytes(buf, n):
    both("delta_index", buf, n, locate=10)


@given(data=st.data())
@budget(150)
def test_delta_apply_forged_starts(data):
    """starts may come from anywhere: every access is bounds-checked again,
    and whatever is written before a fault is the same in both twins."""
    buf = data.draw(st.binary(min_size=0, max_size=400))
    n = data.draw(st.integers(0, 4))
    starts = np.array(data.draw(st.lists(st.integers(0, len(buf) + 3), min_size=n + 1,
                                         max_size=n + 1)), dtype=np.uint64)
    pfns = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
                    dtype=np.uint64)
    first = data.draw(st.integers(0, n))
    count = data.draw(st.integers(0, n - first))
    image = _pages(4, 1)
    both("delta_apply", buf, starts, pfns, image, first, count, locate=5)


FULL = b"\x80" + bytes(range(256)) * 16

DELTA_FAULTS = [
    # (buffer, npages, code, index, offset, message fragment)
    (b"", 1, faults.PAGES_SHORT, 0, 0, "compressed data ends inside page 0"),
    (b"\x00", 2, faults.PAGES_SHORT, 1, 1, "compressed data ends inside page 1"),
    (b"\x00\x00\x00", 2, faults.PAGES_EXTRA, 2, 2, "compressed data continues after the last page"),
    (FULL[:100], 1, faults.RUN_PAST_BUFFER, 0, 0, "compressed page 0 runs past the end"),
    (b"\x00" + FULL[:-1], 2, faults.RUN_PAST_BUFFER, 1, 1, "compressed page 1 runs past"),
    (bytes([0x81, 0x00]), 1, faults.ZERO_MARKER, 0, 1, "zero-length RUN/SKIP marker in compressed page 0"),
    (bytes([0x81, 0x80]), 1, faults.ZERO_MARKER, 0, 1, "zero-length"),
    (bytes([0xFF] * 8 + [0x89]), 1, faults.RUN_PAST_PAGE, 0, 8, "compressed run crosses the end of page 0"),
    (bytes([0xFF] * 8) + bytes([0x09]) + b"\x22" * 36, 1, faults.RUN_PAST_PAGE, 0, 8, "crosses the end"),
    (bytes([0x7F]) + b"\x11" * 100, 1, faults.RUN_PAST_BUFFER, 0, 0, "runs past the end"),
    (bytes([0xFF] * 8), 1, faults.PAGES_SHORT, 0, 8, "compressed data ends inside page 0"),
    (b"\x00" + bytes([0x81]), 2, faults.PAGES_SHORT, 1, 2, "ends inside page 1"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DELTA_FAULTS, ids=lambda c: f"code{c[2]}-len{len(c[0])}")
def test_delta_index_faults(impl, case):
    buf, n, code, index, offset, msg = case
    exc = fault_of(impl_of(impl).delta_index, buf, n, locate=1000)
    assert (exc.code, exc.index, exc.offset) == (code, index, 1000 + offset)
    assert msg in str(exc)
    assert str(exc).endswith(f"at offset {1000 + offset}")


def test_delta_fault_table_agrees():
    for buf, n, *_ in DELTA_FAULTS:
        both("delta_index", buf, n, locate=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_exact_page(impl):
    """Markers that cover exactly 4096 bytes, RUN bytes replacing, SKIP keeping."""
    k = impl_of(impl)
    buf = bytes([0x02]) + b"\xAA" * 8 + bytes([0xFF] * 8) + bytes([0x80 | 6])
    # 2 + 8*127 + 6 = 1024 words
    starts, kinds = k.delta_index(buf, 1)
    assert kinds == {"empty": 0, "full": 0, "delta": 1}
    image = np.full(2 * PAGE, 0x33, np.uint8)
    k.delta_apply(buf, starts, np.array([1], np.uint64), image)
    assert image[:PAGE].tolist() == [0x33] * PAGE
    assert image[PAGE:PAGE + 8].tolist() == [0xAA] * 8
    assert image[PAGE + 8:].tolist() == [0x33] * (PAGE - 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_apply_pfn_fault_untouched(impl):
    k = impl_of(impl)
    buf = b"\x00" + FULL + FULL
    starts, _ = k.delta_index(buf, 3)
    image = np.zeros(2 * PAGE, np.uint8)
    exc = fault_of(k.delta_apply, buf, starts, np.array([0, 1, 2], np.uint64), image,
                   locate=50)
    assert (exc.code, exc.index, exc.offset) == (faults.PFN_RANGE, 2, 50)
    assert not image.any()
    exc = fault_of(k.delta_apply, buf, starts, np.array([0, 1, 9], np.uint64), image, 1, 2)
    assert exc.index == 2, "the index counts from page 0, not from `first`"
    assert k.delta_apply(buf, starts, np.array([0, 1, 9], np.uint64), image, 1, 1) == 1
    assert image[PAGE:].tobytes() == FULL[1:]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("first,count", [(-1, 1), (0, 4), (2, 2), (4, 0), (0, -1)])
def test_delta_apply_bad_range(impl, first, count):
    k = impl_of(impl)
    buf = b"\x00\x00\x00"
    starts, _ = k.delta_index(buf, 3)
    with pytest.raises(ValueError):
        k.delta_apply(buf, starts, np.zeros(3, np.uint64), np.zeros(PAGE, np.uint8), first,
                      count)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_locate_callable(impl):
    """Offsets of a buffer stitched from several chunks map back to the stream."""
    buf = b"\x00" * 5 + bytes([0x81, 0x00])
    exc = fault_of(impl_of(impl).delta_index, buf, 6,
                   locate=lambda off: (100 + off) if off < 4 else (900 + off))
    assert exc.code == faults.ZERO_MARKER and exc.offset == 900 + 6


# Found here: delta_index allocated starts[npages + 1] before looking at the
# buffer, so an untrusted count of 2^40 asked for 8 TiB (fixed: each page takes
# at least one byte, so at most len(buf) pages are walked).
@pytest.mark.parametrize("impl", IMPLS)
def test_delta_index_huge_count(impl):
    exc = fault_of(impl_of(impl).delta_index, b"\x00\x00", 1 << 40)
    assert (exc.code, exc.index, exc.offset) == (faults.PAGES_SHORT, 2, 2)


# =========================================================== the boundary
def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a):
    b = np.repeat(a, 2)
    return b[::2]


# Argument checks: (name, kernel, call builder, expected exception).  The
# builder returns (args, kwargs) for a call that is otherwise valid.
def _dec(types=None, pfns=None, data=None, raw=None):
    raw = entries(8, [1, 2, 0xF0000000]) if raw is None else raw
    return (raw, 8, 16, types, pfns, data), {}


def _scat(pages=None, pfns=None, image=None):
    return ((_pages(2) if pages is None else pages),
            (np.array([1, 0], np.uint64) if pfns is None else pfns),
            (np.zeros(3 * PAGE, np.uint8) if image is None else image)), {}


def _cmp(pages=None, pfns=None, image=None):
    return ((_pages(2) if pages is None else pages),
            (np.array([1, 0], np.uint64) if pfns is None else pfns),
            (np.zeros(3 * PAGE, np.uint8) if image is None else image)), {}


def _dapply(starts=None, pfns=None, image=None):
    buf = b"\x00" + FULL
    st_ = np.array([0, 1, len(buf)], np.uint64) if starts is None else starts
    return (buf, st_, (np.array([0, 1], np.uint64) if pfns is None else pfns),
            (np.zeros(2 * PAGE, np.uint8) if image is None else image)), {}


U8, U64 = np.uint8, np.uint64
BOUNDARY = [
    # decode_pfns outputs
    ("decode types int64", "decode_pfns", lambda: _dec(types=np.zeros(3, np.int64)), TypeError),
    ("decode pfns >u8", "decode_pfns", lambda: _dec(pfns=np.zeros(3, ">u8")), TypeError),
    ("decode data >u8", "decode_pfns", lambda: _dec(data=np.zeros(3, ">u8")), TypeError),
    ("decode pfns int64", "decode_pfns", lambda: _dec(pfns=np.zeros(3, np.int64)), TypeError),
    ("decode pfns list", "decode_pfns", lambda: _dec(pfns=[0, 0, 0]), TypeError),
    ("decode types read-only", "decode_pfns", lambda: _dec(types=_ro(np.zeros(3, U8))), ValueError),
    ("decode pfns read-only", "decode_pfns", lambda: _dec(pfns=_ro(np.zeros(3, U64))), ValueError),
    ("decode pfns strided", "decode_pfns", lambda: _dec(pfns=_strided(np.zeros(3, U64))), ValueError),
    ("decode types F-order 2-D", "decode_pfns",
     lambda: _dec(types=np.zeros((3, 2), U8, order="F")), ValueError),
    ("decode types short", "decode_pfns", lambda: _dec(types=np.zeros(2, U8)), ValueError),
    ("decode pfns short", "decode_pfns", lambda: _dec(pfns=np.zeros(2, U64)), ValueError),
    ("decode data short", "decode_pfns", lambda: _dec(data=np.zeros(2, U64)), ValueError),
    ("decode ragged raw", "decode_pfns", lambda: _dec(raw=b"\x00" * 13), ValueError),
    ("decode strided raw", "decode_pfns", lambda: _dec(raw=memoryview(bytes(48))[::2]), BufferError),
    # scatter_pages
    ("scatter image bytearray", "scatter_pages", lambda: _scat(image=bytearray(3 * PAGE)), TypeError),
    ("scatter image uint32", "scatter_pages", lambda: _scat(image=np.zeros(3 * PAGE, np.uint32)), TypeError),
    ("scatter image 2-D", "scatter_pages", lambda: _scat(image=np.zeros((3, PAGE), U8)), TypeError),
    ("scatter image read-only", "scatter_pages", lambda: _scat(image=_ro(np.zeros(3 * PAGE, U8))), ValueError),
    ("scatter image strided", "scatter_pages", lambda: _scat(image=_strided(np.zeros(3 * PAGE, U8))), ValueError),
    ("scatter pfns short", "scatter_pages", lambda: _scat(pfns=np.array([1], U64)), ValueError),
    ("scatter ragged pages", "scatter_pages", lambda: _scat(pages=np.zeros(PAGE + 1, U8)), ValueError),
    # compare_pages
    ("compare image uint32", "compare_pages", lambda: _cmp(image=np.zeros(3 * PAGE, np.uint32)), TypeError),
    ("compare image strided", "compare_pages", lambda: _cmp(image=_strided(np.zeros(3 * PAGE, U8))), ValueError),
    ("compare pfns short", "compare_pages", lambda: _cmp(pfns=np.array([1], U64)), ValueError),
    # delta_apply
    ("delta starts int64", "delta_apply", lambda: _dapply(starts=np.array([0, 1, 4098], np.int64)), TypeError),
    ("delta starts >u8", "delta_apply", lambda: _dapply(starts=np.array([0, 1, 4098], ">u8")), TypeError),
    ("delta pfns short", "delta_apply", lambda: _dapply(pfns=np.array([0], U64)), ValueError),
    ("delta image read-only", "delta_apply", lambda: _dapply(image=_ro(np.zeros(2 * PAGE, U8))), ValueError),
    ("delta image strided", "delta_apply", lambda: _dapply(image=_strided(np.zeros(2 * PAGE, U8))), ValueError),
    ("delta image uint16", "delta_apply", lambda: _dapply(image=np.zeros(PAGE, np.uint16)), TypeError),
]

# Found here: the reference twin lacked most of these checks (it converted
# '>u8' and int64 outputs silently, wrote a strided image into a temporary
# copy, and failed short pfns with IndexError).  Both twins now share
# xlegacy/kernels/_args.py.
def _boundary_params():
    out = []
    for case in BOUNDARY:
        out.append(pytest.param("native", case, id=f"native-{case[0]}", marks=needs_native))
        out.append(pytest.param("reference", case, id=f"reference-{case[0]}"))
    return out


@pytest.mark.parametrize("impl,case", _boundary_params())
def test_boundary_checks(impl, case):
    name, fn, build, exc_type = case
    args, kwargs = build()
    with pytest.raises(exc_type) as info:
        getattr(impl_of(impl), fn)(*args, **kwargs)
    assert not isinstance(info.value, StreamError), "an argument error is not a stream error"


@pytest.mark.parametrize("impl", IMPLS)
def test_boundary_accepts(impl):
    """What the boundary must accept: any contiguous bytes-like input,
    '>u8' or Python-list pfns (converted), images larger than needed, and an
    F-ordered but 1-D (so also C-contiguous) array."""
    k = impl_of(impl)
    raw = entries(8, [1, 2])
    for src in (raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, U8),
                np.frombuffer(raw, "<u8"), np.asfortranarray(np.frombuffer(raw, U8))):
        assert k.decode_pfns(src, 8, 16)[2].tolist() == [1, 2]
    image = np.zeros(4 * PAGE + 100, U8)
    pages = _pages(2)
    for pf in (np.array([3, 0], ">u8"), [3, 0], np.array([3, 0], np.int64),
               np.array([3, 0, 99], U64)):
        image[:] = 0
        assert k.scatter_pages(pages, pf, image) == 2
        assert image[3 * PAGE:4 * PAGE].tobytes() == pages[:PAGE].tobytes()
    exc = fault_of(k.scatter_pages, pages, [4, 0], image)     # the partial page is no page
    assert exc.code == faults.PFN_RANGE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p2m", [-1, 1 << 64])
def test_decode_p2m_out_of_uint64(impl, p2m):
    with pytest.raises(OverflowError):
        impl_of(impl).decode_pfns(entries(8, [1]), 8, p2m)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("width", [0, 2, 3, 16, -8])
def test_decode_bad_width(impl, width):
    with pytest.raises(ValueError):
        impl_of(impl).decode_pfns(b"\x00" * 16, width, 16)


@needs_native
def test_native_bad_arg_fault_is_value_error():
    """XL_E_BAD_ARG reaches Python only through a wrapper bug; it must still be
    a plain ValueError, never a StreamError with an offset."""
    with pytest.raises(ValueError) as info:
        faults.raise_fault(faults.BAD_ARG, 0, 0, 5, 4)
    assert not isinstance(info.value, StreamError)
    with pytest.raises(RuntimeError):
        faults.raise_fault(-99, 0, 0, 0, 0)


@needs_native
def test_native_kernel_direct_bad_width():
    from xlegacy.kernels._native import ffi, lib
    fault = ffi.new("xl_fault *")
    out = ffi.new("uint8_t[1]")
    pf = ffi.new("uint64_t[1]")
    rc = lib.xl_decode_pfns(b"\x00" * 8, 1, 5, 16, out, pf, pf, 1, fault)
    assert rc == faults.BAD_ARG and fault.value == 5
    # a data_pfns capacity smaller than the data entries is refused, not overrun
    rc = lib.xl_decode_pfns(struct.pack("<2Q", 1, 2), 2, 8, 16, ffi.new("uint8_t[2]"),
                            ffi.new("uint64_t[2]"), pf, 1, fault)
    assert rc == faults.BAD_ARG and (fault.index, fault.value, fault.limit) == (1, 1, 1)


@needs_native
def test_native_null_fault_pointer():
    """Every kernel accepts fault == NULL."""
    from xlegacy.kernels._native import ffi, lib
    rc = lib.xl_delta_index(b"\x81\x00", 2, 1, ffi.new("uint64_t[2]"), ffi.NULL, ffi.NULL)
    assert rc == faults.ZERO_MARKER
    rc = lib.xl_scatter_pages(bytes(PAGE), 1, ffi.new("uint64_t[1]", [5]),
                              ffi.new("uint8_t[4096]"), 1, ffi.NULL)
    assert rc == faults.PFN_RANGE


def test_reference_twins_are_complete():
    names = ("decode_pfns", "scatter_pages", "pwrite_pages", "compare_pages", "delta_index",
             "delta_apply", "pread_pages", "copy_pages", "pwrite_at", "pread_at", "delta_scan")
    for n in names:
        assert callable(getattr(_reference, n))
        if _native is not None:
            assert callable(getattr(_native, n))


# =========================================================== delta_decode (fused)
@given(n=st.integers(0, 6), seed=st.integers(0, 1000),
       fracs=st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.9, 1.0]), min_size=6, max_size=6),
       fulls=st.lists(st.booleans(), min_size=6, max_size=6))
@budget(120)
def test_delta_decode_matches_index_then_apply(n, seed, fracs, fulls):
    """The one-pass decoder gives the image and kinds of the two-pass form,
    natively and in the reference twin."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, 8 * PAGE, dtype=np.uint8)
    pfns = rng.permutation(8)[:n].astype(np.uint64)
    buf = b""
    for i, p in enumerate(pfns):
        old = image[int(p) * PAGE:(int(p) + 1) * PAGE]
        buf += _enc(old, _mutated(old, rng, fracs[i]), fulls[i])
    two = image.copy()
    starts, kinds = _reference.delta_index(buf, n)
    _reference.delta_apply(buf, starts, pfns, two)
    r, args = both("delta_decode", buf, pfns, image)
    assert r == ("ok", kinds)
    assert np.array_equal(args[2], two)


@given(buf=st.binary(max_size=300), n=st.integers(0, 5), seed=st.integers(0, 99))
@budget(300)
def test_delta_decode_random_bytes(buf, n, seed):
    """Any bytes: same outcome and the same partially written image in both."""
    pfns = np.random.default_rng(seed).permutation(5)[:n].astype(np.uint64)
    both("delta_decode", buf, pfns, _pages(5, 1), locate=7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", DELTA_FAULTS, ids=lambda c: f"code{c[2]}-len{len(c[0])}")
def test_delta_decode_faults(impl, case):
    """Every fault of the index pass, with the same code, page and offset."""
    buf, n, code, index, offset, msg = case
    image = np.zeros(n * PAGE, np.uint8)
    exc = fault_of(impl_of(impl).delta_decode, buf, np.arange(n, dtype=np.uint64), image,
                   locate=1000)
    assert (exc.code, exc.index, exc.offset) == (code, index, 1000 + offset)
    assert msg in str(exc)


@pytest.mark.parametrize("impl", IMPLS)
def test_delta_decode_pfn_checked_first(impl):
    image = np.zeros(2 * PAGE, np.uint8)
    exc = fault_of(impl_of(impl).delta_decode, FULL + FULL, np.array([0, 2], np.uint64), image)
    assert exc.code == faults.PFN_RANGE and exc.index == 1
    assert not image.any(), "nothing may be written when a pfn is out of range"


@pytest.mark.parametrize("fn", ["delta_decode", "delta_apply"])
def test_delta_streaming_stores_unaligned_image(fn):
    """Large calls copy FULL pages with non-temporal stores, which need an
    aligned destination: an image that starts off 16-byte alignment must
    still decode correctly (and not fault)."""
    if _native is None:
        pytest.skip("native backend not built")
    n = 2048
    pages = np.random.default_rng(3).integers(0, 256, (n, PAGE), dtype=np.uint8)
    buf = b"".join(b"\x80" + p.tobytes() for p in pages)
    pfns = np.arange(n, dtype=np.uint64)
    for shift in (0, 1, 8):
        raw = np.zeros(n * PAGE + 64, np.uint8)
        image = raw[shift:shift + n * PAGE]
        if fn == "delta_decode":
            _native.delta_decode(buf, pfns, image)
        else:
            starts, _ = _native.delta_index(buf, n)
            _native.delta_apply(buf, starts, pfns, image)
        assert np.array_equal(image.reshape(n, PAGE), pages), shift


def _bounce_set(n, seed):
    """A checkpoint of n pages mixing every shape the large-call decoder
    tells apart: all words changed (RUNs only), nearly all (a few SKIPs),
    a long first RUN then mostly SKIPs, scattered words, FULL and EMPTY."""
    from xlegacy.testing.compress import encode_pages
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    words = old.copy().view("<u4")
    shape = np.arange(n) % 6
    changed = np.zeros(words.shape, bool)
    changed[shape == 0] = True
    changed[shape == 1] = rng.random((int((shape == 1).sum()), PAGE // 4)) < 0.97
    first = np.zeros(PAGE // 4, bool)
    first[:100] = True
    changed[shape == 2] = first | (rng.random(PAGE // 4) < 0.02)
    changed[shape == 3] = rng.random((int((shape == 3).sum()), PAGE // 4)) < 0.1
    changed[shape == 4] = True
    words[changed] ^= rng.integers(1, 1 << 32, int(changed.sum()), dtype=np.uint32)
    new = words.view(np.uint8)
    buf, _, _ = encode_pages(new, old, shape == 4)
    return old, new, np.ascontiguousarray(buf)


@needs_native
@pytest.mark.parametrize("fn", ["delta_decode", "delta_apply"])
@pytest.mark.parametrize("shift", [0, 1])
def test_delta_large_call_page_shapes(fn, shift):
    """Large calls (>= 2048 pages, streamed stores when the image is
    aligned) give the reference's image for every page shape, shuffled pfns."""
    n = 2048 + 6
    old, new, buf = _bounce_set(n, 5)
    pfns = np.random.default_rng(6).permutation(n).astype(np.uint64)
    raw = np.zeros(n * PAGE + 64, np.uint8)
    image = raw[shift:shift + n * PAGE]
    image.reshape(n, PAGE)[pfns.astype(np.intp)] = old
    if fn == "delta_decode":
        _native.delta_decode(buf, pfns, image)
    else:
        starts, _ = _native.delta_index(buf, n)
        _native.delta_apply(buf, starts, pfns, image)
    assert np.array_equal(image.reshape(n, PAGE)[pfns.astype(np.intp)], new)


@needs_native
@pytest.mark.parametrize("cut", [1, 700, 4097])
def test_delta_large_call_fault_leaves_same_image(cut):
    """A buffer cut short inside a large call: the same fault and the same
    partly written image as the reference twin."""
    n = 2048 + 6
    old, _, buf = _bounce_set(n, 7)
    image = np.ascontiguousarray(old.reshape(-1))
    both("delta_decode", buf[:len(buf) - cut], np.arange(n, dtype=np.uint64), image)


# =========================================================== gather_pages
@given(image_pages=st.integers(1, 9), pfns=st.lists(st.integers(0, 11), max_size=8),
       seed=st.integers(0, 5))
@budget(100)
def test_gather_pages_random(tmp_path_factory, image_pages, pfns, seed):
    """Pages read back from an image file by pfn; out-of-range pfns fault
    before any read, in both twins."""
    path = tmp_path_factory.mktemp("gather") / "img"
    data = _pages(image_pages, seed)
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        p = np.array(pfns, np.uint64)
        r, args = both("gather_pages", fd, p, np.zeros(len(pfns) * PAGE, np.uint8), image_pages)
        if r[0] == "ok":
            want = b"".join(data[int(x) * PAGE:(int(x) + 1) * PAGE].tobytes() for x in pfns)
            assert args[2].tobytes() == want
        else:
            assert any(x >= image_pages for x in pfns)
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_pages_short_file(impl, tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(PAGE + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        exc = fault_of(impl_of(impl).gather_pages, fd, np.array([0, 1], np.uint64),
                       np.zeros(2 * PAGE, np.uint8), 4)
        assert exc.code == faults.SHORT_READ and exc.index == 1
    finally:
        os.close(fd)


# =========================================================== pwrite_at / pread_at
def _file_side(mod, fn, tmp, name, size, *args):
    """Run mod.fn on a fresh file of `size` zero bytes (its descriptor is
    the first argument); -> (outcome, the file's bytes afterwards)."""
    path = tmp / f"{name}-{mod.NAME}"
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDWR)
    try:
        res = outcome(getattr(mod, fn), fd, *args)
    finally:
        os.close(fd)
    return res, path.read_bytes()


@given(src_pages=st.integers(0, 4), extra=st.integers(0, 4100),
       at=st.lists(st.integers(0, 5 * PAGE), max_size=8),
       pfns=st.lists(st.integers(0, 9), min_size=8, max_size=8), image_pages=st.integers(0, 9),
       seed=st.integers(0, 5))
@budget(150)
def test_pwrite_at_random(tmp_path_factory, src_pages, extra, at, pfns, image_pages, seed):
    """Pages from anywhere in a buffer to pfns of a file: both twins write
    the same bytes, and refuse (before writing anything) a page past the
    buffer's end or a pfn past the image."""
    if _native is None:
        pytest.skip("native backend not built")
    tmp = tmp_path_factory.mktemp("pwrite_at")
    src = np.random.default_rng(seed).integers(0, 256, src_pages * PAGE + extra, np.uint8)
    a = np.array(at, np.uint64)
    p = np.array(pfns[:len(at)], np.uint64)
    size = image_pages * PAGE
    (ra, fa), (rb, fb) = (_file_side(m, "pwrite_at", tmp, "w", size, src, a, p, image_pages)
                          for m in (_native, _reference))
    check_same("pwrite_at", ra, rb)
    assert fa == fb
    if ra[0] == "ok":
        want = bytearray(size)
        for x, q in zip(at, p):
            want[int(q) * PAGE:(int(q) + 1) * PAGE] = src[x:x + PAGE].tobytes()
        assert fa == bytes(want)
    else:
        assert fa == bytes(size)                  # checked before any write


@given(file_bytes=st.integers(0, 6 * PAGE), offs=st.lists(st.integers(0, 7 * PAGE), max_size=8),
       at=st.lists(st.integers(0, 4 * PAGE), min_size=8, max_size=8),
       out_pages=st.integers(0, 5))
@budget(150)
def test_pread_at_random(tmp_path_factory, file_bytes, offs, at, out_pages):
    """Pages from byte offsets of a file into anywhere in a buffer: the same
    bytes, the same short-read fault (index, offset) in both twins."""
    path = tmp_path_factory.mktemp("pread_at") / "in"
    data = _pages(7, 4)[:file_bytes]
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        o = np.array(offs, np.uint64)
        a = np.array(at[:len(offs)], np.uint64)
        r, args = both("pread_at", fd, o, np.zeros(out_pages * PAGE, np.uint8), a)
        if r[0] == "ok":                         # in order: a later page overwrites
            want = np.zeros(out_pages * PAGE, np.uint8)
            for x, y in zip(offs, a):
                want[int(y):int(y) + PAGE] = data[x:x + PAGE]
            assert args[2].tobytes() == want.tobytes()
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_pread_at_faults(impl, tmp_path):
    k = impl_of(impl)
    path, data = _datafile(tmp_path, 3)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.zeros(4 * PAGE, np.uint8)
        # neighbouring offsets are one preadv; the file ends inside page 2
        exc = fault_of(k.pread_at, fd, np.array([100, 100 + PAGE, 100 + 2 * PAGE + 50]), out,
                       np.array([0, PAGE, 2 * PAGE]))
        assert exc.code == faults.SHORT_READ and exc.index == 2
        with pytest.raises(ValueError):                   # a page past the buffer
            k.pread_at(fd, np.array([0]), out, np.array([3 * PAGE + 1]))
        with pytest.raises(ValueError):                   # an offset past int64
            k.pread_at(fd, np.array([(1 << 63) - 100], np.uint64), out, np.array([0]))
        with pytest.raises(OSError) as info:
            k.pread_at(-1, np.array([0]), out, np.array([0]))
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_pwrite_at_coalesces_neighbours(impl, tmp_path, monkeypatch):
    """Neighbouring pfns whose pages lie apart in the buffer (one pwritev)
    each land at their own pfn; the pfns before them stay untouched."""
    k = impl_of(impl)
    src = _pages(6, 9)
    path = tmp_path / "img"
    path.write_bytes(bytes(8 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        k.pwrite_at(fd, src, np.array([5, 0, 3, 1], np.uint64) * PAGE,
                    np.array([2, 3, 4, 7], np.uint64), 8)
    finally:
        os.close(fd)
    got = path.read_bytes()
    for q, s in ((2, 5), (3, 0), (4, 3), (7, 1)):
        assert got[q * PAGE:(q + 1) * PAGE] == src[s * PAGE:(s + 1) * PAGE].tobytes()
    assert got[:2 * PAGE] == bytes(2 * PAGE)


# =========================================================== delta_scan
@given(buf=st.binary(max_size=300), k=st.integers(0, 6))
@budget(200)
def test_delta_scan_random_bytes(buf, k):
    both("delta_scan", buf, k)


@given(n=st.integers(0, 12), cut=st.integers(0, 1 << 16), k=st.integers(0, 14),
       seed=st.integers(0, 50))
@budget(150)
def test_delta_scan_takes_the_whole_pages(n, cut, k, seed):
    """On a valid buffer cut anywhere: the pages taken are exactly those
    delta_index finds that end at or before the cut (at most k), and the
    bytes walked end the last of them."""
    old, new, buf = _bounce_set(n, seed) if n else (None, None, np.zeros(0, np.uint8))
    starts, _ = _reference.delta_index(buf, n)
    cut = min(cut, buf.size)
    r, _ = both("delta_scan", buf[:cut], k)
    got, used = r[1]
    whole = [i for i in range(n) if int(starts[i + 1]) <= cut][:k]
    assert list(got) == [int(starts[i]) for i in whole]
    assert used == (int(starts[len(whole)]) if whole else 0)
