"""`xlegacy bench`: throughput of the kernels and of whole-stream operations,
each measured beside its baselines in the same run.

The measurement engine, the synthetic kernel inputs and the group builders
live here so that the command and the pytest-benchmark suite in bench/
measure exactly the same operations.

Vocabulary:
  group     one operation on one input: a subject (xlegacy) and its
            baselines (numpy copies of the same bytes, reading or cp-ing the
            stream file, the reference twin, the best plain-numpy version);
  case      one timed callable of a group, with the number of bytes its
            throughput is counted on (the group's unit, e.g. guest page bytes);
  ratio     throughput of a case / throughput of the group's primary
            baseline (for cases over the same bytes: baseline time / time).

Runs interleave the cases of a group (the order rotates every repeat), so
noise from other work on the machine spreads over all of them; medians are
reported with min and max.
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

from . import _reference, kernels
from ._version import __version__
from .format import PAGE_SIZE
from .image import anonymous_buffer

try:
    from . import _native
except ImportError:  # pragma: no cover - reference-only installs
    _native = None

DESCRIPTION = """\
Measure xlegacy beside its baselines and print a table: GB/s (median of the
repeats), the ratio to the group's primary baseline, and min/median/max time.

Without STREAM the inputs are generated: synthetic kernel inputs (PFN arrays,
page batches, Remus compressed buffers of six kinds) and legacy streams written
with xlegacy's own writer (an uncompressed HVM save and a compressed Remus
stream) of --size bytes of guest memory.  With STREAM the kernels run on that
stream's own PFN arrays and compressed checkpoints, and the whole-stream
groups restore it.

Baselines: a numpy copy of the same bytes (into a warm and into freshly mapped
memory), reading the stream file, cp of the stream, the reference (numpy)
twin of each kernel, and for PFN decoding and page scatter the best plain
numpy version.  Measurements interleave the cases; the machine's other work
still adds noise, so read medians and the min/max spread."""

EPILOG = """\
examples:
  xlegacy bench                       # about a minute; generated inputs
  xlegacy bench --size 1G --repeat 7  # the figures of bench/README.md
  xlegacy bench --quick               # a few seconds
  xlegacy bench guest.save --json     # your own stream, machine-readable
  xlegacy bench --only delta,pfn      # some groups (see --list)"""

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZE = 512 * MiB
QUICK_SIZE = 32 * MiB
MAX_KERNEL_BYTES = 256 * MiB
BATCH = 1024                       # entries per PFN array (MAX_BATCH)


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
    """One timed callable.  `fn` must not return anything big (results that
    must outlive the call go into a holder that `cleanup` empties)."""
    name: str
    fn: Callable[[], object]
    nbytes: int
    role: str = "baseline"                 # "subject" or "baseline"
    setup: Optional[Callable[[], None]] = None    # untimed, before each run
    cleanup: Optional[Callable[[], None]] = None  # untimed, after each run
    note: str = ""


@dataclass
class Target:
    """Issue target: speed(subject) / speed(baseline) >= ratio (medians)."""
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
        return {"key": self.key, "title": self.title, "unit": self.unit,
                "primary": self.primary, "info": self.info,
                "cases": [dict(c.as_dict(), ratio=None if self.ratio(c.name) is None
                               else round(self.ratio(c.name), 4)) for c in self.cases],
                "targets": self.target_rows()}


def _run_once(case):
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
            _run_once(c)
    for r in range(repeat):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            times[c.name].append(_run_once(c))
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


def copy_cases(src, nbytes, label="numpy copy", fresh=True, warm=True):
    """numpy copy of `src` into a warm destination and into freshly mapped
    memory (anonymous, MADV_HUGEPAGE like the restore image)."""
    src = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src
    out = []
    if warm:
        dst = np.empty_like(src)
        dst[:] = src                     # touch it now: warm
        out.append(Case(f"{label} (warm destination)", lambda: np.copyto(dst, src), nbytes))
    if fresh:
        h = Holder()

        def setup():
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


def cp_case(path, nbytes, workdir):
    dst = os.path.join(workdir, "cp-baseline.out")

    def unlink():
        if os.path.exists(dst):
            os.unlink(dst)

    return Case("cp of the stream", lambda: subprocess.run(["cp", path, dst], check=True),
                nbytes, setup=unlink, cleanup=unlink)


def warm_page_cache(path):
    read_file(path, 8 * MiB)


KERNEL_NAMES = ("decode_pfns", "scatter_pages", "pwrite_pages", "compare_pages",
                "delta_index", "delta_apply")


@contextmanager
def reference_kernels():
    """Run the package on the reference twins (in this process, for a while)."""
    saved = {n: getattr(kernels, n) for n in KERNEL_NAMES}
    try:
        for n in KERNEL_NAMES:
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
    random from {NOTAB x6, L1TAB, XTAB}: defeats branch prediction.
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
    """The best plain-numpy PFN decoder we know: same outputs and checks as
    the kernel, writing into caller-supplied (warm) types/pfns arrays.
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
    """PFN decoding, `width`-byte entries (4 or 8)."""
    if raw is None:
        raw, p2m_size = pfn_entries(nentries, width, seed, kind)
    n = len(raw) // width
    nbytes = len(raw)
    batches = _batches(raw, width)
    T = np.empty(n, np.uint8)
    P = np.empty(n, np.uint64)
    D = np.empty(n, np.uint64)
    cases = []
    if _native is not None:
        cases.append(Case("native, one call (warm outputs)",
                          lambda: _native.decode_pfns(raw, width, p2m_size, T, P, D),
                          nbytes, role="subject"))

        def native_batches():
            for b in batches:
                _native.decode_pfns(b, width, p2m_size)

        cases.append(Case("native, 1024-entry calls (as the reader)", native_batches, nbytes,
                          role="subject"))
    cases.append(Case("numpy best, one call (warm outputs)",
                      lambda: numpy_decode_pfns(raw, width, p2m_size, T, P), nbytes))
    Tb = np.empty(BATCH, np.uint8)
    Pb = np.empty(BATCH, np.uint64)

    def numpy_batches():
        for b in batches:
            numpy_decode_pfns(b, width, p2m_size, Tb, Pb)

    cases.append(Case("numpy best, 1024-entry calls", numpy_batches, nbytes))
    cases.append(Case("reference twin, one call",
                      lambda: _reference.decode_pfns(raw, width, p2m_size), nbytes))
    cases += copy_cases(np.frombuffer(raw, np.uint8), nbytes, "numpy copy of the entries")
    bits = width * 8
    targets = []
    if _native is not None:
        targets = [Target("native, one call (warm outputs)", "numpy best, one call (warm outputs)",
                          3.0, f"PFN decoding ({bits}-bit) >= 3x best numpy"),
                   Target("native, 1024-entry calls (as the reader)", "numpy best, 1024-entry calls",
                          3.0, f"PFN decoding ({bits}-bit), per batch, >= 3x best numpy")]
    return Group(f"pfn{bits}", f"PFN decoding, {bits}-bit entries ({n} entries, {source})",
                 "entry bytes", cases, "numpy best, one call (warm outputs)", targets,
                 {"entries": n, "bytes": nbytes, "kind": kind, "source": source})


# ========================================================= page scatter inputs
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
MAX_RUN = 127


def encode_delta(new, changed, full=None):
    """Encode pages as Remus format B (see FORMAT.md 4.3), vectorised.

    new:     uint8 (n, 4096): the sender's current pages
    changed: bool (n, 1024): 32-bit words that differ from the receiver's copy
    full:    bool (n,) or None: pages sent as FULL_PAGE
    A page with no changed word (and not full) is EMPTY_PAGE; otherwise the
    page is runs of changed words (RUN) and unchanged ones (SKIP), split at
    127 words.  Returns a uint8 buffer.
    """
    n = new.shape[0]
    if full is None:
        full = np.zeros(n, dtype=bool)
    anych = changed.any(axis=1)
    delta = anych & ~full
    empty = ~anych & ~full
    drows = np.flatnonzero(delta)
    m = changed[drows].reshape(-1)
    tot = m.size
    page_size = np.ones(n, dtype=np.int64)
    page_size[full] = PAGE_SIZE + 1
    if tot:
        # segments of equal words, broken at page starts, then pieces <= 127
        b = np.ones(tot, dtype=bool)
        b[1:] = m[1:] != m[:-1]
        b[::WORDS] = True
        seg_start = np.flatnonzero(b)
        seg_len = np.diff(np.append(seg_start, tot))
        seg_run = m[seg_start]
        npieces = (seg_len + MAX_RUN - 1) // MAX_RUN
        pseg = np.repeat(np.arange(seg_start.size), npieces)
        k = np.arange(pseg.size) - (np.cumsum(npieces) - npieces)[pseg]
        pstart = seg_start[pseg] + k * MAX_RUN
        plen = np.minimum(MAX_RUN, seg_len[pseg] - k * MAX_RUN)
        prun = seg_run[pseg]
        psize = 1 + prun * plen * 4
        prow = pstart // WORDS
        page_size[drows] = np.bincount(prow, weights=psize, minlength=drows.size).astype(np.int64)
    page_off = np.cumsum(page_size) - page_size
    out = np.empty(int(page_size.sum()), dtype=np.uint8)
    out[page_off[empty]] = 0x00
    fo = page_off[full]
    out[fo] = 0x80
    if fo.size:
        out[(fo[:, None] + 1 + np.arange(PAGE_SIZE)).reshape(-1)] = new[full].reshape(-1)
    if tot:
        pc = np.cumsum(psize) - psize
        first = np.searchsorted(prow, np.arange(drows.size))
        poff = page_off[drows][prow] + pc - pc[first][prow]
        out[poff] = (np.where(prun, 0x00, 0x80) | plen).astype(np.uint8)
        runp = np.flatnonzero(prun)
        wpiece = np.repeat(runp, plen[runp])
        widx = np.flatnonzero(m)
        wpos = poff[wpiece] + 1 + (widx - pstart[wpiece]) * 4
        words = np.ascontiguousarray(new[drows]).view("<u4").reshape(-1)[widx]
        out[(wpos[:, None] + np.arange(4)).reshape(-1)] = words.view(np.uint8)
    return out


DELTA_KINDS = {
    # key: (title, description)
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
    """(changed bool (n,1024), full bool (n,)) for a data set kind."""
    full = np.zeros(n, dtype=bool)
    if kind in ("scattered-1", "scattered-10"):
        p = 0.01 if kind == "scattered-1" else 0.1
        changed = rng.random((n, WORDS), dtype=np.float32) < p
    elif kind == "runs":
        changed = np.zeros((n, WORDS), dtype=bool)
        nruns = rng.integers(1, 4, n)
        rows = np.repeat(np.arange(n), nruns)
        lens = rng.integers(1, 129, rows.size)
        starts = rng.integers(0, WORDS, rows.size)
        ends = np.minimum(starts + lens, WORDS)
        # mark [start, end) of every run: +1/-1 then a cumulative sum per row
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


def delta_buffer(kind, npages, seed=3, block=4096, check_old=None):
    """A checkpoint's compressed buffer of `npages` pages of data set `kind`,
    generated block by block.  With check_old (uint8 image of npages pages)
    the expected result of applying it is returned as well (small sizes)."""
    rng = np.random.default_rng(seed)
    parts = []
    expected = None if check_old is None else check_old.copy().reshape(-1, PAGE_SIZE)
    for a in range(0, npages, block):
        n = min(block, npages - a)
        changed, full = delta_changes(kind, n, rng)
        new = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
        parts.append(encode_delta(new, changed, full))
        if expected is not None:
            mask = np.repeat(changed, 4, axis=1) | full[:, None]
            expected[a:a + n] = np.where(mask, new, expected[a:a + n])
    buf = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return buf, (None if expected is None else expected.reshape(-1))


def _split_apply(pool, parts, buf, starts, pfns, image):
    n = pfns.size
    bounds = np.linspace(0, n, parts + 1, dtype=np.int64)
    futs = [pool.submit(_native.delta_apply, buf, starts, pfns, image, int(a), int(b - a))
            for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futs:
        f.result()


def delta_group(kind=None, npages=None, buf=None, pfns=None, image=None, seed=3,
                source="synthetic", title=None):
    """The format B decoder on one checkpoint's compressed buffer.

    Unit: guest page bytes restored (npages * 4096): the decoder's job is to
    bring npages pages up to date, so a numpy copy of those page bytes is the
    primary baseline; a copy of the compressed input is shown as well.
    """
    if buf is None:
        buf, _ = delta_buffer(kind, npages, seed)
        pfns = np.arange(npages, dtype=np.uint64)
    npages = pfns.size
    if image is None:
        image_pages = int(pfns.max()) + 1 if npages else 0
        image = np.random.default_rng(seed + 1).integers(0, 256, image_pages * PAGE_SIZE,
                                                         dtype=np.uint8)
    nbytes = npages * PAGE_SIZE
    cases = []
    pool = ThreadPoolExecutor(2)
    if _native is not None:
        starts, kinds = _native.delta_index(buf, npages)

        def decode():
            st, _ = _native.delta_index(buf, npages)
            _native.delta_apply(buf, st, pfns, image)

        def decode2():
            st, _ = _native.delta_index(buf, npages)
            _split_apply(pool, 2, buf, st, pfns, image)

        cases += [
            Case("native decode: index + apply, 1 thread", decode, nbytes, role="subject"),
            Case("native decode: index + apply, 2 threads", decode2, nbytes, role="subject"),
            Case("native index only", lambda: _native.delta_index(buf, npages), nbytes),
            Case("native apply only, 1 thread",
                 lambda: _native.delta_apply(buf, starts, pfns, image), nbytes),
            Case("native apply only, 2 threads",
                 lambda: _split_apply(pool, 2, buf, starts, pfns, image), nbytes),
        ]
    else:  # pragma: no cover
        _, kinds = _reference.delta_index(buf, npages)
    # Reference twin on a prefix of pages: it walks markers in Python.
    sub = npages
    if npages:
        ref_starts, _ = (_native or _reference).delta_index(buf, npages)
        per_page = max(1.0, len(buf) / npages)
        sub = max(1, min(npages, int(300_000 // per_page) if per_page > 8 else 4096))
        end = int(ref_starts[sub])
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
    cases.append(Case(f"numpy copy of the compressed input ({fmt_bytes(cbuf.size)})",
                      lambda: np.copyto(cdst, cbuf), nbytes,
                      note="time to copy the input; throughput counted on page bytes"))
    targets = []
    need = {"full": 0.9, "changed-100": 0.6, "scattered-10": 0.6}.get(kind)
    if need and _native is not None:
        for sub_name in ("native decode: index + apply, 1 thread",
                         "native decode: index + apply, 2 threads"):
            targets.append(Target(sub_name, "numpy copy of the page bytes (warm destination)",
                                  need, f"delta decoder ({kind}, {sub_name.split(', ')[-1]}) "
                                        f">= {need}x memcpy"))

    def close():
        pool.shutdown()

    ttl, desc = DELTA_KINDS.get(kind, (title or "compressed checkpoint", ""))
    return Group(f"delta-{kind}", f"delta decoder: {ttl} ({npages} pages, "
                 f"{fmt_bytes(len(buf))} compressed, {source})", "page bytes", cases,
                 "numpy copy of the page bytes (warm destination)", targets,
                 {"pages": npages, "compressed_bytes": int(len(buf)), "kinds": kinds,
                  "description": desc, "source": source}, close)


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
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            info["transparent_hugepage"] = f.read().strip()
    except OSError:
        pass
    if workdir:
        info["workdir"] = workdir
        info["workdir_fs"] = _fs_type(workdir)
    return info


def _fs_type(path):
    path = os.path.realpath(path)
    best, fs = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return fs


# ================================================================= report
def format_report(results, machine, extras=()):
    lines = []
    m = machine
    lines.append(f"xlegacy {m.get('xlegacy')} bench: {m.get('cpu', '?')}, "
                 f"{m.get('cpus_usable', m.get('cpus'))} cpus, {m.get('memory', '?')}, "
                 f"THP {m.get('transparent_hugepage', '?')}, numpy {m.get('numpy')}, "
                 f"backend {m.get('backend')}")
    for g in results:
        lines.append("")
        lines.append(f"{g.title}")
        lines.append(f"  unit: {g.unit}; ratio = GB/s / GB/s of '{g.primary}'")
        width = max(len(c.name) + (len(c.note) + 3 if c.note else 0) for c in g.cases)
        width = max(width, 4)
        lines.append(f"  {'case':<{width}}  {'GB/s':>7}  {'ratio':>6}  "
                     f"{'min ms':>9} {'median':>9} {'max ms':>9}")
        for c in g.cases:
            label = c.name + (f" ({c.note})" if c.note else "")
            r = g.ratio(c.name)
            mark = "*" if c.role == "subject" else " "
            lines.append(f"{mark} {label:<{width}}  {c.gbps:7.2f}  "
                         f"{'' if r is None else f'{r:6.2f}':>6}  "
                         f"{1e3 * min(c.times):9.2f} {1e3 * c.median:9.2f} "
                         f"{1e3 * max(c.times):9.2f}")
    rows = [row for g in results for row in g.target_rows()]
    if rows:
        lines.append("")
        lines.append("targets (median ratios, this run):")
        for row in rows:
            state = "n/a" if row["met"] is None else ("met" if row["met"] else "NOT met")
            lines.append(f"  {row['target']:<64} {row['ratio'] if row['ratio'] is not None else '-':>7}"
                         f"  need >= {row['need']:<5} {state}")
    for line in extras:
        lines.append(line)
    lines.append("")
    lines.append("* = xlegacy (subject); the others are baselines")
    return "\n".join(lines)


# ============================================================== the command
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
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--dir", default=None,
                        help="where generated streams and outputs go (default: a temporary "
                             "directory under $TMPDIR, removed afterwards)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a target of the issue is not met")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


GROUP_KEYS = (["pfn32", "pfn64", "scatter-seq", "scatter-ran"]
              + [f"delta-{k}" for k in DELTA_KINDS]
              + ["restore-memory", "restore-file", "restore-remus", "convert"])


def _selected(key, only):
    if not only:
        return True
    return any(key == o or key.startswith(o) for o in only)


def run(args):
    if args.list:
        for k in GROUP_KEYS:
            print(k)
        return 0
    size = parse_size(args.size) if args.size else (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    repeat = args.repeat or (3 if args.quick else 5)
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    log = None if (args.quiet or args.json) else (lambda s: print(s, file=sys.stderr, flush=True))
    own_dir = args.dir is None
    workdir = tempfile.mkdtemp(prefix="xlegacy-bench-") if own_dir else args.dir
    os.makedirs(workdir, exist_ok=True)
    results = []
    extras = []
    try:
        for key, build in plan(size, args.stream, workdir, only, log):
            if log:
                log(f"{key}: preparing")
            group = build()
            if group is None:
                continue
            try:
                if log:
                    log(f"{key}: {len(group.cases)} cases x {repeat} rounds")
                results.append(run_group(group, repeat=repeat, warmup=1, log=None))
            finally:
                if group.close:
                    group.close()
                del group
                gc.collect()
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info(workdir)
    machine["size"] = size
    machine["repeat"] = repeat
    if args.json:
        json.dump({"machine": machine, "groups": [g.as_dict() for g in results],
                   "targets": [r for g in results for r in g.target_rows()]},
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(results, machine, extras))
    if args.check and any(r["met"] is False for g in results for r in g.target_rows()):
        return 1
    return 0


def plan(size, stream, workdir, only, log=None):
    """(key, builder) pairs in the order they run; builders make the inputs
    only when called, so one group's data is freed before the next's."""
    out = []
    if stream is not None:
        return stream_plan(stream, workdir, only, log)
    kbytes = max(MiB, min(MAX_KERNEL_BYTES, size // 4))
    kpages = kbytes // PAGE_SIZE
    entries = max(BATCH, kbytes // 64)            # 16 MiB of 32-bit entries per GiB
    for width in (4, 8):
        key = f"pfn{width * 8}"
        if _selected(key, only):
            out.append((key, lambda w=width: pfn_group(w, entries)))
    for order in ("sequential", "random"):
        key = f"scatter-{order[:3]}"
        if _selected(key, only):
            out.append((key, lambda o=order: scatter_group(kpages, o)))
    for kind in DELTA_KINDS:
        key = f"delta-{kind}"
        if _selected(key, only):
            out.append((key, lambda k=kind: delta_group(k, kpages)))
    out += stream_groups_plan(size, workdir, only, log)
    return out


def stream_groups_plan(size, workdir, only, log=None):
    """Whole-stream groups: filled in once the writer exists."""
    return []


def stream_plan(stream, workdir, only, log=None):
    return []
