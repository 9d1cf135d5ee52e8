"""Plain numpy/Python twins of the native kernels: same signatures, same
argument checks (shared in _args.py), same results, same faults.  They
define what the C code must do; the test suite runs every kernel against its
twin, and XLEGACY_BACKEND=reference runs the whole package on them."""
import os

import numpy as np

from . import faults
from ._args import (file_pages, flags_out, image_pages, offsets, page_index, page_out, page_range, pages as _pages,
                    pfn_entries, pfn_list, starts_array, u8_in, width as _width)
from .. import format as F
from ..fileio import REFUSED, pread_exact
from ..format import PAGE_SIZE

NAME = "reference"

_DATA_TYPES = np.array(F.DATA_TYPES, dtype=bool)
_INVALID = np.isin(np.arange(16), F.INVALID_TYPES)


def _check_pfns(pfns, limit, locate, what="page", first=0):
    bad = np.flatnonzero(pfns >= np.uint64(limit))
    if bad.size:
        i = int(bad[0])
        faults.raise_fault(faults.PFN_RANGE, first + i, 0, int(pfns[i]), limit, locate, what)


def _rows(image, limit):
    return image[: limit * PAGE_SIZE].reshape(-1, PAGE_SIZE)


def decode_pfns(raw, width, p2m_size, types=None, pfns=None, data_pfns=None, locate=0):
    src, n, types, pfns, data_pfns = pfn_entries(raw, width, types, pfns, data_pfns)
    entries = src.view("<u8" if width == 8 else "<u4").astype(np.uint64)
    t = ((entries >> np.uint64(F.ENTRY_TYPE_SHIFT)) & np.uint64(0xF)).astype(np.uint8)
    p = entries & np.uint64(F.ENTRY_PFN_MASK)
    upper = (entries >> np.uint64(32)) != 0
    invalid = _INVALID[t]
    out_of_range = (t != 0xF) & (p >= np.uint64(p2m_size))
    bad = np.flatnonzero(upper | invalid | out_of_range)
    if bad.size:
        i = int(bad[0])
        off = i * width
        if upper[i]:
            faults.raise_fault(faults.UPPER_BITS, i, off, int(entries[i]), 0, locate)
        if invalid[i]:
            faults.raise_fault(faults.BAD_TYPE, i, off, int(entries[i]), int(t[i]), locate)
        faults.raise_fault(faults.PFN_RANGE, i, off, int(p[i]), p2m_size, locate, "PFN entry")
    data = p[_DATA_TYPES[t]]
    types[:n] = t
    pfns[:n] = p
    data_pfns[:data.size] = data
    return types[:n], pfns[:n], data_pfns[:data.size]


def count_data(raw, width, p2m_size, locate=0):
    return int(decode_pfns(raw, width, p2m_size, locate=locate)[2].size)


def mark_pfns(raw, width, p2m_size, maps, counts, held, locate=0):
    size = min(memoryview(b).nbytes for b in maps[:4])
    if p2m_size > size:
        faults.raise_fault(faults.BAD_ARG, -1, 0, p2m_size, size, locate)
    need, have = (p2m_size + 0xFFFF) >> 16, memoryview(maps[4]).nbytes
    if need > have:
        faults.raise_fault(faults.BAD_ARG, -1, 0, need, have, locate)
    types, pfns, data = decode_pfns(raw, width, p2m_size, locate=locate)
    present, last, xalloc, broken, chunks = (np.frombuffer(b, np.uint8) for b in maps)
    has = _DATA_TYPES[types]
    touched = np.unique(pfns[has])
    was = touched[present[touched] == 1]
    for t, c in enumerate(np.bincount(last[was], minlength=16)):
        held[t] -= int(c)
    present[pfns[has]] = 1
    chunks[pfns[has] >> np.uint64(16)] = 1
    last[pfns[has]] = types[has]         # in order: a repeat ends with its last type
    for t, c in enumerate(np.bincount(last[touched], minlength=16)):
        held[t] += int(c)
    xalloc[pfns[types == F.XALLOC]] = 1
    broken[pfns[types == F.BROKEN]] = 1
    for t, c in enumerate(np.bincount(types, minlength=16)):
        counts[t] += int(c)
    return int(data.size)


def _page_rows(pages, pfns, image, writable, locate):
    """scatter/compare's arguments checked: (n, page rows, pfns, image rows)."""
    src, n = _pages(pages)
    pfns = pfn_list(pfns, n)[:n]
    limit = image_pages(image, writable)
    _check_pfns(pfns, limit, locate)
    return n, src.reshape(-1, PAGE_SIZE), pfns, _rows(image, limit)


def scatter_pages(pages, pfns, image, locate=0):
    n, rows, pfns, view = _page_rows(pages, pfns, image, True, locate)
    for i in range(n):  # in order, so a repeated pfn ends with its last copy
        view[int(pfns[i])] = rows[i]
    return n


def pwrite_pages(fd, pages, pfns, image_pages_, locate=0):
    src, n = _pages(pages)
    pfns = pfn_list(pfns, n)[:n]
    limit = file_pages(image_pages_)
    _check_pfns(pfns, limit, locate)
    for i in range(n):
        # A view, not a copy: like the C kernel, only the system call reads
        # the bytes (an input mapping that shrank is EFAULT, not SIGBUS).
        data = memoryview(src[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
        off = int(pfns[i]) * PAGE_SIZE
        while data:
            w = os.pwrite(fd, data, off)
            data, off = data[w:], off + w
    return n


def compare_pages(pages, pfns, image, locate=0):
    n, rows, pfns, view = _page_rows(pages, pfns, image, False, locate)
    return np.array([not np.array_equal(view[int(pfns[i])], rows[i]) for i in range(n)],
                    dtype=np.bool_)


def _walk(buf, pos, page, index, locate):
    """One page encoding from pos; writes into page (a uint8[4096]) if given."""
    size = len(buf)
    if pos >= size:
        faults.raise_fault(faults.PAGES_SHORT, index, pos, 0, size, locate)
    first = buf[pos]
    if first == 0x00:
        return pos + 1, 0
    if first == 0x80:
        if size - pos - 1 < PAGE_SIZE:
            faults.raise_fault(faults.RUN_PAST_BUFFER, index, pos, PAGE_SIZE,
                               size - pos - 1, locate)
        if page is not None:
            page[:] = np.frombuffer(buf, np.uint8, PAGE_SIZE, pos + 1)
        return pos + 1 + PAGE_SIZE, 1
    at = 0
    while at < PAGE_SIZE:
        if pos >= size:
            faults.raise_fault(faults.PAGES_SHORT, index, pos, at, PAGE_SIZE, locate)
        marker = buf[pos]
        nbytes = (marker & 0x7F) * 4
        if nbytes == 0:
            faults.raise_fault(faults.ZERO_MARKER, index, pos, marker, at, locate)
        if at + nbytes > PAGE_SIZE:
            faults.raise_fault(faults.RUN_PAST_PAGE, index, pos, at + nbytes, PAGE_SIZE, locate)
        pos += 1
        if not marker & 0x80:
            if size - pos < nbytes:
                faults.raise_fault(faults.RUN_PAST_BUFFER, index, pos - 1, nbytes,
                                   size - pos, locate)
            if page is not None:
                page[at:at + nbytes] = np.frombuffer(buf, np.uint8, nbytes, pos)
            pos += nbytes
        at += nbytes
    return pos, 2


def delta_index(buf, npages, locate=0):
    buf = bytes(u8_in(buf))
    if npages < 0:
        raise ValueError(f"npages must be >= 0, not {npages}")
    walk = min(npages, len(buf))        # each page takes at least one byte
    starts = np.empty(walk + 1, dtype=np.uint64)
    kinds = [0, 0, 0]
    pos = 0
    for i in range(walk):
        starts[i] = pos
        pos, kind = _walk(buf, pos, None, i, locate)
        kinds[kind] += 1
    starts[walk] = pos
    if walk < npages:
        faults.raise_fault(faults.PAGES_SHORT, len(buf), len(buf), 0, len(buf), locate)
    if pos != len(buf):
        faults.raise_fault(faults.PAGES_EXTRA, npages, pos, len(buf) - pos, npages, locate)
    return starts, {"empty": kinds[0], "full": kinds[1], "delta": kinds[2]}


def delta_apply(buf, starts, pfns, image, first=0, count=None, locate=0):
    buf = bytes(u8_in(buf))
    starts = starts_array(starts)
    npages = starts.size - 1
    first, count = page_range(first, count, npages)
    pfns = pfn_list(pfns, npages)
    limit = image_pages(image, True)
    _check_pfns(pfns[first:first + count], limit, locate, first=first)
    view = _rows(image, limit)
    for i in range(first, first + count):
        _walk(buf, int(starts[i]), view[int(pfns[i])], i, locate)
    return count


def delta_scan(buf, max_pages):
    buf = bytes(u8_in(buf))
    if max_pages < 0:
        raise ValueError(f"max_pages must be >= 0, not {max_pages}")
    starts = []
    pos = 0
    while len(starts) < max_pages and pos < len(buf):
        try:
            end, _ = _walk(buf, pos, None, len(starts), 0)
        except faults.KernelFault:
            break
        starts.append(pos)
        pos = end
    return np.array(starts, dtype=np.uint64), pos


def _read_range(fd, offset, nbytes):
    buf = bytearray(nbytes)
    return bytes(memoryview(buf)[:pread_exact(fd, buf, offset)])


def pread_pages(fd, offset, pfns, image, locate=0):
    pfns = pfn_list(pfns, 0)
    n = pfns.size
    limit = image_pages(image, True)
    _check_pfns(pfns, limit, locate)
    data = _read_range(fd, offset, n * PAGE_SIZE)
    whole = len(data) // PAGE_SIZE
    view = _rows(image, limit)
    src = np.frombuffer(data, dtype=np.uint8)
    for i in range(whole):
        view[int(pfns[i])] = src[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
    if len(data) < n * PAGE_SIZE:
        rem = len(data) - whole * PAGE_SIZE
        if rem:   # the native kernel has read the partial page too
            view[int(pfns[whole])][:rem] = src[whole * PAGE_SIZE:]
        faults.raise_fault(faults.SHORT_READ, whole, len(data), 0, n * PAGE_SIZE, locate)
    return n


def copy_pages(in_fd, offset, pfns, out_fd, image_pages_, locate=0):
    """As the C kernel: each run of consecutive pfns by copy_file_range, so
    no page passes through this process; once the kernel refuses the pair,
    read and written."""
    pfns = pfn_list(pfns, 0)
    n = pfns.size
    limit = file_pages(image_pages_)
    _check_pfns(pfns, limit, locate)
    kernel = hasattr(os, "copy_file_range")
    i = 0
    while i < n:
        k = 1
        while i + k < n and int(pfns[i + k]) == int(pfns[i]) + k:
            k += 1
        src, dst, want = offset + i * PAGE_SIZE, int(pfns[i]) * PAGE_SIZE, k * PAGE_SIZE
        done = _kernel_copy(in_fd, src, out_fd, dst, want) if kernel else None
        if done is None:
            kernel = False
            data = _read_range(in_fd, src, want)
            _pwrite_all(out_fd, data, dst)
            done = len(data)
        if done < want:
            faults.raise_fault(faults.SHORT_READ, i + done // PAGE_SIZE, i * PAGE_SIZE + done, 0,
                               n * PAGE_SIZE, locate)
        i += k
    return n


def _kernel_copy(in_fd, src, out_fd, dst, want):
    """Bytes copied (fewer: the input ended), None if the kernel refuses."""
    done = 0
    while done < want:
        try:
            got = os.copy_file_range(in_fd, out_fd, want - done, src + done, dst + done)
        except OSError as exc:
            if done == 0 and exc.errno in REFUSED:
                return None
            raise
        if got == 0:
            break
        done += got
    return done


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k


def v2_entries(raw, width):
    _width(width)
    a = np.frombuffer(raw, "<u8" if width == 8 else "<u4").astype(np.uint64)
    kept = a[a != np.uint64(0xF0000000)]
    out = (((kept & np.uint64(0xF0000000)) << np.uint64(32)) | (kept & np.uint64(0x0FFFFFFF)))
    srt = np.sort(kept)
    return kept, out.astype("<u8").tobytes(), bool((srt[1:] == srt[:-1]).any())


def copy_raw_pages(raw, width, p2m_size, in_fd, offset, out_fd, image_pages_, locate=0,
                   pages_at=0, skip=None):
    _width(width)
    limit = file_pages(image_pages_)
    if p2m_size > limit:
        faults.raise_fault(faults.BAD_ARG, -1, 0, p2m_size, limit, locate)
    if skip is not None and len(skip) < p2m_size:
        faults.raise_fault(faults.BAD_ARG, -1, 0, len(skip), p2m_size, locate)
    data = decode_pfns(raw, width, p2m_size, locate=locate)[2]
    if skip is None:
        return copy_pages(in_fd, offset, data, out_fd, limit, locate=pages_at)
    # The pages not skipped, a stretch of consecutive data pages at a time.
    keep = np.frombuffer(skip, np.uint8)[data.astype(np.int64)] == 0
    i = 0
    while i < data.size:
        if not keep[i]:
            i += 1
            continue
        j = i
        while j < data.size and keep[j]:
            j += 1
        copy_pages(in_fd, offset + i * PAGE_SIZE, data[i:j], out_fd, limit,
                   locate=pages_at + i * PAGE_SIZE)
        i = j
    return data.size


def delta_decode(buf, pfns, image, locate=0):
    buf = bytes(u8_in(buf))
    pfns = pfn_list(pfns, 0)
    limit = image_pages(image, True)
    _check_pfns(pfns, limit, locate)
    view = _rows(image, limit)
    kinds = [0, 0, 0]
    pos = 0
    for i in range(pfns.size):
        pos, kind = _walk(buf, pos, view[int(pfns[i])], i, locate)
        kinds[kind] += 1
    if pos != len(buf):
        faults.raise_fault(faults.PAGES_EXTRA, pfns.size, pos, len(buf) - pos, pfns.size, locate)
    return {"empty": kinds[0], "full": kinds[1], "delta": kinds[2]}


def gather_pages(fd, pfns, out, image_pages_, locate=0):
    pfns = pfn_list(pfns, 0)
    n = pfns.size
    limit = file_pages(image_pages_)
    if image_pages(out, True) < n:
        raise ValueError(f"out holds {out.size // PAGE_SIZE} pages, needs {n}")
    _check_pfns(pfns, limit, locate)
    for i in range(n):
        data = _read_range(fd, int(pfns[i]) * PAGE_SIZE, PAGE_SIZE)
        out[i * PAGE_SIZE:i * PAGE_SIZE + len(data)] = np.frombuffer(data, np.uint8)
        if len(data) < PAGE_SIZE:
            faults.raise_fault(faults.SHORT_READ, i, i * PAGE_SIZE + len(data), 0,
                               n * PAGE_SIZE, locate)
    return n


def _check_at(at, size):
    bad = np.flatnonzero((size < PAGE_SIZE) | (at > np.uint64(max(size - PAGE_SIZE, 0))))
    if bad.size:
        i = int(bad[0])
        faults.raise_fault(faults.BAD_ARG, i, 0, int(at[i]), size)


def pwrite_at(fd, src, at, pfns, image_pages_):
    pfns = pfn_list(pfns, 0)
    n = pfns.size
    at = offsets(at, n, "at")
    buf = u8_in(src)
    _check_pfns(pfns, file_pages(image_pages_), 0)
    _check_at(at, buf.size)
    for i in range(n):
        # A view: only the system call reads the bytes, as in the C kernel.
        data = memoryview(buf[int(at[i]):int(at[i]) + PAGE_SIZE])
        off = int(pfns[i]) * PAGE_SIZE
        while data:
            w = os.pwrite(fd, data, off)
            data, off = data[w:], off + w
    return n


def pread_at(fd, offs, out, at):
    offs = offsets(offs, np.asarray(offs).size, "offs")
    n = offs.size
    at = offsets(at, n, "at")
    image_pages(out, True)
    big = np.flatnonzero(offs > np.uint64(2 ** 63 - 1 - PAGE_SIZE))
    if big.size:
        i = int(big[0])
        faults.raise_fault(faults.BAD_ARG, i, 0, int(offs[i]), 2 ** 63 - 1 - PAGE_SIZE)
    _check_at(at, out.size)
    for i in range(n):
        a = int(at[i])
        got = pread_exact(fd, memoryview(out[a:a + PAGE_SIZE]), int(offs[i]))
        if got < PAGE_SIZE:
            faults.raise_fault(faults.SHORT_READ, i, i * PAGE_SIZE + got, 0, n * PAGE_SIZE)
    return n


def read_many(map_, index_pfns, index_offs, want, out=None, found=None):
    m, ip, io = page_index(map_, index_pfns, index_offs)
    want = pfn_list(want, 0)
    n = want.size
    out, flat = page_out(out, n)
    found = flags_out(found, n)
    k = np.searchsorted(ip, want)
    hit = k < ip.size
    hit[hit] = ip[k[hit]] == want[hit]
    offs = io[k[hit]]
    bad = np.flatnonzero((offs > np.uint64(m.size)) |
                         (np.uint64(m.size) - np.minimum(offs, np.uint64(m.size))
                          < np.uint64(PAGE_SIZE)))
    if bad.size:
        i = int(np.flatnonzero(hit)[bad[0]])
        faults.raise_fault(faults.SHORT_READ, i, 0, int(offs[bad[0]]), m.size,
                           what="indexed page")
    rows = flat[:n * PAGE_SIZE].reshape(n, PAGE_SIZE)
    rows[~hit] = 0
    for i, off in zip(np.flatnonzero(hit), offs):
        rows[i] = m[int(off):int(off) + PAGE_SIZE]
    if found is not None:
        found[:n] = hit
    return out, int(hit.sum())


def scan_nodata(buf, width, p2m_size):
    _width(width)
    src = bytes(u8_in(buf))
    fmt = "<Q" if width == 8 else "<I"
    pos = 0
    counts, types, pfns = [], [], []
    while len(src) - pos >= 4:
        n = int.from_bytes(src[pos:pos + 4], "little", signed=True)
        if not 1 <= n <= F.MAX_BATCH or len(src) - pos - 4 < n * width:
            break
        raw = np.frombuffer(src, fmt, n, pos + 4).astype(np.uint64)
        t = ((raw >> np.uint64(F.ENTRY_TYPE_SHIFT)) & np.uint64(0xF)).astype(np.uint8)
        p = raw & np.uint64(F.ENTRY_PFN_MASK)
        ok = ((raw >> np.uint64(32)) == 0) & (t >= 0xD) & ((t == 0xF) | (p < np.uint64(p2m_size)))
        if not ok.all():
            break
        counts.append(n)
        types.append(t)
        pfns.append(p)
        pos += 4 + n * width

    def cat(parts, dt):
        return np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)

    return (len(counts), pos, np.array(counts, np.uint32), cat(types, np.uint8),
            cat(pfns, np.uint64))
