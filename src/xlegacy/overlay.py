"""The pages later Remus checkpoints change in an image file, kept out of
the file until the restore ends, so that each is written once.

A Remus stream sends the same hot pages checkpoint after checkpoint; a file
image that took every checkpoint's pages as they came would write (and, for
deltas, read back) each of them once per checkpoint.  The overlay keeps, per
pfn changed since checkpoint 1, where its newest copy is:

* in a memory slot (a page the overlay holds: a delta's result, or a FULL
  page whose pfn already has a slot), at most `budget` bytes of them;
* in the input file, for a FULL_PAGE whose 4096 bytes lie whole in one
  COMPRESSED_DATA payload of a regular-file input: nothing is copied until
  the end, when the page goes from a read-only mapping of the input to the
  output in one pwrite (the kernel's copy is the only one);
* else in the image file, as before.

flush() writes every page the overlay holds to the file, in pfn order,
neighbours in one pwritev; a full set of slots is flushed as the budget is
reached, references to the input only at the end.  The owner (image.FileImage)
flushes before anything else reads or writes the file, and at commit.

Only committed checkpoints reach the overlay (the engine applies a
checkpoint once its tail is read), so whatever it holds belongs to the
result; a restore that fails discards the file and the overlay with it.
"""
import errno
import os

import numpy as np

from . import kernels
from .errors import StreamError
from .format import PAGE_SIZE
from .stream.window import InputWindow

# Memory slots of the overlay: the pages of later checkpoints that are not
# left in the input (deltas, above all), 16384 pages.
BUDGET = 64 << 20

_FULL = 0x80


class PageOverlay:
    """fd: the image file (image_pages pages); budget: bytes of memory
    slots (at least one page)."""

    def __init__(self, fd, image_pages, budget=BUDGET, before_io=None, before_write=None):
        self.fd = fd
        # The owner's other writer (checkpoint 1's copies on a thread of
        # their own): before_io() waits for it to finish, and is called
        # before the overlay first reads the file; before_write(pfns) keeps
        # it off those pfns, and is called before the overlay writes them
        # (without it, before_io() is).
        self._before_io = before_io
        self._before_write = before_write
        self.pages = image_pages
        self.capacity = max(1, budget // PAGE_SIZE)
        self.used = 0
        self._slots = None          # uint8[capacity * 4096], made on first need
        self._slot_pfn = None       # uint64[capacity]: which pfn each slot holds
        # Per pfn: 0 the image file holds it, k > 0 slot k - 1, k < 0 the
        # input file at offset -k - 1.  Lazily zeroed: a sparse p2m costs
        # only the pages of it that are touched.
        self._where = None
        self._refs = []             # pfns given input references (may repeat)
        self._input = None          # our own descriptor of the input file
        self._input_src = None      # the descriptor number it duplicates
        self._window = InputWindow()

    def __bool__(self):
        return bool(self.used or self._refs)

    # ---------------------------------------------------------- applying
    def apply(self, data, starts, pfns, locate, origin=None):
        """Apply an indexed compressed checkpoint (delta_index has checked
        every encoding): data, its page starts and pfns.  origin, a
        checkpoints.CompressedMap, says which FULL pages lie whole in the
        input file."""
        n = pfns.size
        if not n:
            return
        first = data[starts[:-1].astype(np.int64)]
        live = np.flatnonzero(first != 0x00)       # EMPTY pages change nothing
        if not live.size:
            return
        if self._where is None:
            self._where = np.zeros(self.pages, np.int64)
            self._slots = np.empty(self.capacity * PAGE_SIZE, np.uint8)
            self._slot_pfn = np.zeros(self.capacity, np.uint64)
        in_file = self._in_file(origin, data.size)
        a = 0
        while a < live.size:
            if self.used == self.capacity:
                self.flush_slots()
            # Each live page needs at most one new slot: a window of as many
            # pages as there are free slots always fits.
            sel = live[a:a + self.capacity - self.used]
            a += sel.size
            self._window_apply(data, starts, pfns, first, sel, locate, in_file)

    def _in_file(self, origin, size):
        """A function from hold offsets of FULL pages to input file offsets
        (-1: not in the input), or None when no page can be left there."""
        fd = getattr(origin, "fd", None)
        if fd is None:
            return None
        if self._input is None:
            self._input = os.dup(fd)
            self._input_src = fd
        elif fd != self._input_src:       # pragma: no cover - one input a restore
            return None
        return lambda offs: origin.in_file(offs, PAGE_SIZE)

    def _window_apply(self, data, starts, pfns, first, sel, locate, in_file):
        """Pages sel (stream order, none EMPTY) of the checkpoint, with
        capacity - used >= len(sel) free slots."""
        where = self._where
        wp = pfns[sel]
        full = first[sel] == _FULL
        uniq, first_at, inv = np.unique(wp, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        _, back = np.unique(wp[::-1], return_index=True)
        last_at = sel.size - 1 - back                # each pfn's last encoding here
        state = where[uniq]
        in_slot = state > 0
        # A pfn without a slot whose last encoding here is FULL takes that
        # page from the input, when it lies whole in it: no copy now.
        to_ref = ~in_slot & full[last_at]
        ref = np.full(uniq.size, -1, np.int64)
        if in_file is not None and to_ref.any():
            ref[to_ref] = in_file(starts[sel[last_at[to_ref]]].astype(np.int64) + 1)
        # Where it does not (a pipe's pages, a page split between payloads)
        # it is written now, from the checkpoint's bytes: a slot would only
        # add a copy, and memory beside the held checkpoint.
        now = to_ref & (ref < 0)
        to_ref &= ref >= 0
        if now.any():
            kernels.pwrite_at(self._file_for(uniq[now]), data, starts[sel[last_at[now]]] + np.uint64(1),
                              uniq[now], self.pages)
            where[uniq[now]] = 0
        # Every other pfn lives in a slot; a new slot first needs the page's
        # current copy when its first encoding here is a delta.
        new = ~to_ref & ~in_slot & ~now
        base = new & ~full[first_at]
        from_file = base & (state == 0)
        from_input = base & (state < 0)
        rest = new & ~base
        order = np.concatenate([np.flatnonzero(from_file), np.flatnonzero(from_input),
                                np.flatnonzero(rest)])
        slots = np.arange(self.used, self.used + order.size, dtype=np.int64)
        self._slot_pfn[slots] = uniq[order]
        k_file = int(from_file.sum())
        if k_file:
            kernels.gather_pages(self._file(), uniq[order[:k_file]],
                                 self._slots[slots[0] * PAGE_SIZE:], self.pages)
        k_input = int(from_input.sum())
        if k_input:
            got = order[k_file:k_file + k_input]
            self._read_input(-state[got] - 1, slots[k_file:k_file + k_input] * PAGE_SIZE)
        self.used += order.size
        # The new state of every pfn, then the pages that land in slots.
        if to_ref.any():
            where[uniq[to_ref]] = -ref[to_ref] - 1
            self._refs.append(uniq[to_ref])       # (flush() drops repeats)
        where[uniq[order]] = slots + 1
        slotted = ~(to_ref | now)[inv]
        if slotted.any():
            pages = sel[slotted]
            targets = (where[wp[slotted]] - 1).astype(np.uint64)
            sub = np.append(starts[pages], np.uint64(0))
            kernels.delta_apply(data, sub, targets, self._slots, locate=locate)

    def _file(self):
        """The image file, for reading (see before_io)."""
        ready, self._before_io = self._before_io, None
        self._before_write = None
        if ready is not None:
            ready()
        return self.fd

    def _file_for(self, pfns):
        """The image file, for writing the pages of pfns (see before_write)."""
        if self._before_io is None:
            return self.fd
        if self._before_write is None:
            return self._file()
        self._before_write(pfns)
        return self.fd

    def _read_input(self, offs, at):
        try:
            kernels.pread_at(self._input, offs.astype(np.uint64), self._slots,
                             at.astype(np.uint64))
        except StreamError as exc:      # a short read: the input shrank
            raise _input_changed(int(offs.min())) from exc

    # ---------------------------------------------------------- writing
    def flush_slots(self):
        """Write the slots' pages to the file and free every slot."""
        n = self.used
        if not n:
            return
        pf = self._slot_pfn[:n]
        order = np.argsort(pf, kind="stable")
        kernels.pwrite_at(self._file_for(pf), self._slots[:n * PAGE_SIZE],
                          order.astype(np.uint64) * PAGE_SIZE, pf[order], self.pages)
        self._where[pf] = 0
        self.used = 0

    def flush(self):
        """Write everything the overlay holds to the file."""
        self.flush_slots()
        if not self._refs:
            return
        pf = np.unique(np.concatenate(self._refs))
        self._refs = []
        offs = -self._where[pf] - 1
        keep = offs >= 0                      # still an input page (not slotted since)
        pf, offs = pf[keep], offs[keep]
        self._where[pf] = 0
        order = np.argsort(offs, kind="stable")
        pf, offs = pf[order], offs[order]
        span = self._window.size - PAGE_SIZE
        i = 0
        while i < pf.size:
            lo = int(offs[i])
            j = int(np.searchsorted(offs, lo + span, side="right"))
            self._write_input(pf[i:j], offs[i:j], lo)
            i = j
        self._window.close()

    def _write_input(self, pf, offs, lo):
        """Pages at input offsets offs (>= lo, within one window) to pfns pf,
        in pfn order."""
        order = np.argsort(pf, kind="stable")
        pf, offs = pf[order], offs[order]
        view = self._window.view(self._input, lo, int(offs.max()) + PAGE_SIZE - lo)
        try:
            if view is not None:
                kernels.pwrite_at(self._file_for(pf), view, (offs - lo).astype(np.uint64), pf,
                                  self.pages)
                return
            # Not mappable: through the free slots.
            for a in range(0, pf.size, self.capacity):
                part = slice(a, a + self.capacity)
                at = np.arange(pf[part].size, dtype=np.uint64) * PAGE_SIZE
                self._read_input(offs[part], at)
                kernels.pwrite_at(self._file_for(pf[part]), self._slots, at, pf[part],
                                  self.pages)
        except OSError as exc:
            if exc.errno == errno.EFAULT:        # the mapped input shrank under us
                raise _input_changed(lo) from exc
            raise

    # ---------------------------------------------------------- reading
    def read(self, pfns, out):
        """The newest copy of each page of `pfns` into `out` (a writable
        uint8 array of pfns.size pages, page i for pfns[i]), from its slot,
        the input or the file, writing nothing to the file: for a reader
        that wants the pages once (the converter's final records) and would
        otherwise have them written to the file and read back."""
        n = pfns.size
        if not n:
            return out
        pfns = pfns.astype(np.int64)
        state = self._where[pfns] if self._where is not None else np.zeros(n, np.int64)
        at = np.arange(n, dtype=np.uint64) * PAGE_SIZE
        in_slot = state > 0
        if in_slot.any():
            rows = out[:n * PAGE_SIZE].reshape(n, PAGE_SIZE)
            rows[in_slot] = self._slots.reshape(-1, PAGE_SIZE)[state[in_slot] - 1]
        in_input = state < 0
        if in_input.any():
            offs = -state[in_input] - 1
            try:
                kernels.pread_at(self._input, offs.astype(np.uint64), out, at[in_input])
            except StreamError as exc:      # a short read: the input shrank
                raise _input_changed(int(offs.min())) from exc
        in_file = state == 0
        if in_file.any():
            kernels.pread_at(self._file(), pfns[in_file].astype(np.uint64) * np.uint64(PAGE_SIZE),
                             out, at[in_file])
        return out

    def close(self):
        self._window.close()
        if self._input is not None:
            os.close(self._input)
            self._input = None
        self._slots = self._slot_pfn = self._where = None
        self._refs = []
        self.used = 0


def _input_changed(offset):
    return StreamError("the input file changed during the restore: page data of a "
                       "committed checkpoint is no longer there", offset=offset,
                       expected="the input unchanged until the restore ends",
                       found="a shorter file")
