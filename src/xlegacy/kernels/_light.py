"""The compiled kernels' entry points that need no numpy: the only importer
of the cffi module, and what the framing path (reader, infer, convert)
calls.

Reading a stream's framing must not cost numpy's import: the converter is
started once per migration and its whole run on a large stream is a
fraction of a second.  count_data takes any bytes-like object, checks the
arguments itself (ffi.from_buffer checks none of that) and makes one C call
through `call`, the one place where a kernel's negative status becomes an
exception.  _native.py builds the numpy kernels on the same ffi/lib/call.
"""
import contextlib
import os
import threading
from array import array

from . import faults

try:
    from .._ffi import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "xlegacy's compiled core (xlegacy._ffi) is missing: reinstall with "
        "'pip install .' so it is built, or set XLEGACY_BACKEND=reference"
    ) from exc

ABI_VERSION = 19
if lib.xl_abi_version() != ABI_VERSION or lib.XL_ABI_VERSION != ABI_VERSION:
    raise ImportError(
        f"stale xlegacy._ffi build (ABI {lib.xl_abi_version()}, expected "
        f"{ABI_VERSION}): reinstall the package")


_local = threading.local()


def call(kernel, *args, locate=0, what="page", pages_at=None):
    """Call `kernel` (a lib.xl_* function) with args and a fault record as
    its last argument; return its status, or raise the exception the fault
    names (faults.raise_fault) when the status is negative.

    locate: an int added to the fault's buffer offset, or a callable mapping
    it, to give the absolute stream offset; what: the unit the fault's index
    counts ("page", "PFN entry").  The fault record is one per thread: a
    kernel fills it only on failure, and it is read before the next call.
    """
    fault = getattr(_local, "fault", None)
    if fault is None:
        fault = _local.fault = ffi.new("xl_fault *")
    rc = kernel(*args, fault)
    if rc < 0:
        if pages_at is not None and rc == faults.SHORT_READ:
            locate, what = pages_at, "page"
        faults.raise_fault(rc, fault.index, fault.offset, fault.value, fault.limit,
                           locate, what)
    return rc


def _entries(raw, width):
    """Entries in a PFN array (the same argument errors as _args.width and
    decode_pfns)."""
    if width not in (4, 8):
        raise ValueError(f"width must be 4 or 8, not {width}")
    n, rest = divmod(memoryview(raw).nbytes, width)
    if rest:
        raise ValueError(f"{n * width + rest} bytes is not a whole number of "
                         f"{width}-byte entries")
    return n


def count_data(raw, width, p2m_size, locate=0):
    """Check a PFN array as decode_pfns does and return how many of its
    entries carry a page (how many pages follow it in the stream).

    raw: bytes-like, `width` (4 or 8) byte little-endian entries.  Faults
    (bad type, bits 63..32, pfn >= p2m_size) raise KernelFault with the
    entry's offset added to `locate`."""
    n = _entries(raw, width)
    with ffi.from_buffer("uint8_t[]", raw) as s:
        return call(lib.xl_count_data, s, n, width, p2m_size, locate=locate, what="PFN entry")



def splice_append(in_fd, offset, n, out_fd, pipe_r, pipe_w, pipe_size):
    """n bytes at `offset` of in_fd appended to out_fd (at its position) by
    splice through the given empty pipe, in one call that holds no GIL.
    Returns (errno or 0, bytes that reached the output); after an error the
    pipe is empty again."""
    if n < 0 or offset < 0:
        raise ValueError(f"bad range: {n} bytes at {offset}")
    bounce = bounce_buffer()
    done = ffi.new("int64_t *")
    with ffi.from_buffer("uint8_t[]", bounce, require_writable=True) as b:
        rc = lib.xl_splice_append(in_fd, offset, n, out_fd, pipe_r, pipe_w, pipe_size,
                                  b, len(bounce), done)
    if rc < 0:         # pragma: no cover - the arguments were checked above
        raise ValueError(f"splice_append: bad arguments (code {rc})")
    return rc, done[0]


def v2_entries(raw, width):
    """A batch's entries as a v2 PAGE_DATA record carries them, without
    numpy: bare XTAB entries (0xf0000000) dropped, the others as (type << 60)
    | pfn.  Returns (the kept raw values (an array of 'Q'), the v2 entries as
    little-endian bytes, whether a kept raw value repeats)."""
    n = _entries(raw, width)
    kept = array("Q", bytes(8 * n))
    out = bytearray(8 * n)
    scratch = ffi.new("uint64_t[]", max(n, 1))
    repeats = ffi.new("int32_t *")
    with ffi.from_buffer("uint8_t[]", raw) as s, \
            ffi.from_buffer("uint64_t[]", kept, require_writable=True) as k, \
            ffi.from_buffer("uint8_t[]", out, require_writable=True) as o:
        got = lib.xl_v2_entries(s, n, width, k, o, scratch, n, repeats)
    if got < 0:         # pragma: no cover - the arguments were checked above
        raise ValueError(f"v2_entries: bad arguments (code {got})")
    del kept[got:]
    return kept, bytes(out[:8 * got]), bool(repeats[0])


def mark_pfns(raw, width, p2m_size, maps, counts, held, locate=0):
    """Check a PFN array as count_data does and fold its entries into
    per-PFN state (what `info` reports, without numpy).  maps: writable
    buffers (present, last_type, xalloc, broken) of at least p2m_size bytes
    and chunks, of at least (p2m_size + 65535) >> 16: present[pfn] = 1,
    last_type[pfn] = type and chunks[pfn >> 16] = 1 for each data-carrying
    entry, xalloc/broken[pfn] = 1 for those entries.  counts (16 ints) gains each
    entry's type; held (16 ints) stays the number of present pfns by last
    type.  Returns the number of data-carrying entries; a fault changes
    nothing."""
    n = _entries(raw, width)
    size = min(memoryview(b).nbytes for b in maps[:4])
    tally = ffi.new("int64_t[16]", list(counts))
    kept = ffi.new("int64_t[16]", list(held))
    with ffi.from_buffer("uint8_t[]", raw) as s, \
            ffi.from_buffer("uint8_t[]", maps[0], require_writable=True) as p, \
            ffi.from_buffer("uint8_t[]", maps[1], require_writable=True) as t, \
            ffi.from_buffer("uint8_t[]", maps[2], require_writable=True) as x, \
            ffi.from_buffer("uint8_t[]", maps[3], require_writable=True) as b, \
            ffi.from_buffer("uint8_t[]", maps[4], require_writable=True) as c:
        nd = call(lib.xl_mark_pfns, s, n, width, p2m_size, p, t, x, b, size, c,
                  memoryview(maps[4]).nbytes, tally, kept,
                  locate=locate, what="PFN entry")
    counts[:] = list(tally)
    held[:] = list(kept)
    return nd


BOUNCE = 4 << 20        # copy_raw_pages' buffer where the kernel cannot copy
MAX_FILE_PAGES = ((1 << 63) - 1) // 4096        # offsets fit an off_t
# The copy kernels' pipe: each splice into the output then moves up to a
# megabyte (copy_file_range's own pipe moves 64 KiB, which costs ext4 ~60%
# more than cp where input and output offsets disagree modulo the page
# size, as a batch's pages always do).  Below MIN_PIPE: copy_file_range.
PIPE_SIZE = 1 << 20
MIN_PIPE = 256 << 10


class _Pipe(tuple):
    """(read end, write end, size); closed when its thread's state goes
    (threading.local drops it when the thread ends) or when dropped."""

    def __del__(self):
        if self[0] >= 0:
            for fd in self[:2]:
                try:
                    os.close(fd)
                except OSError:
                    pass


_NO_PIPE = (-1, -1, 0)


def bounce_buffer():
    """This thread's bounce buffer (BOUNCE bytes) for copies the kernel
    cannot make file to file: one per thread, made on first need, so the
    hot path allocates nothing."""
    bounce = getattr(_local, "bounce", None)
    if bounce is None:
        bounce = _local.bounce = bytearray(BOUNCE)
    return bounce


def copy_pipe():
    """(read end, write end, size) of this thread's copy pipe, made on first
    use; (-1, -1, 0) where none of MIN_PIPE can be had."""
    got = getattr(_local, "pipe", None)
    if got is None:
        got = _NO_PIPE
        try:
            import fcntl
            r, w = os.pipe2(os.O_CLOEXEC)
        except (ImportError, OSError, AttributeError):
            pass
        else:
            size = 0
            for want in (PIPE_SIZE, MIN_PIPE):
                try:
                    size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                    break
                except OSError:
                    continue        # above /proc/sys/fs/pipe-max-size for this user
            if size >= MIN_PIPE:
                got = _Pipe((r, w, size))
            else:
                os.close(r)
                os.close(w)
        _local.pipe = got
    return got


def drop_copy_pipe():
    """After a failed copy: a pipe the kernel left bytes in is never used
    again (the C kernels empty it, this is belt and braces)."""
    _local.pipe = None


def _optional(buf):
    """ffi.from_buffer of buf, or NULL for None (as a context manager)."""
    if buf is None:
        return contextlib.nullcontext(ffi.NULL)
    return ffi.from_buffer("uint8_t[]", buf)


def copy_raw_pages(raw, width, p2m_size, in_fd, offset, out_fd, image_pages, locate=0,
                   pages_at=0, skip=None):
    """copy_pages for a batch given by its raw PFN array (checked as
    count_data does, before any copy), without numpy: the pages of its
    data-carrying entries, consecutive at `offset` of in_fd, go to out_fd
    at pfn*4096, a run of consecutive pfns at a time, by splice through a
    pipe (copy_pipe), else copy_file_range, else through a bounce buffer.
    p2m_size must not exceed image_pages.  Entry faults are located from
    `locate` (the array's stream offset), a short read of the pages from
    `pages_at` (theirs); an I/O error is an OSError.  skip (a buffer of at
    least p2m_size bytes): the pages of pfns p with skip[p] != 0 are passed
    over (their final content is another writer's).  Returns the number of
    the batch's data pages."""
    n = _entries(raw, width)
    if not 0 <= image_pages <= MAX_FILE_PAGES:
        raise ValueError(f"image of {image_pages} pages does not fit 64-bit file offsets")
    bounce = bounce_buffer()
    pipe_r, pipe_w, pipe_size = copy_pipe()
    try:
        with ffi.from_buffer("uint8_t[]", raw) as s, \
                ffi.from_buffer("uint8_t[]", bounce, require_writable=True) as b, \
                _optional(skip) as k:
            return call(lib.xl_copy_raw_pages, s, n, width, p2m_size, in_fd, offset, out_fd,
                        image_pages, pipe_r, pipe_w, pipe_size, b, len(bounce),
                        k, 0 if skip is None else len(skip),
                        locate=locate, what="PFN entry", pages_at=pages_at)
    except BaseException:
        drop_copy_pipe()
        raise
