"""The groups: one operation on one input, xlegacy's way of doing it beside
its baselines, and the plan that says which groups run in which order."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..kernels import _reference
from .. import format as F
from ..format import PAGE_SIZE
from ..image import anonymous_buffer
from .engine import (Case, Group, Holder, Target, _chain, _fs_type, _unlinker, copy_cases,
                     cp_case, cp_fsync_case, evict_caches, memcpy_case, prime_memory,
                     read_case, reference_kernels, warm_page_cache)
from .inputs import DELTA_KINDS, StreamFiles, delta_buffer, pfn_entries, scan_stream
from .memory import memory_row, memory_rows
from .process import restore_process_group, startup_group
from .units import (BATCH, MAX_KERNEL_BYTES, MiB, REF_REMUS_SIZE, REF_STREAM_SIZE,
                    fmt_bytes)

try:
    from ..kernels import _native
except ImportError:  # pragma: no cover - reference-only installs
    _native = None  # type: ignore[assignment]

# ======================================================= PFN decoding inputs
_DATA_LUT = np.array(F.DATA_TYPES, dtype=bool)
_INVALID_LUT = np.isin(np.arange(16), F.INVALID_TYPES)


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
    np.right_shift(lo, F.ENTRY_TYPE_SHIFT, out=t, casting="unsafe")
    p = pfns[:n]
    np.bitwise_and(lo, F.ENTRY_PFN_MASK, out=p, casting="unsafe")
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
    cases += copy_cases(pages, nbytes, "numpy copy of the pages", what="the pages")
    return Group(f"scatter-{order[:3]}", f"page scatter by PFN, {order} pfns "
                 f"({npages} pages, {fmt_bytes(nbytes)})", "page bytes", cases,
                 MEMCPY_OF_PAGES, [],
                 {"pages": npages, "order": order})


MEMCPY_OF_PAGES = ("C memcpy of the pages (warm destination)",
                   "numpy copy of the pages (warm destination)")
MEMCPY_OF_PAGE_BYTES = ("C memcpy of the page bytes into the image (warm)",
                        "numpy copy of the page bytes (warm destination)")
DECODER_TIME_BOUND = 1.3     # decode time / memcpy of the same page bytes


def _split_apply(pool, parts, buf, starts, pfns, image):
    """Apply an indexed buffer in `parts` page ranges on the pool's threads."""
    n = pfns.size
    bounds = np.linspace(0, n, parts + 1, dtype=np.int64)
    futs = [pool.submit(_native.delta_apply, buf, starts, pfns, image, int(a), int(b - a))
            for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futs:
        f.result()


def delta_group(kind=None, npages=None, buf=None, pfns=None, image=None, seed=3,
                source="synthetic", check=True, xen=None, detail=True):
    """The format B decoder on one checkpoint's compressed buffer.

    Unit: guest page bytes brought up to date (npages * 4096).  The primary
    baseline is the faster of a C memcpy of that many bytes into the same
    warm image and a numpy copy into a warm buffer; a copy of the compressed
    input is shown too (its time; throughput also counted on page bytes).
    With `xen` (bench.xen.XenDecoders), Xen's own decoder runs on the same
    buffer into the same image.  detail: also the 2-thread decode and the
    index and apply steps alone.
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
        split = split and detail
        if split:
            cases += [Case(two, decode2, nbytes, role="subject")]
        if detail:
            cases += [Case("native index only", lambda: _native.delta_index(buf, npages),
                           nbytes),
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
    mc = memcpy_case(MEMCPY_OF_PAGE_BYTES[0], image, page_src, nbytes)
    cases += [mc] if mc is not None else []
    cases += copy_cases(page_src, nbytes, "numpy copy of the page bytes")
    for label, xen_decode in (xen.variants if xen is not None else ()):
        cases.append(Case(f"Xen's decoder ({label})",
                          lambda f=xen_decode: f(buf, pfns, image), nbytes))
    cbuf = np.ascontiguousarray(buf)
    cdst = np.empty_like(cbuf)
    cdst[:] = cbuf
    cases.append(Case("numpy copy of the compressed input", lambda: np.copyto(cdst, cbuf),
                      nbytes, note=fmt_bytes(cbuf.size)))
    targets = []
    primary = MEMCPY_OF_PAGE_BYTES
    if _native is not None:
        subject = fused if has_fused else one
        if kind in DELTA_KINDS:
            targets.append(Target(subject, None, DECODER_TIME_BOUND,
                                  f"delta decoder {kind}: time <= {DECODER_TIME_BOUND}x "
                                  f"memcpy of the page bytes", kind="time"))
        for label, _ in (xen.variants if xen is not None else ()):
            targets.append(Target(subject, f"Xen's decoder ({label})", 0,
                                  f"delta decoder {kind}: time / Xen's decoder ({label})",
                                  kind="report"))
    for c in cases:
        # Every case starts with cold caches (see evict_caches), untimed.
        c.setup = _chain(evict_caches, c.setup)
    title, desc = DELTA_KINDS.get(kind, ("compressed checkpoint", ""))
    return Group(f"delta-{kind}", f"delta decoder: {title} ({npages} pages, "
                 f"{fmt_bytes(len(buf))} compressed, {source})", "page bytes", cases,
                 primary, targets,
                 {"pages": npages, "compressed_bytes": int(len(buf)), "kinds": kinds,
                  "description": desc, "source": source}, pool.shutdown)


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
            with LegacyStream(path, defer_pages=True) as stream:
                h.value = restore_result(stream, output=out, sync=False)

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
    targets = [Target(nosync, primary, 1.10,
                      "restore to a raw file, no fsync: time <= 1.10x cp", kind="time"),
               Target(subject, "cp of the stream + fsync of the copy", 1.10,
                      "restore to a raw file, fsync: time <= 1.10x cp + fsync", kind="time")] \
        if not info["compressed"] else []
    ttl = title or (f"restore to a raw file: {fmt_bytes(n)} "
                    f"{'compressed Remus ' if info['compressed'] else ''}stream, "
                    f"{fmt_bytes(info['image_bytes'])} image, on {_fs_type(workdir)}")
    return Group(key, ttl, "stream bytes", cases, primary, targets, info)


def remus_group(path, workdir, ref_path=None, info=None):
    """A whole compressed Remus restore, 1 and 2 threads, in memory
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


# ============================================================== the command
GROUP_KEYS = (["pfn32", "pfn64", "scatter-seq", "scatter-ran"]
              + [f"delta-{k}" for k in DELTA_KINDS]
              + ["restore-memory", "restore-file", "restore-remus", "restore-linear",
                 "convert", "convert-remus", "startup", "process-restore", "process-remus",
                 "memory"])


# Relative cost of a group (its share of a time budget): kernels are cheap,
# whole processes over whole streams are not.
WEIGHTS = {"pfn": 1, "scatter": 2, "delta": 3, "startup": 1, "process-restore": 6,
           "process-remus": 9, "memory": 2}


def weight(key):
    return next((w for k, w in WEIGHTS.items() if key.startswith(k)), 4)


def _matches(key, pats):
    return any(key == p or key.startswith(p) for p in pats)


def _selected(key, only, skip=None):
    if skip and _matches(key, skip):
        return False
    return not only or _matches(key, only)


def plan(size, stream, workdir, only=None, skip=None, log=None, xen=None, detail=True):
    """(key, builder) pairs in the order they run.  Builders make their
    inputs only when called, so one group's data is freed before the next
    group's is made.  xen: bench.xen.XenDecoders, or None; detail: the
    diagnostic cases too (see delta_group)."""
    if stream is not None:
        return stream_plan(stream, workdir, only, skip, log, xen)
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
            out.append((key, lambda k=kind: delta_group(k, kpages, xen=xen, detail=detail)))
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
    if _selected("startup", only, skip):
        out.append(("startup", lambda: startup_group(files)))
    if _selected("process-restore", only, skip):
        out.append(("process-restore", lambda: restore_process_group(
            files.get("hvm", size), workdir, _stream_info(files.get("hvm", size)))))
    if _selected("process-remus", only, skip):
        out.append(("process-remus", lambda: restore_process_group(
            files.get("remus", size), workdir, _stream_info(files.get("remus", size)),
            key="process-remus")))
    if _selected("memory", only, skip):
        out.append(("memory", lambda: memory_rows(files.get("hvm", size), workdir)
                    + [memory_row(files.get("remus", size), workdir, "remus-memory")]))
    return out


def _stream_delta_group(scan, xen=None):
    buf, pfns = scan["cbuf"], scan["cpfns"]
    order_pfns = pfns.astype(np.uint64)
    image = anonymous_buffer(scan["p2m_size"] * PAGE_SIZE)
    image.reshape(-1, PAGE_SIZE)[np.unique(pfns).astype(np.intp)] = 1   # warm those pages
    return delta_group("stream", buf=buf, pfns=order_pfns, image=image,
                       source="this stream's largest compressed checkpoint", xen=xen)


def stream_plan(stream, workdir, only=None, skip=None, log=None, xen=None):
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
        return _stream_delta_group(scan(), xen) if scan()["cbuf"] is not None else None

    def memory_group():
        info = scan()["info"]
        threads = (2, 1) if info["compressed"] else (None,)
        return restore_memory_group(stream, workdir, ref_path(), threads=threads, info=info)

    def file_group():
        return restore_file_group(stream, workdir, ref_path(), info=scan()["info"])

    def convert():
        return convert_group(stream, workdir, scan()["info"])

    def processes():
        info = scan()["info"]
        return restore_process_group(stream, workdir, info,
                                     key="process-remus" if info["compressed"]
                                     else "process-restore")

    builders = [("pfn", pfn), ("delta", delta), ("restore-memory", memory_group),
                ("restore-file", file_group), ("convert", convert), ("process", processes),
                ("memory", lambda: memory_rows(stream, workdir))]
    return [(key, build) for key, build in builders if _selected(key, only, skip)]
