"""Checkpoint 1 without numpy: `xlegacy info` of the common stream (one
checkpoint, or the first one asked for, no compressed pages) and `xlegacy
restore -o FILE` of any stream file (restore_to_file: checkpoint 1's pages
copied file to file by the kernel, the rest, if any, handed to the
restorer where the walk stopped).

Importing numpy costs more than reading a 1 MiB stream, and info needs no
image: it needs, per PFN, whether a page arrived and its last type, and the
entry counts.  Those live here in anonymous maps of p2m_size bytes (p2m_size <
2^28; zero pages are mapped lazily by the OS, so a sparse p2m costs memory
and time only where pages arrive), filled by one kernels.mark_pfns call per
batch, which also keeps the totals (entries by type, present pfns by last
type) so that nothing scans the maps but the search for runs.

What this path does not serve (later Remus checkpoints, compressed pages)
raises NeedsNumpy.  For info the caller reads the stream again through
restorer.restore_result(inspect_only=True), which does all of it; a restore
is taken over by restorer.take_over on the maps built here (nothing read or
copied twice).  The result is the same object as far as
report.build_metadata is concerned (tests/test_inspector.py and
tests/test_restore_light.py compare the two paths on every sample).
"""
import mmap
import os
import threading

from . import format as F
from . import kernels
from . import options as _options
from .errors import XLegacyError
from .fileio import kernel_copies
from .outputs.atomic import WRITE_ERRORS, named, open_output
from .outputs.background import Background, switching
from .report import CheckpointStats, build_metadata, note_chunk, note_tail
from .stream.reader import LegacyStream
from .stream.records import BatchRun, CheckpointEnd, Chunk, PageBatch


class NeedsNumpy(XLegacyError):
    """The stream needs what only the restorer does (later checkpoints,
    compressed pages): a signal to the caller, not an error of the stream."""


CHUNK = 1 << 16      # pfns per byte of the chunk map (kernels.mark_pfns)


def _ranges(flags, size, chunks=None):
    """[[first, last], ...] of the runs of 1 bytes in flags[:size] (0/1
    bytes): one memchr-speed search per run end.  chunks (a byte per CHUNK
    pfns, 1 where flags may have a 1) limits the search to those chunks, so
    a huge sparse p2m is not read (each page of a map read is a fault)."""
    out = []
    spans = [(0, size)] if chunks is None else _chunk_spans(chunks, size)
    for lo, hi in spans:
        pos = flags.find(b"\1", lo, hi)
        while pos >= 0:
            end = flags.find(b"\0", pos, hi)
            end = hi if end < 0 else end
            if out and out[-1][1] == pos - 1:      # a run across a chunk boundary
                out[-1][1] = end - 1
            else:
                out.append([pos, end - 1])
            pos = flags.find(b"\1", end, hi)
    return out


def _chunk_spans(chunks, size):
    """[(lo, hi), ...]: the pfn spans of consecutive marked chunks."""
    n = (size + CHUNK - 1) // CHUNK
    return [(a * CHUNK, min(b * CHUNK + CHUNK, size)) for a, b in _ranges(chunks, n)]


class _PfnList:
    """The pfns marked 1 in a map, in order (PfnSet's tolist)."""

    def __init__(self, flags, size):
        self.flags, self.size = flags, size

    def tolist(self):
        if not self.size:        # nothing was marked
            return []
        return [p for a, b in _ranges(self.flags, self.size) for p in range(a, b + 1)]


class _Meta:
    """Metadata of the checkpoint read (as restorer._Meta)."""

    def __init__(self):
        self.vcpus = self.tsc_info = self.toolstack = None
        self.hvm_tail = self.qemu = self.pv_tail = None
        self.hvm_params = {}
        self.flags = set()
        self.entry_counts = [0] * 16
        self.xalloc = self.broken = _PfnList(b"", 0)


class Inspection:
    """What info reports of a stream, with the restorer Result's attributes
    that report.build_metadata reads."""

    image = None
    torn = None
    tolerated = ()

    def __init__(self, stream):
        p2m = self.p2m_size = stream.p2m_size
        self.stream = stream
        # present, last_type (0 where no page arrived), xalloc, broken, chunks
        self.maps = [mmap.mmap(-1, max(p2m, 1)) for _ in range(4)]
        self.maps.append(bytearray((p2m + CHUNK - 1) // CHUNK))    # chunks, <= 4 KiB
        for m in self.maps[:4]:
            # Huge zero pages: searching an untouched 256 MiB map then costs
            # 128 page faults, not 65536 (numpy's large arrays do the same).
            if hasattr(mmap, "MADV_HUGEPAGE"):
                m.madvise(mmap.MADV_HUGEPAGE)
        self.present, self.last_type = self.maps[0], self.maps[1]
        self.held = [0] * 16           # present pfns by last type (mark_pfns)
        self.meta = _Meta()
        self.checkpoints = []
        self.warnings = []
        self.verify = {"pages": 0, "matched": 0, "differing_pfns": [], "checked": True}

    def close(self):
        for m in self.maps[:4]:
            m.close()

    def to_dict(self):
        return build_metadata(self)

    def pfn_count(self):
        return sum(self.held)

    def pfn_ranges(self):
        return _ranges(self.present, self.p2m_size, self.maps[4])

    def pagetable_counts(self):
        return {f"L{level}TAB": (self.held[level] + self.held[level | 8], self.held[level | 8])
                for level in (1, 2, 3, 4)}


def inspect(source, width=None, guest=None, checkpoint=None, progress=None,
            force_reading=False):
    """Inspection of `source` (a path or bytes-like: it may be read twice),
    or NeedsNumpy."""
    checkpoint = _options.checkpoint(checkpoint)
    if checkpoint not in (None, 1):
        raise NeedsNumpy("a later checkpoint")
    with LegacyStream(source, width=width, guest=guest, defer_pages=True,
                      force_reading=force_reading) as s:
        return _Walk(s, checkpoint, progress).run()


class _Walk:
    """Checkpoint 1 read record by record into an Inspection, its pages
    copied into `image` (a _PageFile) when restoring.  What it cannot serve
    raises NeedsNumpy with `walk` (this object, which the restorer can take
    over: restorer.take_over) and `record` (the record not yet consumed)."""

    def __init__(self, s, checkpoint, progress, image=None):
        self.s = s
        self.checkpoint = checkpoint
        self.progress = progress
        self.image = image
        self.res = res = Inspection(s)
        self.pending = pending = _Meta()
        pending.xalloc = _PfnList(res.maps[2], res.p2m_size)
        pending.broken = _PfnList(res.maps[3], res.p2m_size)
        self.stats = CheckpointStats(1, s.header.offset)
        self.records = iter(s)

    def _needs_numpy(self, why, rec):
        exc = NeedsNumpy(why)
        exc.walk, exc.record = self, rec
        return exc

    def run(self):
        s, res, pending, stats = self.s, self.res, self.pending, self.stats
        image = self.image
        for rec in self.records:
            if self.progress:
                self.progress(s.src.pos)
            if isinstance(rec, PageBatch):
                if rec.compressed or rec.odd is not None:
                    raise self._needs_numpy("compressed pages", rec)
                if image is not None and rec.n_data and (rec.verify or not image.takes(rec)):
                    # Verify pages are compared with the image (numpy), and
                    # pages the kernel cannot copy go through a mapping.
                    raise self._needs_numpy("pages to compare or map", rec)
                stats.batches += 1
                stats.entries += rec.count
                if rec.verify:
                    stats.verify_pages += rec.n_data
                    if rec.n_data:
                        # Counted, not compared (there is no image); read, so
                        # that missing page bytes fail as in the restorer.
                        rec.page_data()
                        res.verify["pages"] += rec.n_data
                        res.verify["checked"] = False
                else:
                    kernels.mark_pfns(rec.raw, rec.width, rec.p2m_size, res.maps,
                                      pending.entry_counts, res.held, locate=rec.offset + 4)
                    stats.data_pages += rec.n_data
                    if image is not None and rec.n_data:
                        image.copy(rec)
            elif isinstance(rec, CheckpointEnd):
                if not (rec.last or self.checkpoint == 1) or \
                        (image is not None and self.checkpoint not in (None, 1)):
                    raise self._needs_numpy("later checkpoints", rec)
                stats.end = rec.offset
                if not pending.entry_counts[F.XALLOC]:
                    pending.xalloc = _PfnList(b"", 0)
                if not pending.entry_counts[F.BROKEN]:
                    pending.broken = _PfnList(b"", 0)
                res.meta = pending
                res.checkpoints.append(stats)
                if rec.trailing:
                    res.warnings.append(
                        f"{'unknown number of' if rec.trailing < 0 else rec.trailing} "
                        f"bytes after the final checkpoint (LAST_CHECKPOINT) were ignored")
                return res
            elif isinstance(rec, Chunk):
                self._chunk(rec)
            elif note_tail(pending, rec):
                pass
            elif isinstance(rec, BatchRun):     # not asked for (coalesce)
                raise self._needs_numpy("a batch run", rec)
            # Anything else (EndOfBody) says nothing info reports, as in the restorer.
        raise self._needs_numpy("no checkpoint end", None)

    def _chunk(self, c):
        m = self.pending
        if note_chunk(m, c):
            return
        if c.id == F.ENABLE_COMPRESSION:
            if self.image is None:
                # info: format B pages need the delta decoder's index (numpy).
                raise self._needs_numpy("compression", c)
            m.flags.add("compression")       # its pages come in later checkpoints
        elif c.id == F.COMPRESSED_DATA:
            raise self._needs_numpy("compressed data", c)


# ==================================================================== restore
class _PageFile:
    """The output image file of a restore, written without numpy: checkpoint
    1's pages copied from the input by the kernel (kernels.copy_raw_pages).
    As image.FileImage, whose errors it names the same way.

    In the background (background()), the copies are made on a thread of
    their own, in stream order, while the caller reads on: for a Remus
    stream, its later checkpoints are read, decoded and held (restorer.
    take_over) during checkpoint 1's copy instead of after it.  Whatever
    touches the file next waits for the copies first (finish(); the
    restorer's FileImage does so), and nothing may close the file before
    they end: finish() or cancel()."""

    def __init__(self, out, nbytes):
        self.out = out
        self.fd = out.fd
        self.nbytes = nbytes
        self.pages = nbytes // F.PAGE_SIZE
        self._copies = {}          # input fd -> the kernel copies it to fd
        self._bg = self._progress = self._skip = None
        self._queued_to = self._done_to = 0     # stream offsets the copies reach
        self._shown = 0                         # the last position() said
        try:
            os.ftruncate(self.fd, nbytes)   # holes read as zero: never-sent pages
        except OSError as exc:
            raise named(exc, out.path) from None

    def takes(self, rec):
        """Whether copy() moves this batch's pages: they are still in the
        input file, and the kernel copies from it to the image."""
        if not rec.deferred:
            return False
        fd = rec.pages_fd
        known = self._copies.get(fd)
        if known is None:
            known = self._copies[fd] = kernel_copies(fd, self.fd)
        return known

    def background(self, progress=None):
        """Copy on a thread of its own from now on; progress(offset), if
        given, hears how far the copies have got while finish() waits."""
        if self._bg is None:
            self._progress = progress
            # Pfns the restorer writes itself (exclude()), a byte each.
            self._skip = mmap.mmap(-1, max(self.pages, 1))
            self._bg = Background(self._copy, "xlegacy-restore-copier", fast_switch=True)

    def copy(self, rec):
        job = (rec.raw, rec.width, rec.p2m_size, rec.pages_fd, rec.pages_file_offset,
               rec.offset + 4, rec.pages_offset, rec.pages_offset + rec.n_data * F.PAGE_SIZE)
        if self._bg is None:
            self._copy(job)
        else:
            if self._done_to >= self._queued_to:    # idle: progress is this far
                self._done_to = rec.offset
            self._queued_to = job[-1]
            self._bg.put(job, len(rec.raw))

    def _copy(self, job):
        raw, width, p2m, in_fd, offset, locate, pages_at, end = job
        try:
            kernels.copy_raw_pages(raw, width, p2m, in_fd, offset, self.fd, self.pages,
                                   locate=locate, pages_at=pages_at, skip=self._skip)
        except OSError as exc:
            # The input is read here too: name the output only for what
            # only writing fails with.
            if exc.errno in WRITE_ERRORS:
                raise named(exc, self.out.path) from exc
            raise
        self._done_to = end

    def exclude(self, pfns):
        """The caller is about to write the pages of `pfns` (a numpy array of
        pfns below the image's pages) itself, with content that replaces
        checkpoint 1's: the copies not yet made pass over them, and the one
        being made now ends first.  So a Remus restore writes each page a
        later checkpoint changed once, without waiting for checkpoint 1."""
        if self._bg is None:
            return
        import numpy as np      # (only the restorer, which has it, calls this)
        np.frombuffer(self._skip, np.uint8)[pfns] = 1
        self._bg.settle_current()

    def position(self, pos):
        """What a progress report may say of stream offset `pos`: no further
        than the copies have got, and never less than it said before (the
        reader reports a batch's end before its copy is queued)."""
        if self._bg is not None and self._done_to < self._queued_to:
            pos = min(pos, self._done_to)
        self._shown = pos = max(pos, self._shown)
        return pos

    def finish(self):
        """Wait for the copies (reporting their progress); raises what one
        of them raised.  The file is the caller's alone afterwards."""
        bg = self._bg
        if bg is None:
            return
        progress = self._progress
        try:
            bg.drain(None if progress is None else
                     lambda: progress(self.position(self._done_to)))
        finally:
            self._stop(bg)

    def cancel(self, exc=None):
        """End the copies before the file is closed.  Given the error that
        ends the restore, the copies queued before it are still made (they
        come first in the stream): an error of theirs is raised in its place,
        as it would have been without the thread.  Else (or for an
        interruption) what is queued is dropped."""
        bg = self._bg
        if bg is None:
            return
        if isinstance(exc, Exception):
            self.finish()
        else:
            self._stop(bg, discard=True)

    def _stop(self, bg, discard=False):
        self._bg = None
        bg.stop(discard)                 # the thread has ended: the map is ours
        skip, self._skip = self._skip, None
        try:
            skip.close()
        except BufferError:             # pragma: no cover - a view outlived exclude()
            pass


def restore_to_file(source, output, width=None, guest=None, checkpoint=None, progress=None,
                    threads=None, sync=True, checkpoint_buffer=None, force_reading=False):
    """restorer.restore_result(source, output=output), numpy-free as long as
    the stream allows: checkpoint 1 of a stream file into a regular-file
    output, its pages copied by the kernel.  Where the stream needs more
    (later checkpoints, compressed pages, verify pages, an input the kernel
    cannot copy from), the restorer takes over where this stopped
    (restorer.take_over): nothing is read or copied twice.  For a stream the
    inference has seen later checkpoints in, checkpoint 1's copies are made
    on a thread of their own while the restorer is imported and the later
    checkpoints are read (_PageFile.background).  Returns an Inspection (or
    the restorer's Result) whose image is the output path."""
    checkpoint = _options.checkpoint(checkpoint)
    threads = _options.threads(threads)
    stream = LegacyStream(source, width=width, guest=guest, defer_pages=True,
                          defer_compressed=True, force_reading=force_reading)
    out = image = None
    loading = None
    later = checkpoint != 1 and (stream.proven_checkpoints or 0) > 1
    if later:
        loading = _load_restorer()
    try:
        out = output if hasattr(output, "fd") else \
            open_output(output, sync=sync, inputs=(source,))
        walk = None
        try:
            if out.seekable:
                image = _PageFile(out, stream.p2m_size * F.PAGE_SIZE)
                if later:
                    image.background(progress)
                    if progress is not None:
                        progress = _behind(progress, image)
                walk = _Walk(stream, checkpoint, progress, image)
                res = walk.run()
            else:   # pages in order only: the restorer's scratch file
                raise NeedsNumpy("an output that cannot seek")
        except NeedsNumpy as exc:
            if getattr(exc, "walk", None) is not walk:
                raise
            from .restorer import take_over
            taken, out = out, None          # the restorer's to commit or abort
            return take_over(stream, taken, walk, getattr(exc, "record", None),
                             checkpoint=checkpoint, progress=progress, threads=threads,
                             checkpoint_buffer=checkpoint_buffer)
        image.finish()
        res.image = out.commit()
        return res
    except BaseException as exc:
        try:
            if image is not None:
                image.cancel(exc)        # before the file is closed
        finally:
            if out is not None:
                out.abort()
        raise
    finally:
        stream.close()
        if loading is not None:
            loading.join()


def _behind(progress, image):
    """progress(), never ahead of the background copies."""
    return lambda pos: progress(image.position(pos))


def _load_restorer():
    """Import the restorer (numpy, ~0.1 s) in a thread while checkpoint 1 is
    copied, for a stream the inference has read more checkpoints in: the
    copies run in the kernel without the GIL, so the import takes the other
    core instead of following the copy.  A shorter switch interval while it
    runs gives the GIL back to the copying thread within 0.5 ms of a copy's
    end.  An import that fails here fails again where the restorer is
    needed, with its own error."""
    def load():
        try:
            from . import restorer  # noqa: F401
        except BaseException:       # noqa: BLE001 - raised again by the handover
            pass
        finally:
            fast.close()
    fast = switching()
    thread = threading.Thread(target=load, name="xlegacy-load-restorer", daemon=True)
    thread.start()
    return thread
