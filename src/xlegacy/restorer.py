"""Records + kernels -> guest image and metadata, with Remus checkpoint
transactions exactly as libxc applies them:

* checkpoint 1 is applied as it streams in (it is a plain live migration);
* every later checkpoint is buffered (its PFN arrays, page data or
  compressed bytes, and its metadata) and applied only when its tail has been
  read in full; its memory is bounded by its own size;
* a stream that ends (or whose source fails) inside a later checkpoint
  yields the last complete one (with a warning); ending inside checkpoint 1
  is an error;
* a later checkpoint whose bytes are there but do not parse or cannot be
  applied (a bad compressed page, say) is a CorruptCheckpoint, as in libxc:
  the restore fails and its output is discarded.
The rules for later checkpoints are checkpoints.Engine's, shared with the
converter.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from . import format as F
from . import options as _options
from .checkpoints import BUDGET, Engine, Hold
from .errors import StreamError
from .image import FileImage, MemoryImage, NullImage
from .pfnset import PfnSet
from .report import CheckpointStats, build_metadata, note_chunk, note_tail  # noqa: F401 (build_metadata: API)
from .stream.reader import LegacyStream
from .stream.records import BatchRun, CheckpointEnd, Chunk, PageBatch

# Split a compressed checkpoint across threads only when it is worth it.
PARALLEL_MIN_PAGES = 2048

# Which type nibbles carry a page, as a lookup table for numpy indexing.
_DATA_TYPES = np.array(F.DATA_TYPES, dtype=bool)


if TYPE_CHECKING:
    from ._typing import OutputTarget, Progress, StreamSource


class _Meta:
    """Metadata one checkpoint sets; later checkpoints replace it on commit."""

    def __init__(self):
        self.vcpus = None
        self.tsc_info = None
        self.hvm_params = {}
        self.toolstack = None
        self.hvm_tail = None
        self.qemu = None
        self.pv_tail = None
        self.flags = set()
        self.entry_counts = np.zeros(16, dtype=np.int64)
        self.verify_entry_counts = np.zeros(16, dtype=np.int64)
        # Sets, not lists: a stream may repeat the same entries without end.
        self.xalloc = PfnSet()
        self.broken = PfnSet()

    def merge(self, newer):
        for name in ("vcpus", "tsc_info", "toolstack", "hvm_tail", "qemu", "pv_tail"):
            value = getattr(newer, name)
            if value is not None:
                setattr(self, name, value)
        self.hvm_params.update(newer.hvm_params)
        self.flags |= newer.flags
        self.entry_counts += newer.entry_counts
        self.verify_entry_counts += newer.verify_entry_counts
        self.xalloc.update(newer.xalloc)
        self.broken.update(newer.broken)


class Result:
    """What a restore produced: `image` (numpy array, path or None), the
    committed metadata, per-checkpoint statistics and warnings."""

    def __init__(self, stream: LegacyStream, meta: Any, checkpoints: list[CheckpointStats],
                 present: np.ndarray, last_type: np.ndarray,
                 image: np.ndarray | str | None, verify: dict[str, Any], warnings: list[str],
                 torn: dict[str, Any] | None) -> None:
        self.stream = stream
        self.meta = meta
        self.checkpoints = checkpoints
        self.present = present
        self.last_type = last_type
        self.image = image
        self.verify = verify
        self.warnings = warnings
        self.torn = torn

    @property
    def pfns_with_data(self):
        return np.flatnonzero(self.present).astype(np.uint64)

    def to_dict(self) -> dict[str, Any]:
        return build_metadata(self)

    # The per-PFN facts build_metadata asks every result for.
    def pfn_count(self) -> int:
        return int(np.count_nonzero(self.present))

    def pfn_ranges(self) -> list[list[int]]:
        return _ranges(self.present)

    def pagetable_counts(self) -> dict[str, tuple[int, int]]:
        return {level: (len(rows), sum(1 for _, pin in rows if pin))
                for level, rows in pagetable_pfns(self).items()}


def pagetable_pfns(res):
    """PV page-table pages of the result by level: {"L1TAB": [[pfn, pinned], ...]}.
    Looks only at pfns holding data, so a sparse p2m costs nothing."""
    idx = np.flatnonzero(res.present)
    types = res.last_type[idx]
    out = {}
    for level in (1, 2, 3, 4):
        sel = (types & 0x7) == level
        out[f"L{level}TAB"] = [[int(p), bool(t & 0x8)] for p, t in zip(idx[sel], types[sel])]
    return out


def _ranges(present):
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


class Restorer:
    """Drive a LegacyStream into an image.  Use restore() for the common case.

    Checkpoint 1 is applied as it streams in; later ones go through the
    checkpoint engine (checkpoints.py), this class being its consumer."""

    def __init__(self, stream, image, stop_after=None, progress=None, threads=None,
                 checkpoint_buffer=None):
        self.s = stream
        self.image = image
        self.stop_after = stop_after
        self.progress = progress
        # One thread by default: the single-pass decoder reads the compressed
        # buffer once, and on the machines measured (bench/README.md) one core
        # already saturates memory bandwidth, so index-then-split was slower.
        self.threads = threads if threads is not None else 1
        p2m = stream.p2m_size
        # Both are zero-filled lazily by the OS: a huge, sparse p2m costs
        # memory only where pages actually arrive.  last_type is meaningful
        # only where `present` is set.
        self.present = np.zeros(p2m, dtype=np.bool_)
        self.last_type = np.zeros(p2m, dtype=np.uint8)
        self.meta = _Meta()
        self.checkpoints = []
        self.warnings = []
        self.verify = {"pages": 0, "matched": 0, "differing_pfns": [], "checked": True}
        self._differing = PfnSet()     # distinct pfns; a verify pass may repeat
        self.torn = None
        self.tolerated = []
        # The bytes of the checkpoint being held (one hold serves them all).
        budget = BUDGET if checkpoint_buffer is None else checkpoint_buffer
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"checkpoint_buffer must be a byte count >= 0, not {budget!r}")
        self._hold = Hold(budget=budget, spill_dir=image.spill_dir)
        self._held = None

    # ---------------------------------------------------------- batches
    def _entries(self, b, meta):
        counts = np.bincount(b.types, minlength=16)
        if b.verify:
            meta.verify_entry_counts += counts
        else:
            meta.entry_counts += counts
            if counts[F.XALLOC]:
                meta.xalloc.add(b.pfns[b.types == F.XALLOC])
            if counts[F.BROKEN]:
                meta.broken.add(b.pfns[b.types == F.BROKEN])

    def _data_types(self, b):
        return b.types[_DATA_TYPES[b.types]]

    def _verify(self, pfns, pages, offset):
        n = pfns.size
        self.verify["pages"] += n
        differs = self.image.compare_pages(pages, pfns, locate=offset)
        if differs is None:
            self.verify["checked"] = False
            return
        bad = pfns[differs]
        self.verify["matched"] += n - int(bad.size)
        self._differing.add(bad)

    def _count(self, b, stats):
        self._entries(b, self.meta_pending)
        stats.batches += 1
        stats.entries += b.count
        if b.verify:
            stats.verify_pages += b.n_data
        else:
            stats.data_pages += b.n_data

    def _count_run(self, r, stats):
        """A BatchRun: many batches without pages, counted in one go."""
        self._entries(r, self.meta_pending)
        stats.batches += r.batches
        stats.entries += int(r.types.size)

    def _apply_now(self, b, stats):
        """Checkpoint 1: pages go straight into the image."""
        self._count(b, stats)
        if not b.n_data:
            return
        if b.verify:
            self._verify(b.data_pfns, b.page_data(), b.pages_offset)
            return
        if b.deferred:
            self.image.write_pages_from(b.pages_fd, b.pages_file_offset, b.data_pfns,
                                        locate=b.pages_offset)
        else:
            self.image.write_pages(b.pages, b.data_pfns, locate=b.pages_offset)
        self._mark(b)

    def _mark(self, b):
        self.present[b.data_pfns] = True
        self.last_type[b.data_pfns] = self._data_types(b)

    # ---------------------------------------------------------- engine consumer
    def begin(self, held):
        self.stats = CheckpointStats(held.number, self._end)
        self.meta_pending = _Meta()
        self._held = held
        # A file image takes compressed pages from anywhere: they need not
        # be copied out of a regular-file input first.
        held.in_place = hasattr(self.image, "apply_indexed")

    def record(self, rec):
        if isinstance(rec, PageBatch):
            self.stats.compressed = self.stats.compressed or rec.compressed
            self._count(rec, self.stats)
            self._held.add_batch(rec)
        elif isinstance(rec, BatchRun):
            self._count_run(rec, self.stats)
        else:
            self._other(rec)

    def commit(self, end):
        held, stats = self._held, self.stats
        image = self.image
        if held.compressed:
            pfns = held.compressed_pfns()
            mapped = held.map_compressed(pfns.size, self._hold.budget)
            if mapped is not None:
                try:
                    stats.page_kinds = image.apply_indexed(*mapped, pfns)
                finally:
                    del mapped
                    held.unmap()
            else:
                held.materialize()
                stats.page_kinds = image.apply_compressed(
                    self._hold.view(), pfns, held.cmap.locate, self._parts(pfns),
                    origin=held.cmap)
        elif stats.compressed:      # no page to apply: the bytes are ignored
            stats.page_kinds = {"empty": 0, "full": 0, "delta": 0}
        data = self._hold.view()
        for h, pages in held.pages(data):
            if h.verify:
                self._verify(h.pfns, pages, h.pages_offset)
            else:
                image.write_pages(pages, h.pfns, locate=h.pages_offset)
        for h in held.batches + held.compressed:
            if not h.verify:
                self.present[h.pfns] = True
                self.last_type[h.pfns] = h.types
        self._hold.release()
        self._close(end)

    def committed(self, end):
        return end.last or bool(self.stop_after and end.checkpoint >= self.stop_after)

    def _parts(self, pfns):
        n = pfns.size
        if self.threads <= 1 or n < PARALLEL_MIN_PAGES or np.unique(pfns).size != n:
            return 1
        return self.threads

    # ---------------------------------------------------------- main loop
    def run(self, walk=None, record=None):
        """Restore the stream; or, given inspector.restore_to_file's `walk`
        (see take_over), go on from `record` (None: the next one)."""
        s = self.s
        if walk is None:
            records = iter(s)
            self.stats = CheckpointStats(1, s.header.offset)
            self.meta_pending = _Meta()
        else:
            records = self._resume(walk, record)
        try:
            for rec in records:
                if self.progress:
                    self.progress(s.src.pos)
                if isinstance(rec, PageBatch):
                    self._apply_now(rec, self.stats)
                elif isinstance(rec, BatchRun):
                    self._count_run(rec, self.stats)
                elif isinstance(rec, CheckpointEnd):
                    self._close(rec)
                    if not self.committed(rec):
                        engine = Engine(self, self._hold, last_good=1)
                        engine.run(self._progressed(records))
                        self.torn = engine.torn
                        self.tolerated = engine.tolerated
                        self.warnings.extend(engine.warnings)
                    break
                else:
                    self._other(rec)
        finally:
            self._hold.close()
        if self.stop_after and len(self.checkpoints) < self.stop_after:
            raise StreamError(f"checkpoint {self.stop_after} was asked for",
                              expected=f"at least {self.stop_after} complete checkpoints",
                              found=f"{len(self.checkpoints)}")
        self.verify["differing_pfns"] = self._differing.tolist()
        res = Result(s, self.meta, self.checkpoints, self.present, self.last_type,
                     None, self.verify, self.warnings, self.torn)
        res.tolerated = self.tolerated
        return res

    def _resume(self, walk, record):
        """Checkpoint 1 as the numpy-free walk left it: its per-PFN maps
        become present/last_type as they are (views, not copies), its
        statistics and metadata this checkpoint's."""
        p2m = self.s.p2m_size
        res, seen = walk.res, walk.pending
        self.present = np.frombuffer(res.present, np.bool_)[:p2m]
        self.last_type = np.frombuffer(res.last_type, np.uint8)[:p2m]
        self.stats = walk.stats
        m = self.meta_pending = _Meta()
        for name in ("vcpus", "tsc_info", "toolstack", "hvm_tail", "qemu", "pv_tail",
                     "hvm_params", "flags"):
            setattr(m, name, getattr(seen, name))
        m.entry_counts = np.array(seen.entry_counts, np.int64)
        for name, kind in (("xalloc", F.XALLOC), ("broken", F.BROKEN)):
            if m.entry_counts[kind]:
                marks = getattr(seen, name)
                getattr(m, name).add(np.flatnonzero(np.frombuffer(marks.flags, np.uint8)
                                                    [:marks.size]))
        return walk.records if record is None else itertools.chain([record], walk.records)

    def _progressed(self, records):
        for rec in records:
            if self.progress:
                self.progress(self.s.src.pos)
            yield rec

    def _close(self, end):
        """A checkpoint has been applied: its statistics and metadata count."""
        stats = self.stats
        stats.end = self._end = end.offset
        self.meta.merge(self.meta_pending)
        self.checkpoints.append(stats)
        if end.trailing:
            self.warnings.append(
                f"{'unknown number of' if end.trailing < 0 else end.trailing} "
                f"bytes after the final checkpoint (LAST_CHECKPOINT) were ignored")

    def _other(self, rec):
        m = self.meta_pending
        if isinstance(rec, Chunk):
            self._chunk(rec)
        else:
            note_tail(m, rec)

    def _chunk(self, c):
        m = self.meta_pending
        if note_chunk(m, c):
            return
        if c.id == F.ENABLE_COMPRESSION:
            if c.checkpoint == 1:
                m.flags.add("compression")
        elif c.id == F.COMPRESSED_DATA:
            held = self._held
            held.add_compressed(c)
            self.stats.compressed_bytes = held.compressed_bytes
            self.stats.compressed_chunks = held.compressed_chunks


def restore(source: StreamSource | LegacyStream, image: np.ndarray | None = None,
            output: OutputTarget | None = None, width: int | None = None,
            guest: str | None = None, checkpoint: int | None = None,
            progress: Progress | None = None, threads: int | None = None, sync: bool = True,
            checkpoint_buffer: int | None = None,
            force_reading: bool = False) -> tuple[np.ndarray | str | None, dict[str, Any]]:
    """Restore a legacy stream.

    source:     path, '-', binary file object or bytes-like
    image:      a writable 1-D numpy uint8 buffer of at least p2m_size*4096 bytes
                to restore into (caller-owned); by default a new one is made
    output:     a path: write a sparse raw image file there instead (renamed
                into place only when the restore succeeded)
    checkpoint: restore the state after this checkpoint (default: the last
                complete one)
    sync:       with output, fsync the file (and its directory) before and
                after it takes its final name
    checkpoint_buffer: memory budget in bytes for a held Remus checkpoint
                (default 256 MiB); beyond it the checkpoint is held in an
                unnamed file beside the output (an anonymous memory file
                without one)
    width, guest: 32|64, "pv"|"hvm"; inferred when None (see stream/infer.py).
                Given values that the bytes contradict raise ReadingMismatch
                naming the reading that fits, unless force_reading
    Returns (image, metadata dict): the numpy image (or the output path).
    """
    res = restore_result(source, image=image, output=output, width=width, guest=guest,
                         checkpoint=checkpoint, progress=progress, threads=threads, sync=sync,
                         checkpoint_buffer=checkpoint_buffer, force_reading=force_reading)
    return res.image, res.to_dict()


def restore_result(source: StreamSource | LegacyStream, image: np.ndarray | None = None,
                   output: Any = None, width: int | None = None, guest: str | None = None,
                   checkpoint: int | None = None, progress: Progress | None = None,
                   threads: int | None = None, inspect_only: bool = False, sync: bool = True,
                   checkpoint_buffer: int | None = None,
                   force_reading: bool = False) -> Result:
    """Like restore(), returning the full Result object."""
    checkpoint = _options.checkpoint(checkpoint)
    threads = _options.threads(threads)
    # Page data of a regular-file input is left in the file (defer_pages)
    # and moved with one copy: pread straight into a memory image, pwrite
    # from a read-only mapping of the input into a file image.
    stream = source if isinstance(source, LegacyStream) else \
        LegacyStream(source, width=width, guest=guest, defer_pages=True, coalesce=True,
                     defer_compressed=True, force_reading=force_reading)
    nbytes = stream.p2m_size * F.PAGE_SIZE
    target: NullImage | FileImage | MemoryImage | None = None
    try:
        if inspect_only:
            target = NullImage(nbytes)
        elif output is not None:
            if image is not None:
                raise ValueError("give either image or output, not both")
            target = FileImage(output, nbytes, sync=sync, inputs=(source,))
        else:
            target = MemoryImage(nbytes, image)
        res = Restorer(stream, target, stop_after=checkpoint, progress=progress,
                       threads=threads, checkpoint_buffer=checkpoint_buffer).run()
        res.image = target.commit()
        return res
    except BaseException:
        if target is not None:
            target.abort()
        raise
    finally:
        if not isinstance(source, LegacyStream):
            stream.close()


def take_over(stream: LegacyStream, output: Any, walk: Any, record: Any,
              checkpoint: int | None = None, progress: Progress | None = None,
              threads: int | None = None, checkpoint_buffer: int | None = None) -> Result:
    """Go on with a restore that inspector.restore_to_file began without
    numpy (`walk`: its state, None if it read nothing; `record`: the first
    record it did not consume) into `output`, an output it opened: the pages
    already in the file and the records already read are not touched
    again."""
    stream.coalesce = True          # what restore_result reads with
    # (FileImage aborts the output itself if it cannot be made.)  Copies the
    # walk still makes on its thread end before the file is touched again.
    target = FileImage(output, stream.p2m_size * F.PAGE_SIZE,
                       pending=getattr(walk, "image", None))
    try:
        res = Restorer(stream, target, stop_after=checkpoint, progress=progress,
                       threads=threads, checkpoint_buffer=checkpoint_buffer).run(walk, record)
        res.image = target.commit()
        return res
    except BaseException as exc:
        target.abort(exc)
        raise
