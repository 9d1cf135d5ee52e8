"""Plain numpy/Python twins of the native kernels: same signatures, same
results, same faults.  They define what the C code must do; the test suite
runs every kernel against its twin, and XLEGACY_BACKEND=reference runs the
whole package on them."""
import os

import numpy as np

from . import faults
from .format import PAGE_SIZE

NAME = "reference"

_DATA_TYPES = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
_INVALID = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)


def _bytes(buf):
    if isinstance(buf, np.ndarray):
        return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _check_pfns(pfns, limit, locate, what="page"):
    bad = np.flatnonzero(pfns >= limit)
    if bad.size:
        i = int(bad[0])
        faults.raise_fault(faults.PFN_RANGE, i, 0, int(pfns[i]), limit, locate, what)


def decode_pfns(raw, width, p2m_size, types=None, pfns=None, data_pfns=None, locate=0):
    if width not in (4, 8):
        raise ValueError(f"width must be 4 or 8, not {width}")
    src = _bytes(raw)
    if src.size % width:
        raise ValueError(f"{src.size} bytes is not a whole number of {width}-byte entries")
    entries = src.view("<u8" if width == 8 else "<u4").astype(np.uint64)
    n = entries.size
    t = ((entries >> np.uint64(28)) & np.uint64(0xF)).astype(np.uint8)
    p = entries & np.uint64(0x0FFFFFFF)
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
    for arr, name, need in ((types, "types", n), (pfns, "pfns", n), (data_pfns, "data_pfns", n)):
        if arr is not None and (arr.size < need or not arr.flags.writeable):
            raise ValueError(f"{name} holds {arr.size} items, needs {need}")
    if types is not None:
        types[:n] = t
        t = types[:n]
    if pfns is not None:
        pfns[:n] = p
        p = pfns[:n]
    if data_pfns is not None:
        data_pfns[:data.size] = data
        data = data_pfns[:data.size]
    return t, p, data


def _pages(pages):
    src = _bytes(pages)
    if src.size % PAGE_SIZE:
        raise ValueError(f"page data of {src.size} bytes is not a whole number of pages")
    return src.reshape(-1, PAGE_SIZE), src.size // PAGE_SIZE


def scatter_pages(pages, pfns, image, locate=0):
    src, n = _pages(pages)
    pfns = np.asarray(pfns, dtype=np.uint64)[:n]
    limit = image.size // PAGE_SIZE
    _check_pfns(pfns, limit, locate)
    view = image[: limit * PAGE_SIZE].reshape(-1, PAGE_SIZE)
    for i in range(n):  # in order, so a repeated pfn ends with its last copy
        view[int(pfns[i])] = src[i]
    return n


def pwrite_pages(fd, pages, pfns, image_pages, locate=0):
    src, n = _pages(pages)
    pfns = np.asarray(pfns, dtype=np.uint64)[:n]
    _check_pfns(pfns, image_pages, locate)
    for i in range(n):
        data = src[i].tobytes()
        off = int(pfns[i]) * PAGE_SIZE
        while data:
            w = os.pwrite(fd, data, off)
            data, off = data[w:], off + w
    return n


def compare_pages(pages, pfns, image, locate=0):
    src, n = _pages(pages)
    pfns = np.asarray(pfns, dtype=np.uint64)[:n]
    limit = image.size // PAGE_SIZE
    _check_pfns(pfns, limit, locate)
    view = image[: limit * PAGE_SIZE].reshape(-1, PAGE_SIZE)
    return np.array([not np.array_equal(view[int(pfns[i])], src[i]) for i in range(n)],
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
    buf = bytes(_bytes(buf))
    starts = np.empty(npages + 1, dtype=np.uint64)
    kinds = [0, 0, 0]
    pos = 0
    for i in range(npages):
        starts[i] = pos
        pos, kind = _walk(buf, pos, None, i, locate)
        kinds[kind] += 1
    starts[npages] = pos
    if pos != len(buf):
        faults.raise_fault(faults.PAGES_EXTRA, npages, pos, len(buf) - pos, npages, locate)
    return starts, {"empty": kinds[0], "full": kinds[1], "delta": kinds[2]}


def delta_apply(buf, starts, pfns, image, first=0, count=None, locate=0):
    buf = bytes(_bytes(buf))
    npages = starts.size - 1
    if count is None:
        count = npages - first
    if first < 0 or count < 0 or first + count > npages:
        raise ValueError(f"page range {first}+{count} outside 0..{npages}")
    pfns = np.asarray(pfns, dtype=np.uint64)
    limit = image.size // PAGE_SIZE
    sel = pfns[first:first + count]
    bad = np.flatnonzero(sel >= limit)
    if bad.size:
        i = int(bad[0])
        faults.raise_fault(faults.PFN_RANGE, first + i, 0, int(sel[i]), limit, locate)
    view = image[: limit * PAGE_SIZE].reshape(-1, PAGE_SIZE)
    for i in range(first, first + count):
        _walk(buf, int(starts[i]), view[int(pfns[i])], i, locate)
    return count


def _read_range(fd, offset, nbytes):
    out = bytearray()
    while len(out) < nbytes:
        part = os.pread(fd, nbytes - len(out), offset + len(out))
        if not part:
            break
        out += part
    return bytes(out)


def pread_pages(fd, offset, pfns, image, locate=0):
    pfns = np.asarray(pfns, dtype=np.uint64)
    n = pfns.size
    limit = image.size // PAGE_SIZE
    _check_pfns(pfns, limit, locate)
    data = _read_range(fd, offset, n * PAGE_SIZE)
    whole = len(data) // PAGE_SIZE
    view = image[: limit * PAGE_SIZE].reshape(-1, PAGE_SIZE)
    src = np.frombuffer(data, dtype=np.uint8)
    for i in range(whole):
        view[int(pfns[i])] = src[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
    if len(data) < n * PAGE_SIZE:
        # the native kernel has written whole runs up to the short page too
        rem = len(data) - whole * PAGE_SIZE
        if rem:
            view[int(pfns[whole])][:rem] = src[whole * PAGE_SIZE:]
        faults.raise_fault(faults.SHORT_READ, whole, len(data), 0, n * PAGE_SIZE, locate)
    return n


def copy_pages(in_fd, offset, pfns, out_fd, image_pages, locate=0):
    pfns = np.asarray(pfns, dtype=np.uint64)
    n = pfns.size
    _check_pfns(pfns, image_pages, locate)
    data = _read_range(in_fd, offset, n * PAGE_SIZE)
    whole = len(data) // PAGE_SIZE
    for i in range(whole):
        os.pwrite(out_fd, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE], int(pfns[i]) * PAGE_SIZE)
    if len(data) < n * PAGE_SIZE:
        faults.raise_fault(faults.SHORT_READ, whole, len(data), 0, n * PAGE_SIZE, locate)
    return n
