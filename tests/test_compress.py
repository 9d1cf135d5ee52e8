"""The format B compressor (xlegacy.testing.compress) against

* a literal, page-by-page model of Xen's xc_compression.c + write_compressed
  (linked-list LRU cache, retry after a full buffer, output-buffer flushes),
* the receiver's decoder (xlegacy.kernels), and
* the COMPRESSED_DATA bytes of the shared samples, which Xen's own
  compressor produced (skipped when the samples are absent).
"""
import os

import numpy as np
import pytest

import conftest
import xlegacy
from xlegacy.testing import compress as C
from xlegacy import kernels
from xlegacy.stream.records import Chunk, PageBatch

SAMPLES = str(conftest.SAMPLES)     # ../shared/samples or $XLEGACY_SAMPLES
PAGE = 4096


# ------------------------------------------------------------ a literal model
class XenModel:
    """xc_compression.c and xc_domain_save.c's write_compressed, one page at
    a time, with the same data structures.  fixed=True sends a page that
    missed the cache and did not fit as FULL_PAGE on its retry (what
    xlegacy does by default); fixed=False is Xen's behaviour."""

    INVALID = -1

    def __init__(self, p2m, width, pb, cache, outbuf, fixed):
        self.width, self.pb, self.size, self.fixed = width, pb, outbuf, fixed
        self.hdr = 4 + width
        self.page = [bytearray(PAGE) for _ in range(cache)]
        self.pfn = [self.INVALID] * cache
        self.prev = [i - 1 if i else None for i in range(cache)]
        self.next = [i + 1 if i + 1 < cache else None for i in range(cache)]
        self.head, self.tail = 0, cache - 1
        self.pfn2cache = {}
        self.inbuf = []
        self.index = 0
        self.pos = 0
        self.retry = None

    def _to_head(self, item):
        if item == self.head:
            return
        if item == self.tail:
            self.tail = self.prev[item]
            self.next[self.tail] = None
        else:
            self.next[self.prev[item]] = self.next[item]
            self.prev[self.next[item]] = self.prev[item]
        self.prev[item] = None
        self.next[item] = self.head
        self.prev[self.head] = item
        self.head = item

    def get_cache_page(self, pfn):
        item = self.pfn2cache.get(pfn)
        israw = False
        if item is None:
            israw = True
            item = self.tail
            if self.pfn[item] != self.INVALID:
                del self.pfn2cache[self.pfn[item]]
            self.pfn[item] = pfn
            self.pfn2cache[pfn] = item
        self._to_head(item)
        return item, israw

    def invalidate(self, pfn):
        item = self.pfn2cache.get(pfn)
        if item is None:
            return
        if item != self.tail:
            if item == self.head:
                self.head = self.next[item]
                self.prev[self.head] = None
            else:
                self.next[self.prev[item]] = self.next[item]
                self.prev[self.next[item]] = self.prev[item]
            self.next[item] = None
            self.prev[item] = self.tail
            self.next[self.tail] = item
            self.tail = item
        del self.pfn2cache[pfn]
        self.pfn[self.tail] = self.INVALID

    def hardwrite(self, n):
        if n and n > self.size - self.pos:
            self.pos = 0
        self.pos += n

    def add_page(self, page, pfn, israw):
        if israw:
            self.invalidate(pfn)
        self.inbuf.append((self.INVALID if israw else pfn, bytes(page)))
        return -1 if len(self.inbuf) == self.pb else 0

    def compress_pages(self, cap):
        if not self.inbuf or self.index == len(self.inbuf):
            self.inbuf, self.index = [], 0
            return 0, b""
        out = bytearray()
        rc = 1
        while self.index < len(self.inbuf):
            pfn, page = self.inbuf[self.index]
            israw, slot = pfn == self.INVALID, None
            if not israw:
                slot, israw = self.get_cache_page(pfn)
                if self.fixed and self.retry == self.index:
                    israw = True
            if israw:
                if len(out) + C.FULL_PAGE_SIZE > cap:
                    rc = -1
                    self.retry = self.index if slot is not None else None
                    break
                if slot is not None:
                    self.page[slot][:] = page
                out += bytes([C.FULL_PAGE]) + page
            else:
                if len(out) + C.WORST_PAGE_SIZE > cap:
                    rc = -1
                    self.retry = None
                    break
                out += C.encode_page_reference(page, self.page[slot])
                self.page[slot][:] = page
            self.index += 1
        return rc, bytes(out)

    def write_compressed(self):
        chunks = []
        while True:
            if self.pos + self.hdr + 2 * PAGE > self.size:
                self.pos = 0
            rc, data = self.compress_pages(self.size - self.pos - self.hdr)
            if not rc:
                break
            self.hardwrite(4)
            self.hardwrite(self.width)
            self.pos += len(data)
            chunks.append(data)
        return chunks


def _history(rng, p2m, ncp, ndirty, pt_frac=0.0):
    """Random checkpoints: (pfns, pages, raw) per checkpoint, pages evolving
    from one checkpoint to the next (some unchanged, some partly changed)."""
    cur = rng.integers(0, 256, (p2m, PAGE), dtype=np.uint8)
    out = []
    for _ in range(ncp):
        pfns = rng.choice(p2m, ndirty, replace=False)
        if rng.random() < 0.5:
            pfns.sort()
        for p in pfns:
            r = rng.random()
            w = cur[p].view("<u4")
            if r < 0.2:
                continue                                     # dirty but unchanged
            if r < 0.3:
                cur[p] = rng.integers(0, 256, PAGE, dtype=np.uint8)
            else:
                a = int(rng.integers(0, 1024))
                b = min(1024, a + int(rng.integers(1, 400)))
                w[a:b] = rng.integers(0, 2 ** 32, b - a, dtype=np.uint32)
                m = rng.random(1024) < rng.random() * 0.2
                w[m] ^= 0x01010101
        raw = rng.random(ndirty) < pt_frac
        out.append((pfns, cur[pfns].copy(), raw))
    return out


def _run_both(history, p2m, width, pb, cache, outbuf, stale_retry, batch=64):
    comp = C.Compressor(p2m, width=width, page_buffer_pages=pb, cache_pages=cache,
                        outbuf_size=outbuf, stale_retry=stale_retry)
    model = XenModel(p2m, width, pb, cache, outbuf, fixed=not stale_retry)
    for pfns, pages, raw in history:
        comp.begin_checkpoint()
        model.pos = 0
        mine, theirs = [], []
        for a in range(0, pfns.size, batch):
            b = min(pfns.size, a + batch)
            for n in (4, width * (b - a)):
                comp.note_write(n)
                model.hardwrite(n)
            mine += [bytes(c.data) for c in comp.add_pages(pfns[a:b], pages[a:b], raw[a:b])]
            for i in range(a, b):
                if model.add_page(pages[i], int(pfns[i]), bool(raw[i])) == -1:
                    theirs += model.write_compressed()
        mine += [bytes(c.data) for c in comp.flush()]
        theirs += model.write_compressed()
        assert [len(x) for x in mine] == [len(x) for x in theirs]
        assert mine == theirs


# ------------------------------------------------------------ page encoding
def _pairs():
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, PAGE, dtype=np.uint8)
    olds, news = [], []
    for n in (1, 2, 126, 127, 128, 129, 253, 254, 255, 381, 1023, 1024):
        for start in sorted({0, 1, 511, 1024 - n}):
            for invert in (False, True):
                new = base.copy()
                w = new.view("<u4")
                if invert:
                    w ^= 1
                w[start:start + n] ^= 1
                olds.append(base)
                news.append(new)
    for _ in range(100):
        new = base.copy()
        m = rng.random(1024) < rng.random()
        new.view("<u4")[m] += np.uint32(1)
        olds.append(base)
        news.append(new)
    one_byte = base.copy()
    one_byte[4095] ^= 0x80
    olds += [base, base]
    news += [base.copy(), one_byte]
    return np.stack(olds), np.stack(news)


def test_encode_matches_literal_compress_page():
    old, new = _pairs()
    full = np.zeros(len(new), bool)
    full[::7] = True
    data, sizes, kinds = C.encode_pages(new, old, full)
    assert int(sizes.sum()) == data.size
    pos = 0
    for i in range(len(new)):
        ref = C.encode_page_reference(new[i], None if full[i] else old[i])
        assert data[pos:pos + sizes[i]].tobytes() == ref, i
        pos += int(sizes[i])
        assert kinds[i] == (C.KIND_FULL if full[i] else
                            C.KIND_EMPTY if ref == b"\0" else C.KIND_DELTA)


def test_encode_known_shapes():
    page = np.zeros((1, PAGE), np.uint8)
    d, s, k = C.encode_pages(page, page)
    assert d.tobytes() == b"\x00" and k[0] == C.KIND_EMPTY
    d, s, k = C.encode_pages(page, None)
    assert d[0] == 0x80 and s[0] == 4097 and d[1:].tobytes() == page.tobytes()
    # every word changed: 8 RUNs of 127 words and one of 8 (not FULL_PAGE)
    new = np.full((1, PAGE), 0xAB, np.uint8)
    d, s, k = C.encode_pages(new, page)
    assert s[0] == C.WORST_PAGE_SIZE and k[0] == C.KIND_DELTA
    marks = [d[i * 509] for i in range(8)] + [d[8 * 509]]
    assert marks == [127] * 8 + [8]
    # one changed word in the middle: SKIP 127 x4, SKIP 4, RUN 1, SKIP ...
    new = page.copy()
    new.view("<u4")[0, 512] = 7
    d, s, k = C.encode_pages(new, page)
    assert d.tobytes() == bytes([0xFF] * 4 + [0x84, 0x01]) + b"\x07\0\0\0" + \
        bytes([0xFF] * 4 + [0x83])


def test_encoding_decodes_with_the_restore_kernels():
    old, new = _pairs()
    full = np.zeros(len(new), bool)
    full[::5] = True
    data, sizes, kinds = C.encode_pages(new, old, full)
    starts, counts = kernels.delta_index(data, len(new))
    assert counts == {"empty": int((kinds == 0).sum()), "full": int((kinds == 1).sum()),
                      "delta": int((kinds == 2).sum())}
    image = old.copy().reshape(-1)
    kernels.delta_apply(data, starts, np.arange(len(new), dtype=np.uint64), image)
    assert np.array_equal(image.reshape(-1, PAGE), new)


def test_raw_types():
    t = np.array([0, 1, 2, 3, 4, 8, 9, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF], np.uint8)
    assert C.is_raw_type(t).tolist() == [False, True, True, True, True, False, True, True,
                                         True, True, False, False, False]


# ------------------------------------------------------------ the saver model
@pytest.mark.parametrize("stale_retry", [False, True])
@pytest.mark.parametrize("seed,width,pb,cache,outbuf,pt", [
    (1, 8, 50, 8192, 16 << 20, 0.0),       # page-buffer flushes only
    (2, 4, 37, 300, 16 << 20, 0.1),        # evictions + page tables (invalidation)
    (3, 8, 200, 120, 60000, 0.05),         # tiny output buffer: chunk splits + retries
    (4, 4, 64, 64, 30000, 0.2),            # everything at once
])
def test_compressor_matches_literal_model(seed, width, pb, cache, outbuf, pt, stale_retry):
    rng = np.random.default_rng(seed)
    hist = _history(rng, 400, 4, 180, pt)
    _run_both(hist, 400, width, pb, cache, outbuf, stale_retry)


def test_lru_slow_path_with_duplicates_and_eviction():
    # duplicate pfns inside one round force the per-page path
    rng = np.random.default_rng(9)
    p2m = 64
    cur = rng.integers(0, 256, (p2m, PAGE), dtype=np.uint8)
    pfns = np.array([1, 2, 3, 1, 4, 5, 2, 6, 7, 8, 1], np.int64)
    hist = [(pfns, cur[pfns].copy(), np.zeros(pfns.size, bool))] * 2
    _run_both(hist, p2m, 8, 8, 4, 1 << 20, False, batch=3)


def test_default_stream_restores_where_xen_would_corrupt():
    """With a small output buffer a page that missed the cache can open a new
    chunk; Xen then sends it as a delta against its fresh (zero) cache slot,
    and the receiver keeps its own old bytes wherever the new page is zero.
    xlegacy's default sends FULL_PAGE there and restores exactly."""
    from xlegacy.testing.writer import make_stream
    rng = np.random.default_rng(5)
    p2m = 96
    img1 = rng.integers(1, 256, (p2m, PAGE), dtype=np.uint8)     # no zero bytes
    img2 = np.zeros_like(img1)
    img2[:, :16] = img1[:, :16]                                   # mostly zero now
    img3 = img2.copy()
    img3[:, 100:104] ^= 2
    cps = [{"image": img2, "pfns": np.arange(p2m)}, {"image": img3, "pfns": np.arange(p2m)}]
    opts = {"cache_pages": 128, "outbuf_size": 40000}
    good, res = make_stream(img1, checkpoints=cps, compress=True, compress_options=opts)
    for cp in (1, 2, 3):
        out, _ = xlegacy.restore(good, checkpoint=cp)
        assert np.array_equal(out, res.image_after(cp))
    bad, _ = make_stream(img1, checkpoints=cps, compress=True,
                         compress_options=dict(opts, stale_retry=True))
    assert len(bad) < len(good)
    out, _ = xlegacy.restore(bad, checkpoint=2)
    wrong = np.flatnonzero((out.reshape(-1, PAGE) != img2).any(axis=1))
    assert wrong.size > 0           # Xen's bytes restore some pages wrongly


# ------------------------------------------------------------ Xen's bytes
def _sample(name):
    path = os.path.join(SAMPLES, name)
    if not os.path.exists(path):
        pytest.skip("shared samples not available")
    return path


def _read_checkpoints(path):
    """Per checkpoint: [("batch", count, data_pfns, data_types) | ("chunk", bytes)]."""
    cps = {}
    with xlegacy.open(path) as stream:
        it = iter(stream)
        while True:
            try:
                r = next(it)
            except (StopIteration, xlegacy.TruncatedStream):
                break
            if isinstance(r, PageBatch):
                keep = (r.types < 5) | ((r.types >= 8) & (r.types <= 0xC))
                cps.setdefault(r.checkpoint, []).append(
                    ("batch", r.count, r.data_pfns.astype(np.int64), r.types[keep].copy()))
            elif isinstance(r, Chunk) and r.id == -12:
                cps.setdefault(r.checkpoint, []).append(("chunk", r.value))
    return cps


@pytest.mark.parametrize("name,page_buffer", [("remus_compressed_3cp.bin", 200),
                                              ("remus_compressed_cut_cp3.bin", 40)])
def test_xen_compressed_bytes_reproduced(name, page_buffer):
    """Re-encode every compressed checkpoint from the images the stream
    restores to, with the sender's cache carried across checkpoints, and
    compare with the stream's COMPRESSED_DATA chunks byte for byte, chunk by
    chunk, including where they sit between the PFN arrays."""
    path = _sample(name)
    s = xlegacy.open(path)
    width, p2m = s.width, s.p2m_size
    s.close()
    cps = _read_checkpoints(path)
    comp = C.Compressor(p2m, width=width, page_buffer_pages=page_buffer)
    prev, _ = xlegacy.restore(path, checkpoint=1)
    compared = 0
    for cp in range(2, max(cps) + 1):
        items = cps[cp]
        pfns = np.concatenate([it[2] for it in items if it[0] == "batch"])
        theirs_bytes = b"".join(it[1] for it in items if it[0] == "chunk")
        try:
            new, _ = xlegacy.restore(path, checkpoint=cp)
        except xlegacy.StreamError:
            # the cut checkpoint: its body is complete, apply it ourselves
            new = prev.copy()
            buf = np.frombuffer(theirs_bytes, np.uint8)
            starts, _ = kernels.delta_index(buf, pfns.size)
            kernels.delta_apply(buf, starts, pfns.astype(np.uint64), new)
        pages = new.reshape(-1, PAGE)
        comp.begin_checkpoint()
        mine = []
        for it in items:
            if it[0] != "batch":
                continue
            _, count, dp, dt = it
            mine.append(("batch", count))
            comp.note_write(4)
            comp.note_write(width * count)
            mine += [("chunk", bytes(c.data)) for c in comp.add_pages(dp, pages[dp],
                                                                      C.is_raw_type(dt))]
        mine += [("chunk", bytes(c.data)) for c in comp.flush()]
        theirs = [(it[0], it[1]) for it in items]
        assert [(k, len(v) if k == "chunk" else v) for k, v in mine] == \
            [(k, len(v) if k == "chunk" else v) for k, v in theirs]
        assert b"".join(v for k, v in mine if k == "chunk") == theirs_bytes
        compared += len(theirs_bytes)
        prev = new
    assert compared > 0
