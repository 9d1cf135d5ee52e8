"""`xlegacy verify STREAM`: read a whole legacy stream, check it against
every rule of the legacy format (as Xen's xc_domain_restore.c applies them)
and report every problem with its byte offset.

The stream is read by xlegacy.stream.reader and applied by xlegacy.restorer (to no
image by default: inspect_only), so the checks are the ones a restore makes
-- framing, PFN entries, chunk ids and payloads, tails, qemu records, Remus
checkpoint transactions, the compressed page encoding -- plus what a restore
tolerates but the format does not intend (see RULES below).  The first error
a restore stops at ends the reading; problems found before it are kept.

Severity:
  error    the stream breaks a rule; libxc's restore fails on it (or it is
           not a legacy stream at all)
  warning  libxc restores it, but it is not what a saver writes or it loses
           something: a torn last Remus checkpoint, unknown extended-info
           blocks, duplicate pfns in a batch, trailing bytes, verification
           pages that differ...
A stream is valid when it has no errors (with --strict: no problems at all).

Exit status: 0 valid, 1 invalid (or unreadable), 2 internal or usage error.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import format as F
from .errors import (AmbiguousStream, CorruptCheckpoint, StreamError, UnsupportedStream,
                     XLegacyError)
from .stream.reader import LegacyStream
from .stream.records import (BatchRun, CheckpointEnd, Chunk, HVMTail, PageBatch, PVTail, QemuRecord)

# What is checked beyond the reader's and the restorer's own errors.
RULES = {
    "dup-pfn": "a pfn repeats inside one page batch",
    "ext-unknown": "unknown PV extended-info block (libxc skips it)",
    "ext-extv-size": "'extv' extended-info block with a payload (it has none)",
    "ext-no-vcpu": "PV extended info without a 'vcpu' block",
    "hvm-param-in-pv": "HVM param chunk in a PV stream (libxc ignores it)",
    "late-compression": "ENABLE_COMPRESSION after checkpoint 1 (no effect)",
    "compressed-order": "compressed pages arrive before their PFN entries",
    "hvm-context": "HVM context blob that does not parse as hvm_save records",
    "qemu-to-eof-in-remus": "QemuDeviceModelRecord (runs to the end) in a checkpointed stream",
    "unmapped-range": "PV tail unmapped pfn not below p2m_size",
    "trailing": "bytes after the final checkpoint",
    "torn": "the last Remus checkpoint is incomplete and was discarded",
    "compressed-without-pages": "a Remus checkpoint's COMPRESSED_DATA with no page entries "
                                "(ignored)",
    "verify-mismatch": "verification pages that differ from the restored pages",
    "cpu-record": "a vCPU's saved registers that do not fit the CPU (reserved bits, an "
                  "offline vCPU with HVM state, a PV cr3 that is not a page table...)",
}


# Problems of one kind (severity and rule) listed in full; beyond that only
# counted, so a stream repeating one flaw a million times gives a report of
# bounded size (the counts still say how many there were).
KEEP_PER_KIND = 20


if TYPE_CHECKING:
    from ._typing import Progress, StreamSource


class Report:
    def __init__(self, name):
        self.name = name
        self.problems = []
        self.kinds = {}              # (severity, rule) -> problems of that kind seen

    def add(self, severity, message, offset=None, checkpoint=None, rule=None, expected=None,
            found=None):
        key = (severity, rule)
        seen = self.kinds.get(key, 0) + 1
        self.kinds[key] = seen
        if seen > KEEP_PER_KIND:
            return
        p = {"severity": severity, "offset": offset, "checkpoint": checkpoint,
             "rule": rule, "message": message}
        if expected is not None:
            p["expected"] = expected
        if found is not None:
            p["found"] = found
        self.problems.append(p)

    def error_from(self, exc, checkpoint=None, rule=None):
        if isinstance(exc, StreamError):
            self.add("error", exc.message, getattr(exc, "offset", None),
                     getattr(exc, "checkpoint", None) or checkpoint, rule,
                     exc.expected, exc.found)
        else:
            self.add("error", str(exc), getattr(exc, "offset", None), checkpoint, rule)


class _Observer:
    """Checks records as the restorer pulls them from the reader."""

    def __init__(self, report, stream):
        self.r = report
        self.s = stream
        self.checkpoint = 1
        self.compressed_seen = False
        self._cp = None
        self._reset()

    def _reset(self):
        self._entries_seen = 0       # data-carrying entries of this checkpoint so far
        self._chunks = []            # (buffer start, length, stream offset, entries before)
        self._cdata = []
        self._clen = 0
        self._compressed = False

    def __call__(self, rec):
        r = self.r
        cp = getattr(rec, "checkpoint", self.checkpoint)
        if cp != self.checkpoint:
            self.checkpoint = cp
            self._reset()
        if isinstance(rec, BatchRun):
            self._run_dups(rec, cp)
        elif isinstance(rec, PageBatch):
            sel = rec.types != F.XTAB
            pf = rec.pfns[sel]
            if pf.size > 1:
                uniq, counts = np.unique(pf, return_counts=True)
                if uniq.size != pf.size:
                    dups = uniq[counts > 1]
                    r.add("warning", f"the {rec.count}-entry batch repeats "
                          f"{dups.size} pfn(s): {[int(x) for x in dups[:8]]}"
                          + ("..." if dups.size > 8 else "")
                          + " (libxc applies them in order; Xen's converter refuses the batch)",
                          rec.offset, cp, "dup-pfn")
            if rec.compressed:
                self._compressed = True
            self._entries_seen += rec.n_data
        elif isinstance(rec, Chunk):
            cid = rec.id
            if cid in F.HVM_PARAM_CHUNKS and self.s.guest == "pv":
                r.add("warning", f"HVM param chunk {rec.name} in a PV stream", rec.offset, cp,
                      "hvm-param-in-pv")
            elif cid == F.ENABLE_COMPRESSION and cp > 1:
                r.add("warning", f"ENABLE_COMPRESSION in checkpoint {cp} has no effect (only "
                      "checkpoint 1's switches format B on)", rec.offset, cp, "late-compression")
            elif cid == F.ENABLE_COMPRESSION:
                self.compressed_seen = True
            elif cid == F.COMPRESSED_DATA and rec.value:
                self._chunks.append((self._clen, len(rec.value), rec.payload_offset + self.s.width,
                                     self._entries_seen))
                self._cdata.append(rec.value)
                self._clen += len(rec.value)
        elif isinstance(rec, HVMTail):
            self._hvm_context(rec, cp)
        elif isinstance(rec, QemuRecord):
            if rec.variant == "to-eof" and (cp > 1 or self.compressed_seen):
                r.add("error", "a QemuDeviceModelRecord record runs to the end of the stream, "
                      "so it cannot be followed by further checkpoints", rec.offset, cp,
                      "qemu-to-eof-in-remus",
                      expected="'RemusDeviceModelState' in a checkpointed stream",
                      found=repr(rec.signature))
        elif isinstance(rec, PVTail):
            unmapped = np.asarray(rec.unmapped_pfns, dtype=np.uint64)
            bad = unmapped[unmapped >= self.s.p2m_size]
            if bad.size:
                r.add("warning", f"{bad.size} unmapped pfn(s) in the PV tail are not below "
                      f"p2m_size {self.s.p2m_size}: {[int(x) for x in bad[:8]]}",
                      rec.offset + 4, cp, "unmapped-range")
        elif isinstance(rec, CheckpointEnd):
            if self._compressed:
                self._compressed_order(cp)
            if rec.trailing:
                n = "an unknown number of" if rec.trailing < 0 else str(rec.trailing)
                r.add("warning", f"{n} bytes follow the final checkpoint (after "
                      "LAST_CHECKPOINT) and are ignored", rec.offset, cp, "trailing")
            self._reset()

    def _run_dups(self, run, cp):
        """dup-pfn over a BatchRun: pfns repeating inside one of its batches
        (found for all of them at once: sort by batch, then pfn)."""
        if run.types.size == run.batches:
            return              # one entry per batch: nothing can repeat
        batch = np.repeat(np.arange(run.batches, dtype=np.uint64), run.counts)
        keep = run.types != F.XTAB
        key = np.sort((batch[keep] << np.uint64(32)) | run.pfns[keep])
        same = np.flatnonzero(key[1:] == key[:-1])
        if not same.size:
            return
        starts = np.concatenate([[0], np.cumsum(run.counts, dtype=np.int64)])
        # batch b starts after b chunk ids and the entries before it
        offsets = run.offset + 4 * np.arange(run.batches) + self.s.width * starts[:-1]
        for b in np.unique(key[same] >> np.uint64(32)).astype(np.int64):
            dups = np.unique(key[same][(key[same] >> np.uint64(32)) == b] & np.uint64(0xFFFFFFFF))
            n = int(run.counts[b])
            self.r.add("warning", f"the {n}-entry batch repeats {dups.size} pfn(s): "
                       f"{[int(x) for x in dups[:8]]}" + ("..." if dups.size > 8 else "")
                       + " (libxc applies them in order; Xen's converter refuses the batch)",
                       int(offsets[b]), cp, "dup-pfn")

    def _hvm_context(self, rec, cp):
        blob = rec.context
        at = rec.context_offset
        walked, stop, pos = F.walk_hvm_save(blob)
        if len(blob) >= F.HVM_SAVE_DESC.size:
            typecode = F.HVM_SAVE_DESC.unpack_from(blob, 0)[0]
            magic = F.U32.unpack_from(blob, 8)[0] if len(blob) >= 12 else None
            if typecode != F.HVM_SAVE_HEADER or magic != F.HVM_SAVE_MAGIC:
                self.r.add("error", "HVM context does not start with the hvm_save header",
                           at, cp, "hvm-context",
                           expected=f"typecode 1 with magic {F.HVM_SAVE_MAGIC:#x}",
                           found=f"typecode {typecode}"
                                 + (f", magic {magic:#x}" if magic is not None else ""))
                return
        if stop == "short":
            self.r.add("error", "HVM context ends without an END record", at + pos, cp,
                       "hvm-context", expected="an hvm_save record header",
                       found=f"{len(blob) - pos} bytes")
        elif stop == "overrun":
            typecode, _inst, length = F.HVM_SAVE_DESC.unpack_from(blob, pos)
            self.r.add("error", f"HVM context record (typecode {typecode}) overruns the "
                       "blob", at + pos, cp, "hvm-context",
                       expected=f"at most {len(blob) - pos - 8} bytes",
                       found=f"{length} bytes")
        elif pos != len(blob):
            self.r.add("warning", f"{len(blob) - pos} bytes follow the END record of "
                       "the HVM context", at + pos, cp, "hvm-context")

    def _compressed_order(self, cp):
        """Format B: a page can only be decoded once its PFN entry was sent."""
        from . import kernels
        if not self._chunks:
            return
        data = np.frombuffer(b"".join(self._cdata), dtype=np.uint8)
        try:
            starts, _ = kernels.delta_index(data, self._entries_seen)
        except StreamError:
            return          # the restorer reports the broken encoding itself
        ends = starts[1:].astype(np.int64) - 1          # last byte of each page
        cstart = np.array([c[0] for c in self._chunks], dtype=np.int64)
        which = np.searchsorted(cstart, ends, side="right") - 1
        before = np.array([c[3] for c in self._chunks], dtype=np.int64)[which]
        late = np.flatnonzero(before < np.arange(1, ends.size + 1))
        if late.size:
            i = int(late[0])
            c = self._chunks[int(which[i])]
            self.r.add("warning", f"{late.size} compressed page(s) of checkpoint {cp} arrive "
                       f"before their PFN entries (first: page {i})",
                       c[2] + int(ends[i] - c[0]), cp, "compressed-order",
                       expected=f"at least {i + 1} data entries sent",
                       found=f"{int(before[i])}")


def _header_checks(report, s):
    if s.pv_info is None:
        return
    info = s.pv_info
    if not info.extended:
        return
    if not any(b.id == b"vcpu" for b in info.blocks):
        report.add("warning", "PV extended info has no 'vcpu' block: the guest width is "
                   "assumed to be the toolstack's", info.offset, 1, "ext-no-vcpu")
    for b in info.blocks:
        if b.id not in (b"vcpu", b"extv", b"xcnt"):
            report.add("warning", f"unknown extended-info block {b.id!r} ({b.size} bytes), "
                       "skipped as libxc skips it (Xen's converter refuses it)",
                       b.offset, 1, "ext-unknown")
        elif b.id == b"extv" and b.size:
            report.add("warning", f"'extv' extended-info block carries {b.size} bytes "
                       "(libxc ignores them)", b.offset, 1, "ext-extv-size",
                       expected="0 bytes", found=f"{b.size} bytes")


def verify(source: StreamSource, width: int | None = None, guest: str | None = None,
           pages: bool = False, strict: bool = False, name: str | None = None,
           progress: Progress | None = None, force_reading: bool = False) -> dict[str, Any]:
    """Check a legacy stream; returns a report dict:

    valid, errors, warnings, problems (severity, offset, checkpoint, rule,
    message, expected, found), summary (what the stream holds, as far as it
    was read).  pages=True restores into a temporary sparse file so that
    verify-mode pages can be compared (otherwise no image is kept).
    """
    name = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else
                    getattr(source, "name", "<stream>"))
    report = Report(str(name))
    summary = {}
    stream = None
    res = None
    try:
        stream = LegacyStream(source, width=width, guest=guest, defer_pages=True,
                              coalesce=True, force_reading=force_reading)
    except (StreamError, UnsupportedStream, AmbiguousStream, OSError) as exc:
        _fatal(report, exc)
    if stream is not None:
        stream.observer = _Observer(report, stream)
        summary.update(_stream_summary(stream))
        _header_checks(report, stream)
        from .restorer import restore_result
        try:
            # --pages restores into an unnamed scratch file, compared page
            # by page through small buffers (no mapping of the whole image).
            res = restore_result(stream, output=_Scratch() if pages else None,
                                 inspect_only=not pages, progress=progress)
        except CorruptCheckpoint as exc:
            report.error_from(exc, rule="checkpoint")
        except (StreamError, UnsupportedStream, AmbiguousStream) as exc:
            report.error_from(exc, checkpoint=stream.observer.checkpoint)
        except OSError as exc:
            _fatal(report, exc)
        finally:
            try:
                stream.close()
            except OSError:
                pass
    if res is not None:
        summary.update(_result_summary(res))
        if res.torn:
            t = res.torn
            report.add("warning", f"checkpoint {t['checkpoint']} is incomplete ({t['reason']}); "
                       f"a restore discards it and gives checkpoint {t['checkpoint'] - 1}",
                       t["offset"], t["checkpoint"], "torn")
        for t in getattr(res, "tolerated", ()):
            report.add("warning", f"checkpoint {t['checkpoint']} carries "
                       f"{t['compressed_bytes']} bytes of COMPRESSED_DATA but no page entries; "
                       "libxc ignores them and so does a restore", t["offset"],
                       t["checkpoint"], t["rule"])
        _cpu_checks(report, res, summary)
        v = res.verify
        if v["pages"] and v["checked"] and v["differing_pfns"]:
            d = v["differing_pfns"]
            report.add("warning", f"{len(d)} verification page(s) differ from the pages sent "
                       f"before: pfns {d[:16]}" + ("..." if len(d) > 16 else ""),
                       None, None, "verify-mismatch")
    errors = sum(n for (sev, _), n in report.kinds.items() if sev == "error")
    warnings = sum(report.kinds.values()) - errors
    for (sev, rule), n in report.kinds.items():
        if n > KEEP_PER_KIND:
            report.problems.append({
                "severity": sev, "offset": None, "checkpoint": None, "rule": rule,
                "message": f"{n - KEEP_PER_KIND} more {sev}(s)"
                           + (f" of rule {rule!r}" if rule else "")
                           + f" not listed (only the first {KEEP_PER_KIND} are)",
                "omitted": n - KEEP_PER_KIND})
    valid = errors == 0 and (not strict or warnings == 0)
    return {"stream": report.name, "valid": valid, "errors": errors, "warnings": warnings,
            "strict": strict, "problems": report.problems, "summary": summary}


class _Scratch:
    """The output a --pages pass restores into: an unnamed temporary file
    (nothing is left behind, whatever happens), dropped at the end."""
    path = None
    seekable = True
    sync = False

    def __init__(self):
        from .outputs.atomic import scratch_file
        self.fd = scratch_file()

    def commit(self):
        self.abort()

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _cpu_checks(report, res, summary):
    """The warnings of the decoded vCPU states (cpu.py), one problem each; an
    HVM one at its CPU record in the stream."""
    vcpus = summary.get("vcpus") or {}
    at = {}
    if res.stream.guest == "hvm" and res.meta.hvm_tail is not None:
        from .cpu import context_records
        base = res.meta.hvm_tail.context_offset
        at = {r["instance"]: base + r["offset"]
              for r in (context_records(res) or {}).get("records", ())
              if r["name"] == "CPU"}
    for state in vcpus.get("state") or ():
        for w in state.get("warnings") or ():
            report.add("warning", f"vcpu {state['id']}: {w}", at.get(state["id"]),
                       len(res.checkpoints) or None, "cpu-record")


def _fatal(report, exc):
    if isinstance(exc, OSError) and not isinstance(exc, XLegacyError):
        report.add("error", f"{exc.strerror or exc}"
                   + (f": {exc.filename}" if exc.filename else ""))
    elif isinstance(exc, AmbiguousStream):
        report.add("error", str(exc), None, None, "ambiguous")
    else:
        report.error_from(exc)


def _stream_summary(s):
    w = s.wrapper
    out = {"wrapper": w.kind, "image_offset": w.image_offset, "width": s.width * 8,
           "guest": s.guest, "inferred": s.header.inferred, "p2m_size": s.p2m_size}
    if s.pv_info is not None:
        out["pv_guest_width"] = s.pv_info.guest_width * 8
        out["extended_info"] = [b.id.decode("latin-1") for b in s.pv_info.blocks]
    return out


def _result_summary(res):
    meta = res.to_dict()
    keep = ("checkpoints", "torn_checkpoint", "compressed", "last_checkpoint_flag", "pfns",
            "data_pages", "entry_counts", "vcpus", "tsc_info", "hvm_params", "qemu", "verify")
    out = {k: meta[k] for k in keep if k in meta}
    out["committed_checkpoint"] = len(res.checkpoints)
    out["checkpoint_details"] = [
        {k: c[k] for k in ("number", "offset", "end", "batches", "entries", "data_pages",
                           "compressed") if k in c}
        for c in meta["checkpoint_details"]]
    if "hvm" in meta:
        out["hvm_context_length"] = meta["hvm"]["context"]["length"]
    return out
