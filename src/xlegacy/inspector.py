"""`xlegacy info` without numpy, for the common stream: one checkpoint (or
the first one asked for), no compressed pages.

Importing numpy costs more than reading a 1 MiB stream, and info needs no
image: it needs, per PFN, whether a page arrived and its last type, and the
entry counts.  Those live here in anonymous maps of p2m_size bytes (p2m_size <
2^28; zero pages are mapped lazily by the OS, so a sparse p2m costs memory
and time only where pages arrive), filled by one kernels.mark_pfns call per
batch, which also keeps the totals (entries by type, present pfns by last
type) so that nothing scans the maps but the search for runs.

What this path does not serve (later Remus checkpoints, compressed pages)
raises NeedsNumpy, and the caller reads the stream again through
restorer.restore_result(inspect_only=True), which does all of it.  The
result is the same object as far as report.build_metadata is concerned
(tests/test_inspector.py compares the two on every sample).
"""
import mmap

from . import format as F
from . import kernels
from . import options as _options
from .errors import XLegacyError
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
        return _read(s, checkpoint, progress)


def _read(s, checkpoint, progress):
    res = Inspection(s)
    pending = _Meta()
    pending.xalloc = _PfnList(res.maps[2], res.p2m_size)
    pending.broken = _PfnList(res.maps[3], res.p2m_size)
    stats = CheckpointStats(1, s.header.offset)
    for rec in s:
        if progress:
            progress(s.src.pos)
        if isinstance(rec, PageBatch):
            if rec.compressed or rec.odd is not None:
                raise NeedsNumpy("compressed pages")
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
        elif isinstance(rec, CheckpointEnd):
            if not (rec.last or checkpoint == 1):
                raise NeedsNumpy("later checkpoints")
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
            _chunk(rec, pending)
        elif note_tail(pending, rec):
            pass
        elif isinstance(rec, BatchRun):     # not asked for (coalesce)
            raise NeedsNumpy("a batch run")
        # Anything else (EndOfBody) says nothing info reports, as in the restorer.
    raise NeedsNumpy("no checkpoint end")


def _chunk(c, m):
    if note_chunk(m, c):
        return
    if c.id == F.ENABLE_COMPRESSION:
        # Format B pages need the delta decoder's index (numpy).
        raise NeedsNumpy("compression")
    elif c.id == F.COMPRESSED_DATA:
        raise NeedsNumpy("compressed data")
