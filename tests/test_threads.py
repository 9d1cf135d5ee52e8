"""Threads: concurrent restores on separate outputs give what serial ones
give; native kernels called from many threads at once (they release the
GIL) stay correct; a stream object used from two threads at once either
works or raises a clear error, and never corrupts anything."""
import hashlib
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import SAMPLES        # ../shared/samples or $XLEGACY_SAMPLES
from support import hostile_streams as H
import xlegacy
from xlegacy import kernels
from xlegacy.errors import XLegacyError
from xlegacy.restorer import restore_result

PAGE = 4096
CAT = H.catalogue()
restore_mod = sys.modules["xlegacy.restorer"]


def _streams():
    out = {name: b.data for name, b in CAT.items()}
    if SAMPLES.is_dir():
        for meta_path in sorted(SAMPLES.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            if meta.get("expect") == "ok" and meta["size"] < (6 << 20):
                out[meta["name"]] = (SAMPLES / meta["file"]).read_bytes()
    return out


STREAMS = _streams()


def _digest(img):
    return hashlib.sha256(memoryview(np.ascontiguousarray(img)).cast("B")).hexdigest()


def _meta_key(meta):
    return json.dumps(meta, sort_keys=True, default=str)


def _restore_mem(data, **kw):
    img, meta = xlegacy.restore(data, **kw)
    return _digest(img), _meta_key(meta)


def _restore_file(data, path, **kw):
    out, meta = xlegacy.restore(data, output=path, **kw)
    with open(out, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), _meta_key(meta)


@pytest.fixture(scope="module")
def serial():
    return {name: _restore_mem(data) for name, data in STREAMS.items()}


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_concurrent_memory_restores_match_serial(serial, fast_switching):
    jobs = [name for name in STREAMS for _ in range(3)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda n: (n, _restore_mem(STREAMS[n])), jobs))
    for name, result in got:
        assert result == serial[name], name


def test_concurrent_file_restores_match_serial(serial, tmp_path, fast_switching):
    jobs = [(name, tmp_path / f"{name}.{i}.raw") for name in STREAMS for i in range(2)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: (j[0], _restore_file(STREAMS[j[0]], j[1])), jobs))
    for name, (digest, meta) in got:
        want_digest, want_meta = serial[name]
        assert digest == want_digest, name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


def test_concurrent_failures_and_successes(serial, tmp_path, fast_switching):
    """Failing restores running beside good ones change nothing for either."""
    good = CAT["remus64_compressed"].data
    bad = [good[:5000], good[:-7], H.remus_stream(8, 3, True, bad_page=(1, b"\x81\x00"),
                                                  bad_checkpoint=2).data]

    def job(i):
        if i % 2:
            return _restore_file(good, tmp_path / f"ok{i}")
        try:
            _restore_file(bad[(i // 2) % len(bad)], tmp_path / f"bad{i}")
        except XLegacyError as exc:
            return type(exc).__name__
        return "torn"

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(job, range(24)))
    for i, r in enumerate(got):
        if i % 2:
            assert r[0] == serial["remus64_compressed"][0]
        else:
            want = ["TruncatedStream", "torn", "CorruptCheckpoint"][(i // 2) % len(bad)]
            assert r == want
            assert (tmp_path / f"bad{i}").exists() == (r == "torn")
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("name", ["remus64_compressed", "remus32_compressed",
                                  "remus_compressed_3cp"])
@pytest.mark.parametrize("threads", [2, 3, 8])
def test_parallel_delta_apply_matches_serial(name, threads, monkeypatch):
    """Force the split of compressed checkpoints across threads, even for
    small ones, and compare with a single-threaded restore."""
    if name not in STREAMS:
        pytest.skip("shared samples not available")
    data = STREAMS[name]
    one = _restore_mem(data, threads=1)
    monkeypatch.setattr(restore_mod, "PARALLEL_MIN_PAGES", 1)
    assert _restore_mem(data, threads=threads) == one


def test_kernels_from_many_threads(fast_switching):
    """Native kernels release the GIL: many threads hammering them on their
    own buffers must each get exactly the serial results."""
    rng = np.random.default_rng(5)
    raw = (rng.integers(0, 64, 1024, dtype=np.uint64)
           | (rng.choice([0, 1, 2, 0xF], 1024).astype(np.uint64) << np.uint64(28)))
    raw = raw.astype("<u8").tobytes()
    old = rng.integers(0, 256, 64 * PAGE, dtype=np.uint8)
    new = old.copy()
    new[::7] ^= 0xFF
    buf = b"".join(H.encode_page(old[p * PAGE:(p + 1) * PAGE].tobytes(),
                                 new[p * PAGE:(p + 1) * PAGE].tobytes()) for p in range(64))
    pfns = np.arange(64, dtype=np.uint64)
    want_types, want_pfns, want_data = kernels.decode_pfns(raw, 8, 64)

    def work(_):
        t, p, d = kernels.decode_pfns(raw, 8, 64)
        assert np.array_equal(t, want_types) and np.array_equal(d, want_data)
        starts, _k = kernels.delta_index(buf, 64)
        img = old.copy()
        kernels.delta_apply(buf, starts, pfns, img)
        assert np.array_equal(img, new)
        img2 = np.zeros(64 * PAGE, np.uint8)
        kernels.scatter_pages(new, pfns, img2)
        assert not kernels.compare_pages(new, pfns, img2).any()
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(64)))


def test_disjoint_ranges_of_one_image(fast_switching):
    """delta_apply on disjoint page ranges of one shared image, at once."""
    rng = np.random.default_rng(9)
    n = 256
    old = rng.integers(0, 256, n * PAGE, dtype=np.uint8)
    new = old.copy()
    new[5::11] ^= 0x3C
    buf = b"".join(H.encode_page(old[p * PAGE:(p + 1) * PAGE].tobytes(),
                                 new[p * PAGE:(p + 1) * PAGE].tobytes(), full=p % 5 == 0)
                   for p in range(n))
    pfns = rng.permutation(n).astype(np.uint64)
    # page i of the buffer is the new version of page i, to go to pfn pfns[i]
    img = np.zeros(n * PAGE, np.uint8)
    for i, p in enumerate(pfns):
        img[int(p) * PAGE:(int(p) + 1) * PAGE] = old[i * PAGE:(i + 1) * PAGE]
    want = np.zeros_like(img)
    for i, p in enumerate(pfns):
        want[int(p) * PAGE:(int(p) + 1) * PAGE] = new[i * PAGE:(i + 1) * PAGE]
    starts, _ = kernels.delta_index(buf, n)
    bounds = np.linspace(0, n, 9, dtype=int)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ab: kernels.delta_apply(buf, starts, pfns, img, int(ab[0]),
                                                     int(ab[1] - ab[0])),
                      zip(bounds[:-1], bounds[1:])))
    assert np.array_equal(img, want)


CLEAR = (RuntimeError, ValueError, XLegacyError)


@pytest.mark.parametrize("name", ["hvm64", "remus64_compressed"])
def test_one_stream_object_two_restores(name, fast_switching):
    """Two threads restore from the same LegacyStream at once: each either
    gets the right result or a clear error (it can be iterated only once)."""
    data = CAT[name].data
    want = _restore_mem(data)
    for _ in range(20):
        stream = xlegacy.open(data)
        barrier = threading.Barrier(2)
        results = []

        def run():
            barrier.wait()
            try:
                res = restore_result(stream)
                results.append(("ok", (_digest(res.image), _meta_key(res.to_dict()))))
            except CLEAR as exc:
                results.append(("err", exc))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        oks = [r[1] for r in results if r[0] == "ok"]
        assert len(results) == 2
        assert all(r == want for r in oks), "a shared stream gave a wrong image"
        assert len(oks) <= 1


@pytest.mark.parametrize("name", ["hvm64", "remus64_compressed", "pv64"])
def test_one_iterator_two_threads(name, fast_switching):
    """Two threads pulling records from one iterator: every record arrives
    once, in order, or a thread is told clearly that the generator is busy."""
    data = CAT[name].data
    want = [(type(r).__name__, r.offset) for r in xlegacy.open(data)]
    for _ in range(10):
        it = iter(xlegacy.open(data))
        got, errors = [], []
        lock = threading.Lock()

        def pull():
            while True:
                try:
                    rec = next(it)
                except StopIteration:
                    return
                except ValueError as exc:           # "generator already executing"
                    errors.append(exc)
                    continue
                with lock:
                    got.append((type(rec).__name__, rec.offset))

        threads = [threading.Thread(target=pull) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got, key=lambda r: r[1]) == want
        assert all("already executing" in str(e) for e in errors)


def test_source_buffer_cannot_be_resized_under_a_restore(fast_switching):
    """A bytearray source is held (buffer export) while it is read: resizing
    it from another thread fails clearly instead of freeing what is read."""
    data = bytearray(CAT["remus64_compressed"].data)
    stream = xlegacy.open(data)
    outcomes = []

    def resize():
        for _ in range(200):
            try:
                data.extend(b"\0")
                outcomes.append("resized")
            except BufferError:
                outcomes.append("refused")

    t = threading.Thread(target=resize)
    t.start()
    res = restore_result(stream)
    t.join()
    assert _digest(res.image) == _restore_mem(bytes(CAT["remus64_compressed"].data))[0]
    assert set(outcomes) <= {"resized", "refused"}


def test_same_caller_image_from_two_threads(fast_switching):
    """Two restores of the same stream into one caller-owned buffer at once
    write the same bytes: the result is the serial one (no torn pages)."""
    data = CAT["hvm64"].data
    want = _restore_mem(data)[0]
    img = np.zeros(48 * PAGE, np.uint8)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: xlegacy.restore(data, image=img), range(2)))
    assert _digest(img) == want
