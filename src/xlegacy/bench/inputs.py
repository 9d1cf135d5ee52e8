"""The benchmark's inputs: PFN arrays, Remus compressed buffers of six data
sets, synthetic guests and the streams written from them, and the inputs
read off a user's stream."""
import os
import time

import numpy as np

from .. import format as F
from ..format import PAGE_SIZE
from .units import MiB, REMUS_CHECKPOINTS, fmt_bytes

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
    entries[types == F.XTAB] = F.BARE_XTAB                 # bare XTAB, as the saver writes
    return entries.astype("<u8" if width == 8 else "<u4").tobytes(), n


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
                       config=f'name = "bench"\nmemory = {max(1, size // MiB)}\n',
                       vcpus=(0, 1), tsc=(0, 1_000_000, 2_600_000, 1),
                       params={"ident_pt": 0xFEFFD000, "vm86_tss": 0xFEFFE000,
                               "console_pfn": 0xFEFFF})


def write_remus_stream(path, size, checkpoints=REMUS_CHECKPOINTS, seed=7):
    """A compressed Remus stream (`xl remus` with checkpoint compression) of
    a guest with `size` bytes of memory: checkpoint 1 sends every page, then
    `checkpoints` format B checkpoints, of all three kinds of page.  Each
    dirties a hot set (4096 pages, or a quarter of the guest) and 1/128 of
    the guest at random (at most 2048 pages); together they fit the sender's
    delta cache (8192 pages), so a hot page goes as a delta, a cold one
    mostly as FULL_PAGE, and a fifth of the dirtied pages did not change
    (EMPTY_PAGE).  (With more dirty pages than the cache holds, sent in pfn
    order, every page misses the cache and goes FULL.)"""
    from ..testing.writer import write_guest
    p2m = max(16, size // PAGE_SIZE)
    g = SyntheticGuest(p2m, seed)
    rng = np.random.default_rng(seed)
    hot = np.sort(rng.choice(p2m, min(4096, p2m // 4), replace=False))
    versions = np.zeros(p2m, np.uint32)
    cps = []
    for k in range(2, checkpoints + 2):
        cold = rng.choice(p2m, max(1, min(2048, p2m // 128)), replace=False)
        dirty = np.union1d(hot, cold)
        versions = versions.copy()
        versions[dirty[rng.random(dirty.size) < 0.8]] = k
        cps.append({"pfns": dirty, "image": (lambda pf, v=versions: g.pages(pf, v))})
    return write_guest(path, g.pages, p2m_size=p2m, width=8, guest="hvm", wrapper="xl",
                       config='name = "bench-remus"\n', vcpus=(0, 1),
                       params={"ident_pt": 0xFEFFD000}, checkpoints=cps, compress=True,
                       qemu_signature="RemusDeviceModelState")


# Bumped when a generator changes what it writes: a --dir kept from an
# earlier run must not serve a stream of the old kind under the same name.
INPUTS_VERSION = {"hvm": "", "remus": "-mixed"}


class StreamFiles:
    """Generated streams under a directory, made once and reused (by name)."""

    def __init__(self, workdir, log=None):
        self.workdir = workdir
        self.log = log

    def get(self, kind, size):
        path = os.path.join(self.workdir, f"{kind}{INPUTS_VERSION[kind]}-{size}.xlsave")
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
