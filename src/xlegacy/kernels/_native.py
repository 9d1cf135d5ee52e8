"""The compiled kernels on numpy arrays (the cffi module itself is loaded by
_light, which also holds the numpy-free entry points).

Each function checks its arguments (dtype, byte order, contiguity, writability,
sizes) because ffi.from_buffer checks none of that, makes exactly one C call,
and turns a negative status into an exception through _light.call (the one
call helper, shared with the numpy-free count_data).
"""

import numpy as np

from . import faults
from ._args import (file_pages, flags_out, offsets, page_index, page_out, image_pages as _image,
                    page_range, pages as _pages, pfn_entries, pfn_list as _pfn_list, starts_array,
                    u8_in as _u8_in, width as _width)

# The cffi module, its ABI check and the numpy-free entry points live in
# _light (the reader uses them without numpy); count_data is re-exported.
from ._light import (ABI_VERSION, bounce_buffer, call, copy_pipe, count_data,  # noqa: F401
                     drop_copy_pipe, ffi, lib)

NAME = "native"


def decode_pfns(raw, width, p2m_size, types=None, pfns=None, data_pfns=None, locate=0):
    """Decode a PFN array of `width`-byte (4 or 8) little-endian entries.

    Returns (types uint8[n], pfns uint64[n], data_pfns uint64[n_data]): the type
    nibble and pfn of each entry, and the pfns of the data-carrying entries in
    order.  Output arrays may be supplied (caller-owned, reused across calls).
    """
    _width(width)
    if types is None and pfns is None and data_pfns is None and _plain_bytes(raw):
        return _decode_pfns_new(raw, width, p2m_size, locate)
    src, n, types, pfns, data_pfns = pfn_entries(raw, width, types, pfns, data_pfns)
    with ffi.from_buffer("uint8_t[]", src) as s, \
            ffi.from_buffer("uint8_t[]", types, require_writable=True) as t, \
            ffi.from_buffer("uint64_t[]", pfns, require_writable=True) as p, \
            ffi.from_buffer("uint64_t[]", data_pfns, require_writable=True) as d:
        rc = call(lib.xl_decode_pfns, s, n, width, p2m_size, t, p, d, data_pfns.size,
                  locate=locate, what="PFN entry")
    return types[:n], pfns[:n], data_pfns[:rc]


def _plain_bytes(raw):
    """bytes, bytearray or a flat contiguous byte memoryview: len() is bytes."""
    if isinstance(raw, (bytes, bytearray)):
        return True
    return isinstance(raw, memoryview) and raw.itemsize == 1 and raw.ndim == 1 \
        and raw.c_contiguous


def _decode_pfns_new(raw, width, p2m_size, locate):
    """decode_pfns for the reader's case (bytes in, new outputs): the wrapper
    cost matters at 1024 entries a call, so one allocation holds pfns and
    data_pfns."""
    if len(raw) % width:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {width}-byte entries")
    n = len(raw) // width
    out = np.empty(2 * n, np.uint64)
    types = np.empty(n, np.uint8)
    o = ffi.from_buffer("uint64_t[]", out, require_writable=True)
    rc = call(lib.xl_decode_pfns, ffi.from_buffer("uint8_t[]", raw), n, width, p2m_size,
              ffi.from_buffer("uint8_t[]", types, require_writable=True), o, o + n, n,
              locate=locate, what="PFN entry")
    return types, out[:n], out[n:n + rc]


def scatter_pages(pages, pfns, image, locate=0):
    """Copy consecutive 4096-byte pages into image at page index pfns[i]."""
    src, n = _pages(pages)
    pfns = _pfn_list(pfns, n)
    image_pages = _image(image, True)
    with ffi.from_buffer("uint8_t[]", src) as s, ffi.from_buffer("uint64_t[]", pfns) as p, \
            ffi.from_buffer("uint8_t[]", image, require_writable=True) as img:
        call(lib.xl_scatter_pages, s, n, p, img, image_pages, locate=locate)
    return n


def pwrite_pages(fd, pages, pfns, image_pages, locate=0):
    """Write consecutive pages to file descriptor fd at pfns[i]*4096."""
    src, n = _pages(pages)
    pfns = _pfn_list(pfns, n)
    image_pages = file_pages(image_pages)
    with ffi.from_buffer("uint8_t[]", src) as s, ffi.from_buffer("uint64_t[]", pfns) as p:
        call(lib.xl_pwrite_pages, fd, s, n, p, image_pages, locate=locate)
    return n


def compare_pages(pages, pfns, image, locate=0):
    """Compare pages with the image; returns a bool array, True where different."""
    src, n = _pages(pages)
    pfns = _pfn_list(pfns, n)
    image_pages = _image(image, False)
    differs = np.empty(n, dtype=np.uint8)
    with ffi.from_buffer("uint8_t[]", src) as s, ffi.from_buffer("uint64_t[]", pfns) as p, \
            ffi.from_buffer("uint8_t[]", image) as img, \
            ffi.from_buffer("uint8_t[]", differs, require_writable=True) as d:
        call(lib.xl_compare_pages, s, n, p, img, image_pages, d, locate=locate)
    return differs.view(np.bool_)


def delta_index(buf, npages, locate=0):
    """Index a checkpoint's compressed buffer holding exactly npages pages.

    Returns (starts uint64[npages+1], kinds dict with empty/full/delta counts).
    """
    src = _u8_in(buf)
    if npages < 0:
        raise ValueError(f"npages must be >= 0, not {npages}")
    # Every page takes at least one byte: an untrusted count beyond the
    # buffer's length is decided without allocating `starts` for it.
    walk = min(npages, src.size)
    starts = np.empty(walk + 1, dtype=np.uint64)
    kinds = np.zeros(3, dtype=np.uint64)
    with ffi.from_buffer("uint8_t[]", src) as s, \
            ffi.from_buffer("uint64_t[]", starts, require_writable=True) as st, \
            ffi.from_buffer("uint64_t[]", kinds, require_writable=True) as k:
        call(lib.xl_delta_index, s, src.size, walk, st, k, locate=locate)
    if walk < npages:
        faults.raise_fault(faults.PAGES_SHORT, src.size, src.size, 0, src.size, locate)
    return starts, {"empty": int(kinds[0]), "full": int(kinds[1]), "delta": int(kinds[2])}


def delta_apply(buf, starts, pfns, image, first=0, count=None, locate=0):
    """Apply pages [first, first+count) of an indexed compressed buffer."""
    src = _u8_in(buf)
    starts = starts_array(starts)
    npages = starts.size - 1
    first, count = page_range(first, count, npages)
    pfns = _pfn_list(pfns, npages)
    image_pages = _image(image, True)
    with ffi.from_buffer("uint8_t[]", src) as s, ffi.from_buffer("uint64_t[]", starts) as st, \
            ffi.from_buffer("uint64_t[]", pfns) as p, \
            ffi.from_buffer("uint8_t[]", image, require_writable=True) as img:
        call(lib.xl_delta_apply, s, src.size, st, p, first, count, img, image_pages,
             locate=locate)
    return count


def delta_scan(buf, max_pages):
    """The whole, valid page encodings at the start of buf (at most
    max_pages): returns (starts uint64[k], bytes walked).  A page that
    crosses the end of buf, or breaks a rule, ends the scan untaken."""
    src = _u8_in(buf)
    if max_pages < 0:
        raise ValueError(f"max_pages must be >= 0, not {max_pages}")
    cap = min(max_pages, src.size)          # each page takes at least one byte
    starts = np.empty(cap, dtype=np.uint64)
    used = ffi.new("uint64_t *")
    with ffi.from_buffer("uint8_t[]", src) as s, \
            ffi.from_buffer("uint64_t[]", starts, require_writable=True) as st:
        k = call(lib.xl_delta_scan, s, src.size, cap, st, used)
    return starts[:k], int(used[0])



def pread_pages(fd, offset, pfns, image, locate=0):
    """Read len(pfns) consecutive pages at file offset `offset` of fd straight
    into image at their pfns (no intermediate buffer)."""
    pfns = _pfn_list(pfns, 0)
    n = pfns.size
    image_pages = _image(image, True)
    with ffi.from_buffer("uint64_t[]", pfns) as p, \
            ffi.from_buffer("uint8_t[]", image, require_writable=True) as img:
        call(lib.xl_pread_pages, fd, offset, n, p, img, image_pages, locate=locate)
    return n


def copy_pages(in_fd, offset, pfns, out_fd, image_pages, locate=0):
    """Copy len(pfns) consecutive pages at `offset` of in_fd to out_fd at
    pfn*4096, in the kernel (splice through _light.copy_pipe, else
    copy_file_range) where it can."""
    pfns = _pfn_list(pfns, 0)
    n = pfns.size
    image_pages = file_pages(image_pages)
    bounce = bounce_buffer()     # (for file systems the kernel cannot copy between)
    pipe_r, pipe_w, pipe_size = copy_pipe()
    try:
        with ffi.from_buffer("uint64_t[]", pfns) as p, \
                ffi.from_buffer("uint8_t[]", bounce, require_writable=True) as b:
            call(lib.xl_copy_pages, in_fd, offset, n, p, out_fd, image_pages,
                 pipe_r, pipe_w, pipe_size, b, len(bounce), locate=locate)
    except BaseException:
        drop_copy_pipe()
        raise
    return n


def delta_decode(buf, pfns, image, locate=0):
    """Decode a checkpoint's whole compressed buffer (exactly len(pfns) page
    encodings) into image at pfns, in one pass.  Returns the EMPTY/FULL/delta
    counts.  pfns are checked before any write; a fault in the data leaves
    the pages before it applied."""
    src = _u8_in(buf)
    pfns = _pfn_list(pfns, 0)
    n = pfns.size
    image_pages = _image(image, True)
    kinds = np.zeros(3, dtype=np.uint64)
    with ffi.from_buffer("uint8_t[]", src) as s, ffi.from_buffer("uint64_t[]", pfns) as p, \
            ffi.from_buffer("uint8_t[]", image, require_writable=True) as img, \
            ffi.from_buffer("uint64_t[]", kinds, require_writable=True) as k:
        call(lib.xl_delta_decode, s, src.size, n, p, img, image_pages, k, locate=locate)
    return {"empty": int(kinds[0]), "full": int(kinds[1]), "delta": int(kinds[2])}


def gather_pages(fd, pfns, out, image_pages, locate=0):
    """Read the pages at pfns of image file fd into consecutive pages of out
    (a writable uint8 array of at least len(pfns)*4096 bytes)."""
    pfns = _pfn_list(pfns, 0)
    n = pfns.size
    image_pages = file_pages(image_pages)
    if _image(out, True) < n:
        raise ValueError(f"out holds {out.size // 4096} pages, needs {n}")
    with ffi.from_buffer("uint64_t[]", pfns) as p, \
            ffi.from_buffer("uint8_t[]", out, require_writable=True) as o:
        call(lib.xl_gather_pages, fd, p, n, o, image_pages, locate=locate)
    return n


def pwrite_at(fd, src, at, pfns, image_pages):
    """Write page i, the 4096 bytes at src[at[i]:], to file descriptor fd at
    pfns[i]*4096 (src: any bytes-like, e.g. a read-only mapping of the
    input, whose bytes only the system call reads).  Runs of consecutive
    pfns go in one pwritev."""
    pfns = _pfn_list(pfns, 0)
    n = pfns.size
    at = offsets(at, n, "at")
    buf = _u8_in(src)
    image_pages = file_pages(image_pages)
    with ffi.from_buffer("uint8_t[]", buf) as s, ffi.from_buffer("uint64_t[]", at) as a, \
            ffi.from_buffer("uint64_t[]", pfns) as p:
        call(lib.xl_pwrite_at, fd, s, buf.size, a, p, n, image_pages)
    return n


def pread_at(fd, offs, out, at):
    """Read page i from byte offset offs[i] of fd into out[at[i]:at[i]+4096]
    (out: a writable uint8 array).  Runs of consecutive offsets go in one
    preadv."""
    offs = offsets(offs, np.asarray(offs).size, "offs")
    n = offs.size
    at = offsets(at, n, "at")
    _image(out, True)
    with ffi.from_buffer("uint64_t[]", offs) as o, ffi.from_buffer("uint64_t[]", at) as a, \
            ffi.from_buffer("uint8_t[]", out, require_writable=True) as d:
        call(lib.xl_pread_at, fd, o, n, d, out.size, a)
    return n


def read_many(map_, index_pfns, index_offs, want, out=None, found=None):
    """Read the pages of `want` (pfns) through a page index: index_pfns
    (uint64, strictly increasing) and index_offs (uint64: where each one's
    page starts in map_, a uint8 buffer such as a read-only mmap view).

    out: uint8, C-contiguous, >= len(want)*4096 bytes (default: a new
    (n, 4096) array); page i of it receives want[i]'s page, zeros when the
    index lacks it.  found: optional uint8/bool[n], 1 where the pfn was found.
    Returns (out, number found)."""
    m, ip, io = page_index(map_, index_pfns, index_offs)
    want = _pfn_list(want, 0)
    n = want.size
    out, flat = page_out(out, n)
    found = flags_out(found, n)
    fptr = ffi.NULL if found is None else ffi.from_buffer("uint8_t[]", found.view(np.uint8),
                                                          require_writable=True)
    with ffi.from_buffer("uint8_t[]", m) as mp, \
            ffi.from_buffer("uint64_t[]", ip) as p, \
            ffi.from_buffer("uint64_t[]", io) as o, \
            ffi.from_buffer("uint64_t[]", want) as w, \
            ffi.from_buffer("uint8_t[]", flat, require_writable=True) as d:
        rc = call(lib.xl_read_many, mp, m.size, p, o, ip.size, w, n, d, fptr,
                  what="indexed page")
    return out, rc


def scan_nodata(buf, width, p2m_size):
    """Walk the run of page batches at the start of buf (a bytes-like that
    begins at a chunk id) whose entries carry no page (XTAB, XALLOC,
    BROKEN) and pass the reader's checks; stops before anything else.

    Returns (batches, used bytes, counts uint32[batches] entries per batch,
    types uint8[entries], pfns uint64[entries]).  Outputs are sized by buf,
    never by what the bytes claim."""
    _width(width)
    src = _u8_in(buf)
    cap = src.size // width
    ncap = src.size // (4 + width)
    types = np.empty(cap, np.uint8)
    pfns = np.empty(cap, np.uint64)
    counts = np.empty(ncap, np.uint32)
    used = ffi.new("uint64_t *")
    with ffi.from_buffer("uint8_t[]", src) as s, \
            ffi.from_buffer("uint8_t[]", types, require_writable=True) as t, \
            ffi.from_buffer("uint64_t[]", pfns, require_writable=True) as p, \
            ffi.from_buffer("uint32_t[]", counts, require_writable=True) as c:
        nb = lib.xl_scan_nodata(s, src.size, width, p2m_size, t, p, cap, c, ncap, used)
    if nb < 0:   # pragma: no cover - width was checked above
        raise ValueError(f"scan_nodata: bad arguments ({nb})")
    ne = int(counts[:nb].sum(dtype=np.int64))
    return nb, int(used[0]), counts[:nb], types[:ne], pfns[:ne]
