"""Where restored guest memory goes: a numpy buffer, a sparse raw file,
nowhere (for inspection), or the converter's shadow of the pages later
checkpoints change.  Page p lives at byte p*4096 in every case.

Every image answers the same calls, so the checkpoint engine never asks
which kind it holds:
    write_pages(pages, pfns, locate)        consecutive pages to pfns
    write_pages_from(fd, offset, pfns, ...) the same, still in a file
    compare_pages(pages, pfns, locate)      differs mask, None: not kept
    apply_compressed(data, pfns, locate, parts, origin)
                                            a format B checkpoint's pages
                                            (origin: its CompressedMap);
                                            returns the EMPTY/FULL/delta counts
"""
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels
from .fileio import kernel_copies
from .format import PAGE_SIZE
from .outputs.atomic import WRITE_ERRORS, describe, named, open_output, scratch_file
from .overlay import BUDGET as OVERLAY_BUDGET, PageOverlay
from .stream.window import InputWindow


def anonymous_buffer(nbytes):
    """A zero-filled uint8 array backed by lazily-populated anonymous memory.

    MAP_NORESERVE keeps a huge, mostly sparse guest from being refused up
    front; MADV_HUGEPAGE (where the kernel offers transparent huge pages)
    cuts the page faults of filling a multi-GB image by 512x.
    """
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        m = mmap.mmap(-1, nbytes, flags=flags)
    except OSError as exc:
        raise MemoryError(f"cannot map {nbytes} bytes for the guest image ({exc}); "
                          "restore to a file instead") from exc
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(m, dtype=np.uint8)


def decode_into(data, pfns, array, locate, parts=1):
    """Apply a compressed buffer to an in-memory array.  One part: a single
    fused pass (the buffer is read once).  Several (the caller checked the
    pfns are distinct, so the slices touch disjoint pages): index the page
    boundaries first, then decode slices at once (each kernel call releases
    the GIL)."""
    if parts <= 1:
        return kernels.delta_decode(data, pfns, array, locate=locate)
    n = pfns.size
    starts, kinds = kernels.delta_index(data, n, locate=locate)
    bounds = np.linspace(0, n, parts + 1, dtype=np.int64)
    with ThreadPoolExecutor(parts) as pool:
        futs = [pool.submit(kernels.delta_apply, data, starts, pfns, array,
                            int(a), int(b - a), locate)
                for a, b in zip(bounds[:-1], bounds[1:])]
        for f in futs:
            f.result()
    return kinds


# Bytes of pages a compressed checkpoint is decoded through for a file image
# (enough to coalesce 8192 neighbouring pages per call; small beside the
# held checkpoint's budget).
WORK_BUDGET = 32 << 20


def apply_compressed_to_file(data, pfns, locate, fd, file_pages, budget, write, index=None):
    """Apply a compressed checkpoint to an image file, at copy speed and in
    bounded memory.  Every page's kind is known before any I/O (the index's
    first byte: 0x00 EMPTY, 0x80 FULL, else a delta): EMPTY pages cost no
    buffer, read or write; FULL pages are not read; only a delta's page is
    read back.  The pages go through a work buffer of at most `budget` bytes,
    window by window in stream order (a window ends when its distinct
    non-EMPTY pages fill the buffer); each window's pages are read and
    written back in pfn order, neighbours in one call."""
    n = pfns.size
    starts, kinds = index if index is not None else \
        kernels.delta_index(data, n, locate=locate)
    if not n:
        return kinds
    first = data[starts[:-1].astype(np.int64)]
    live = np.flatnonzero(first != 0x00)           # pages that write something
    if not live.size:
        return kinds
    room = max(1, budget // PAGE_SIZE)
    slots = np.zeros(n, np.uint64)                  # EMPTY pages: slot 0, never written
    for a in range(0, live.size, room):
        # At most `room` live pages, hence at most `room` distinct pages.
        sel = live[a:a + room]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        wp = pfns[sel]
        pages, first_at, slot = np.unique(wp, return_index=True, return_inverse=True)
        # Work slots: the pages whose first encoding here is a delta (they
        # need their current copy, read straight into their slots) first,
        # then the others; each group in pfn order, so reads and writes
        # coalesce neighbours.
        need = first[sel[first_at]] != 0x80
        order = np.concatenate([pages[need], pages[~need]])
        rank = np.empty(pages.size, np.uint64)
        rank[need] = np.arange(int(need.sum()), dtype=np.uint64)
        rank[~need] = np.arange(int(need.sum()), pages.size, dtype=np.uint64)
        work = np.empty(pages.size * PAGE_SIZE, np.uint8)
        if need.any():
            kernels.gather_pages(fd, pages[need], work, file_pages)
        slots[sel] = rank[slot.reshape(-1)]
        kernels.delta_apply(data, starts, slots, work, lo, hi - lo, locate=locate)
        write(work, order)
        slots[sel] = 0
    return kinds


class MemoryImage:
    """The image in memory: a caller's writable uint8 buffer or a new one."""

    spill_dir = None        # a held checkpoint beyond its budget: anonymous memory file

    def __init__(self, nbytes, array=None):
        if array is None:
            array = anonymous_buffer(nbytes)
        else:
            if not isinstance(array, np.ndarray):
                array = np.frombuffer(array, dtype=np.uint8)
            if array.dtype != np.uint8 or array.ndim != 1 or not array.flags.c_contiguous:
                raise TypeError("image must be a 1-D C-contiguous numpy uint8 array")
            if not array.flags.writeable:
                raise ValueError("image buffer is read-only")
            if array.size < nbytes:
                raise ValueError(f"image buffer holds {array.size} bytes; the stream needs "
                                 f"{nbytes} (p2m_size * 4096)")
        self.nbytes = nbytes
        self.array = array[:nbytes]
        self.pages = nbytes // PAGE_SIZE

    def write_pages(self, pages, pfns, locate=0):
        kernels.scatter_pages(pages, pfns, self.array, locate=locate)

    def write_pages_from(self, fd, offset, pfns, locate=0):
        """Pages lying consecutively at `offset` of fd: read straight in."""
        kernels.pread_pages(fd, offset, pfns, self.array, locate=locate)

    def compare_pages(self, pages, pfns, locate=0):
        return kernels.compare_pages(pages, pfns, self.array, locate=locate)

    def apply_compressed(self, data, pfns, locate, parts=1, origin=None):
        return decode_into(data, pfns, self.array, locate, parts)

    def commit(self):
        return self.array

    def abort(self):
        pass


class FileImage:
    """A sparse raw image file, written through an output of outputs/atomic.py:
    a regular file appears under its name only at commit(); a stream (a pipe,
    /dev/null, standard output) cannot take pages at random offsets, so the
    image is built in an unnamed scratch file and written out in order at
    commit(), holes as zeros.

    output: a path (opened here, refused if it is one of `inputs`) or an
    output already opened by the caller (see outputs.atomic.Outputs).

    The pages of later (compressed) checkpoints go through a PageOverlay
    (overlay.py) of `budget` bytes and reach the file once, at commit() or
    when the budget is full; every other access to the file flushes it
    first."""

    budget = OVERLAY_BUDGET

    def __init__(self, output, nbytes, sync=True, inputs=(), pending=None):
        # Copies into the file still being made on another thread (inspector.
        # _PageFile): finish() before the file is touched, cancel() before it
        # is closed.
        self._pending = pending
        self.nbytes = nbytes
        self.pages = nbytes // PAGE_SIZE
        self._out = output if hasattr(output, "fd") else \
            open_output(output, sync=sync, inputs=inputs)
        self.path = self._out.path
        self._scratch = None
        self._map = None
        self._array = None
        self._input = InputWindow()
        self._copies = {}           # input fd -> copy_file_range works
        self._overlay = None
        try:
            if self._out.seekable:
                self.fd = self._out.fd
            else:
                self._scratch = scratch_file()
                self.fd = self._scratch
            os.ftruncate(self.fd, nbytes)   # holes read as zero: never-sent pages
        except OSError as exc:
            self.abort(exc)
            raise self._named(exc) from None
        except BaseException as exc:
            self.abort(exc)
            raise

    def _named(self, exc):
        return named(exc, self.path)

    def _ready(self):
        """The copies made on another thread are done (or raise their error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.finish()

    def _exclude(self, pfns):
        """The overlay is about to write these pfns: the copies made on
        another thread keep off them (instead of being waited for)."""
        if self._pending is not None:
            self._pending.exclude(pfns)

    def _settle(self):
        """The file alone holds the image again: the overlay's pages are
        written (while the copies made on another thread go on, keeping off
        them) and those copies done, before anything else reads or writes
        it."""
        if self._overlay:
            try:
                self._overlay.flush()
            except OSError as exc:
                raise self._named(exc) from exc
        self._ready()

    @property
    def array(self):
        """A writable view of the file (mapped on first use: verify, deltas)."""
        self._settle()
        if self._array is None:
            self._map = mmap.mmap(self.fd, self.nbytes, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self._array = np.frombuffer(self._map, dtype=np.uint8)
        return self._array

    def write_pages(self, pages, pfns, locate=0):
        self._settle()
        try:
            kernels.pwrite_pages(self.fd, pages, pfns, self.pages, locate=locate)
        except OSError as exc:
            raise self._named(exc) from exc

    def write_pages_from(self, fd, offset, pfns, locate=0):
        """Pages lying consecutively at `offset` of fd: copied in the kernel
        (kernels.copy_pages: splice through a pipe, else copy_file_range,
        page cache to page cache, as cp does; no mapping to tear down).
        Where the kernel cannot copy between the two files
        (fileio.kernel_copies), pwrite from a read-only mapping of the
        input, still one copy; where neither works, a bounce buffer."""
        self._settle()
        try:
            part = None
            if not self._kernel_copies(fd):
                part = self._input.view(fd, offset, pfns.size * PAGE_SIZE)
            if part is not None:
                try:
                    kernels.pwrite_pages(self.fd, part, pfns, self.pages, locate=locate)
                finally:
                    part.release()
            else:
                kernels.copy_pages(fd, offset, pfns, self.fd, self.pages, locate=locate)
        except OSError as exc:
            # The input is read here too: name the output only for what
            # only writing fails with.
            if exc.errno in WRITE_ERRORS:
                raise self._named(exc) from exc
            raise

    def _kernel_copies(self, fd):
        """Whether copy_file_range moves bytes from fd to the image (asked
        once per input, by a copy of nothing)."""
        known = self._copies.get(fd)
        if known is None:
            known = self._copies[fd] = kernel_copies(fd, self.fd)
        return known

    def compare_pages(self, pages, pfns, locate=0):
        """Through a buffer of the batch's pages (read from the file), not
        a mapping of the whole file: a verify pass of a 4 GiB guest works
        within the memory of the restore itself."""
        self._settle()
        n = pfns.size
        work = np.empty(n * PAGE_SIZE, np.uint8)
        kernels.gather_pages(self.fd, pfns, work, self.pages, locate=locate)
        return kernels.compare_pages(pages, np.arange(n, dtype=np.uint64), work,
                                     locate=locate)

    def apply_compressed(self, data, pfns, locate, parts=1, origin=None):
        """Into the overlay (its pages reach the file at commit): every
        page's kind is known before any I/O; EMPTY pages cost nothing, FULL
        pages of a regular-file input are left there, a delta's base is
        read once (from the overlay, the input or the file)."""
        starts, _ = kernels.delta_index(data, pfns.size, locate=locate)
        return self.apply_indexed(data, starts, locate, origin, pfns)

    def apply_indexed(self, data, starts, locate, origin, pfns):
        """The same, for pages delta_index (or delta_scan) has checked:
        page i's encoding starts at data[starts[i]]."""
        first = data[starts[:-1].astype(np.int64)]
        empty, full = int(np.count_nonzero(first == 0x00)), int(np.count_nonzero(first == 0x80))
        if self._overlay is None:
            self._overlay = PageOverlay(self.fd, self.pages, self.budget,
                                        before_io=self._ready, before_write=self._exclude)
        try:
            self._overlay.apply(data, starts, pfns, locate, origin)
        except OSError as exc:
            raise self._named(exc) from exc
        return {"empty": empty, "full": full, "delta": pfns.size - empty - full}

    @property
    def spill_dir(self):
        """Where a checkpoint too large for memory is held: beside the output."""
        return getattr(self._out, "dir", None)

    def _unmap(self, flush):
        if self._array is not None:
            self._array = None
            if flush:
                self._map.flush()
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the GC unmaps it later
            self._map = None

    def commit(self):
        self._settle()
        self._close_overlay()
        self._input.close()
        self._unmap(flush=self._out.sync and self._scratch is None)
        if self._scratch is not None:
            from .outputs.fdio import copy_sparse
            try:
                copy_sparse(self._scratch, self._out.fd, self.nbytes)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, describe(self.path)) from exc
            finally:
                os.close(self._scratch)
                self._scratch = None
        self.fd = None
        return self._out.commit()

    def _close_overlay(self):
        if self._overlay is not None:
            self._overlay.close()
            self._overlay = None

    def abort(self, exc=None):
        """Discard the image; exc, the error that ends the restore, lets the
        other thread's copies report an earlier error of theirs instead
        (inspector._PageFile.cancel)."""
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                pending.cancel(exc)
        finally:
            self._abort()

    def _abort(self):
        self._close_overlay()
        self._input.close()
        self._unmap(flush=False)
        self.fd = None
        if self._scratch is not None:
            os.close(self._scratch)
            self._scratch = None
        self._out.abort()


class NullImage:
    """Pages are checked but not kept (inspection without a restore)."""

    spill_dir = None

    kind = "none"
    array = None

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.pages = nbytes // PAGE_SIZE

    def write_pages(self, pages, pfns, locate=0):
        pass

    def write_pages_from(self, fd, offset, pfns, locate=0):
        pass

    def compare_pages(self, pages, pfns, locate=0):
        return None

    def apply_compressed(self, data, pfns, locate, parts=1, origin=None):
        """Only indexed, which checks every rule of the encoding."""
        return kernels.delta_index(data, pfns.size, locate=locate)[1]

    def commit(self):
        return None

    def abort(self):
        pass


class ShadowImage:
    """The converter's image of the pages later checkpoints change: a sparse
    unnamed file with room for every pfn, beside the output, reached by
    positional reads and writes (never mapped), and in front of it a
    PageOverlay (overlay.py), as FileImage has: a compressed checkpoint's
    FULL pages lying whole in a regular-file input stay there as
    references, deltas go to memory slots (OVERLAY_BUDGET bytes, then to
    the file), so that each changed page is copied once, when rows() reads
    the result, instead of once per checkpoint.

    A delta needs the previous copy of its page: before a compressed
    checkpoint is applied, need_base(pfns, first_bytes) is called with every
    page's first encoding byte (0x00 EMPTY, 0x80 FULL, else a delta), for
    the owner to fill in (put_page) the copies the shadow does not hold yet
    (pages no later checkpoint changed: the overlay never holds them)."""

    overlay_budget = OVERLAY_BUDGET

    def __init__(self, nbytes, spill_dir=None, need_base=None):
        from .outputs.atomic import scratch_file
        self.nbytes = nbytes
        self.pages = nbytes // PAGE_SIZE
        self.need_base = need_base
        self.first_bytes = np.zeros(0, np.uint8)   # of the last compressed checkpoint
        # unnamed, in spill_dir (beside the output): nothing left after a kill
        self.fd = scratch_file(spill_dir)
        self._overlay = None
        try:
            os.ftruncate(self.fd, nbytes)
            self._overlay = PageOverlay(self.fd, self.pages, self.overlay_budget)
        except BaseException:
            self.close()
            raise

    def _settle(self):
        if self._overlay:
            self._overlay.flush()

    def write_pages(self, pages, pfns, locate=0):
        """(A pfn repeated in `pfns` ends with its last copy.)"""
        self._settle()
        kernels.pwrite_pages(self.fd, pages, pfns, self.pages, locate=locate)

    def write_pages_from(self, fd, offset, pfns, locate=0):
        self._settle()
        kernels.copy_pages(fd, offset, pfns, self.fd, self.pages, locate=locate)

    def put_page(self, pfn, page):
        os.pwrite(self.fd, page, pfn * PAGE_SIZE)

    def compare_pages(self, pages, pfns, locate=0):
        return kernels.compare_pages(pages, np.arange(pfns.size, dtype=np.uint64),
                                     self.rows(pfns), locate=locate)

    def apply_compressed(self, data, pfns, locate, parts=1, origin=None):
        """origin: the checkpoint's CompressedMap (FULL pages left in the input)."""
        starts, kinds = kernels.delta_index(data, pfns.size, locate=locate)
        self.apply_indexed(data, starts, locate, origin, pfns)
        return kinds

    def apply_indexed(self, data, starts, locate, origin, pfns):
        """The same, for pages delta_index (or delta_scan) has checked: page
        i's encoding starts at data[starts[i]] (data may be a mapping of the
        input: checkpoints.Held.map_compressed)."""
        self.first_bytes = data[starts[:-1].astype(np.int64)] if pfns.size else \
            np.zeros(0, np.uint8)
        if self.need_base is not None:
            self.need_base(pfns, self.first_bytes)
        self._overlay.apply(data, starts, pfns, locate, origin)

    def rows(self, pfns):
        """Copies of the pages at pfns, consecutive (from the overlay, the
        input or the file: nothing is written for it)."""
        out = np.empty(pfns.size * PAGE_SIZE, np.uint8)
        if self._overlay is None:
            kernels.gather_pages(self.fd, pfns.astype(np.uint64), out, self.pages)
            return out
        return self._overlay.read(pfns, out)

    def close(self):
        if self._overlay is not None:
            self._overlay.close()
            self._overlay = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
