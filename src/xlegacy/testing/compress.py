"""The sender side of Remus checkpoint compression (format B), as Xen's legacy
saver produces it.

Xen's saver (libxc ``xc_domain_save.c`` driving ``xc_compression.c``, at the
parent of xen.git b15bc4345e) works like this once compression is on, i.e.
from the second checkpoint on:

* Every data page of the checkpoint is appended to a *page buffer*
  (8192 pages).  Page-table pages are marked "raw" and, at that moment, their
  pfn is dropped from the delta cache.
* When the page buffer is full, and once more at the end of the checkpoint,
  the buffered pages are compressed into the saver's 16 MiB output buffer,
  each run of pages becoming one COMPRESSED_DATA chunk.  A chunk ends when
  the next page might not fit: a page needs room for 4097 bytes (FULL_PAGE)
  or for the worst-case delta of 4105 bytes.  The output buffer is then
  flushed, and compression goes on in a fresh chunk.  The PFN arrays go
  through the same output buffer, so where chunks split depends on them too.
* Per page: a raw page, or a page whose pfn has no copy in the delta cache,
  is sent as FULL_PAGE (0x80 + 4096 bytes).  Otherwise the page is compared
  with the cached copy as 1024 little-endian 32-bit words; equal stretches
  become SKIP markers, differing stretches RUN markers followed by the new
  words, each marker covering at most 127 words (a stretch of 300 words is
  127 + 127 + 46).  A page with no differing word is the single byte
  EMPTY_PAGE (0x00).  The cache then holds the new version.
* The delta cache is an LRU list of 8192 page slots.  A miss takes the slot
  at the tail: a free slot if there is one (slots freed by page-table pages
  are reused first, most recently freed first), else the least recently used
  page's slot.  A hit or a miss makes the slot the most recently used.

Everything here is an independent re-implementation of that behaviour; the
encoding is vectorised with numpy, one call per block of pages.

One deliberate difference, `stale_retry`: when a page that missed the cache
does not fit in the current chunk, Xen has already given it a cache slot, so
in the next chunk it finds the pfn "cached" and sends a delta against
whatever that slot held before (zeros, or an evicted page).  The receiver
applies that delta to its own copy, which is not what the sender compared
against: the restored page can be wrong.  By default this module sends such
a page as FULL_PAGE, which is what Xen means to do; stale_retry=True
reproduces Xen's bytes exactly (exact only while page_buffer_pages <=
cache_pages, as in Xen's defaults).
"""
import heapq

import numpy as np

from .. import format as F

PAGE = F.PAGE_SIZE
WORDS = PAGE // 4
MAX_RUN = 127                         # LENMASK: words per RUN/SKIP marker
EMPTY_PAGE = 0x00
FULL_PAGE = 0x80                      # SKIPFLAG with length 0
SKIPFLAG = 0x80
FULL_PAGE_SIZE = PAGE + 1             # 4097
WORST_PAGE_SIZE = PAGE + 9            # 4105: 8 x 127 + 8 words, 9 markers

# Xen's defaults (xc_compression.c, xc_domain_save.c).
PAGE_BUFFER_PAGES = 8192              # PAGE_BUFFER_SIZE / 4096
CACHE_PAGES = 8192                    # DELTA_CACHE_SIZE / 4096
OUTBUF_SIZE = 16384 * 1024            # OUTBUF_SIZE of the saver
OUTBUF_ROOM = 2 * PAGE                # write_compressed wants 8 KiB free

KIND_EMPTY, KIND_FULL, KIND_DELTA = 0, 1, 2

# Encoding block: bounds the temporaries of encode_pages() (~12 bytes/byte).
ENCODE_BLOCK = 1024


def _as_pages(pages, n=None):
    """Any page source as a C-contiguous (n, 4096) uint8 array (no copy if
    it already is one)."""
    if isinstance(pages, np.ndarray):
        arr = pages
        if arr.dtype != np.uint8:
            arr = arr.view(np.uint8) if arr.flags.c_contiguous else \
                np.ascontiguousarray(arr).view(np.uint8)
    else:
        arr = np.frombuffer(pages, dtype=np.uint8)
    arr = np.ascontiguousarray(arr).reshape(-1, PAGE)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{arr.shape[0]} pages given, {n} needed")
    return arr


def is_raw_type(types):
    """Which type nibbles Xen sends uncompressed: page tables (L1..L4,
    pinned or not).  NOTAB and a lone LPINTAB bit are ordinary pages."""
    t = np.asarray(types, dtype=np.uint8) & 0x7
    return (t >= 1) & (t <= 4)


# --------------------------------------------------------------- encoding
def encode_pages(new, old=None, full=None):
    """Encode pages the way xc_compression.c's compress_page/add_full_page do.

    new:  (n, 4096) uint8 (or bytes of n pages): the pages to send.
    old:  (n, 4096) uint8: the sender's cached copy of each page; rows of
          pages in `full` are ignored.  None: every page is FULL_PAGE.
    full: bool[n]: send these as FULL_PAGE (not cached, or page tables).

    Returns (data, sizes, kinds): data is a uint8 array holding the encoded
    pages back to back, sizes int64[n] the bytes of each page, kinds
    uint8[n] (0 EMPTY, 1 FULL, 2 RUN/SKIP delta).
    """
    new = _as_pages(new)
    n = new.shape[0]
    if full is None:
        full = np.zeros(n, dtype=bool) if old is not None else np.ones(n, dtype=bool)
    full = np.asarray(full, dtype=bool)
    if full.shape != (n,):
        raise ValueError("full must be a bool array with one entry per page")
    if old is None and not full.all():
        raise ValueError("old pages are needed for pages that are not FULL_PAGE")
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    if full.all():
        out = np.empty((n, FULL_PAGE_SIZE), dtype=np.uint8)
        out[:, 0] = FULL_PAGE
        out[:, 1:] = new
        return (out.reshape(-1), np.full(n, FULL_PAGE_SIZE, np.int64),
                np.full(n, KIND_FULL, np.uint8))
    parts, sizes, kinds = [], [], []
    old = _as_pages(old, n)
    for a in range(0, n, ENCODE_BLOCK):
        b = min(n, a + ENCODE_BLOCK)
        d, s, k = _encode_block(new[a:b], old[a:b], full[a:b])
        parts.append(d)
        sizes.append(s)
        kinds.append(k)
    return np.concatenate(parts), np.concatenate(sizes), np.concatenate(kinds)


def _encode_block(new, old, full):
    nw = new.view("<u4")
    diff = nw != old.view("<u4")                  # (n, 1024): word differs -> RUN
    diff[full] = True
    changed = diff.any(axis=1)
    delta = changed & ~full
    kinds = np.where(full, KIND_FULL, np.where(changed, KIND_DELTA, KIND_EMPTY)).astype(np.uint8)
    nwords = diff.sum(axis=1, dtype=np.int64)     # data words each page carries

    # Runs of equal `diff` inside the delta pages.
    rows = np.flatnonzero(delta)
    sub = diff[rows]
    starts_b = np.empty_like(sub)
    starts_b[:, 0] = True
    np.not_equal(sub[:, 1:], sub[:, :-1], out=starts_b[:, 1:])
    starts = np.flatnonzero(starts_b)             # flat index into sub
    row_of = starts // WORDS
    ends = np.minimum(np.append(starts[1:], sub.size), (row_of + 1) * WORDS)
    lens = ends - starts
    is_run = sub.reshape(-1)[starts]
    # Split each run into markers of at most 127 words (counted from the
    # run's own start, as compress_page's runlen does).
    npieces = (lens + (MAX_RUN - 1)) // MAX_RUN
    total = int(npieces.sum())
    first = np.cumsum(npieces) - npieces
    k = np.arange(total, dtype=np.int64) - np.repeat(first, npieces)
    plen = np.minimum(MAX_RUN, np.repeat(lens, npieces) - MAX_RUN * k)
    prun = np.repeat(is_run, npieces)
    prow = np.repeat(row_of, npieces)             # index into rows
    markers = (plen | np.where(prun, 0, SKIPFLAG)).astype(np.uint8)
    pbytes = 1 + 4 * plen * prun                  # marker + RUN data

    # Page sizes and where each page starts in the output.
    sizes = np.where(full, FULL_PAGE_SIZE, 1).astype(np.int64)
    pieces_per_row = np.bincount(prow, minlength=rows.size)
    sizes[rows] = pieces_per_row + 4 * nwords[rows]
    base = np.cumsum(sizes) - sizes
    # Marker positions: a page marker for EMPTY/FULL pages, the run markers
    # of delta pages placed after the bytes of the earlier markers of the row.
    cum = np.cumsum(pbytes) - pbytes
    row_first = np.cumsum(pieces_per_row) - pieces_per_row
    ppos = base[rows][prow] + cum - cum[row_first][prow]
    single = np.flatnonzero(~delta)
    pos = np.concatenate([base[single], ppos])
    vals = np.concatenate([np.where(full[single], FULL_PAGE, EMPTY_PAGE).astype(np.uint8),
                           markers])
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    is_marker = np.zeros(out.size, dtype=bool)
    is_marker[pos] = True
    out[pos] = vals
    # Every other byte is page data, in page order: the differing words of
    # delta pages, all words of FULL pages.
    out[~is_marker] = nw[diff].view(np.uint8)
    return out, sizes, kinds


def encode_page_reference(new, old=None):
    """One page, word by word, following compress_page's loop literally.
    A slow twin of encode_pages() for tests.  old None: FULL_PAGE."""
    new = bytes(new)
    if old is None:
        return bytes([FULL_PAGE]) + new
    nw = np.frombuffer(new, "<u4")
    ow = np.frombuffer(bytes(old), "<u4")
    out = bytearray()
    runlen = 0
    runptr = 0
    was = False
    skipped = 0
    for off in range(WORDS + 1):
        copying = bool(nw[off] != ow[off]) if off < WORDS else not was
        if runlen and (was != copying or runlen == MAX_RUN):
            out.append(runlen | (0 if was else SKIPFLAG))
            if was:
                out += new[runptr * 4:(runptr + runlen) * 4]
            else:
                skipped += runlen * 4
            runlen = 0
            runptr = off
        runlen += 1
        was = copying
    if skipped == PAGE:
        return bytes([EMPTY_PAGE])
    return bytes(out)


# --------------------------------------------------------------- the cache
class DeltaCache:
    """Xen's LRU page cache of the compressor (a model with page contents).

    slots hold page copies; `slot_of[pfn]` is a pfn's slot or -1.  Free
    slots form a stack whose top is the list's tail in Xen (initially slot
    cache_pages-1; a freed slot goes on top).
    """

    def __init__(self, p2m_size, cache_pages=CACHE_PAGES):
        self.size = int(cache_pages)
        self.slot_of = np.full(int(p2m_size), -1, dtype=np.int64)
        self.pfn_of = np.full(self.size, -1, dtype=np.int64)
        self.stamp = np.zeros(self.size, dtype=np.int64)
        self.free = list(range(self.size))
        self.clock = 0
        self.pages = np.zeros((self.size, PAGE), dtype=np.uint8)   # lazily zero

    @property
    def live(self):
        return self.size - len(self.free)

    def invalidate(self, pfns):
        """Page-table pages: drop their pfns (in order), freeing their slots."""
        for pfn in np.asarray(pfns, dtype=np.int64).tolist():
            slot = int(self.slot_of[pfn])
            if slot >= 0:
                self.slot_of[pfn] = -1
                self.pfn_of[slot] = -1
                self.free.append(slot)

    def lookup(self, pfns):
        """get_cache_page for each pfn in order.  Returns (slots, hit)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        n = pfns.size
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        slots = self.slot_of[pfns]
        hit = slots >= 0
        miss = np.flatnonzero(~hit)
        if miss.size <= len(self.free) and np.unique(pfns).size == n:
            # No eviction can happen: misses pop free slots in order.
            if miss.size:
                taken = np.array(self.free[len(self.free) - miss.size:][::-1], dtype=np.int64)
                del self.free[len(self.free) - miss.size:]
                slots[miss] = taken
                self.slot_of[pfns[miss]] = taken
                self.pfn_of[taken] = pfns[miss]
            self.stamp[slots] = self.clock + np.arange(n, dtype=np.int64)
            self.clock += n
            return slots, hit
        return self._lookup_slow(pfns)

    def _lookup_slow(self, pfns):
        slot_of, pfn_of, stamp, free = self.slot_of, self.pfn_of, self.stamp, self.free
        live = np.flatnonzero(pfn_of >= 0)
        heap = list(zip(stamp[live].tolist(), live.tolist()))
        heapq.heapify(heap)
        clock = self.clock
        out_slots = np.empty(pfns.size, dtype=np.int64)
        out_hit = np.empty(pfns.size, dtype=bool)
        for i, pfn in enumerate(pfns.tolist()):
            slot = int(slot_of[pfn])
            if slot >= 0:
                out_hit[i] = True
            else:
                out_hit[i] = False
                if free:
                    slot = free.pop()
                else:
                    while True:          # least recently used live slot
                        st, slot = heapq.heappop(heap)
                        if pfn_of[slot] >= 0 and stamp[slot] == st:
                            break
                    slot_of[pfn_of[slot]] = -1
                pfn_of[slot] = pfn
                slot_of[pfn] = slot
            stamp[slot] = clock
            heapq.heappush(heap, (clock, slot))
            clock += 1
            out_slots[i] = slot
        self.clock = clock
        return out_slots, out_hit


# --------------------------------------------------------------- the saver
class CompressedChunk:
    """One COMPRESSED_DATA payload and what it holds."""

    __slots__ = ("data", "pages", "kinds")

    def __init__(self, data, pages, kinds):
        self.data = data        # uint8 array (bytes(chunk.data) for bytes)
        self.pages = pages      # pages encoded in it
        self.kinds = kinds      # {"empty": n, "full": n, "delta": n}

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        return f"CompressedChunk({len(self.data)} bytes, {self.pages} pages, {self.kinds})"


class Compressor:
    """Xen's checkpoint compressor and the saver's output buffer, as one object.

    Use per compressed checkpoint:

        c.begin_checkpoint()
        c.note_write(4); c.note_write(width * n)   # each PFN batch header/array
        chunks = c.add_pages(pfns, pages, raw)     # that batch's data pages
        ... more batches ...
        chunks = c.flush()                         # at the end of the body

    Every returned chunk must be written (as `-12, ulong len, data`) where
    it is returned: right after the PFN array whose pages filled the page
    buffer, or, for flush(), after the last batch.  The chunk headers are
    accounted for here.

    width:             toolstack unsigned long size (the chunk header is 4 + width)
    page_buffer_pages: pages buffered before they are compressed (Xen: 8192)
    cache_pages:       delta cache slots (Xen: 8192)
    outbuf_size:       the saver's output buffer (Xen: 16 MiB)
    stale_retry:       reproduce Xen's bug for a cache-missing page that opens
                       a new chunk (see the module docstring)
    """

    def __init__(self, p2m_size, width=8, page_buffer_pages=PAGE_BUFFER_PAGES,
                 cache_pages=CACHE_PAGES, outbuf_size=OUTBUF_SIZE, stale_retry=False):
        if width not in (4, 8):
            raise ValueError("width is the toolstack's unsigned long size: 4 or 8")
        self.p2m_size = int(p2m_size)
        self.width = width
        self.header = 4 + width
        self.page_buffer_pages = int(page_buffer_pages)
        self.outbuf_size = int(outbuf_size)
        if self.outbuf_size < self.header + OUTBUF_ROOM:
            raise ValueError("outbuf_size too small")
        self.stale_retry = stale_retry
        self.cache = DeltaCache(p2m_size, cache_pages)
        self.pos = 0                    # fill of the saver's output buffer
        # The page buffer (xc_compression.c's inputbuf and sendbuf_pfns).
        self._buf = None                # (page_buffer_pages, 4096) uint8, allocated on use
        self._bpfns = np.zeros(self.page_buffer_pages, dtype=np.int64)
        self._braw = np.zeros(self.page_buffer_pages, dtype=bool)
        self._pending = 0
        self.stats = {"chunks": 0, "bytes": 0, "empty": 0, "full": 0, "delta": 0}

    # -- the output buffer (outbuf_hardwrite / outbuf_flush)
    def begin_checkpoint(self):
        """The saver's output buffer is empty when a checkpoint starts."""
        if self._pending:
            raise RuntimeError("pages of the previous checkpoint were not flushed")
        self.pos = 0

    def note_write(self, nbytes):
        """Account for nbytes written to the output buffer by one write
        (outbuf_hardwrite: flushes first when it does not fit)."""
        if nbytes <= 0:
            return
        if nbytes > self.outbuf_size - self.pos:
            self.pos = 0
        self.pos += nbytes

    # -- the page buffer (xc_compression_add_page)
    def add_pages(self, pfns, pages, raw=None):
        """Queue data pages; returns the chunks the saver writes now (when
        the page buffer fills)."""
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        pages = _as_pages(pages, pfns.size)
        raw = np.zeros(pfns.size, bool) if raw is None else \
            np.broadcast_to(np.asarray(raw, dtype=bool), pfns.shape)
        if pfns.size and (pfns.min() < 0 or pfns.max() >= self.p2m_size):
            raise ValueError("pfn outside 0..p2m_size-1")
        chunks = []
        i = 0
        while i < pfns.size:
            take = min(pfns.size - i, self.page_buffer_pages - self._pending)
            p, r = pfns[i:i + take], raw[i:i + take]
            if r.any():
                self.cache.invalidate(p[r])      # at add time, in order
            if self._buf is None:
                self._buf = np.empty((self.page_buffer_pages, PAGE), dtype=np.uint8)
            k = self._pending
            self._buf[k:k + take] = pages[i:i + take]
            self._bpfns[k:k + take] = p
            self._braw[k:k + take] = r
            self._pending += take
            i += take
            if self._pending == self.page_buffer_pages:
                chunks += self._write_compressed()
        return chunks

    def flush(self):
        """End of the checkpoint body: compress what is left."""
        return self._write_compressed()

    # -- write_compressed + xc_compression_compress_pages
    def _write_compressed(self):
        n = self._pending
        self._pending = 0
        pfns = self._bpfns[:n]
        raw = self._braw[:n]
        pages = self._buf[:n] if n else np.zeros((0, PAGE), np.uint8)

        slots = np.full(n, -1, dtype=np.int64)
        hit = np.zeros(n, dtype=bool)
        cooked = np.flatnonzero(~raw)
        if cooked.size:
            s, h = self.cache.lookup(pfns[cooked])
            slots[cooked] = s
            hit[cooked] = h
        # The cached copies, read before this round's stores: for hits, and
        # for misses too when their stale slot contents may be needed.
        want = cooked if self.stale_retry else np.flatnonzero(hit)
        old = np.empty((n, PAGE), dtype=np.uint8) if want.size else None
        last = cooked
        if cooked.size:
            # A slot used twice in one round (a pfn repeated, or more pages
            # than cache slots) holds, the second time, the page stored the
            # first time.
            cs = slots[cooked]
            order = np.argsort(cs, kind="stable")
            same = cs[order][1:] == cs[order][:-1]
            prev = np.full(cooked.size, -1, dtype=np.int64)
            prev[order[1:][same]] = cooked[order[:-1][same]]
            if same.any():
                last = cooked[order[np.append(~same, True)]]   # final store per slot
            if want.size:
                pw = prev[np.searchsorted(cooked, want)]
                fresh = pw < 0
                old[want[fresh]] = self.cache.pages[slots[want[fresh]]]
                old[want[~fresh]] = pages[pw[~fresh]]
        full = ~hit
        data, sizes, kinds = encode_pages(pages, old, full)
        if last.size:
            # The cache now holds the new copies (for a slot used more than
            # once, the last page stored in it).
            self.cache.pages[slots[last]] = pages[last]
        need = np.where(full, FULL_PAGE_SIZE, WORST_PAGE_SIZE).astype(np.int64)
        starts = np.cumsum(sizes) - sizes

        chunks = []
        i = 0
        while True:
            if self.pos + self.header + OUTBUF_ROOM > self.outbuf_size:
                self.pos = 0                       # outbuf_flush
            if i == n:
                break
            cap = self.outbuf_size - self.pos - self.header
            # First page j >= i with (starts[j] - starts[i]) + need[j] > cap.
            key = np.maximum.accumulate(starts[i:] + need[i:])
            j = i + int(np.searchsorted(key, cap + starts[i], side="right"))
            if j < n and self.stale_retry and not raw[j] and not hit[j] and j > i:
                # Xen retries this page against its (stale) cache slot.
                d, s, k = encode_pages(pages[j:j + 1], old[j:j + 1], np.zeros(1, bool))
                data = np.concatenate([data[:starts[j]], d, data[starts[j] + sizes[j]:]])
                sizes[j], kinds[j], need[j] = s[0], k[0], WORST_PAGE_SIZE
                hit[j] = True
                full[j] = False
                starts = np.cumsum(sizes) - sizes
            a, b = int(starts[i]), int(starts[j - 1] + sizes[j - 1])
            kc = np.bincount(kinds[i:j], minlength=3)
            chunk = CompressedChunk(data[a:b], j - i,
                                    {"empty": int(kc[0]), "full": int(kc[1]),
                                     "delta": int(kc[2])})
            chunks.append(chunk)
            self.pos += self.header + (b - a)
            self.stats["chunks"] += 1
            self.stats["bytes"] += b - a
            for name, v in zip(("empty", "full", "delta"), kc):
                self.stats[name] += int(v)
            i = j
        return chunks
