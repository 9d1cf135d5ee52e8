"""`xlegacy bench`: throughput of the kernels and of whole-stream operations,
each measured beside its baselines in the same run.

The measurement engine, the synthetic inputs and the group builders live
here so that the command and the pytest-benchmark suite in bench/ measure
exactly the same operations.

Vocabulary:
  group     one operation on one input: xlegacy's way of doing it (the
            subject cases, marked *) and baselines: numpy copies of the same
            bytes, reading or cp-ing the stream file, the reference twin, the
            best plain-numpy version;
  case      one timed callable of a group, with the number of bytes its
            throughput is counted on (the group's unit, e.g. guest page bytes);
  ratio     GB/s of a case / GB/s of the group's primary baseline; for cases
            over the same bytes that is baseline time / case time.

Cases of a group run interleaved (the order rotates every round) after one
untimed warm-up round, so noise from other work spreads over all of them;
the table gives medians with min and max.

Memory that is "fresh" (a new image, a new output file's page cache) is
primed before each timed run: on a VM whose host reclaims free guest memory
(virtio-balloon free page reporting) the first touch of such memory costs
host page faults, more than the copy itself.  Priming gives every case the
same, host-backed memory; --no-prime shows the other behaviour.
"""
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from ..kernels import _reference
from .. import kernels
from .._version import __version__
from ..format import PAGE_SIZE
from ..image import anonymous_buffer

try:
    from ..kernels import _native
except ImportError:  # pragma: no cover - reference-only installs
    _native = None

DESCRIPTION = """\
Measure xlegacy beside its baselines and print a table: GB/s (median of the
rounds), the ratio to the group's primary baseline, and min/median/max time.

Without STREAM the inputs are generated: PFN arrays, page batches, Remus
compressed buffers of six kinds, and streams written by xlegacy's writer (an
xl save of an HVM guest with --size bytes of memory, and a compressed Remus
stream of the same guest with 10 more checkpoints).  With STREAM the kernels
run on that stream's own PFN arrays and largest compressed checkpoint, and
the whole-stream groups restore it.

Baselines, where they apply: numpy copies of the same bytes (into warm and
into fresh memory), reading the stream file, cp of the stream (and cp +
fsync), the reference (numpy) twin, and the best plain-numpy version of PFN
decoding and page scatter.  Peak RSS of a restore from a pipe and of an in-memory restore is
measured in child processes."""

EPILOG = """\
examples:
  xlegacy bench                       # about a minute; generated inputs
  xlegacy bench --size 1G --repeat 7  # the figures of bench/README.md
  xlegacy bench --quick               # seconds
  xlegacy bench guest.save --json     # your own stream, machine-readable
  xlegacy bench --only delta,pfn      # some groups (see --list)"""

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZE = 512 * MiB
QUICK_SIZE = 32 * MiB
MAX_KERNEL_BYTES = 256 * MiB
REF_STREAM_SIZE = 64 * MiB         # reference twin of uncompressed restores
REF_REMUS_SIZE = 4 * MiB           # ... of compressed ones (it walks markers in Python)
BATCH = 1024                       # entries per PFN array (MAX_BATCH)
REMUS_CHECKPOINTS = 10             # compressed checkpoints after the first


# ====================================================================== sizes
def parse_size(text):
    """'8M', '1G', '1.5GiB', '4096', '64k' -> bytes (binary units)."""
    s = str(text).strip().lower().replace(" ", "")
    for suffix in ("ib", "b"):
        if s.endswith(suffix) and len(s) > len(suffix) and not s[-len(suffix) - 1].isdigit():
            s = s[:-len(suffix)]
            break
    mult = 1
    if s and s[-1] in "kmgt":
        mult = 1 << (10 * ("kmgt".index(s[-1]) + 1))
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}: use e.g. 64M, 1G, 4096") from None
    n = int(value * mult)
    if n <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return n


def fmt_bytes(n):
    for unit, s in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= s:
            v = n / s
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


# ===================================================================== engine
@dataclass
class Case:
    """One timed callable.  `fn` must not return anything big: results that
    must outlive the call go into a Holder that `cleanup` empties, so freeing
    them is not timed."""
    name: str
    fn: Callable[[], object]
    nbytes: int
    role: str = "baseline"                 # "subject" or "baseline"
    setup: Optional[Callable[[], None]] = None    # untimed, before each run
    cleanup: Optional[Callable[[], None]] = None  # untimed, after each run
    note: str = ""


@dataclass
class Target:
    """An issue target: GB/s(subject) / GB/s(baseline) >= ratio (medians)."""
    subject: str
    baseline: str
    ratio: float
    text: str


@dataclass
class Group:
    key: str
    title: str
    unit: str                               # what the bytes of a case are
    cases: List[Case]
    primary: str                            # baseline the ratio column uses
    targets: List[Target] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    close: Optional[Callable[[], None]] = None

    def case(self, name):
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass
class CaseResult:
    name: str
    role: str
    nbytes: int
    times: List[float]
    note: str = ""

    @property
    def median(self):
        return float(np.median(self.times)) if self.times else math.nan

    @property
    def gbps(self):
        m = self.median
        return self.nbytes / m / 1e9 if m > 0 else math.inf

    def as_dict(self):
        return {"name": self.name, "role": self.role, "bytes": self.nbytes,
                "gb_per_s": round(self.gbps, 4),
                "seconds": {"min": min(self.times), "median": self.median,
                            "max": max(self.times), "all": list(self.times)},
                "note": self.note}


@dataclass
class GroupResult:
    key: str
    title: str
    unit: str
    primary: str
    cases: List[CaseResult]
    targets: List[Target]
    info: dict

    def result(self, name):
        for c in self.cases:
            if c.name == name:
                return c
        return None

    def ratio(self, name, baseline=None):
        a, b = self.result(name), self.result(baseline or self.primary)
        if a is None or b is None or not a.times or not b.times:
            return None
        return a.gbps / b.gbps

    def target_rows(self):
        rows = []
        for t in self.targets:
            r = self.ratio(t.subject, t.baseline)
            rows.append({"group": self.key, "target": t.text, "subject": t.subject,
                         "baseline": t.baseline, "need": t.ratio,
                         "ratio": None if r is None else round(r, 3),
                         "met": None if r is None else bool(r >= t.ratio)})
        return rows

    def as_dict(self):
        out = []
        for c in self.cases:
            r = self.ratio(c.name)
            out.append(dict(c.as_dict(), ratio=None if r is None else round(r, 4)))
        return {"key": self.key, "title": self.title, "unit": self.unit,
                "primary": self.primary, "info": self.info, "cases": out,
                "targets": self.target_rows()}


def run_case_once(case):
    """setup, gc, time fn, cleanup -> seconds."""
    if case.setup:
        case.setup()
    gc.collect()
    t0 = time.perf_counter()
    case.fn()
    dt = time.perf_counter() - t0
    if case.cleanup:
        case.cleanup()
    return dt


def run_group(group, repeat=5, warmup=1, log=None):
    """Time every case of `group` `repeat` times, interleaved (the order
    rotates each round), after `warmup` untimed rounds."""
    cases = list(group.cases)
    times = {c.name: [] for c in cases}
    for _ in range(warmup):
        for c in cases:
            run_case_once(c)
    for r in range(repeat):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            times[c.name].append(run_case_once(c))
        if log:
            log(f"  {group.key}: round {r + 1}/{repeat}")
    return GroupResult(group.key, group.title, group.unit, group.primary,
                       [CaseResult(c.name, c.role, c.nbytes, times[c.name], c.note)
                        for c in cases], group.targets, group.info)


# ============================================================ shared baselines
class Holder:
    """Keeps a case's output alive until cleanup (freeing is not timed)."""

    def __init__(self):
        self.value = None

    def clear(self):
        self.value = None


PRIME = {"on": True}


def prime_memory(nbytes):
    """Touch and free nbytes of anonymous memory, so that the next fresh
    allocation gets host-backed pages (see the module docstring)."""
    if not PRIME["on"] or nbytes <= 0:
        return
    m = anonymous_buffer(nbytes)
    m[::PAGE_SIZE] = 1
    del m


def _chain(*fns):
    fns = [f for f in fns if f is not None]

    def run():
        for f in fns:
            f()
    return run


def copy_cases(src, nbytes, label="numpy copy", fresh=True, warm=True):
    """numpy copy of `src` into a warm destination and into freshly mapped
    memory (anonymous, MADV_HUGEPAGE, like the restore image)."""
    src = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src
    out = []
    if warm:
        dst = np.empty_like(src)
        dst[:] = src                     # touch it now: warm
        out.append(Case(f"{label} (warm destination)", lambda: np.copyto(dst, src), nbytes))
    if fresh:
        h = Holder()

        def setup():
            prime_memory(src.size)
            h.value = anonymous_buffer(src.size)

        out.append(Case(f"{label} (fresh memory)", lambda: np.copyto(h.value, src), nbytes,
                        setup=setup, cleanup=h.clear))
    return out


def read_file(path, bufsize=MiB):
    """Read a whole file with readinto into one reused buffer (no parsing)."""
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                return total
            total += n


def _unlinker(path):
    def unlink():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return unlink


def cp_case(path, nbytes, workdir, name="cp of the stream"):
    dst = os.path.join(workdir, "cp-baseline.out")
    unlink = _unlinker(dst)
    size = os.path.getsize(path)
    return Case(name, lambda: subprocess.run(["cp", path, dst], check=True), nbytes,
                setup=_chain(unlink, lambda: prime_memory(size)), cleanup=unlink)


def cp_fsync_case(path, nbytes, workdir):
    """cp, then fsync of the copy: the baseline for a restore that makes its
    output durable before renaming it into place (restore's default)."""
    dst = os.path.join(workdir, "cp-baseline.out")
    unlink = _unlinker(dst)
    size = os.path.getsize(path)

    def run():
        subprocess.run(["cp", path, dst], check=True)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    return Case("cp of the stream + fsync of the copy", run, nbytes,
                setup=_chain(unlink, lambda: prime_memory(size)), cleanup=unlink)


def read_case(path, nbytes):
    return Case("read the stream file (1 MiB readinto)", lambda: read_file(path), nbytes)


def warm_page_cache(path):
    """Put the file in the page cache as one sequential read leaves it.

    Drop its cached pages first (posix_fadvise DONTNEED; clean pages only):
    after memory pressure a file's cache can be left in small pieces, which
    made reading the same 1 GiB file 1.6x slower (61 ms against 37 ms) and
    every restore of it with it.  Re-reading it whole gives each run the
    same starting point."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)
    read_file(path, 8 * MiB)


@contextmanager
def reference_kernels():
    """Run the package on the reference twins (in this process, for a while):
    every kernel that xlegacy.kernels exports and _reference implements."""
    names = [n for n in dir(kernels) if callable(getattr(kernels, n)) and not n.startswith("_")
             and callable(getattr(_reference, n, None))]
    saved = {n: getattr(kernels, n) for n in names}
    try:
        for n in names:
            setattr(kernels, n, getattr(_reference, n))
        yield
    finally:
        for n, f in saved.items():
            setattr(kernels, n, f)


# ======================================================= PFN decoding inputs
_DATA_LUT = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
_INVALID_LUT = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)


def pfn_entries(n, width, seed=1, kind="mixed"):
    """n PFN-array entries (raw little-endian bytes) and the p2m_size.

    kind "mixed": what a save looks like: ascending pfns, about 1% PV
    page-table types (L1..L4, some pinned) scattered, bare XTAB entries in
    runs (holes), a few XALLOC.  kind "random": every entry's type drawn at
    random from {NOTAB x6, L1TAB, XTAB}, which defeats branch prediction.
    """
    rng = np.random.default_rng(seed)
    pfns = np.arange(n, dtype=np.uint64)
    types = np.zeros(n, dtype=np.uint64)
    if kind == "random":
        types = rng.choice(np.array([0, 0, 0, 0, 0, 0, 1, 0xF], np.uint64), n)
    else:
        pt = rng.random(n) < 0.01
        types[pt] = rng.choice(np.array([1, 2, 3, 4, 9, 0xA, 0xB, 0xC], np.uint64),
                               int(pt.sum()))
        types[(pfns % 8192) >= 8192 - 64] = 0xF          # a 64-entry hole every 8192
        types[rng.random(n) < 0.001] = 0xE
    entries = (types << np.uint64(28)) | pfns
    entries[types == 0xF] = 0xF0000000                  # bare XTAB, as the saver writes
    return entries.astype("<u8" if width == 8 else "<u4").tobytes(), n


def numpy_decode_pfns(raw, width, p2m_size, types, pfns):
    """The best plain-numpy PFN decoder we know: the kernel's outputs and
    checks, writing types/pfns into caller-supplied (warm) arrays.
    Returns (types, pfns, data_pfns)."""
    e = np.frombuffer(raw, dtype="<u4" if width == 4 else "<u8")
    n = e.size
    if width == 8:
        halves = e.view("<u4")
        if halves[1::2].any():
            raise ValueError("entry with bits 63..32 set")
        lo = halves[0::2]
    else:
        lo = e
    t = types[:n]
    np.right_shift(lo, 28, out=t, casting="unsafe")
    p = pfns[:n]
    np.bitwise_and(lo, 0x0FFFFFFF, out=p, casting="unsafe")
    if _INVALID_LUT[t].any():
        raise ValueError("bogus page type")
    if n and p.max() >= p2m_size and ((p >= p2m_size) & (t != 0xF)).any():
        raise ValueError("pfn out of range")
    return t, p, p[_DATA_LUT[t]]


def _batches(raw, width):
    step = BATCH * width
    mv = memoryview(raw)
    return [mv[i:i + step] for i in range(0, len(raw), step)]


def pfn_group(width, nentries=None, raw=None, p2m_size=None, seed=1, kind="mixed",
              source="synthetic"):
    """PFN decoding of `width`-byte entries (4 or 8): one call over all
    entries, and 1024-entry calls as the reader makes them."""
    if raw is None:
        raw, p2m_size = pfn_entries(nentries, width, seed, kind)
    n = len(raw) // width
    nbytes = len(raw)
    batches = _batches(raw, width)
    T = np.empty(n, np.uint8)
    P = np.empty(n, np.uint64)
    D = np.empty(n, np.uint64)
    one, per = "native, one call (warm outputs)", "native, 1024-entry calls (as the reader)"
    np_one, np_per = "numpy best, one call (warm outputs)", "numpy best, 1024-entry calls"
    cases = []
    if _native is not None:
        cases.append(Case(one, lambda: _native.decode_pfns(raw, width, p2m_size, T, P, D),
                          nbytes, role="subject"))

        def native_batches():
            for b in batches:
                _native.decode_pfns(b, width, p2m_size)

        cases.append(Case(per, native_batches, nbytes, role="subject"))
    cases.append(Case(np_one, lambda: numpy_decode_pfns(raw, width, p2m_size, T, P), nbytes))
    Tb = np.empty(BATCH, np.uint8)
    Pb = np.empty(BATCH, np.uint64)

    def numpy_batches():
        for b in batches:
            numpy_decode_pfns(b, width, p2m_size, Tb, Pb)

    cases.append(Case(np_per, numpy_batches, nbytes))
    cases.append(Case("reference twin, one call",
                      lambda: _reference.decode_pfns(raw, width, p2m_size), nbytes))
    cases += copy_cases(np.frombuffer(raw, np.uint8), nbytes, "numpy copy of the entries")
    bits = width * 8
    targets = []
    if _native is not None:
        targets = [Target(one, np_one, 3.0, f"PFN decoding {bits}-bit, one call: >= 3x numpy"),
                   Target(per, np_per, 3.0, f"PFN decoding {bits}-bit, per batch: >= 3x numpy")]
    return Group(f"pfn{bits}", f"PFN decoding, {bits}-bit entries ({n} entries, {source})",
                 "entry bytes", cases, np_one, targets,
                 {"entries": n, "bytes": nbytes, "kind": kind, "source": source})


# ========================================================= page scatter
def scatter_group(npages, order="sequential", seed=2):
    """Page scatter by PFN: npages consecutive pages into an image of npages."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8)
    pfns = np.arange(npages, dtype=np.uint64)
    if order == "random":
        rng.shuffle(pfns)
    nbytes = npages * PAGE_SIZE
    image = np.zeros(nbytes, np.uint8)
    image2d = image.reshape(-1, PAGE_SIZE)
    pages2d = pages.reshape(-1, PAGE_SIZE)
    ipfns = pfns.astype(np.intp)
    cases = []
    if _native is not None:
        cases.append(Case("native scatter (warm image)",
                          lambda: _native.scatter_pages(pages, pfns, image), nbytes,
                          role="subject"))
        h = Holder()

        def setup():
            prime_memory(nbytes)
            h.value = anonymous_buffer(nbytes)

        cases.append(Case("native scatter (fresh image)",
                          lambda: _native.scatter_pages(pages, pfns, h.value), nbytes,
                          role="subject", setup=setup, cleanup=h.clear))

    def numpy_scatter():
        image2d[ipfns] = pages2d

    cases.append(Case("numpy fancy-index scatter (warm image)", numpy_scatter, nbytes))
    sub = min(npages, 16384)
    cases.append(Case("reference twin", lambda: _reference.scatter_pages(
        pages[:sub * PAGE_SIZE], pfns[:sub], image), sub * PAGE_SIZE,
        note=f"first {sub} pages" if sub < npages else ""))
    cases += copy_cases(pages, nbytes, "numpy copy of the pages")
    return Group(f"scatter-{order[:3]}", f"page scatter by PFN, {order} pfns "
                 f"({npages} pages, {fmt_bytes(nbytes)})", "page bytes", cases,
                 "numpy copy of the pages (warm destination)", [],
                 {"pages": npages, "order": order})


# ================================================== Remus compressed buffers
WORDS = PAGE_SIZE // 4

DELTA_KINDS = {
    # key: (title, how the pages change)
    "scattered-1": ("1% of 32-bit words changed, scattered",
                    "each word changed with probability 0.01"),
    "scattered-10": ("10% of 32-bit words changed, scattered",
                     "each word changed with probability 0.1"),
    "runs": ("1-3 changed runs per page", "1-3 runs of 1-128 words at random offsets"),
    "changed-100": ("100% of words changed (RUN markers)",
                    "every word changed: 9 RUN markers per page"),
    "full": ("all FULL_PAGE", "0x80 + 4096 bytes per page"),
    "empty": ("all EMPTY_PAGE", "one 0x00 byte per page"),
}


def delta_changes(kind, n, rng):
    """(changed bool (n, 1024) words, full bool (n,) pages) for a data set."""
    full = np.zeros(n, dtype=bool)
    if kind in ("scattered-1", "scattered-10"):
        p = 0.01 if kind == "scattered-1" else 0.1
        changed = rng.random((n, WORDS), dtype=np.float32) < p
    elif kind == "runs":
        nruns = rng.integers(1, 4, n)
        rows = np.repeat(np.arange(n), nruns)
        starts = rng.integers(0, WORDS, rows.size)
        ends = np.minimum(starts + rng.integers(1, 129, rows.size), WORDS)
        # +1 at each run's start, -1 at its end, running sum per page
        edge = np.zeros((n, WORDS + 1), dtype=np.int16)
        np.add.at(edge, (rows, starts), 1)
        np.add.at(edge, (rows, ends), -1)
        changed = np.cumsum(edge, axis=1)[:, :WORDS] > 0
    elif kind == "changed-100":
        changed = np.ones((n, WORDS), dtype=bool)
    elif kind == "full":
        changed = np.ones((n, WORDS), dtype=bool)
        full[:] = True
    elif kind == "empty":
        changed = np.zeros((n, WORDS), dtype=bool)
    else:
        raise ValueError(f"unknown delta data set {kind!r}")
    return changed, full


def delta_buffer(kind, old, seed=3, block=4096):
    """One checkpoint's compressed buffer for the pages of `old` (uint8, n
    pages; the receiver's copy), data set `kind`, made block by block with
    xlegacy's compressor (compress.encode_pages).  Returns (buffer, new):
    new is the image a correct decoder turns `old` into."""
    from ..testing.compress import encode_pages
    rng = np.random.default_rng(seed)
    old2d = old.reshape(-1, PAGE_SIZE)
    new = np.empty_like(old2d)
    parts = []
    for a in range(0, old2d.shape[0], block):
        o = old2d[a:a + block]
        n = o.shape[0]
        changed, full = delta_changes(kind, n, rng)
        nb = new[a:a + n]
        nb[:] = o
        words = nb.view("<u4")
        words[changed] ^= rng.integers(1, 1 << 32, int(changed.sum()), dtype=np.uint32)
        data, _sizes, _kinds = encode_pages(nb, o, full)
        parts.append(data)
    buf = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return buf, new.reshape(-1)


def _split_apply(pool, parts, buf, starts, pfns, image):
    """Apply an indexed buffer in `parts` page ranges on the pool's threads."""
    n = pfns.size
    bounds = np.linspace(0, n, parts + 1, dtype=np.int64)
    futs = [pool.submit(_native.delta_apply, buf, starts, pfns, image, int(a), int(b - a))
            for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futs:
        f.result()


def delta_group(kind=None, npages=None, buf=None, pfns=None, image=None, seed=3,
                source="synthetic", check=True):
    """The format B decoder on one checkpoint's compressed buffer.

    Unit: guest page bytes brought up to date (npages * 4096): a numpy copy
    of those page bytes is the primary baseline; a copy of the compressed
    input is shown too (its time; throughput also counted on page bytes).
    """
    expected = None
    if buf is None:
        image = np.random.default_rng(seed + 1).integers(0, 256, npages * PAGE_SIZE,
                                                         dtype=np.uint8)
        buf, expected = delta_buffer(kind, image, seed)
        pfns = np.arange(npages, dtype=np.uint64)
    npages = int(pfns.size)
    nbytes = npages * PAGE_SIZE
    impl = _native or _reference
    starts, kinds = impl.delta_index(buf, npages)
    if expected is not None and check:
        impl.delta_apply(buf, starts, pfns, image)
        if not np.array_equal(image, expected):
            raise AssertionError(f"delta data set {kind}: the decoder's result differs")
    del expected
    cases = []
    pool = ThreadPoolExecutor(2)
    split = False
    one, two = "native decode: index + apply, 1 thread", "native decode: index + apply, 2 threads"
    fused = "native fused decode (one pass), 1 thread"
    has_fused = _native is not None and hasattr(_native, "delta_decode")
    if _native is not None:
        def decode():
            st, _ = _native.delta_index(buf, npages)
            _native.delta_apply(buf, st, pfns, image)

        def decode2():
            st, _ = _native.delta_index(buf, npages)
            _split_apply(pool, 2, buf, st, pfns, image)

        # Page ranges may go to two threads only when no pfn repeats.
        split = np.unique(pfns).size == npages
        if has_fused:
            # What a restore does on one thread (no separate validation pass).
            cases += [Case(fused, lambda: _native.delta_decode(buf, pfns, image), nbytes,
                           role="subject")]
        cases += [Case(one, decode, nbytes, role="subject")]
        if split:
            cases += [Case(two, decode2, nbytes, role="subject")]
        cases += [Case("native index only", lambda: _native.delta_index(buf, npages), nbytes),
                  Case("native apply only, 1 thread",
                       lambda: _native.delta_apply(buf, starts, pfns, image), nbytes)]
        if split:
            cases += [Case("native apply only, 2 threads",
                           lambda: _split_apply(pool, 2, buf, starts, pfns, image), nbytes)]
    # The reference twin walks markers in Python: a prefix of the pages.
    if npages:
        per_page = max(1.0, len(buf) / npages)
        sub = max(1, min(npages, int(300_000 // per_page) if per_page > 8 else 4096))
        end = int(starts[sub])
        sbuf, spfns = buf[:end], pfns[:sub]

        def reference():
            st, _ = _reference.delta_index(sbuf, sub)
            _reference.delta_apply(sbuf, st, spfns, image)

        cases.append(Case("reference twin: index + apply", reference, sub * PAGE_SIZE,
                          note=f"first {sub} pages" if sub < npages else ""))
    page_src = np.random.default_rng(seed + 2).integers(0, 256, nbytes, dtype=np.uint8)
    cases += copy_cases(page_src, nbytes, "numpy copy of the page bytes")
    cbuf = np.ascontiguousarray(buf)
    cdst = np.empty_like(cbuf)
    cdst[:] = cbuf
    cases.append(Case("numpy copy of the compressed input", lambda: np.copyto(cdst, cbuf),
                      nbytes, note=fmt_bytes(cbuf.size)))
    targets = []
    need = {"full": 0.9, "changed-100": 0.6, "scattered-10": 0.6}.get(kind)
    primary = "numpy copy of the page bytes (warm destination)"
    if need and _native is not None:
        chosen = [(fused, "one pass, 1 thread")] if has_fused else [(one, "1 thread")]
        if split:
            chosen.append((two, "2 threads"))
        for name, how in chosen:
            targets.append(Target(name, primary, need,
                                  f"delta decoder {kind}, {how}: >= {need}x memcpy"))
    title, desc = DELTA_KINDS.get(kind, ("compressed checkpoint", ""))
    return Group(f"delta-{kind}", f"delta decoder: {title} ({npages} pages, "
                 f"{fmt_bytes(len(buf))} compressed, {source})", "page bytes", cases,
                 primary, targets,
                 {"pages": npages, "compressed_bytes": int(len(buf)), "kinds": kinds,
                  "description": desc, "source": source}, pool.shutdown)


# ============================================================ stream inputs
class SyntheticGuest:
    """Deterministic guest memory made on demand (no image is held).

    Page p at version 0 is a row of a 16 MiB random pool XOR a function of
    p; version v > 0 changes about 10% of its 32-bit words, scattered, chosen
    by a hash of (p, word, v).  Two versions of a page differ in about 19%
    of words: Remus deltas with both RUN and SKIP markers.
    """

    def __init__(self, p2m_size, seed=7, pool_pages=4096):
        rng = np.random.default_rng(seed)
        self.p2m_size = p2m_size
        self.pool = rng.integers(0, 1 << 32, (pool_pages, WORDS), dtype=np.uint32)
        self.versions = np.zeros(p2m_size, np.uint32)

    @staticmethod
    def _hash(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    def pages(self, pfns, versions=None):
        """(n, 4096) uint8 pages of `pfns` at `versions` (per-pfn array)."""
        pf = np.asarray(pfns, dtype=np.int64)
        words = self.pool[pf % self.pool.shape[0]]
        words ^= (pf.astype(np.uint32) * np.uint32(0x9E3779B1))[:, None]
        v = (self.versions if versions is None else versions)[pf]
        sel = np.flatnonzero(v)
        if sel.size:
            w = np.arange(WORDS, dtype=np.uint32)[None, :]
            key = (pf[sel].astype(np.uint32)[:, None] * np.uint32(0x85EBCA77)
                   + w * np.uint32(0xC2B2AE3D) + v[sel][:, None] * np.uint32(0x27D4EB2F))
            h = self._hash(key)
            mask = h < np.uint32(0x1999999A)             # 10% of 2^32
            sub = words[sel]
            sub[mask] ^= self._hash(h[mask]) | np.uint32(1)
            words[sel] = sub
        return words.view(np.uint8)


def write_hvm_stream(path, size, seed=7):
    """An `xl save` of an HVM guest with `size` bytes of memory, every page
    sent once in 1024-entry batches.  Returns the writer's WriteResult."""
    from ..testing.writer import write_guest
    p2m = max(1, size // PAGE_SIZE)
    g = SyntheticGuest(p2m, seed)
    return write_guest(path, g.pages, p2m_size=p2m, width=8, guest="hvm", wrapper="xl",
                       config='name = "bench"\nmemory = %d\n' % max(1, size // MiB),
                       vcpus=(0, 1), tsc=(0, 1_000_000, 2_600_000, 1),
                       params={"ident_pt": 0xFEFFD000, "vm86_tss": 0xFEFFE000,
                               "console_pfn": 0xFEFFF})


def write_remus_stream(path, size, checkpoints=REMUS_CHECKPOINTS, seed=7):
    """A compressed Remus stream (`xl remus` with checkpoint compression) of
    a guest with `size` bytes of memory: checkpoint 1 sends every page, then
    `checkpoints` format B checkpoints.  Each dirties a hot set (6144 pages,
    or a quarter of the guest; it fits the sender's delta cache, so its
    pages go as deltas) and 1/64 of the guest at random (mostly FULL_PAGE);
    a fifth of the dirtied pages did not change (EMPTY_PAGE)."""
    from ..testing.writer import write_guest
    p2m = max(16, size // PAGE_SIZE)
    g = SyntheticGuest(p2m, seed)
    rng = np.random.default_rng(seed)
    hot = np.sort(rng.choice(p2m, min(6144, p2m // 4), replace=False))
    versions = np.zeros(p2m, np.uint32)
    cps = []
    for k in range(2, checkpoints + 2):
        cold = rng.choice(p2m, max(1, p2m // 64), replace=False)
        dirty = np.union1d(hot, cold)
        versions = versions.copy()
        versions[dirty[rng.random(dirty.size) < 0.8]] = k
        cps.append({"pfns": dirty, "image": (lambda pf, v=versions: g.pages(pf, v))})
    return write_guest(path, g.pages, p2m_size=p2m, width=8, guest="hvm", wrapper="xl",
                       config='name = "bench-remus"\n', vcpus=(0, 1),
                       params={"ident_pt": 0xFEFFD000}, checkpoints=cps, compress=True,
                       qemu_signature="RemusDeviceModelState")


class StreamFiles:
    """Generated streams under a directory, made once and reused (by name)."""

    def __init__(self, workdir, log=None):
        self.workdir = workdir
        self.log = log

    def get(self, kind, size):
        path = os.path.join(self.workdir, f"{kind}-{size}.xlsave")
        if not os.path.exists(path):
            if self.log:
                self.log(f"writing a {fmt_bytes(size)} {kind} stream to {path}")
            t0 = time.perf_counter()
            tmp = path + ".partial"
            (write_hvm_stream if kind == "hvm" else write_remus_stream)(tmp, size)
            # Clean pages in the page cache: no writeback of the new file
            # competes with the first timed runs.
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.log:
                self.log(f"  {fmt_bytes(os.path.getsize(path))} in "
                         f"{time.perf_counter() - t0:.1f} s")
        return path


# ============================================================ stream groups
def _stream_info(path):
    from ..restorer import restore_result
    res = restore_result(path, inspect_only=True)
    m = res.to_dict()
    return {"stream": path, "stream_bytes": os.path.getsize(path), "p2m_size": m["p2m_size"],
            "image_bytes": m["image_size"], "pages": m["pfns"], "checkpoints": m["checkpoints"],
            "compressed": m["compressed"], "data_pages": m["data_pages"],
            "wrapper": m["wrapper"], "guest": m["guest"], "width": m["width"]}


def _reference_restore_case(ref_path, output=None):
    from ..restorer import restore
    nbytes = os.path.getsize(ref_path)
    h = Holder()
    unlink = _unlinker(output) if output else None

    def fn():
        with reference_kernels():
            h.value = restore(ref_path, output=output)

    label = "reference twin: restore" + (" to a file" if output else " in memory")
    return Case(label, fn, nbytes, setup=unlink, cleanup=_chain(h.clear, unlink),
                note=f"{fmt_bytes(nbytes)} stream")


def restore_memory_group(path, workdir, ref_path=None, threads=(None,), info=None,
                         key="restore-memory", title=None):
    """Whole-stream restore into memory beside copying/reading the same bytes."""
    from ..restorer import restore
    info = info or _stream_info(path)
    n = info["stream_bytes"]
    image_bytes = info["image_bytes"]
    warm_page_cache(path)
    src = anonymous_buffer(n)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(src))
    cases = []
    subject = None
    for t in threads:
        h = Holder()
        name = "xlegacy restore in memory" + (f", {t} thread{'s' * (t > 1)}" if t else "")
        subject = subject or name
        cases.append(Case(name, lambda h=h, t=t: setattr(h, "value", restore(path, threads=t)),
                          n, role="subject", setup=lambda: prime_memory(image_bytes + 64 * MiB),
                          cleanup=h.clear))
    primary = "numpy copy of the stream bytes (fresh memory)"
    cases += copy_cases(src, n, "numpy copy of the stream bytes")
    cases.append(read_case(path, n))
    cases.append(cp_case(path, n, workdir))
    if ref_path:
        cases.append(_reference_restore_case(ref_path))
    targets = [Target(subject, primary, 0.8,
                      "restore in memory: >= 0.8x numpy copy into fresh memory")] \
        if not info["compressed"] else []
    what = "compressed Remus " if info["compressed"] else ""
    ttl = title or (f"restore in memory: {fmt_bytes(n)} {what}stream, {info['checkpoints']} "
                    f"checkpoint(s), {fmt_bytes(image_bytes)} image")
    return Group(key, ttl, "stream bytes", cases, primary, targets, info)


def restore_file_group(path, workdir, ref_path=None, info=None, key="restore-file",
                       title=None, variants=True):
    """Whole-stream restore to a raw image file beside cp and reading it."""
    from ..stream.reader import LegacyStream
    from ..restorer import restore, restore_result
    info = info or _stream_info(path)
    n = info["stream_bytes"]
    warm_page_cache(path)
    out = os.path.join(workdir, "restore-bench.raw")
    unlink = _unlinker(out)
    prime = lambda: prime_memory(n)   # noqa: E731 - page cache of the output
    h = Holder()
    subject = "xlegacy restore to a raw file (fsync before rename)"
    nosync = "xlegacy restore to a raw file, sync=False (no fsync, like cp)"
    cases = [Case(subject, lambda: setattr(h, "value", restore(path, output=out)), n,
                  role="subject", setup=_chain(unlink, prime), cleanup=_chain(h.clear, unlink)),
             Case(nosync, lambda: setattr(h, "value", restore(path, output=out, sync=False)), n,
                  role="subject", setup=_chain(unlink, prime), cleanup=_chain(h.clear, unlink))]
    if variants and not info["compressed"]:
        def via_cfr():
            h.value = restore_result(LegacyStream(path, defer_pages=True), output=out,
                                     sync=False)

        cases.append(Case("restore to a file via copy_file_range, sync=False", via_cfr,
                          n, role="subject", setup=_chain(unlink, prime),
                          cleanup=_chain(h.clear, unlink)))
    primary = "cp of the stream"
    cases.append(cp_case(path, n, workdir))
    cases.append(cp_fsync_case(path, n, workdir))
    cases.append(read_case(path, n))
    src = np.fromfile(path, dtype=np.uint8)
    cases += copy_cases(src, n, "numpy copy of the stream bytes", fresh=False)
    if ref_path:
        cases.append(_reference_restore_case(ref_path, os.path.join(workdir, "ref-bench.raw")))
    targets = [Target(nosync, primary, 1 / 1.10,
                      "restore to a raw file, no fsync: time <= 1.10x cp"),
               Target(subject, "cp of the stream + fsync of the copy", 1 / 1.10,
                      "restore to a raw file, fsync: time <= 1.10x cp + fsync")] \
        if not info["compressed"] else []
    ttl = title or (f"restore to a raw file: {fmt_bytes(n)} "
                    f"{'compressed Remus ' if info['compressed'] else ''}stream, "
                    f"{fmt_bytes(info['image_bytes'])} image, on {_fs_type(workdir)}")
    return Group(key, ttl, "stream bytes", cases, primary, targets, info)


def remus_group(path, workdir, ref_path=None, info=None):
    """A whole compressed Remus restore (issue 3), 1 and 2 threads, in memory
    and to a file, beside the same baselines."""
    from ..restorer import restore
    info = info or _stream_info(path)
    g = restore_memory_group(path, workdir, ref_path, threads=(2, 1), info=info,
                             key="restore-remus")
    out = os.path.join(workdir, "remus-bench.raw")
    unlink = _unlinker(out)
    h = Holder()
    g.cases.insert(2, Case("xlegacy restore to a raw file, 2 threads",
                           lambda: setattr(h, "value", restore(path, output=out, threads=2)),
                           info["stream_bytes"], role="subject",
                           setup=_chain(unlink, lambda: prime_memory(info["image_bytes"])),
                           cleanup=_chain(h.clear, unlink)))
    g.title = (f"compressed Remus restore, end to end: {fmt_bytes(info['stream_bytes'])} "
               f"stream, {info['checkpoints']} checkpoints, {fmt_bytes(info['image_bytes'])} "
               f"guest")
    g.targets = []
    return g


def linear_group(files, size, workdir):
    """Cost per byte: restores of `size` and 4x `size` streams (in memory
    and to a file); ratio 1.0 = the same GB/s at both sizes."""
    from ..restorer import restore
    small, big = files.get("hvm", size), files.get("hvm", 4 * size)
    cases = []
    for label, path in (("1x", small), ("4x", big)):
        n = os.path.getsize(path)
        image = (n // PAGE_SIZE) * PAGE_SIZE
        warm_page_cache(path)
        h = Holder()
        out = os.path.join(workdir, "linear-bench.raw")
        unlink = _unlinker(out)
        cases.append(Case(f"restore in memory, {label} size",
                          lambda h=h, p=path: setattr(h, "value", restore(p)), n, role="subject",
                          setup=lambda i=image: prime_memory(i + 64 * MiB), cleanup=h.clear,
                          note=fmt_bytes(n)))
        cases.append(Case(f"restore to a raw file, {label} size",
                          lambda h=h, p=path, o=out: setattr(h, "value", restore(p, output=o)),
                          n, role="subject", setup=_chain(unlink, lambda m=n: prime_memory(m)),
                          cleanup=_chain(h.clear, unlink), note=fmt_bytes(n)))
    s, b = fmt_bytes(size), fmt_bytes(4 * size)
    primary = "restore in memory, 1x size"
    targets = [Target("restore in memory, 4x size", primary, 0.9,
                      f"linear: in-memory restore GB/s at {b} within 10% of {s}"),
               Target("restore to a raw file, 4x size", "restore to a raw file, 1x size", 0.9,
                      f"linear: restore-to-file GB/s at {b} within 10% of {s}")]
    return Group("restore-linear", f"cost per byte: {s} and {b} HVM streams", "stream bytes",
                 cases, primary, targets, {"sizes": [size, 4 * size]})


def convert_group(path, workdir, info=None, key="convert", ref_path=None):
    """Conversion to a v2 stream file (xlegacy.converter), beside cp and
    reading the stream.  None when xlegacy.converter is not there."""
    try:
        from ..converter import convert
    except ImportError:
        return None
    info = info or _stream_info(path)
    n = info["stream_bytes"]
    warm_page_cache(path)
    out = os.path.join(workdir, "convert-bench.out")
    unlink = _unlinker(out)
    subject = "xlegacy convert (to a v3 stream file)"
    cases = [Case(subject, lambda: convert(path, out), n, role="subject",
                  setup=_chain(unlink, lambda: prime_memory(n)), cleanup=unlink)]
    cases.append(cp_case(path, n, workdir))
    cases.append(read_case(path, n))
    src = np.fromfile(path, dtype=np.uint8)
    cases += copy_cases(src, n, "numpy copy of the stream bytes", fresh=False)
    if ref_path:
        ref_out = os.path.join(workdir, "convert-ref.out")
        ref_n = os.path.getsize(ref_path)
        ref_unlink = _unlinker(ref_out)

        def reference():
            with reference_kernels():
                convert(ref_path, ref_out)

        cases.append(Case("reference twin: convert", reference, ref_n, setup=ref_unlink,
                          cleanup=ref_unlink, note=f"{fmt_bytes(ref_n)} stream"))
    what = "compressed Remus " if info["compressed"] else ""
    return Group(key, f"convert: {fmt_bytes(n)} {what}stream ({info['checkpoints']} "
                 f"checkpoint(s)) to a v3 stream, on {_fs_type(workdir)}", "stream bytes",
                 cases, "cp of the stream", [], info)


# ============================================================ memory checks
_CHILD = r"""
import json, sys, time
import xlegacy
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = status("VmHWM")
t0 = time.perf_counter()
if mode == "pipe-to-file":
    xlegacy.restore("-", output=out)
    image = 0
else:
    img, meta = xlegacy.restore(path)
    image = int(img.size)
print(json.dumps({"mode": mode, "peak_rss": status("VmHWM"), "start_rss": base,
                  "image": image, "seconds": time.perf_counter() - t0}))
"""


def peak_rss(path, workdir, mode):
    """Peak RSS of a restore in a child process: "pipe-to-file" (the stream
    arrives through a pipe from cat) or "memory" (image in memory)."""
    out = os.path.join(workdir, "rss-bench.raw")
    cmd = [sys.executable, "-c", _CHILD, mode, path, out]
    try:
        if mode == "pipe-to-file":
            cat = subprocess.Popen(["cat", path], stdout=subprocess.PIPE)
            try:
                r = subprocess.run(cmd, stdin=cat.stdout, capture_output=True, text=True)
            finally:
                cat.stdout.close()
                cat.wait()
        else:
            r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        _unlinker(out)()
    if r.returncode != 0:
        raise RuntimeError(f"child restore failed: {r.stderr.strip()[-500:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["over_image"] = d["peak_rss"] - d["image"]
    return d


MEMORY_BOUNDS = {
    # mode: (bound on peak RSS beyond the image, what the issue asks)
    "pipe-to-file": (128 * MiB, "restore from a pipe to a file: peak RSS < 128 MiB"),
    "memory": (128 * MiB, "in-memory restore: peak RSS <= image + 128 MiB"),
}


def memory_row(path, workdir, mode):
    """One peak-RSS measurement against the issue's bound, as a dict row."""
    limit, text = MEMORY_BOUNDS[mode]
    d = peak_rss(path, workdir, mode)
    d.update(stream_bytes=os.path.getsize(path), limit=limit, text=text,
             met=d["over_image"] <= limit)
    return d


def memory_rows(path, workdir):
    """The issue's memory bounds for one stream."""
    return [memory_row(path, workdir, mode) for mode in MEMORY_BOUNDS]


def format_memory(rows):
    lines = ["", "memory (child processes; interpreter + numpy + xlegacy alone: "
             f"{fmt_bytes(rows[0]['start_rss']) if rows else '?'}):"]
    for d in rows:
        lines.append(f"  {d['text']:<58} {fmt_bytes(d['stream_bytes'])} stream: peak "
                     f"{fmt_bytes(d['peak_rss'])}"
                     + (f" = image {fmt_bytes(d['image'])} + {fmt_bytes(d['over_image'])}"
                        if d["image"] else "")
                     + f"  {'met' if d['met'] else 'NOT met'}")
    return lines


# ================================================================ machine
def machine_info(workdir=None):
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "xlegacy": __version__, "backend": kernels.BACKEND,
            "native": _native is not None, "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                k, _, v = line.partition(":")
                if k.strip() in ("Model name", "CPU family", "Model", "Thread(s) per core",
                                 "Core(s) per socket", "L2 cache", "L3 cache",
                                 "Hypervisor vendor"):
                    info["lscpu " + k.strip()] = v.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/meminfo") as f:
            info["memory"] = fmt_bytes(int(f.readline().split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for key, p in (("transparent_hugepage", "/sys/kernel/mm/transparent_hugepage/enabled"),
                   ("thp_defrag", "/sys/kernel/mm/transparent_hugepage/defrag")):
        try:
            with open(p) as f:
                info[key] = f.read().strip()
        except OSError:
            pass
    if workdir:
        info["workdir"] = workdir
        info["workdir_fs"] = _fs_type(workdir)
    info["prime_fresh_memory"] = PRIME["on"]
    return info


def _loadavg():
    """The 1-minute load average: other work on the machine skews the figures."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _fs_type(path):
    path = os.path.realpath(path)
    best, fs = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or len(parts[1]) <= len(best):
                    continue
                if path == parts[1] or path.startswith(parts[1].rstrip("/") + "/"):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return fs


# ================================================================= report
def _ms(seconds):
    ms = 1e3 * seconds
    return f"{ms:9.1f}" if ms >= 100 else f"{ms:9.3g}"


def format_group(g):
    lines = [g.title, f"  unit: {g.unit}; ratio = GB/s / GB/s of '{g.primary}'"]
    labels = [c.name + (f" [{c.note}]" if c.note else "") for c in g.cases]
    width = max(len(x) for x in labels)
    lines.append(f"  {'case':<{width}}  {'GB/s':>7}  {'ratio':>6}  "
                 f"{'min ms':>9} {'median':>9} {'max ms':>9}")
    for c, label in zip(g.cases, labels):
        r = g.ratio(c.name)
        mark = "*" if c.role == "subject" else " "
        lines.append(f"{mark} {label:<{width}}  {c.gbps:7.2f}  "
                     f"{'' if r is None else f'{r:6.2f}':>6}  "
                     f"{_ms(min(c.times))} {_ms(c.median)} {_ms(max(c.times))}")
    return lines


def core_check(rounds=7):
    """Is a second core free right now?  A compute-bound numpy operation
    (sqrt + sum, which releases the GIL) on 1 thread and split over 2:
    returns t(1) / t(2), about 2 on two idle cores, about 1 when other work
    holds the second one.  Reported beside the 2-thread figures."""
    x = np.random.default_rng(0).random(1 << 23)
    half = x.size // 2

    def part(a):
        return float(np.sqrt(a).sum())

    with ThreadPoolExecutor(2) as pool:
        def two():
            a, b = pool.submit(part, x[:half]), pool.submit(part, x[half:])
            return a.result() + b.result()
        one_t, two_t = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            part(x)
            one_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            two()
            two_t.append(time.perf_counter() - t0)
    return round(float(np.median(one_t) / np.median(two_t)), 2)


def thread_speedups(results):
    """[(group key, case stem, t(1 thread) / t(2 threads))] for every case
    that a group has in a 1-thread and a 2-thread variant."""
    out = []
    for g in results:
        for c in g.cases:
            if c.name.endswith(", 2 threads"):
                stem = c.name[:-len(", 2 threads")]
                one = g.result(stem + ", 1 thread")
                if one is not None and c.times and one.times:
                    out.append((g.key, stem, one.median / c.median))
    return out


def format_report(results, machine, extras=()):
    m = machine
    lines = [f"xlegacy {m.get('xlegacy')} bench: {m.get('cpu', '?')}, "
             f"{m.get('cpus_usable', m.get('cpus'))} cpus, {m.get('memory', '?')}, "
             f"THP {m.get('transparent_hugepage', '?')}, numpy {m.get('numpy')}, "
             f"backend {m.get('backend')}, {m.get('repeat')} rounds, load average "
             f"{m.get('load_before', '?')} before / {m.get('load_after', '?')} after"]
    for g in results:
        lines.append("")
        lines += format_group(g)
    speedups = thread_speedups(results)
    if speedups:
        lines.append("")
        lines.append("2 threads against 1 (median time of the 1-thread case / the 2-thread "
                     "case);")
        lines.append(f"  control, compute-bound numpy on 2 threads: "
                     f"{m.get('core_check_before', '?')}x before, "
                     f"{m.get('core_check_after', '?')}x after (2.0 = the second core was free)")
        w = max(len(f"{k}: {n}") for k, n, _ in speedups)
        for key, name, x in speedups:
            lines.append(f"  {key + ': ' + name:<{w}}  {x:5.2f}x")
    rows = [row for g in results for row in g.target_rows()]
    if rows:
        lines.append("")
        lines.append("targets (median ratios of this run):")
        w = max(len(r["target"]) for r in rows)
        for row in rows:
            state = "n/a" if row["met"] is None else ("met" if row["met"] else "NOT met")
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
            lines.append(f"  {row['target']:<{w}}  {ratio:>6}  need >= {row['need']:.2f}  {state}")
    lines += list(extras)
    lines.append("")
    lines.append("* = xlegacy; the other cases are baselines")
    return "\n".join(lines)


# ============================================================== the command
GROUP_KEYS = (["pfn32", "pfn64", "scatter-seq", "scatter-ran"]
              + [f"delta-{k}" for k in DELTA_KINDS]
              + ["restore-memory", "restore-file", "restore-remus", "restore-linear",
                 "convert", "convert-remus", "memory"])


def configure(parser):
    parser.add_argument("stream", nargs="?",
                        help="measure on this legacy stream (a path) instead of generated inputs")
    parser.add_argument("--size", default=None,
                        help=f"guest memory of the generated streams, e.g. 256M, 1G "
                             f"(default {fmt_bytes(DEFAULT_SIZE)}; kernel inputs are a quarter "
                             f"of it, at most {fmt_bytes(MAX_KERNEL_BYTES)})")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed rounds per group (default 5; --quick: 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small inputs ({fmt_bytes(QUICK_SIZE)}) and 3 rounds: seconds")
    parser.add_argument("--only", default=None, metavar="GROUPS",
                        help="comma-separated group keys or prefixes (see --list)")
    parser.add_argument("--skip", default=None, metavar="GROUPS",
                        help="comma-separated group keys or prefixes to leave out")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--linear", action="store_true",
                        help="also restore a 4x --size stream (cost per byte; needs the space)")
    parser.add_argument("--dir", default=None,
                        help="where generated streams and outputs go (default: a new temporary "
                             "directory, removed afterwards; a given one keeps the streams "
                             "for the next run)")
    parser.add_argument("--no-prime", action="store_true",
                        help="do not pre-touch fresh memory before timed runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a target of the issue is not met")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def _matches(key, pats):
    return any(key == p or key.startswith(p) for p in pats)


def _selected(key, only, skip=None):
    if skip and _matches(key, skip):
        return False
    return not only or _matches(key, only)


def run(args):
    if args.list:
        print("\n".join(GROUP_KEYS))
        return 0
    size = parse_size(args.size) if args.size else (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    repeat = args.repeat or (3 if args.quick else 5)
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    skip = [o.strip() for o in args.skip.split(",") if o.strip()] if args.skip else None
    if args.linear and only:
        only.append("restore-linear")
    elif not args.linear:
        skip = (skip or []) + ["restore-linear"]
    quiet = args.quiet or args.json
    log = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    PRIME["on"] = not args.no_prime
    own_dir = args.dir is None
    workdir = tempfile.mkdtemp(prefix="xlegacy-bench-") if own_dir else args.dir
    os.makedirs(workdir, exist_ok=True)
    results, extras, memory = [], [], []
    t_start = time.perf_counter()
    load_before = _loadavg()
    cores_before = core_check()
    try:
        for key, build in plan(size, args.stream, workdir, only, skip, log):
            if key == "memory":
                if log:
                    log("memory: peak RSS of restores in child processes")
                memory += build()
                continue
            if log:
                log(f"{key}: preparing")
            group = build()
            if group is None:
                continue
            try:
                if log:
                    log(f"{key}: {len(group.cases)} cases x {repeat} rounds")
                results.append(run_group(group, repeat=repeat, warmup=1))
            finally:
                if group.close:
                    group.close()
                del group
                gc.collect()
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info(workdir)
    machine.update(size=size, repeat=repeat, seconds=round(time.perf_counter() - t_start, 1),
                   load_before=load_before, load_after=_loadavg(),
                   core_check_before=cores_before, core_check_after=core_check())
    if memory:
        extras += format_memory(memory)
    if args.json:
        json.dump({"machine": machine, "groups": [g.as_dict() for g in results],
                   "thread_speedups": [{"group": k, "case": n, "speedup": round(x, 3)}
                                       for k, n, x in thread_speedups(results)],
                   "targets": [r for g in results for r in g.target_rows()],
                   "memory": memory}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(results, machine, extras))
    failed = any(r["met"] is False for g in results for r in g.target_rows()) or \
        any(not d["met"] for d in memory)
    return 1 if args.check and failed else 0


def plan(size, stream, workdir, only=None, skip=None, log=None):
    """(key, builder) pairs in the order they run.  Builders make their
    inputs only when called, so one group's data is freed before the next
    group's is made."""
    if stream is not None:
        return stream_plan(stream, workdir, only, skip, log)
    out = []
    kbytes = max(MiB, min(MAX_KERNEL_BYTES, size // 4))
    kpages = kbytes // PAGE_SIZE
    entries = max(BATCH, kpages * 16)             # 1M entries for 256 MiB of pages
    for width in (4, 8):
        key = f"pfn{width * 8}"
        if _selected(key, only, skip):
            out.append((key, lambda w=width: pfn_group(w, entries)))
    for order in ("sequential", "random"):
        key = f"scatter-{order[:3]}"
        if _selected(key, only, skip):
            out.append((key, lambda o=order: scatter_group(kpages, o)))
    for kind in DELTA_KINDS:
        key = f"delta-{kind}"
        if _selected(key, only, skip):
            out.append((key, lambda k=kind: delta_group(k, kpages)))
    files = StreamFiles(workdir, log)
    ref = min(size, REF_STREAM_SIZE)
    if _selected("restore-memory", only, skip):
        out.append(("restore-memory", lambda: restore_memory_group(
            files.get("hvm", size), workdir, files.get("hvm", ref))))
    if _selected("restore-file", only, skip):
        out.append(("restore-file", lambda: restore_file_group(
            files.get("hvm", size), workdir, files.get("hvm", ref))))
    if _selected("restore-remus", only, skip):
        out.append(("restore-remus", lambda: remus_group(
            files.get("remus", size), workdir, files.get("remus", min(size, REF_REMUS_SIZE)))))
    if _selected("restore-linear", only, skip):
        out.append(("restore-linear", lambda: linear_group(files, size, workdir)))
    if _selected("convert", only, skip):
        out.append(("convert", lambda: convert_group(files.get("hvm", size), workdir)))
    if _selected("convert-remus", only, skip):
        out.append(("convert-remus", lambda: convert_group(
            files.get("remus", size), workdir, key="convert-remus",
            ref_path=files.get("remus", min(size, REF_REMUS_SIZE)))))
    if _selected("memory", only, skip):
        out.append(("memory", lambda: memory_rows(files.get("hvm", size), workdir)))
    return out


# ========================================================= a user's stream
def scan_stream(path):
    """One pass over a stream's records: its PFN arrays (per width, joined)
    and its largest compressed checkpoint (buffer, data pfns)."""
    from ..stream.reader import LegacyStream
    from ..stream.records import Chunk, PageBatch, CheckpointEnd
    from .. import format as F
    raws = []
    best = (0, None, None)
    cdata, cpfns = bytearray(), []
    with LegacyStream(path) as s:
        width, p2m = s.width, s.p2m_size
        for rec in s:
            if isinstance(rec, PageBatch):
                raws.append(bytes(rec.raw))
                if rec.compressed and rec.n_data:
                    cpfns.append(rec.data_pfns.copy())
            elif isinstance(rec, Chunk) and rec.id == F.COMPRESSED_DATA and rec.value:
                cdata += rec.value
            elif isinstance(rec, CheckpointEnd):
                if len(cdata) > best[0]:
                    best = (len(cdata), np.frombuffer(bytes(cdata), np.uint8),
                            np.concatenate(cpfns) if cpfns else np.zeros(0, np.uint64))
                cdata, cpfns = bytearray(), []
    return {"width": width, "p2m_size": p2m, "raw": b"".join(raws),
            "cbuf": best[1], "cpfns": best[2]}


def _stream_delta_group(scan):
    buf, pfns = scan["cbuf"], scan["cpfns"]
    order_pfns = pfns.astype(np.uint64)
    image = anonymous_buffer(scan["p2m_size"] * PAGE_SIZE)
    image.reshape(-1, PAGE_SIZE)[np.unique(pfns).astype(np.intp)] = 1   # warm those pages
    return delta_group("stream", buf=buf, pfns=order_pfns, image=image,
                       source="this stream's largest compressed checkpoint")


def stream_plan(stream, workdir, only=None, skip=None, log=None):
    """The groups for a user's stream: its own PFN arrays and largest
    compressed checkpoint, and whole-stream operations on it."""
    if not os.path.isfile(stream):
        raise ValueError(f"{stream}: not a regular file (bench reads it several times)")
    cache = {}

    def scan():
        """Read the stream once (records, then an inspect-only restore)."""
        if not cache:
            if log:
                log(f"scanning {stream}")
            cache.update(scan_stream(stream))
            cache["info"] = _stream_info(stream)
        return cache

    def ref_path():
        info = scan()["info"]
        limit = REF_REMUS_SIZE if info["compressed"] else REF_STREAM_SIZE
        return stream if info["stream_bytes"] <= limit else None

    def pfn():
        s = scan()
        if not s["raw"]:
            return None
        return pfn_group(s["width"], raw=s["raw"], p2m_size=s["p2m_size"],
                         source="this stream's PFN arrays")

    def delta():
        return _stream_delta_group(scan()) if scan()["cbuf"] is not None else None

    def memory_group():
        info = scan()["info"]
        threads = (2, 1) if info["compressed"] else (None,)
        return restore_memory_group(stream, workdir, ref_path(), threads=threads, info=info)

    def file_group():
        return restore_file_group(stream, workdir, ref_path(), info=scan()["info"])

    def convert():
        return convert_group(stream, workdir, scan()["info"])

    builders = [("pfn", pfn), ("delta", delta), ("restore-memory", memory_group),
                ("restore-file", file_group), ("convert", convert),
                ("memory", lambda: memory_rows(stream, workdir))]
    return [(key, build) for key, build in builders if _selected(key, only, skip)]
