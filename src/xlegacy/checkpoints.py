"""Remus checkpoint transactions, as libxc applies them -- the one engine
the restorer and the converter both run.

* Checkpoint 1 is a plain live migration: its consumer applies it as it
  streams in (an error there fails the whole command).
* Every later checkpoint is held back (its PFN arrays, page data or
  compressed bytes, and its metadata) and applied only when its tail has
  been read in full (`Engine.run` calls the consumer's commit()).
* A stream that stops inside a later checkpoint yields the last complete
  one, with a warning and a `torn` record; a checkpoint read in full that
  cannot be applied is a CorruptCheckpoint naming the last good one.

What a checkpoint holds lives in `Held`: the PFN arrays of its batches and a
`Hold` of their bytes (page data, or the compressed stream of format B, with
a `CompressedMap` from buffer offsets back to stream offsets for errors).
"""
import bisect
import mmap
import os
from typing import NamedTuple

import numpy as np

from .format import DATA_TYPES
from .errors import CorruptCheckpoint, StreamError, TruncatedStream
from .fileio import pread_exact
from . import kernels
from .kernels import faults
from .kernels.faults import KernelFault
from .stream.records import CheckpointEnd

BOUNCE = 4 << 20        # copy step when a hold lives in a file
_DATA_TYPES = np.array(DATA_TYPES, dtype=np.bool_)


# ==================================================================== offsets
class CompressedMap:
    """Where each COMPRESSED_DATA payload of a checkpoint landed in its hold
    and where it came from in the stream: locate() turns a hold offset (as
    the kernels report it) back into a stream offset.  Payloads left in a
    regular-file input also say where they lie in it (in_file()), so that a
    file image can take FULL pages from there instead of from the hold."""

    def __init__(self):
        self.held = [0]
        self.stream = [0]
        self._payloads = []        # (hold offset, length, file offset or -1)
        self.fd = None             # the input file of the payloads left in one

    def add(self, held_offset, stream_offset, length=0, where=None):
        self.held.append(held_offset)
        self.stream.append(stream_offset)
        file_offset = -1
        if where is not None and self.fd in (None, where[0]):
            self.fd, file_offset = where[0], where[1]
        self._payloads.append((held_offset, length, file_offset))

    def locate(self, off):
        i = bisect.bisect_right(self.held, off) - 1
        return self.stream[i] + (off - self.held[i])

    def in_file(self, offs, n):
        """Input file offsets of the n bytes at each hold offset of `offs`
        (int64 array), -1 where they do not lie whole in one payload left
        in the input file."""
        p = np.array(self._payloads, np.int64).reshape(-1, 3)
        k = np.searchsorted(p[:, 0], offs, side="right") - 1
        ok = k >= 0
        k = np.maximum(k, 0)
        ok &= (p[k, 2] >= 0) & (offs + n <= p[k, 0] + p[k, 1])
        return np.where(ok, p[k, 2] + (offs - p[k, 0]), -1)


# ==================================================================== bytes
# Default memory budget of a held checkpoint (API checkpoint_buffer=, CLI
# --checkpoint-buffer): beyond it the checkpoint's bytes go to a file.
BUDGET = 256 << 20


class Hold:
    """The bytes of one held checkpoint, appended in stream order: in memory
    while they fit `budget` bytes (None: no limit), else in an unnamed file
    in `spill_dir` (budget 0: always in the file).  One Hold serves every
    checkpoint of a stream (reset() between them); its memory is grown,
    never shrunk, so it is faulted in once."""

    def __init__(self, budget=None, spill_dir=None):
        self.budget = budget
        self.spill_dir = spill_dir
        self.size = 0
        self._mem = np.empty(0, np.uint8)
        self._file = None
        self._map = None

    @property
    def spilled(self):
        return self._file is not None

    def reset(self):
        self.release()
        self.size = 0
        if self._file is not None:
            os.ftruncate(self._file.fileno(), 0)

    # ---------------------------------------------------------- appending
    def _room(self, n):
        """A writable view for the next n bytes when they fit in memory,
        else None (the bytes go to the file)."""
        need = self.size + n
        if self._file is None and (self.budget is None or need <= self.budget):
            if self._mem.size < need:
                cap = max(need, 2 * self._mem.size)
                if self.budget is not None:
                    cap = min(cap, self.budget)
                grown = np.empty(cap, np.uint8)
                grown[:self.size] = self._mem[:self.size]
                self._mem = grown
            return memoryview(self._mem[self.size:need])
        if self._file is None:
            self._spill()
        return None

    def _spill(self):
        """Beyond the budget: an unnamed file beside the output (nothing to
        clean up, even after SIGKILL), or an anonymous memory file when
        there is no output directory -- never silently elsewhere."""
        from .outputs.atomic import scratch_file
        if self.spill_dir is not None:
            fd = scratch_file(self.spill_dir)
        elif hasattr(os, "memfd_create"):
            fd = os.memfd_create("xlegacy-checkpoint", os.MFD_CLOEXEC)
        else:       # pragma: no cover - Linux has memfd_create
            fd = scratch_file(None)
        self._file = os.fdopen(fd, "r+b", buffering=0)
        self._pwrite(memoryview(self._mem[:self.size]), 0)
        self._mem = np.empty(0, np.uint8)

    def _pwrite(self, mv, off):
        fd = self._file.fileno()
        while len(mv):
            k = os.pwrite(fd, mv, off)
            mv, off = mv[k:], off + k

    def append(self, data):
        """Append a bytes-like; returns its offset in the hold."""
        at = self.size
        mv = memoryview(data).cast("B")
        room = self._room(len(mv))
        if room is not None:
            room[:] = mv
        else:
            self._pwrite(mv, at)
        self.size = at + len(mv)
        return at

    def append_from(self, src, n, what):
        """Append the next n bytes of a stream Source (exact reads)."""
        at = self.size
        room = self._room(n)
        try:
            self._read_from(src, n, what, at, room)
        except OSError as exc:
            raise SourceFailed(exc, src.pos) from exc
        self.size = at + n
        return at

    def _read_from(self, src, n, what, at, room):
        if room is not None:
            src.readinto(room, what)
        else:
            bounce = bytearray(min(n, BOUNCE))
            done = 0
            while done < n:
                k = min(n - done, len(bounce))
                part = memoryview(bounce)[:k]
                src.readinto(part, what)
                self._pwrite(part, at + done)
                done += k

    def append_from_fd(self, fd, offset, n, what, stream_offset):
        """Append n bytes at `offset` of a regular file (deferred stream data
        that starts at stream_offset, for the error if the file shrank)."""
        at = self.size
        room = self._room(n)
        bounce = None
        done = 0
        while done < n:
            if room is not None:
                dst = room[done:]
            else:
                bounce = bounce or bytearray(min(n, BOUNCE))
                dst = memoryview(bounce)[:min(n - done, len(bounce))]
            try:
                got = pread_exact(fd, dst, offset + done)
            except OSError as exc:
                raise SourceFailed(exc, stream_offset + done) from exc
            if room is None:
                self._pwrite(dst[:got], at + done)
            done += got
            if got < len(dst):   # the file shrank under us
                raise TruncatedStream(what, stream_offset + done, n, done)
        self.size = at + n
        return at

    # ---------------------------------------------------------- reading
    def view(self):
        """The held bytes as a read-only uint8 array (a mapping of the file
        once spilled), valid until release()/reset()."""
        if self._file is None:
            return self._mem[:self.size]
        if not self.size:
            return np.zeros(0, np.uint8)
        if self._map is None:
            import mmap
            self._map = mmap.mmap(self._file.fileno(), self.size, access=mmap.ACCESS_READ)
        return np.frombuffer(self._map, dtype=np.uint8)

    def release(self):
        if self._map is not None:
            _unmap(self._map)
            self._map = None

    def close(self):
        self.release()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = np.empty(0, np.uint8)


class HeldBatch(NamedTuple):
    """What a commit needs of a held page batch: its data pfns and their
    types (9 bytes a page; the batch itself is let go), whether it is a
    verification pass, where its pages start in the stream and in the hold
    (format A; -1 for format B)."""
    pfns: np.ndarray
    types: np.ndarray
    verify: bool
    pages_offset: int
    at: int


# MADV_POPULATE_READ (Linux 5.14): map a range's pages in one call, failing
# with an error (not SIGBUS) where the file no longer has them.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class Held:
    """One later checkpoint held back until its tail has been read: its
    page-carrying batches and their bytes in `hold`.

    With `in_place` set (by a consumer that can apply pages from anywhere,
    before the first record), COMPRESSED_DATA payloads left in a
    regular-file input are not copied into the hold: at commit,
    map_compressed() reads them from a read-only mapping of the input, or,
    where that cannot be done, materialize() copies them in then."""

    def __init__(self, number, hold):
        self.number = number
        self.hold = hold
        hold.reset()
        self.batches = []          # format A: HeldBatch per batch with pages
        self.compressed = []       # format B: HeldBatch per batch with pages
        self.cmap = CompressedMap()
        self.compressed_bytes = 0
        self.compressed_chunks = 0
        self.in_place = False
        self.left = []             # payloads left in the input: (stream, file offset, length)
        self._fd = None
        self._map = None

    def add_batch(self, b, src=None):
        """A PageBatch of this checkpoint: format A page data is copied into
        the hold now (from `src` when the reader left it there, else from
        the batch), so the stream can move on."""
        if not b.n_data:
            return
        pfns = b.data_pfns
        types = b.types[_DATA_TYPES[b.types]]
        if b.compressed:
            self.compressed.append(HeldBatch(pfns, types, b.verify, b.pages_offset, -1))
            return
        n = b.n_data * 4096
        if src is not None:
            at = self.hold.append_from(src, n, "page data")
        elif b.deferred:
            at = self.hold.append_from_fd(b.pages_fd, b.pages_file_offset, n, "page data",
                                          b.pages_offset)
        else:
            at = self.hold.append(b.pages)
        self.batches.append(HeldBatch(pfns, types, b.verify, b.pages_offset, at))

    def add_compressed(self, c):
        """A COMPRESSED_DATA chunk (its bytes in c.value, or left in the file
        at c.where)."""
        n = c.where[2] if c.value is None else len(c.value)
        self.compressed_bytes += n
        self.compressed_chunks += 1
        if not n:
            return
        first = c.offset + c.size - n        # the payload is the chunk's last n bytes
        if self.in_place and c.value is None and self._fd in (None, c.where[0]):
            self._fd = c.where[0]
            self.left.append((first, c.where[1], n))
            return
        self.materialize()                   # the hold keeps the payloads in order
        self.in_place = False
        self.cmap.add(self.hold.size, first, n, c.where)
        if c.value is None:
            fd, off, _ = c.where
            self.hold.append_from_fd(fd, off, n, "COMPRESSED_DATA", first)
        else:
            self.hold.append(c.value)

    def materialize(self):
        """Copy the payloads left in the input into the hold (where they
        would have gone at once without in_place)."""
        left, self.left = self.left, []
        for first, off, n in left:
            self.cmap.add(self.hold.size, first, n, (self._fd, off, n))
            self.hold.append_from_fd(self._fd, off, n, "COMPRESSED_DATA", first)

    def map_compressed(self, npages, limit):
        """The compressed pages straight from a read-only mapping of the
        input: (data, starts uint64[npages + 1], locate, origin), every page
        checked as delta_index checks them, or None where that cannot be
        done (nothing left in the input, a mapping over `limit` bytes, a
        page split between payloads, anything delta_index would refuse):
        then materialize() and the hold.  The mapping is made resident by
        MADV_POPULATE_READ first, so that a file cut since it was read is
        an error here rather than a SIGBUS in the kernels.  unmap() ends it."""
        if not self.left:
            return None
        lo = self.left[0][1]
        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        size = max(off + n for _, off, n in self.left) - base
        if limit is not None and size > limit:
            return None
        try:
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=base)
            self._map.madvise(_POPULATE_READ)
        except (OSError, ValueError, OverflowError, AttributeError):
            self.unmap()
            return None
        data = np.frombuffer(self._map, np.uint8)
        parts, total = [], 0
        for _, off, n in self.left:
            at = off - base
            starts, used = kernels.delta_scan(data[at:at + n], npages - total)
            if used != n:
                break
            parts.append(starts + np.uint64(at))
            total += starts.size
        if total != npages or len(parts) != len(self.left):
            del data
            self.unmap()
            return None
        parts.append(np.zeros(1, np.uint64))
        return data, np.concatenate(parts), _InputLocator(self.left, base), \
            _InputOrigin(self._fd, base)

    def unmap(self):
        if self._map is not None:
            _unmap(self._map)
            self._map = None

    def compressed_at(self):
        """Stream offset of the first COMPRESSED_DATA payload."""
        return self.left[0][0] if self.left else self.cmap.stream[1]

    def pages_ignored(self):
        """COMPRESSED_DATA without a page to apply it to: libxc ignores it."""
        return self.compressed_bytes > 0 and not self.compressed

    def compressed_pfns(self):
        """The pfns the compressed stream carries pages for, in order."""
        if not self.compressed:
            return np.zeros(0, np.uint64)
        return np.concatenate([h.pfns for h in self.compressed])

    def pages(self, data):
        """Format A: (HeldBatch, its pages as a view of `data`)."""
        for h in self.batches:
            yield h, data[h.at:h.at + h.pfns.size * 4096]


class _InputLocator:
    """Offsets in a mapping of the input (from `base`) -> stream offsets."""

    def __init__(self, left, base):
        self.file = [off - base for _, off, _ in left]
        self.stream = [first for first, _, _ in left]

    def __call__(self, off):
        i = max(0, bisect.bisect_right(self.file, off) - 1)
        return self.stream[i] + (off - self.file[i])


class _InputOrigin:
    """Where the pages of a mapping of the input (from `base`) lie in it:
    all of them whole (map_compressed checked that)."""

    def __init__(self, fd, base):
        self.fd = fd
        self.base = base

    def in_file(self, offs, n):
        return offs + self.base


# ==================================================================== engine
class SourceFailed(StreamError):
    """Reading the source failed (an I/O error) inside a later checkpoint:
    as libxc, that ends the stream there, like its end would."""

    def __init__(self, exc, offset=None):
        super().__init__(f"reading the stream failed ({exc})", offset=offset)


class Engine:
    """Runs the records of checkpoints 2, 3 ... into a consumer with libxc's
    rules, one verdict for every command:

    * the stream ends (or its source fails) inside a checkpoint: the
      checkpoint is dropped with a warning and a `torn` record;
    * its bytes are present but do not parse, or it cannot be applied: a
      CorruptCheckpoint naming the last good checkpoint;
    * a compressed checkpoint with COMPRESSED_DATA but no page entries:
      libxc applies nothing and ignores the bytes, so does every command;
      it is noted in `tolerated` (verify reports it).

    The consumer provides:

        begin(held)            a later checkpoint starts; `held` (a Held)
                               keeps its bytes
        record(rec)            one of its records (not CheckpointEnd)
        commit(end)            its tail has been read: apply it (may raise
                               KernelFault or CorruptCheckpoint)
        committed(end) -> bool after the commit; True stops the reading

    `last_good` is the last committed checkpoint; `warnings` the messages
    said about torn or tolerated checkpoints."""

    def __init__(self, consumer, hold, last_good=1):
        self.consumer = consumer
        self.hold = hold
        self.last_good = last_good
        self.torn = None
        self.tolerated = []
        self.warnings = []

    def _next(self, records):
        try:
            return next(records, None)
        except OSError as exc:
            raise SourceFailed(exc) from exc

    def run(self, records):
        c = self.consumer
        records = iter(records)
        held = None
        try:
            while True:
                rec = self._next(records)
                if rec is None:
                    return
                if held is None:
                    held = Held(rec.checkpoint, self.hold)
                    c.begin(held)
                if not isinstance(rec, CheckpointEnd):
                    c.record(rec)
                    continue
                try:
                    c.commit(rec)
                except KernelFault as exc:
                    if exc.code in (faults.IO, faults.SHORT_READ):
                        raise          # the image's I/O, not the stream's bytes
                    raise self.corrupt(held.number, exc) from exc
                self._tolerate(held)
                self.last_good = held.number
                held = None
                if c.committed(rec):
                    return
        except CorruptCheckpoint:
            raise
        except (TruncatedStream, SourceFailed) as exc:
            self.tear(held.number if held is not None else self.last_good + 1, exc)
        except StreamError as exc:
            number = held.number if held is not None else self.last_good + 1
            raise self.corrupt(number, exc) from exc

    def corrupt(self, number, exc):
        """A checkpoint whose bytes are there but cannot be read or applied."""
        return CorruptCheckpoint(
            f"checkpoint {number} cannot be applied: {exc.message}",
            offset=exc.offset, expected=exc.expected, found=exc.found,
            checkpoint=number, last_good=self.last_good)

    def tear(self, number, exc):
        cut = isinstance(exc, TruncatedStream)
        self.torn = {"checkpoint": number, "offset": exc.offset, "reason": str(exc),
                     "kind": "truncated" if cut else "read-error"}
        self.warnings.append(
            f"{'stream ends' if cut else 'reading failed'} inside checkpoint {number}, "
            f"which is incomplete ({exc}); it was discarded and the result is checkpoint "
            f"{self.last_good}, the last complete one")

    def _tolerate(self, held):
        if held.pages_ignored():
            at = held.compressed_at()
            self.tolerated.append({
                "checkpoint": held.number, "offset": at, "rule": "compressed-without-pages",
                "compressed_bytes": held.compressed_bytes})
            self.warnings.append(
                f"checkpoint {held.number} has {held.compressed_bytes} bytes of "
                f"COMPRESSED_DATA (from offset {at}) but no page entries: they were "
                "ignored, as libxc ignores them")


def _unmap(m):
    """Close the mapping m; while a view of it is still alive the mapping
    stays until the garbage collector frees both."""
    try:
        m.close()
    except BufferError:   # pragma: no cover - a view is still alive
        pass
