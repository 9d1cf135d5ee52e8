"""Legacy stream -> v2/v3 stream (libxc, optionally inside a libxl stream).

The output is byte for byte what Xen's tools/python/scripts/convert-legacy-
stream (the current one: libxc stream version 3 with STATIC_DATA_END)
writes, for every stream that script converts.  Beyond it:

* width and guest type are inferred when not given; the xend, XenServer and
  libvirt wrappers are read (their headers are not part of the output); an
  xl header is copied as Xen's -x does, with or without -x;
* checkpointed (Remus) streams, compressed or not, become a plain v3 stream
  holding the state of the last complete checkpoint.  Checkpoint 1 is
  written as the script writes it (page batches become PAGE_DATA records
  one to one, TSC_INFO where it is read, HVM params at the end of the body),
  but its tail records are held back until it is known whether more
  follows.  Each later checkpoint is held back (pages or compressed data,
  in memory up to checkpoint_buffer, else in a file beside the output)
  until its tail has been read, then applied to the "shadow" (image.
  ShadowImage: a page overlay -- FULL pages left in a regular-file input,
  deltas in memory slots -- in front of a sparse file beside the output);
  a torn last checkpoint is dropped.
  The output then carries, after checkpoint 1's records, one PAGE_DATA
  record set with every page a later committed checkpoint changed (pfn
  order, last type), then the committed checkpoint's TSC, params, tail and
  qemu record.  See _Later.  (Restoring the image first and writing it out
  would need the whole image and, for a pipe, a second pass; this needs
  only the pages changed after checkpoint 1.)
* errors carry byte offsets (xlegacy.errors), never a traceback.

Data movement (bounded memory, page data never in Python objects): a
regular-file input is read with positional reads and its page data copied
by Output.copy_range (splice through a private 1 MiB pipe for a regular-file
output, sendfile for a pipe or socket, writev from a read-only mapping for a
character device such as /dev/null; pread + write where the kernel refuses);
a pipe or socket input is read with exact reads -- never past what the
stream needs, so a caller sharing the descriptor (xenopsd reads the qemu
record after the converter) finds the rest where it was -- and its page data
is spliced.  From a regular file to a regular file the output is written on
a thread of its own (Output.background), so that a Remus stream's later
checkpoints are read and applied while checkpoint 1 is still being copied.
For a regular-file descriptor the file offset is left after the last byte
used.

The stream is read by xlegacy.stream.reader (LegacyStream with leave_data, so page
data and qemu payloads stay in the source for this module to move;
lookahead=False, so nothing past what the output needs is read; lenient,
for what Xen's script passes on although libxc refuses it).  Start-up cost
matters for a converter run once per guest: with width and guest given, a
stream of ordinary pages is converted without importing numpy (the reader
checks each batch and counts its data pages with a numpy-free kernel, and
so does inference).  numpy is loaded for batches with other entries than
ordinary pages (XTAB holes, page tables, XALLOC/BROKEN) and for checkpoints
after the first.

Deliberate differences from Xen's script, on streams it accepts but reads
differently from libxc (we follow libxc):
* no VCPU_INFO chunk in a PV stream means vcpu 0 alone (the script would
  read no vcpu context and misparse the tail); a second VCPU_INFO replaces
  the first (the script appends); map bits beyond max_vcpu_id are ignored;
* a further checkpoint after the first (uncompressed Remus) is applied when
  the input is a regular file (the script ignores it); from a pipe or socket
  the converter stops after the first checkpoint unless compression was
  enabled, because reading on could block on a live sender; with
  --skip-qemu (libxc format) it stops after the first HVM context, as the
  script does.
Streams the script refuses are converted: duplicate pfns in a batch (split
into PAGE_DATA records without repeats, applied in order as libxc applies
the batch), unknown extended-info blocks and HVM param chunks in a PV
stream (skipped, with a warning), PV streams without extended info (Xen
3.0 era), other qemu signatures (written as DeviceModelRecord0002 or
EMULATOR_CONTEXT), compressed Remus streams.  TMEM state cannot be carried
by a v2 stream and is refused (exit status 2, like the script's "todo").
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable

from . import format as F
from . import kernels
from . import v2
from .errors import StreamError, TruncatedStream, UnsupportedStream
from .fileio import pread_exact
from .outputs import fdio
from .outputs.background import switching
from .outputs.stream_output import Output
from .stream.metadata import ToolstackError, libxl_physmap_entries
from .stream.reader import LegacyStream, check_options, page_truncation, ulongs
from .stream.records import (
    CheckpointEnd,
    Chunk,
    EndOfBody,
    HVMTail,
    PageBatch,
    PVTail,
    QemuRecord,
)
from .stream.source import PipeSource, PreadSource, Source, open_source
from .stream.wrappers import read_xl_header

PAGE = F.PAGE_SIZE
# Values of an entry's byte 3 (bits 31..24) with type nibble 0 (NOTAB): a
# batch whose byte 3s are all among them holds ordinary pages only.
_NOTAB_BYTES = bytes(range(0x10))


# Annotations only: see stream/reader.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._typing import OutputTarget, Progress, StreamSource


def copy_extent(src, out, n, what):
    """Move n bytes of stream data from src to out without keeping them.
    Returns the number of bytes moved (fewer when the stream ends)."""
    if n <= 0:
        return 0
    where = src.defer(n, what)
    if where is not None:
        fd, offset = where
        done = out.copy_range(fd, offset, n)
        if done < n:      # the file shrank under us
            src.pos -= n - done
        return done
    if isinstance(src, PipeSource):
        return src.splice_to(out, n, what)
    done = 0
    while done < n:
        k = min(n - done, 1 << 20)
        try:
            part = src.view(k, what)
        except TruncatedStream:
            rest = src.read_to_eof(what, limit=k)
            out.write(rest)
            return done + len(rest)
        out.write(part)
        done += k
    return done


# ==================================================================== helpers
def libxl_physmap(data, width, at):
    """libxl's version-1 toolstack record -> the xenstore key/value blob
    Xen's converter makes of it (EMULATOR_XENSTORE_DATA), with its checks."""
    def bad(msg):
        return StreamError(msg, offset=at, expected="a libxl version-1 toolstack record",
                           found=f"{len(data)} bytes")
    try:
        entries, _used = libxl_physmap_entries(data, width)
    except ToolstackError as exc:
        if str(exc).startswith("version "):
            raise StreamError("cannot decode the libxl toolstack record", offset=at,
                              expected="version 1", found=str(exc)) from None
        raise bad(str(exc)) from None
    out = bytearray()
    for i, (phys, start, size, name, _leak) in enumerate(entries):
        if not name:
            raise bad(f"physmap entry {i} has no name")
        if name[-1] != 0:
            raise bad(f"physmap entry {i}: name not NUL terminated")
        root = b"physmap/%x" % phys
        out += b"\0".join([root + b"/start_addr", b"%x" % start, root + b"/size", b"%x" % size,
                           root + b"/name", name[:-1]]) + b"\0"
    return bytes(out)


def page_entries(b):
    """A batch's entries as Xen's converter writes them: bare XTAB entries
    (0xf0000000) dropped, the others as (type << 60) | pfn.  Returns (the
    kept raw values, the v2 entries as little-endian bytes, whether a raw
    value repeats -- Xen's script refuses such a batch)."""
    w = b.width
    if b.odd is None and not b.raw[3::w].translate(None, _NOTAB_BYTES):
        # Every entry an ordinary page with a valid pfn (the reader checked
        # them): the v2 entries are the values themselves.
        kept = ulongs(b.raw, w)
        return kept, b.raw if w == 8 else kept.tobytes(), len(set(kept)) != len(kept)
    return kernels.v2_entries(b.raw, w)


def _split_batch(kept):
    """Groups (first entry, end entry, first page, end page) of a batch's
    kept entries such that no pfn repeats inside a group (for batches Xen's
    script refuses; a rare case, walked entry by entry)."""
    groups = []
    seen = set()
    e0 = p0 = 0
    page = 0
    for i, x in enumerate(int(v) for v in kept):
        pfn = F.entry_pfn(x)
        if pfn in seen:
            groups.append((e0, i, p0, page))
            seen = set()
            e0, p0 = i, page
        seen.add(pfn)
        if F.DATA_TYPES[F.entry_type(x)]:
            page += 1
    groups.append((e0, len(kept), p0, page))
    return groups


def _tsc_record(value):
    return v2.tsc_info(value["mode"], value["khz"], value["nsec"], value["incarnation"])


class ConvertStats:
    """What convert() did.  as_dict() for JSON."""

    def __init__(self):
        self.wrapper = "none"
        self.width = None
        self.guest = None
        self.inferred = {}
        self.p2m_size = None
        self.format = None
        self.checkpoints = 0            # complete checkpoints read
        self.committed_checkpoint = 0   # the checkpoint the output holds
        self.compressed = False
        self.torn = None
        self.tolerated = []
        self.page_records = 0
        self.pages = 0
        self.records = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.qemu = None
        self.warnings = []
        self.copy_methods = []
        self.xl_header = None

    def count(self, name, n=1):
        self.records[name] = self.records.get(name, 0) + n

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items()}


# ==================================================================== converter
class Converter:
    def __init__(self, src, out, fmt="libxc", xl=False, skip_qemu=False, width=None,
                 guest=None, warn=None, info=None, progress=None, checkpoint_buffer=None,
                 force_reading=False):
        if fmt not in ("libxc", "libxl"):
            raise ValueError("fmt must be 'libxc' or 'libxl'")
        check_options(width, guest)
        if checkpoint_buffer is None:
            checkpoint_buffer = 256 << 20      # (checkpoints.BUDGET, without numpy)
        if isinstance(checkpoint_buffer, bool) or not isinstance(checkpoint_buffer, int) \
                or checkpoint_buffer < 0:
            raise ValueError("checkpoint_buffer must be a byte count >= 0, "
                             f"not {checkpoint_buffer!r}")
        self.checkpoint_buffer = checkpoint_buffer
        self.progress = progress
        self.src = src
        self.out = out
        self.libxl = fmt == "libxl"
        self.xl = xl
        self.skip_qemu = skip_qemu
        self.width = width
        self.guest = guest
        self.force_reading = force_reading
        self._warn_cb = warn
        self._info_cb = info
        self.stats = ConvertStats()
        self.stats.format = fmt
        self.consumed = 0               # stream offset up to which the output used the input

    def warn(self, msg):
        self.stats.warnings.append(msg)
        if self._warn_cb:
            self._warn_cb(msg)

    def info(self, msg):
        if self._info_cb:
            self._info_cb(msg)

    # ---------------------------------------------------------- headers
    def _xl_header(self):
        """Copy an xl header (Xen's -x), as Xen's script does: its fields are
        not checked beyond what decides how to go on."""
        src, out = self.src, self.out
        head = src.peek(64)
        if not head.startswith(F.XL_MAGIC):
            if self.xl:
                raise StreamError("no xl header", offset=src.pos,
                                  expected=f"the xl magic {F.XL_MAGIC!r} (-x/--xl was given)",
                                  found=repr(head[:32]))
            return False
        hdr = read_xl_header(src, strict=False)
        if hdr.byteorder != F.XL_BYTEORDER:
            self.warn(f"xl header byte order 0x{hdr.byteorder:08x} at offset {hdr.offset + 32} "
                      "is not 0x01020304 (copied as it is)")
        if hdr.unknown_mandatory:
            self.warn(f"xl header has unknown mandatory flags 0x{hdr.mandatory:x} (copied)")
        mflags = hdr.mandatory | (F.XL_FLAG_STREAMV2 if self.libxl else 0)
        out.write(hdr.pack(mflags))
        self.stats.xl_header = {"input_length": 48 + len(hdr.optional_data),
                                "mandatory_flags": mflags}
        if not self.xl:
            self.info("xl header found: copied to the output as with -x")
        return True

    def _open(self):
        """The LegacyStream after any xl header (other wrappers are the
        reader's), with what the converter accepts beyond libxc reported."""
        xl = self._xl_header()
        # (defer_compressed: a regular file's COMPRESSED_DATA is read once,
        # straight into the held checkpoint)
        s = LegacyStream(self.src, self.width, self.guest, leave_data=True, lookahead=False,
                         lenient=True, defer_compressed=True,
                         force_reading=self.force_reading)
        if self.progress is not None:
            s.observer = lambda rec: self.progress(s.src.pos)
        st = self.stats
        st.wrapper = "xl" if xl else s.wrapper.kind
        if st.wrapper not in ("none", "xl"):
            self.info(f"{st.wrapper} wrapper: libxc image at offset {s.wrapper.image_offset}; "
                      "the wrapper's header is not part of the output")
        h = s.header
        if not 1 <= h.p2m_size <= F.MAX_PFNS:
            self.warn(f"p2m_size {h.p2m_size} at offset {h.offset} is outside 1..2^28; "
                      "converted anyway, as --force-reading asks")
        st.width, st.guest, st.inferred, st.p2m_size = s.width * 8, s.guest, h.inferred, \
            h.p2m_size
        if s.pv_info is not None:
            self.pv_widths = self._pv_widths(s)
        self.info(f"libxc image at offset {h.offset}: {s.width * 8}-bit toolstack "
                  f"({h.inferred.get('width')}), {s.guest.upper()} guest "
                  f"({h.inferred.get('guest')}), p2m_size {h.p2m_size}")
        return s

    def _pv_widths(self, s):
        """The guest width of each X86_PV_INFO record: Xen's script writes one
        for every 'vcpu' extended-info block."""
        info = s.pv_info
        for b in info.blocks:
            if b.id not in (b"vcpu", b"extv", b"xcnt"):
                self.warn(f"unknown extended-info block {b.id!r} ({b.size} bytes) at offset "
                          f"{b.offset} skipped, as libxc does")
        widths = [8 if b.size == F.PV_VCPU_SIZE_64 else 4 for b in info.blocks
                  if b.id == b"vcpu"]
        if not info.extended:
            how = h if (h := s.header.inferred.get("pv_guest_width")) else \
                "the toolstack's width, as libxc assumed"
            self.warn("PV stream without extended info (Xen 3.0 era): a "
                      f"{8 * info.guest_width}-bit guest ({how})")
            return [info.guest_width]
        elif not widths:
            self.warn("PV extended info has no 'vcpu' block: assuming a "
                      f"{8 * s.width}-bit guest (the toolstack's width)")
        return widths or [s.width]

    def _headers(self, s):
        out = self.out
        if self.libxl:
            out.write(v2.libxl_header())
            out.write(v2.record(v2.LREC_LIBXC_CONTEXT))
            self.stats.count("libxl LIBXC_CONTEXT")
        out.write(v2.image_header())
        out.write(v2.domain_header(s.guest))
        if s.pv_info is not None:
            for gw in self.pv_widths:
                out.write(v2.pv_info(gw, 4 if gw == 8 else 3))
                self.stats.count("X86_PV_INFO")
        out.write(v2.record(v2.REC_STATIC_DATA_END))
        self.stats.count("STATIC_DATA_END")
        if s.pv_info is not None:
            out.write(v2.p2m_frames(s.p2m_size, s.pv_info.p2m_frames.tobytes()))
            self.stats.count("X86_PV_P2M_FRAMES")

    # ---------------------------------------------------------- first checkpoint
    def _refuse_odd(self, b):
        """An entry libxc refuses (pfn out of range, bits 63..32 set, a bogus
        type): Xen's script passes it on to a restore that will fail; this
        converter fails now, with the restore's error at the same offset."""
        if b.odd is not None:
            raise b.odd

    def _emit_batch(self, b):
        out, src = self.out, self.src
        kept, ents, dup = page_entries(b)
        groups = _split_batch(kept) if dup else ((0, len(kept), 0, b.n_data),)
        if dup:
            self.warn(f"the {b.count}-entry batch at offset {b.offset} repeats a pfn: written "
                      f"as {len(groups)} PAGE_DATA records applied in order, as libxc applies "
                      "the batch (Xen's converter refuses it)")
        for e0, e1, p0, p1 in groups:
            out.write(v2.page_data_head(e1 - e0, p1 - p0))
            out.write(ents[8 * e0:8 * e1] if dup else ents)
            n = (p1 - p0) * PAGE
            if n:
                try:
                    done = copy_extent(src, out, n, "page data")
                except TruncatedStream as exc:
                    raise page_truncation(b, exc) from None
                if done < n:
                    raise page_truncation(b, TruncatedStream(
                        "page data", b.pages_offset + p0 * PAGE + done, n, done))
            self.stats.page_records += 1
            self.stats.pages += p1 - p0
        self.stats.count("PAGE_DATA", len(groups))

    def run(self):
        """Convert; returns the ConvertStats.  From a regular file to a regular
        file the output is written on a thread of its own (Output.background),
        drained before this returns."""
        bg = isinstance(self.src, PreadSource) and self.out.background()
        ok = False
        try:
            st = self._run()
            if bg:
                self.out.drain()
                st.bytes_out = self.out.pos
                st.copy_methods = sorted(self.out.methods)
            ok = True
        finally:
            if bg:
                self.out.foreground(discard=not ok)
        return st

    def _run(self):
        st = self.stats
        src = self.src
        s = self.stream = self._open()
        self._headers(s)
        hvm = s.guest == "hvm"
        want_qemu = hvm and (self.libxl or not self.skip_qemu)

        # ---- checkpoint 1, written as it is read (Xen's record order)
        params = []            # (index, value) in stream order, duplicates kept
        emu_xs = bytearray()
        held = []              # records after the body, written once it is known
        compression = False
        last = False
        tail = qemu = None
        it = iter(s)
        regular = isinstance(src, PreadSource)
        cp1_batches = [] if regular else None
        end = None
        trailer_done = False
        for rec in it:
            if isinstance(rec, PageBatch):
                self._refuse_odd(rec)
                self._emit_batch(rec)
                if cp1_batches is not None and not rec.verify and rec.n_data:
                    cp1_batches.append((rec.offset, rec.count, rec.pages_offset))
            elif isinstance(rec, Chunk):
                cid = rec.id
                if cid == F.TSC_INFO:
                    self.out.write(_tsc_record(rec.value))
                    st.count("X86_TSC_INFO")
                elif cid in F.HVM_PARAM_CHUNKS:
                    params.append((F.HVM_PARAM_CHUNKS[cid][1], rec.value))
                elif cid == F.TOOLSTACK:
                    if self.libxl and rec.value:
                        emu_xs += libxl_physmap(rec.value, s.width, rec.offset)
                elif cid == F.ENABLE_COMPRESSION:
                    compression = True
                elif cid == F.LAST_CHECKPOINT:
                    last = True
                elif cid == F.ENABLE_VERIFY_MODE:
                    self.info(f"debug stream: verification pass from offset {rec.offset} "
                              "(converted as ordinary pages, as Xen's converter does)")
                elif cid == F.VCPU_INFO:
                    self._check_vcpu_info(rec)
            elif isinstance(rec, EndOfBody):
                if params:
                    if hvm:
                        held.append(("HVM_PARAMS", v2.hvm_params(params)))
                    else:
                        self.warn(f"{len(params)} HVM param chunk(s) in a PV stream ignored, "
                                  "as libxc ignores them")
            elif isinstance(rec, HVMTail):
                tail = rec
                held.extend(self._hvm_tail_records(rec))
                self.consumed = src.pos
                if not want_qemu and not compression:
                    break          # Xen reads nothing more (xenopsd reads the qemu record)
            elif isinstance(rec, QemuRecord):
                qemu = rec
                if not want_qemu:
                    continue
                if not compression and (last or self._ends_at_eof(rec)):
                    # Nothing can follow: finish now, moving the qemu data
                    # straight from the input.
                    self._write_held(held)
                    held = []
                    self._write_trailer(emu_xs, rec)
                    trailer_done = True
                else:
                    s.qemu_data(rec)
            elif isinstance(rec, PVTail):
                tail = rec
                held.extend(self._pv_tail_records(rec))
            elif isinstance(rec, CheckpointEnd):
                end = rec
                self.consumed = rec.offset
                st.checkpoints = 1
                break
        st.committed_checkpoint = 1
        st.compressed = compression
        more = end is not None and not last and (compression or (regular and not src.at_eof()))
        if not more:
            if not trailer_done:
                self._finish_single(held, emu_xs, qemu if want_qemu else None)
        else:
            # From here this thread imports numpy and decodes (much of it
            # holding the GIL) while the writing thread may still copy
            # checkpoint 1: the GIL changes hands every 0.5 ms instead of 5,
            # so the writer, which wants it only between two copies, is not
            # kept waiting.  (Not before: with nothing to decode, the
            # switching costs the copy ~2%.)
            fast = switching()
            try:
                later = _Later(self, it, cp1_batches, params, emu_xs, tail, qemu)
                try:
                    later.run()
                    if later.committed_cp > 1:
                        later.finish(want_qemu)
                    else:
                        # Nothing after checkpoint 1 was complete (or it was not
                        # a checkpoint at all, just trailing bytes): Xen's output.
                        self._finish_single(held, emu_xs, qemu if want_qemu else None)
                finally:
                    later.close()
            finally:
                fast.close()
        self.out.flush()
        st.bytes_out = self.out.pos
        st.bytes_in = self.consumed
        st.copy_methods = sorted(self.out.methods)
        st.warnings = list(st.warnings)
        return st

    def _check_vcpu_info(self, rec):
        if rec.value["max_id"] < 0:
            self.warn(f"VCPU_INFO at offset {rec.offset} has max_vcpu_id "
                      f"{rec.value['max_id']}: no vcpu online")

    def _ends_at_eof(self, q):
        rem = self.src.remaining()
        return rem is not None and q.data is None and q.data_offset + q.length == self.src.size

    def _hvm_tail_records(self, t):
        io, bufio, store = t.magic_pfns
        return [("HVM_PARAMS", v2.hvm_params([(5, io), (6, bufio), (1, store)])),
                ("HVM_CONTEXT", v2.record(v2.REC_HVM_CONTEXT, t.context)),
                ("END", v2.end_record())]

    def _pv_tail_records(self, t):
        recs = []
        for v in t.vcpus:
            recs.append(("X86_PV_VCPU_BASIC",
                         v2.vcpu_record(v2.REC_X86_PV_VCPU_BASIC, v.id, v.context)))
            if v.extended is not None:
                recs.append(("X86_PV_VCPU_EXTENDED",
                             v2.vcpu_record(v2.REC_X86_PV_VCPU_EXTENDED, v.id, v.extended)))
            if v.xsave is not None:
                recs.append(("X86_PV_VCPU_XSAVE",
                             v2.vcpu_record(v2.REC_X86_PV_VCPU_XSAVE, v.id, v.xsave)))
        recs.append(("SHARED_INFO", v2.record(v2.REC_SHARED_INFO, t.shared_info)))
        recs.append(("END", v2.end_record()))
        return recs

    def _write_held(self, held):
        for name, data in held:
            self.out.write(data)
            self.stats.count(name)

    def _finish_single(self, held, emu_xs, qemu):
        self._write_held(held)
        self._write_trailer(emu_xs, qemu)

    def _write_trailer(self, emu_xs, qemu):
        """What follows the libxc END: libxl's emulator records and END, or
        for a bare libxc stream the raw qemu record Xen's script appends."""
        out, st = self.out, self.stats
        if self.libxl and emu_xs:
            out.write(v2.emulator_record(v2.LREC_EMULATOR_XENSTORE_DATA, bytes(emu_xs)))
            st.count("libxl EMULATOR_XENSTORE_DATA")
        if qemu is not None:
            st.qemu = {"signature": qemu.signature, "length": qemu.length}
            if qemu.signature != v2.QEMU_RAW_SIGNATURE.decode():
                self.info(f"qemu record {qemu.signature!r} written as "
                          + ("EMULATOR_CONTEXT" if self.libxl else "DeviceModelRecord0002"))
            if self.libxl:
                out.write(v2.RH.pack(v2.LREC_EMULATOR_CONTEXT, 8 + qemu.length)
                          + v2.EMULATOR_HEAD.pack(v2.EMULATOR_ID_UNKNOWN, 0))
                self._qemu_payload(qemu)
                out.write(bytes(v2.padding(8 + qemu.length)))
                st.count("libxl EMULATOR_CONTEXT")
            else:
                out.write(v2.QEMU_RAW_SIGNATURE + struct.pack("<I", qemu.length))
                self._qemu_payload(qemu)
                st.count("raw qemu record")
        if self.libxl:
            out.write(v2.record(v2.LREC_END))
            st.count("libxl END")

    def _qemu_payload(self, q):
        if q.data is not None:
            self.out.write(q.data)
            return
        done = copy_extent(self.src, self.out, q.length, "qemu data")
        if done < q.length:
            raise TruncatedStream("qemu data", q.data_offset + done, q.length, done)
        self.consumed = max(self.consumed, self.src.pos)


# ==================================================================== later checkpoints
class _Later:
    """Checkpoints after the first (Remus).

    Each is held back until its tail has been read: format A pages and
    format B compressed bytes go to the hold (checkpoints.Hold: memory up to
    checkpoint_buffer, then a file).  When it commits, its pages are applied
    to the shadow (image.ShadowImage: a page overlay in front of a sparse
    file with room for every pfn), and the pfns whose content (or page type)
    changed are remembered.
    At the end one set of PAGE_DATA records carries every changed page, in
    pfn order, followed by the committed checkpoint's metadata and tail.

    A delta-encoded page needs the receiver's previous copy.  Xen's
    compressor sends a page in full the first time it goes through its
    cache, so that copy is normally in the shadow already; if the previous
    copy is a first-checkpoint page, it is read back from the input (regular
    files only).
    """

    def __init__(self, conv, it, cp1_batches, params, emu_xs, tail, qemu):
        import numpy as np

        from .checkpoints import Hold
        from .image import ShadowImage
        self.np = np
        self.conv = conv
        self.s = stream = conv.stream
        self.it = it
        self.src = conv.src
        self.cp1_batches = cp1_batches
        self._cp1_offsets = None
        p2m = stream.p2m_size
        self.p2m = p2m
        # Held checkpoints stay in memory up to the budget; beyond it, and
        # the shadow always, in unnamed files beside the output (a stream
        # output has no directory: the temporary one, said so).
        out = getattr(conv.out, "output", None)
        outdir = getattr(out, "dir", None)
        shadow_dir = outdir
        if shadow_dir is None:
            import tempfile
            shadow_dir = os.environ.get("XLEGACY_TMPDIR") or tempfile.gettempdir()
            conv.info(f"later checkpoints are applied to a sparse file in {shadow_dir} "
                      "(the output is not a file; XLEGACY_TMPDIR chooses the directory)")
        self.shadow = ShadowImage(p2m * PAGE, shadow_dir, need_base=self._bases)
        self.valid = np.zeros(p2m, dtype=np.bool_)     # shadow holds the latest copy
        self.changed = np.zeros(p2m, dtype=np.bool_)   # goes into the final records
        self.ptype = np.zeros(p2m, dtype=np.uint8)     # latest page type nibble
        self.nodata = {}                               # pfn -> XALLOC/BROKEN type
        self.hold = Hold(budget=conv.checkpoint_buffer, spill_dir=outdir)
        # committed metadata (start: checkpoint 1's)
        self.params = {}
        for i, v in params:
            self.params[i] = v
        self.emu_xs = bytes(emu_xs)
        self.tail = tail
        self.qemu = qemu
        self.tsc = None
        self.committed_cp = 1
        # Checkpoint 1 was streamed without keeping anything; for a regular
        # file its pages can be found again (delta bases) and, for PV, the
        # page types a later checkpoint may change (pinned page tables).
        self._cp1_types = None
        if cp1_batches is not None and stream.guest == "pv":
            self._cp1_page_offsets()
            self.ptype[:] = self._cp1_types

    # ---------------------------------------------------------- reading
    def run(self):
        """Read checkpoints until the last, the end of the stream or one that
        is cut or unreadable (dropped: the output holds the one before).  An
        error while applying a complete checkpoint is raised."""
        from .checkpoints import Engine
        engine = Engine(self, self.hold, last_good=1)
        engine.run(self.it)
        st = self.conv.stats
        st.torn = engine.torn
        st.tolerated = engine.tolerated
        for w in engine.warnings:
            self.conv.warn(w)

    # ---------------------------------------------------------- engine consumer
    def begin(self, held):
        self.cp = held.number
        self.held = held
        # The shadow takes compressed pages from anywhere: a regular-file
        # input's payloads need not be copied into the hold as they are read.
        held.in_place = self._compressed()
        self.pend = {"batches": [], "params": [], "tsc": None, "emu": None, "tail": None,
                     "qemu": None}

    def record(self, rec):
        if isinstance(rec, PageBatch):
            self.conv._refuse_odd(rec)
            self._batch(rec)
        elif isinstance(rec, Chunk):
            self._chunk(rec)
        elif isinstance(rec, (HVMTail, PVTail)):
            self.pend["tail"] = rec
        elif isinstance(rec, QemuRecord):
            self.s.qemu_data(rec)
            self.pend["qemu"] = rec

    def committed(self, end):
        self.conv.consumed = end.offset
        st = self.conv.stats
        st.checkpoints = st.committed_checkpoint = end.checkpoint
        return end.last

    def _batch(self, b):
        types = b.types
        pfns = b.pfns.astype(self.np.int64)
        if not b.verify:       # (the reader skips verify pages)
            self.pend["batches"].append({"types": types, "pfns": pfns})
            try:
                self.held.add_batch(b, self.src)
            except TruncatedStream as exc:
                raise page_truncation(b, exc) from None

    def _chunk(self, c):
        pend = self.pend
        cid = c.id
        if cid in F.HVM_PARAM_CHUNKS:
            pend["params"].append((F.HVM_PARAM_CHUNKS[cid][1], c.value))
        elif cid == F.TSC_INFO:
            pend["tsc"] = c.value
        elif cid == F.VCPU_INFO:
            self.conv._check_vcpu_info(c)
        elif cid == F.TOOLSTACK:
            if self.conv.libxl and c.value:
                pend["emu"] = (pend["emu"] or b"") + libxl_physmap(c.value, self.s.width,
                                                                   c.offset)
            elif pend["emu"] is None:
                pend["emu"] = b""
        elif cid == F.COMPRESSED_DATA:
            self.held.add_compressed(c)
        elif cid == F.ENABLE_COMPRESSION:
            self.conv.info(f"ENABLE_COMPRESSION in checkpoint {c.checkpoint} at offset "
                           f"{c.offset} has no effect (only checkpoint 1's counts)")

    # ---------------------------------------------------------- commit
    def _bases(self, dpfns, first):
        """Before a compressed checkpoint is applied: a delta needs the
        previous copy; so does an unchanged page whose type changes (it is
        written again with its new type)."""
        empty = first == 0x00
        full = first == 0x80
        self._retype = empty & (self._dtypes != self.ptype[dpfns])
        self._ensure_base(dpfns[(~empty & ~full) | self._retype])

    def commit(self, end):
        np = self.np
        pend = self.pend
        live = pend["batches"]
        if live:
            types = np.concatenate([e["types"] for e in live])
            pfns = np.concatenate([e["pfns"] for e in live])
        else:
            types = np.zeros(0, np.uint8)
            pfns = np.zeros(0, np.int64)
        isdata = types < 0xD
        dpfns = pfns[isdata]
        dtypes = types[isdata]
        held = self.held
        data = None
        if self._compressed() and held.compressed:
            self._dtypes = dtypes
            upfns = dpfns.astype(np.uint64)
            # Payloads left in a regular-file input are read where they lie
            # (a read-only mapping); else they are copied into the hold now.
            mapped = held.map_compressed(upfns.size, self.hold.budget)
            if mapped is not None:
                try:
                    self.shadow.apply_indexed(*mapped, upfns)
                finally:
                    del mapped
                    held.unmap()
            else:
                held.materialize()
                data = self.hold.view()
                self.shadow.apply_compressed(data, upfns, held.cmap.locate, origin=held.cmap)
            first = self.shadow.first_bytes
            touched = dpfns[(first != 0x00) | self._retype] if dpfns.size else dpfns
        elif self._compressed():     # no page to apply the bytes to: ignored
            touched = dpfns[:0]
        else:
            touched = dpfns
            data = self.hold.view()
            for h, pages in held.pages(data):
                self.shadow.write_pages(pages, h.pfns)
        if touched.size:
            self.valid[touched] = True
            self.changed[touched] = True
        if dpfns.size:
            self.ptype[dpfns] = dtypes
        nodata = ~isdata & (types != 0xF)
        for pfn, t in zip(pfns[nodata].tolist(), types[nodata].tolist()):
            self.nodata[pfn] = t
        del data
        self.hold.release()
        # metadata: what this checkpoint sent replaces what came before
        for i, v in pend["params"]:
            self.params[i] = v
        if pend["tsc"] is not None:
            self.tsc = pend["tsc"]
        if pend["emu"] is not None:
            self.emu_xs = pend["emu"]
        if pend["tail"] is not None:
            self.tail = pend["tail"]
        if pend["qemu"] is not None:
            self.qemu = pend["qemu"]
        self.committed_cp = self.cp

    def _compressed(self):
        return self.conv.stats.compressed and self.cp > 1

    def _ensure_base(self, pfns):
        """Make the shadow hold the current copy of these pfns: read back
        first-checkpoint pages the shadow does not have."""
        if not pfns.size:
            return
        missing = pfns[~self.valid[pfns]]
        if not missing.size:
            return
        offs = self._cp1_page_offsets()
        if offs is None:
            raise UnsupportedStream(
                f"checkpoint {self.cp} has {missing.size} compressed page(s) encoded against "
                "pages of the first checkpoint, which the converter can read back only from "
                "a regular file: convert the stream from a file, not a pipe")
        where = offs[missing]
        have = where >= 0
        fd = self.src.fd
        page = bytearray(PAGE)
        for pfn, off in zip(missing[have].tolist(), where[have].tolist()):
            pread_exact(fd, page, off, "a first-checkpoint page", off - self.src.base)
            self.shadow.put_page(pfn, page)
        self.valid[missing] = True

    def _cp1_page_offsets(self):
        """File offset of every pfn's last checkpoint-1 page (-1: none), and
        (in self._cp1_types) its page type, read back from the input."""
        if self._cp1_offsets is not None:
            return self._cp1_offsets
        if self.cp1_batches is None:
            return None
        np = self.np
        offs = np.full(self.p2m, -1, dtype=np.int64)
        ptypes = np.zeros(self.p2m, dtype=np.uint8)
        src = self.src
        w = self.s.width
        for at, count, pages_at in self.cp1_batches:
            raw = bytearray(count * w)
            pread_exact(src.fd, raw, src.base + at + 4, "PFN array", at + 4)
            ents = np.frombuffer(raw, dtype="<u8" if w == 8 else "<u4").astype(np.uint64)
            all_types = ((ents >> np.uint64(F.ENTRY_TYPE_SHIFT)) & np.uint64(0xF)).astype(np.uint8)
            data = np.array(F.DATA_TYPES, dtype=bool)[all_types]
            pfns = (ents[data] & np.uint64(F.ENTRY_PFN_MASK)).astype(np.int64)
            types = all_types[data]
            idx = np.arange(pfns.size, dtype=np.int64)
            ok = pfns < self.p2m
            offs[pfns[ok]] = src.base + pages_at + idx[ok] * PAGE
            ptypes[pfns[ok]] = types[ok]
        self._cp1_offsets = offs
        self._cp1_types = ptypes
        return offs

    # ---------------------------------------------------------- output
    def finish(self, want_qemu):
        np = self.np
        conv, out, st = self.conv, self.conv.out, self.conv.stats
        if self.tsc is not None:
            out.write(_tsc_record(self.tsc))
            st.count("X86_TSC_INFO")
        pfns = np.flatnonzero(self.changed)
        for i in range(0, pfns.size, F.MAX_BATCH):
            part = pfns[i:i + F.MAX_BATCH]
            ents = (self.ptype[part].astype(np.uint64) << np.uint64(60)) | part.astype(np.uint64)
            out.write(v2.page_data_head(part.size, part.size))
            out.write(ents.astype("<u8").tobytes())
            out.flush()
            out._write_all(memoryview(self.shadow.rows(part)).cast("B"))
            st.page_records += 1
            st.pages += int(part.size)
            st.count("PAGE_DATA")
        extra = sorted((pfn, t) for pfn, t in self.nodata.items() if not self.changed[pfn])
        for i in range(0, len(extra), F.MAX_BATCH):
            part = extra[i:i + F.MAX_BATCH]
            out.write(v2.page_data_head(len(part), 0))
            out.write(struct.pack(f"<{len(part)}Q", *((t << 60) | pfn for pfn, t in part)))
            st.page_records += 1
            st.count("PAGE_DATA")
        held = []
        if self.s.guest == "hvm":
            if self.params:
                held.append(("HVM_PARAMS", v2.hvm_params(list(self.params.items()))))
            held.extend(conv._hvm_tail_records(self.tail))
        else:
            held.extend(conv._pv_tail_records(self.tail))
        conv._write_held(held)
        qemu = self.qemu if want_qemu else None
        if qemu is not None:
            self.s.qemu_data(qemu)
        conv._write_trailer(self.emu_xs, qemu)
        conv.info(f"checkpoint {self.committed_cp} converted: {int(pfns.size)} pages changed "
                  "after checkpoint 1")

    def close(self):
        self.shadow.close()
        self.hold.close()


# ==================================================================== API
def convert(source: StreamSource, out: OutputTarget | Output, fmt: str = "libxc",
            xl: bool = False, skip_qemu: bool = False, width: int | None = None,
            guest: str | None = None, warn: Callable[[str], object] | None = None,
            info: Callable[[str], object] | None = None, progress: Progress | None = None,
            checkpoint_buffer: int | None = None, force_reading: bool = False) -> ConvertStats:
    """Convert a legacy stream to a v2/v3 stream.

    source:    a path, a file descriptor (int), a binary file object, bytes
               or an xlegacy Source (see source.open_source(exact=True))
    out:       a path (see below), a file descriptor, or a binary file
               object (its fileno() is used when it has one)
    fmt:       "libxc" (a libxc v3 stream) or "libxl" (libxl v2 stream around it)
    xl:        the input must start with an xl header (copied to the output
               with the STREAMv2 flag set for libxl output); an xl header is
               copied even without it
    skip_qemu: libxc format: neither read nor write the qemu record (stop after
               the HVM context, as Xen's script does); libxl format ignores it
    width, guest: 32|64 and "pv"|"hvm"; inferred when None.  Given values
               that the bytes contradict (a p2m_size out of range, a reading
               that fails where another gets through) raise ReadingMismatch
               naming the reading that fits, unless force_reading
    warn, info: optional callables for warnings and progress notes
    progress:  optional callable, given the input offset reached, per record
    checkpoint_buffer: memory budget in bytes for a held Remus checkpoint
               (default 256 MiB); beyond it, and for the shadow of the pages
               later checkpoints change, unnamed files beside the output

    Returns a ConvertStats.  Raises StreamError (with offsets),
    UnsupportedStream, AmbiguousStream, OutputError (`out` is the input, a
    directory...) or OSError.  A path is written as every xlegacy output
    (outputs/atomic.py): nothing appears under the name, and a file already
    there stays untouched, unless the conversion succeeds.  To a descriptor
    or file object, output written before an error stays (as with Xen's
    script): the caller must report the failure.  For a regular-file
    descriptor the file offset is left after the last input byte the output
    used.
    """
    src = open_source(source, exact=True)
    own_src = not isinstance(source, (Source, int)) and src is not source
    try:
        o = out if isinstance(out, Output) else Output(out, inputs=(source,))
    except BaseException:
        if own_src:
            src.close()
        raise
    conv = Converter(src, o, fmt=fmt, xl=xl, skip_qemu=skip_qemu, width=width, guest=guest,
                     warn=warn, info=info, progress=progress,
                     checkpoint_buffer=checkpoint_buffer, force_reading=force_reading)
    ok = False
    try:
        stats = conv.run()
        o.flush()
        ok = True
    except OSError as exc:
        named = fdio.output_error(exc, o.name)
        if named is exc:
            raise
        raise named from exc
    finally:
        try:
            if not isinstance(out, Output):
                o.close(ok)
        finally:
            if isinstance(src, PreadSource) and isinstance(source, int):
                try:
                    os.lseek(src.fd, src.base + conv.consumed, os.SEEK_SET)
                except OSError:
                    pass
            if own_src:
                src.close()
    return stats


__all__ = ["convert", "ConvertStats", "Converter", "Output", "copy_extent", "libxl_physmap",
           "page_entries"]
