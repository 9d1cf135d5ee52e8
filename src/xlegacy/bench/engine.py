"""The measurement engine: cases and groups, interleaved timing, and the
baseline cases (copies, reading and cp of a file) that groups share.

Memory that is "fresh" (a new image, a new output file's page cache) is
primed before each timed run: on a VM whose host reclaims free guest memory
(virtio-balloon free page reporting) the first touch of such memory costs
host page faults, more than the copy itself.  Priming gives every case the
same, host-backed memory; --no-prime shows the other behaviour.
"""
import gc
import math
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np

from ..kernels import _reference
from .. import kernels
from ..format import PAGE_SIZE
from ..image import anonymous_buffer
from .units import MiB

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
    setup: Callable[[], None] | None = None    # untimed, before each run
    cleanup: Callable[[], None] | None = None  # untimed, after each run
    note: str = ""


@dataclass
class Target:
    """A performance target, judged on the median of per-round values (every
    round times each case of the group once, so a round's subject and
    baseline ran side by side; min and max are shown too).  kind:
      "gbps"      GB/s(subject) / GB/s(baseline) >= ratio
      "time"      time(subject) / time(baseline) <= ratio (per byte of each)
      "extra_ms"  time(subject) - time(baseline) <= ratio milliseconds
      "report"    no bound: the time ratio is shown (e.g. to Xen's decoder)
    baseline None means the group's primary baseline."""
    subject: str
    baseline: str | None
    ratio: float
    text: str
    kind: str = "gbps"


@dataclass
class Group:
    key: str
    title: str
    unit: str                               # what the bytes of a case are
    cases: list[Case]
    # The baseline the ratio column uses; a tuple of names means the fastest
    # of them in this run (by median GB/s), e.g. C memcpy or a numpy copy.
    primary: str | tuple[str, ...]
    targets: list[Target] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    close: Callable[[], None] | None = None
    warmup: int = 1                         # untimed rounds first

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
    times: list[float]
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


def _paired(a, b, kind):
    """Per-round values of case result a against b (rounds in order)."""
    out = []
    for ta, tb in zip(a.times, b.times):
        if kind == "extra_ms":
            out.append((ta - tb) * 1e3)
        elif ta > 0 and tb > 0:
            gbps = (a.nbytes / ta) / (b.nbytes / tb)
            out.append(gbps if kind == "gbps" else 1 / gbps)
    return out


def fastest(results, names):
    """The name among `names` with the highest median GB/s in `results`."""
    have = [r for r in results if r.name in names and r.times]
    return max(have, key=lambda r: r.gbps).name if have else names[0]


@dataclass
class GroupResult:
    key: str
    title: str
    unit: str
    primary: str | tuple[str, ...]
    cases: list[CaseResult]
    targets: list[Target]
    info: dict
    load: tuple[float | None, float | None] = (None, None)   # before, after
    primary_of: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.primary, str):
            self.primary_of = tuple(self.primary)
            self.primary = fastest(self.cases, self.primary_of)

    def result(self, name):
        for c in self.cases:
            if c.name == name:
                return c
        return None

    def ratio_stats(self, name, baseline=None, kind="gbps"):
        """(min, median, max) over rounds of `name` against `baseline`, or None."""
        a, b = self.result(name), self.result(baseline or self.primary)
        if a is None or b is None or not a.times or not b.times:
            return None
        v = _paired(a, b, kind)
        if not v:
            return None
        return (min(v), float(np.median(v)), max(v))

    def ratio(self, name, baseline=None):
        """Median over rounds of GB/s(name) / GB/s(baseline)."""
        st = self.ratio_stats(name, baseline)
        return None if st is None else st[1]

    def target_rows(self):
        rows = []
        for t in self.targets:
            kind = "time" if t.kind == "report" else t.kind
            st = self.ratio_stats(t.subject, t.baseline, kind)
            met = None
            if st is not None and t.kind != "report":
                met = bool(st[1] >= t.ratio) if t.kind == "gbps" else bool(st[1] <= t.ratio)
            rows.append({"group": self.key, "target": t.text, "subject": t.subject,
                         "baseline": t.baseline or self.primary, "kind": t.kind,
                         "need": t.ratio,
                         "ratio": None if st is None else round(st[1], 3),
                         "min": None if st is None else round(st[0], 3),
                         "max": None if st is None else round(st[2], 3),
                         "load": self.load, "met": met})
        return rows

    def as_dict(self):
        out = []
        for c in self.cases:
            st = self.ratio_stats(c.name)
            out.append(dict(c.as_dict(), ratio=None if st is None else round(st[1], 4),
                            ratio_min=None if st is None else round(st[0], 4),
                            ratio_max=None if st is None else round(st[2], 4)))
        return {"key": self.key, "title": self.title, "unit": self.unit,
                "primary": self.primary, "primary_of": list(self.primary_of),
                "load_average": list(self.load), "info": self.info, "cases": out,
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


def run_group(group, repeat=5, warmup=1, log=None, deadline=None, min_rounds=3):
    """Time every case of `group` `repeat` times, interleaved (the order
    rotates each round), after `warmup` untimed rounds.  With a deadline
    (time.perf_counter() value) fewer rounds run, never fewer than
    min_rounds, when the next one would end past it: a loaded machine gets
    fewer repeats of the same data.  The 1-minute load average is taken
    before and after."""
    cases = list(group.cases)
    times = {c.name: [] for c in cases}
    load_before = _loadavg()
    for _ in range(warmup):
        for c in cases:
            run_case_once(c)
    t0 = time.perf_counter()
    for r in range(repeat):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            times[c.name].append(run_case_once(c))
        if log:
            log(f"  {group.key}: round {r + 1}/{repeat}")
        now = time.perf_counter()
        if deadline is not None and r + 1 >= min_rounds and \
                now + (now - t0) / (r + 1) > deadline:
            break
    return GroupResult(group.key, group.title, group.unit, group.primary,
                       [CaseResult(c.name, c.role, c.nbytes, times[c.name], c.note)
                        for c in cases], group.targets, group.info,
                       load=(load_before, _loadavg()))


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


EVICT_BYTES = 96 * MiB        # well over the last-level caches of the machines measured
_EVICT: list = []


def evict_caches():
    """Write a buffer larger than the caches, so the next case starts
    without the lines the previous one left there.  Sparse delta data sets
    touch the same few lines of an image on every run: a decoder that ran
    right after another found a third of them in the cache."""
    if not _EVICT:
        _EVICT.append(np.zeros(EVICT_BYTES, np.uint8))
    buf = _EVICT[0]
    buf[::64] += 1


def _chain(*fns):
    fns = [f for f in fns if f is not None]

    def run():
        for f in fns:
            f()
    return run


_MEMCPY: list = []


def c_memcpy():
    """The C library's memcpy through ctypes (which releases the GIL): the
    very copy the kernels call, as a baseline beside numpy's.  None where it
    cannot be loaded."""
    if not _MEMCPY:
        try:
            import ctypes
            f = ctypes.CDLL(None).memcpy
            f.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
            f.restype = ctypes.c_void_p
        except (ImportError, OSError, AttributeError):  # pragma: no cover
            f = None
        _MEMCPY.append(f)
    return _MEMCPY[0]


def memcpy_case(name, dst, src, nbytes):
    """One C memcpy of nbytes from src into dst (numpy arrays), or None."""
    f = c_memcpy()
    if f is None:  # pragma: no cover
        return None
    if dst.nbytes < nbytes or src.nbytes < nbytes:
        raise ValueError(f"memcpy case {name!r}: {nbytes} bytes do not fit")
    return Case(name, lambda d=dst, s=src: f(d.ctypes.data, s.ctypes.data, nbytes), nbytes)


def copy_cases(src, nbytes, label="numpy copy", fresh=True, warm=True, what=None):
    """numpy copy of `src` into a warm destination and into freshly mapped
    memory (anonymous, MADV_HUGEPAGE, like the restore image); with `what`
    (e.g. "the page bytes") also a C memcpy into the warm destination."""
    src = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src
    out = []
    if warm:
        dst = np.empty_like(src)
        dst[:] = src                     # touch it now: warm
        out.append(Case(f"{label} (warm destination)", lambda: np.copyto(dst, src), nbytes))
        if what:
            c = memcpy_case(f"C memcpy of {what} (warm destination)", dst, src, nbytes)
            if c is not None:
                out.append(c)
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
