"""A page index of a legacy save file: PFN -> where its page lies in the file.

An uncompressed legacy stream already holds every page it sends, whole and
contiguous; only the framing (PFN arrays, chunk headers, tails) lies between
them.  PageMap reads that framing once -- seeking over the page data, so a
1 GiB save costs a few hundred small reads -- and keeps, for every PFN
present in the committed state, the file offset of the copy that wins:

* the last copy sent wins, across iterations and checkpoints;
* pages of a verification pass (ENABLE_VERIFY_MODE) never win: a restore
  only compares them;
* only complete checkpoints count (a cut or unreadable later checkpoint is
  dropped, as restore drops it), or those up to `checkpoint=N`.

Pages are then read where they lie, through one read-only mmap of the file:
page() is a zero-copy numpy view, read()/read_many() copy (read_many in one
C call for any number of pages).

Compressed Remus streams (format B) carry deltas against earlier pages, so
no page of a later checkpoint lies anywhere in the file.  For them the
stream is restored once into a sparse raw file in a cache directory, and
the index points into that file instead (`in_place` is False and repr()
says so).

save()/load() keep the index in a small file beside the stream (runs of
consecutive pages, not one entry per page), stamped with the stream's
size, mtime and a hash of its first bytes; load() refuses an index whose
stamp no longer matches.
"""
import hashlib
import json
import mmap
import os
import struct
import types as _types

import numpy as np

from . import cpu as _cpu
from . import format as F
from . import kernels
from .errors import StreamError, XLegacyError
from .stream.reader import LegacyStream
from .stream.records import CheckpointEnd, Chunk, HVMTail, PageBatch, PVTail
from .stream.source import PreadSource

PAGE = F.PAGE_SIZE
INDEX_SUFFIX = ".xlidx"
INDEX_MAGIC = b"XLPGMAP\x01"
INDEX_HEAD = struct.Struct("<8sI")          # magic, JSON length
INDEX_RUN = np.dtype([("pfn", "<u8"), ("offset", "<u8"), ("count", "<u8")])
INDEX_TYPED = np.dtype([("pfn", "<u8"), ("type", "u1")])
MAX_INDEX_JSON = 16 << 20
# How much of the stream's start the index stamp hashes: the wrapper, the
# libxc header and the first PFN array -- what changes when a file is
# replaced by another save of the same size.
STAMP_BYTES = 1 << 16
# Data-carrying type nibbles (what a restore writes): 0-4 and 8-12.
_DATA_TYPE = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0], bool)


class AbsentPage(XLegacyError, KeyError):
    """A page the stream never sent (or that no committed checkpoint holds)."""

    def __init__(self, pfn, what="pfn"):
        self.pfn = pfn
        super().__init__(f"{what} {pfn} (physical address {pfn * PAGE:#x}) holds no page "
                         "in this save")

    def __str__(self):
        return self.args[0]


class NotSeekable(XLegacyError, ValueError):
    """A page index needs a regular (seekable) file."""


class StaleIndex(XLegacyError):
    """A saved index does not belong to the stream as it is now."""

    def __init__(self, message, expected=None, found=None):
        self.expected = expected
        self.found = found
        text = message
        if expected is not None:
            text += f": expected {expected}, found {found}"
        super().__init__(text)


def default_cache_dir():
    """Where restored copies of compressed streams go by default:
    $XLEGACY_CACHE_DIR, else $XDG_CACHE_HOME/xlegacy, else ~/.cache/xlegacy."""
    if os.environ.get("XLEGACY_CACHE_DIR"):
        return os.environ["XLEGACY_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xlegacy")


def index_path(stream_path):
    """The index file that belongs beside a stream."""
    return os.fspath(stream_path) + INDEX_SUFFIX


# ------------------------------------------------------------------ the map
class PageMap:
    """PFN -> file offset of its page, for the committed state of a stream.

    pfns:     sorted uint64 array of the present pfns
    in_place: True when the pages are read from the stream itself; False for
              compressed Remus streams, whose pages come from a restored copy
              (`backing`, made once in the cache directory)
    Also: p2m_size, checkpoint (the committed one), guest, width (bytes),
    wrapper (kind), vcpus (decoded vCPU states: CR3, paging mode, ...),
    warnings, path (of the stream), backing (the file pages are read from).
    """

    def __init__(self, pfns, offsets, types, info, backing_fd, backing_path, stamp):
        self.pfns = pfns
        self._offsets = offsets
        self._types = types
        self.info = info
        self.p2m_size = info["p2m_size"]
        self.checkpoint = info["checkpoint"]
        self.guest = info["guest"]
        self.width = info["width"]
        self.wrapper = info["wrapper"]
        self.vcpus = info.get("vcpus", [])
        self.warnings = info.get("warnings", [])
        self.path = info.get("stream")
        self.in_place = info["backing"] == "stream"
        self.backing = backing_path
        self.stamp = stamp
        size = os.fstat(backing_fd).st_size
        end = int(offsets.max()) + PAGE if offsets.size else 0
        if end > size:
            raise StaleIndex(f"the index points past the end of {backing_path}",
                             expected=f"a file of at least {end} bytes", found=f"{size} bytes")
        self._mmap = mmap.mmap(backing_fd, 0, access=mmap.ACCESS_READ) if size else None
        self._bytes = (np.frombuffer(self._mmap, np.uint8) if self._mmap is not None
                       else np.zeros(0, np.uint8))
        self.pfns.flags.writeable = False
        self._offsets.flags.writeable = False

    # ---------------------------------------------------------- lookups
    def __len__(self):
        return int(self.pfns.size)

    def _slot(self, pfn):
        pfn = int(pfn)
        if pfn < 0:
            return -1
        i = int(np.searchsorted(self.pfns, np.uint64(pfn)))
        if i < self.pfns.size and int(self.pfns[i]) == pfn:
            return i
        return -1

    def __contains__(self, pfn):
        try:
            return self._slot(pfn) >= 0
        except (TypeError, ValueError, OverflowError):
            return False

    def offset(self, pfn):
        """Byte offset of pfn's page in `backing` (the stream when in_place).
        AbsentPage (a KeyError) when the save holds no page for it."""
        i = self._slot(pfn)
        if i < 0:
            raise AbsentPage(int(pfn))
        return int(self._offsets[i])

    def page(self, pfn):
        """pfn's 4096 bytes as a read-only numpy uint8 view into the mapped
        file (no copy; valid while the PageMap is open)."""
        off = self.offset(pfn)
        return self._bytes[off:off + PAGE]

    def page_type(self, pfn):
        """The type nibble of the winning entry (0 NOTAB, 1-4 L1-L4TAB, |8 pinned)."""
        i = self._slot(pfn)
        if i < 0:
            raise AbsentPage(int(pfn))
        return int(self._types[i])

    def read_many(self, pfns, out=None, found=None, strict=False):
        """Copy the pages of `pfns` (any integer array) into out, a uint8
        array of len(pfns)*4096 bytes (default: a new (n, 4096) array), in one
        C call.  Absent pages read as zeros (strict=True: AbsentPage names the
        first).  found: optional uint8/bool array, set to 1 where present.
        Returns out."""
        want = np.asarray(pfns)
        if want.dtype.kind not in "ui":
            raise TypeError(f"pfns must be integers, not {want.dtype}")
        if want.dtype.kind == "i" and want.size and int(want.min()) < 0:
            raise ValueError("pfns must not be negative")
        want = np.ascontiguousarray(want.reshape(-1), dtype=np.uint64)
        if strict and found is None:
            found = np.empty(want.size, np.uint8)
        out, hits = kernels.read_many(self._bytes, self.pfns, self._offsets, want, out, found)
        if strict and hits != want.size:
            raise AbsentPage(int(want[np.flatnonzero(found[:want.size] == 0)[0]]))
        return out

    def read(self, paddr, length, strict=False):
        """`length` bytes of guest-physical memory from paddr, across page
        boundaries; absent pages read as zeros (strict=True: AbsentPage)."""
        paddr, length = int(paddr), int(length)
        if paddr < 0 or length < 0:
            raise ValueError("paddr and length must not be negative")
        if length == 0:
            return b""
        first = paddr // PAGE
        last = (paddr + length - 1) // PAGE
        pfns = np.arange(first, last + 1, dtype=np.uint64)
        buf = self.read_many(pfns, strict=strict)
        start = paddr - first * PAGE
        return buf.reshape(-1)[start:start + length].tobytes()

    def runs(self):
        """Contiguous present pfn ranges, in order, as `range` objects."""
        p = self.pfns
        if not p.size:
            return []
        breaks = np.flatnonzero(np.diff(p) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [p.size]])
        return [range(int(p[a]), int(p[b - 1]) + 1) for a, b in zip(starts, ends)]

    def file_runs(self):
        """Runs of pages consecutive both in pfn and in the backing file:
        a structured array of (pfn, offset, count) -- what save() writes and
        what a Volatility segment is."""
        return _file_runs(self.pfns, self._offsets)

    # ---------------------------------------------------------- lifetime
    def close(self):
        self._bytes = np.zeros(0, np.uint8)
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:      # a page() view is still alive: the GC unmaps it
                pass
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        where = ("pages read in place from the stream" if self.in_place else
                 f"compressed Remus stream: pages read from a restored copy at {self.backing}")
        return (f"<PageMap {self.path or '?'}: {len(self)} pages in {len(self.runs())} runs, "
                f"checkpoint {self.checkpoint}, p2m_size {self.p2m_size}, {where}>")

    def summary(self):
        """A JSON-ready description (what `xlegacy index` prints)."""
        runs = self.runs()
        return {"stream": self.path, "pages": len(self), "runs": len(runs),
                "file_runs": int(self.file_runs().size),
                "first_pfn": runs[0].start if runs else None,
                "last_pfn": runs[-1].stop - 1 if runs else None,
                "p2m_size": self.p2m_size, "checkpoint": self.checkpoint,
                "guest": self.guest, "width": self.width * 8, "wrapper": self.wrapper,
                "in_place": self.in_place, "backing": self.backing,
                "vcpus": [{k: v.get(k) for k in ("id", "paging", "cr3", "cr3_paddr",
                                                 "page_table_base") if k in v}
                          for v in self.vcpus],
                "warnings": list(self.warnings)}

    # ---------------------------------------------------------- the index file
    def save(self, path=None):
        """Write the index (default: beside the stream, STREAM.xlidx)
        atomically.  Returns its path."""
        from .outputs.atomic import write_atomic
        if path is None:
            if not self.path:
                raise ValueError("this PageMap has no stream path: give the index path")
            path = index_path(self.path)
        info = dict(self.info, stamp=self.stamp, index_version=1)
        head = json.dumps(info, sort_keys=True).encode()
        runs = self.file_runs()
        typed = np.flatnonzero(self._types)
        t = np.empty(typed.size, INDEX_TYPED)
        t["pfn"] = self.pfns[typed]
        t["type"] = self._types[typed]
        body = (INDEX_HEAD.pack(INDEX_MAGIC, len(head)) + head
                + struct.pack("<QQ", runs.size, t.size) + runs.tobytes() + t.tobytes())
        write_atomic(path, body, inputs=(self.path,) if self.path else ())
        return os.fspath(path)

    @classmethod
    def load(cls, path, stream=None):
        """Open a saved index.  stream: the stream's path (default: the one
        recorded in the index).  StaleIndex when the stream (or the restored
        copy) is not the file the index was made for; StreamError when the
        index file itself is damaged."""
        with open(path, "rb") as f:
            data = f.read()
        info, runs, typed = _parse_index(data, path)
        stream = os.fspath(stream) if stream is not None else info.get("stream")
        if not stream:
            raise StaleIndex(f"{path} names no stream: give the stream's path")
        fd = os.open(stream, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = info["stamp"]
            found = _stamp(fd, st["base"], os.fstat(fd).st_size - st["base"])
            _check_stamp(st, found, stream)
            info = dict(info, stream=os.path.abspath(stream))
            return _from_runs(info, runs, typed, fd, stream)
        finally:
            os.close(fd)


def _file_runs(pfns, offsets):
    if not pfns.size:
        return np.zeros(0, INDEX_RUN)
    brk = np.flatnonzero((np.diff(pfns) != 1)
                         | (np.diff(offsets.astype(np.int64)) != PAGE)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [pfns.size]])
    out = np.empty(starts.size, INDEX_RUN)
    out["pfn"] = pfns[starts]
    out["offset"] = offsets[starts]
    out["count"] = ends - starts
    return out


def _expand(runs):
    """(pfn, offset, count) runs -> per-page pfns and offsets (vectorised)."""
    counts = runs["count"].astype(np.int64)
    total = int(counts.sum())
    first = np.repeat(np.cumsum(counts) - counts, counts)
    step = np.arange(total, dtype=np.int64) - first
    pfns = np.repeat(runs["pfn"].astype(np.uint64), counts) + step.astype(np.uint64)
    offs = np.repeat(runs["offset"].astype(np.uint64), counts) + \
        (step * PAGE).astype(np.uint64)
    return pfns, offs


def _parse_index(data, path):
    """Check every length and order in an index file before trusting it."""
    def bad(what, expected, found, at):
        raise StreamError(f"{path}: not a usable page index ({what})", offset=at,
                          expected=expected, found=found)
    if len(data) < INDEX_HEAD.size or data[:8] != INDEX_MAGIC:
        bad("magic", repr(INDEX_MAGIC), repr(data[:8]), 0)
    _, n = INDEX_HEAD.unpack_from(data, 0)
    at = INDEX_HEAD.size
    if n > MAX_INDEX_JSON or at + n + 16 > len(data):
        bad("header length", f"at most {len(data) - at - 16} bytes", str(n), 8)
    try:
        info = json.loads(data[at:at + n])
        stamp = info["stamp"]
        for key in ("size", "mtime_ns", "sha256", "base"):
            stamp[key]
        for key in ("p2m_size", "checkpoint", "guest", "width", "wrapper", "backing"):
            info[key]
    except (ValueError, KeyError, TypeError) as exc:
        bad("header", "the JSON header of an index", f"{type(exc).__name__}: {exc}", at)
    at += n
    nruns, ntyped = struct.unpack_from("<QQ", data, at)
    at += 16
    need = nruns * INDEX_RUN.itemsize + ntyped * INDEX_TYPED.itemsize
    if need != len(data) - at:
        bad("body length", f"{need} bytes of runs", f"{len(data) - at}", at)
    runs = np.frombuffer(data, INDEX_RUN, nruns, at)
    typed = np.frombuffer(data, INDEX_TYPED, ntyped, at + nruns * INDEX_RUN.itemsize)
    p2m = int(info["p2m_size"])
    if nruns:
        ends = runs["pfn"].astype(np.uint64) + runs["count"].astype(np.uint64)
        if (runs["count"] == 0).any() or int(ends.max()) > p2m or \
                (runs["pfn"][1:] < ends[:-1]).any():
            bad("runs", f"ordered, non-empty runs of pfns below {p2m}", "something else", at)
    return info, runs, typed


def _from_runs(info, runs, typed, stream_fd, stream_path):
    pfns, offs = _expand(runs)
    types = np.zeros(pfns.size, np.uint8)
    if typed.size:
        k = np.searchsorted(pfns, typed["pfn"].astype(np.uint64))
        ok = (k < pfns.size)
        ok[ok] = pfns[k[ok]] == typed["pfn"][ok]
        types[k[ok]] = typed["type"][ok]
    if info["backing"] == "stream":
        return PageMap(pfns, offs, types, info, stream_fd, stream_path, info["stamp"])
    cache = info["restored"]
    fd = os.open(cache["path"], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if st.st_size != cache["size"] or st.st_mtime_ns != cache["mtime_ns"]:
            raise StaleIndex(f"the restored copy {cache['path']} changed",
                             expected=f"{cache['size']} bytes, mtime_ns {cache['mtime_ns']}",
                             found=f"{st.st_size} bytes, mtime_ns {st.st_mtime_ns}")
        return PageMap(pfns, offs, types, info, fd, cache["path"], info["stamp"])
    finally:
        os.close(fd)


# ------------------------------------------------------------------ stamps
def _stamp(fd, base, size):
    st = os.fstat(fd)
    head = os.pread(fd, min(STAMP_BYTES, max(size, 0)), base)
    return {"size": size, "mtime_ns": st.st_mtime_ns, "base": base,
            "sha256": hashlib.sha256(head).hexdigest()}


def _check_stamp(want, found, name):
    for key, what in (("size", "size"), ("mtime_ns", "modification time (ns)"),
                      ("sha256", f"sha256 of the first {STAMP_BYTES} bytes")):
        if want[key] != found[key]:
            raise StaleIndex(f"the index does not belong to {name} as it is now ({what} "
                             "differs); rebuild it with 'xlegacy index'",
                             expected=str(want[key]), found=str(found[key]))


# ------------------------------------------------------------------ building
def open_pagemap(source, checkpoint=None, cache_dir=None, index=None, width=None,
                 guest=None):
    """A PageMap for a stream: a path, a file descriptor or a binary file
    object of a regular file.

    index: None (default): use the index beside the stream (STREAM.xlidx)
           when it is fresh and for the same checkpoint, else build one (and
           write nothing); a path: load that index (StaleIndex if stale);
           False: always build.
    cache_dir: where a compressed Remus stream is restored (once); default
           default_cache_dir().
    """
    if index is not None and index is not False:
        return PageMap.load(index, stream=source if isinstance(source, (str, os.PathLike))
                            else None)
    if index is None and isinstance(source, (str, os.PathLike)) and os.fspath(source) != "-":
        pm = _fresh_index(source, checkpoint)
        if pm is not None:
            return pm
    stream = LegacyStream(source, width=width, guest=guest)
    try:
        return build(stream, checkpoint=checkpoint, cache_dir=cache_dir)
    finally:
        stream.close()


def _fresh_index(path, checkpoint):
    ipath = index_path(path)
    if not os.path.exists(ipath):
        return None
    try:
        pm = PageMap.load(ipath, stream=path)
    except (StaleIndex, StreamError, OSError):
        return None
    if pm.info.get("requested_checkpoint") != checkpoint:
        pm.close()
        return None
    return pm


def build(stream, checkpoint=None, cache_dir=None):
    """Build the PageMap of an open, not yet iterated LegacyStream whose
    source is a regular file.  Reads only the framing."""
    src = stream.src
    if not isinstance(src, PreadSource):
        raise NotSeekable(f"a page index needs a seekable regular file; {src.name} is a "
                          "pipe or stream (save it to a file first, or use 'xlegacy restore')")
    if stream._started:
        raise RuntimeError("the stream was already read: open it again for pages()")
    # The framing only: page data and the qemu payload are skipped (a seek),
    # compressed chunks left in the file.
    stream.leave_data = True
    stream.defer_pages = False
    stream.defer_compressed = True
    stamp = _stamp(src.fd, src.base, src.size)
    walk = _Walk(stream, checkpoint)
    walk.run()
    info = {"stream": os.path.abspath(src.name) if _is_path(src.name) else None,
            "requested_checkpoint": checkpoint, "checkpoint": walk.committed_cp,
            "p2m_size": stream.p2m_size, "guest": stream.guest, "width": stream.width,
            "wrapper": stream.wrapper.kind, "torn": walk.torn, "warnings": walk.warnings}
    if walk.compressed:
        return _restored(stream, info, stamp, cache_dir)
    pfns, offs, types = walk.result(src.base)
    info["backing"] = "stream"
    info["vcpus"] = _vcpu_states(stream, walk.meta, pfns, types)
    return PageMap(pfns, offs, types, info, src.fd, src.name, stamp)


def _is_path(name):
    return bool(name) and not name.startswith("<")


class _Walk:
    """One pass over the framing, keeping per checkpoint the pfns of the
    data pages, where each batch's pages start, and the tails.  Checkpoint 1
    counts as it is read; later ones go through checkpoints.Engine, the
    transaction rules restore and convert run (torn: dropped; present but
    unreadable: CorruptCheckpoint)."""

    def __init__(self, stream, checkpoint):
        self.s = stream
        self.stop_after = checkpoint
        self.pfns, self.starts, self.types = [], [], []   # committed, stream order
        self.committed_cp = 0
        self.compressed = False
        self.meta = {}
        self.torn = None
        self.warnings = []
        self.begin(None)

    # ---------------------------------------------------------- the consumer
    def begin(self, held):
        self._p, self._s, self._t, self._meta = [], [], [], {}
        self._compressed = False

    def record(self, rec):
        if isinstance(rec, PageBatch):
            if rec.verify or not rec.n_data:
                return
            if rec.compressed:
                self._compressed = True
                return
            types = rec.types
            pfns = rec.data_pfns
            # A batch of consecutive pfns (the usual case) is kept as a range,
            # not as the decoder's array: the index's memory stays ~16 bytes
            # per page.
            n = pfns.size
            first = int(pfns[0])
            if n > 1 and int(pfns[-1]) - first == n - 1 and bool((np.diff(pfns) == 1).all()):
                pfns = range(first, first + n)
            self._p.append(pfns)
            self._s.append(rec.pages_offset)
            # Mostly every entry carries an untyped page: then no selection.
            self._t.append(None if rec.n_data == rec.count and not types.any()
                           else types[_DATA_TYPE[types]])
        elif isinstance(rec, Chunk):
            if rec.id == F.VCPU_INFO:
                self._meta["vcpus"] = rec.value
        elif isinstance(rec, HVMTail):
            self._meta["hvm_tail"] = rec
        elif isinstance(rec, PVTail):
            self._meta["pv_tail"] = rec

    def commit(self, end):
        self.pfns += self._p
        self.starts += self._s
        self.types += self._t
        self.meta.update(self._meta)
        self.compressed = self.compressed or self._compressed
        self.committed_cp = end.checkpoint
        if end.trailing:
            self.warnings.append("bytes after the final checkpoint (LAST_CHECKPOINT) "
                                 "were ignored")

    def committed(self, end):
        return end.last or bool(self.stop_after and end.checkpoint >= self.stop_after)

    # ---------------------------------------------------------- the pass
    def run(self):
        from .checkpoints import Engine, Hold
        records = iter(self.s)
        for rec in records:
            if not isinstance(rec, CheckpointEnd):
                self.record(rec)
                continue
            self.commit(rec)
            if not self.committed(rec):
                hold = Hold()
                try:
                    engine = Engine(self, hold, last_good=1)
                    engine.run(records)
                finally:
                    hold.close()
                self.torn = engine.torn
                self.warnings += engine.warnings
            break
        if self.stop_after and self.committed_cp < self.stop_after:
            raise StreamError(f"checkpoint {self.stop_after} was asked for",
                              expected=f"at least {self.stop_after} complete checkpoints",
                              found=f"{self.committed_cp}")

    def result(self, base):
        """(pfns sorted, file offsets, type nibbles) of the winning copies."""
        if not self.pfns:
            z = np.zeros(0, np.uint64)
            return z, z.copy(), np.zeros(0, np.uint8)
        counts = np.array([len(p) for p in self.pfns], np.int64)
        total = int(counts.sum())
        allp = np.empty(total, np.uint64)
        at = 0
        for p in self.pfns:            # per batch, not per page
            n = len(p)
            if isinstance(p, range):
                allp[at:at + n] = np.arange(p.start, p.stop, dtype=np.uint64)
            else:
                allp[at:at + n] = p
            at += n
        # Page k of the stream's data pages (in order) lies at the start of
        # its batch plus (k - the batch's first k) pages.
        first_k = np.cumsum(counts) - counts
        offs = np.arange(total, dtype=np.uint64)
        offs *= np.uint64(PAGE)
        offs += np.repeat((np.array(self.starts, np.int64) + base - first_k * PAGE)
                          .astype(np.uint64), counts)
        types = np.concatenate([np.zeros(c, np.uint8) if t is None else t
                                for c, t in zip(counts.tolist(), self.types)])
        if allp.size < 2 or bool((allp[1:] > allp[:-1]).all()):
            # Sent once each, in pfn order (a non-live save): nothing to choose.
            return allp, offs, types
        # The last copy wins: the first occurrence in the reversed order.
        rev = allp[::-1]
        pfns, idx = np.unique(rev, return_index=True)
        return (pfns.astype(np.uint64), np.ascontiguousarray(offs[::-1][idx]),
                np.ascontiguousarray(types[::-1][idx]))


class _TypeLookup:
    """last_type for cpu.decode_pv_context: a pfn's type, 0xFF when absent."""

    def __init__(self, p2m_size, pfns, types):
        self.n, self.pfns, self.types = p2m_size, pfns, types

    def __len__(self):
        return self.n

    def __getitem__(self, pfn):
        i = int(np.searchsorted(self.pfns, np.uint64(pfn)))
        if i < self.pfns.size and int(self.pfns[i]) == pfn:
            return int(self.types[i])
        return 0xFF


def _vcpu_states(stream, meta, pfns, types):
    """The committed vCPU states (cpu.vcpu_states on what the walk kept)."""
    res = _types.SimpleNamespace(
        stream=stream, meta=_types.SimpleNamespace(hvm_tail=meta.get("hvm_tail"),
                                                   pv_tail=meta.get("pv_tail"),
                                                   vcpus=meta.get("vcpus")),
        last_type=_TypeLookup(stream.p2m_size, pfns, types))
    try:
        return _cpu.vcpu_states(res)
    except (ValueError, StreamError) as exc:    # metadata only: never fatal here
        return [{"error": f"vCPU state not decoded: {exc}"}]


def _restored(stream, info, stamp, cache_dir):
    """Compressed Remus: restore once into the cache directory, index that."""
    from .restorer import restore_result
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(json.dumps([stamp, info["checkpoint"]], sort_keys=True)
                         .encode()).hexdigest()[:20]
    name = os.path.basename(info["stream"] or "stream")
    raw = os.path.join(cache_dir, f"{name}.{key}.raw")
    idx = raw + INDEX_SUFFIX
    if os.path.exists(raw) and os.path.exists(idx):
        try:
            pm = PageMap.load(idx, stream=stream.src.name) if info["stream"] else None
            if pm is not None and pm.backing == raw:
                return pm
        except (StaleIndex, StreamError, OSError):
            pass
    src = stream.src
    again = LegacyStream(PreadSource(src.fd, src.name, src.base, src.size),
                         width=stream.width * 8, guest=stream.guest, defer_compressed=True)
    res = restore_result(again, output=raw, checkpoint=info["checkpoint"])
    present = res.present
    pfns = np.flatnonzero(present).astype(np.uint64)
    types = res.last_type[pfns.astype(np.intp)].astype(np.uint8)
    offs = pfns * np.uint64(PAGE)
    fd = os.open(raw, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        info = dict(info, backing="restored", warnings=info["warnings"] + res.warnings,
                    restored={"path": raw, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
                    vcpus=_cpu.vcpu_states(res))
        pm = PageMap(pfns, offs, types, info, fd, raw, stamp)
    finally:
        os.close(fd)
    if info["stream"]:
        pm.save(idx)
    return pm
