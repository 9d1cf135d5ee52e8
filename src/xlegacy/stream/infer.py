"""Choosing how to read a libxc image: guess, then prove.

Nothing in a legacy stream records the toolstack's width (its unsigned long,
4 or 8 bytes) or whether the guest is PV or HVM.  A reading that parses the
first megabyte can be wrong: a 32-bit toolstack's HVM stream read as PV
without extended info takes the first PFN entries for a short batch and a
zero word in page 0 for the end of the body, and then walks through zero
page data as one empty "checkpoint" after another.  So every plausible
reading is read through, and the one chosen must explain the whole stream.

The readings tried (those the given width/guest leave open):

* for a 64-bit and a 32-bit toolstack:
  * HVM;
  * PV with extended info, when the word after p2m_size is ~0 (the guest
    width comes from the "vcpu" block);
  * PV without extended info (Xen 3.0 era) otherwise, once with a 64-bit and
    once with a 32-bit guest: nothing in the header says which, but the p2m
    frame list's length and the size of each vcpu context in the tail
    depend on it; the page-table levels sent (L4 pages: 64-bit) settle a tie,
    and libxc's assumption (the toolstack's width) settles the rest.

Each reading is read by the reader itself (reader.LegacyStream) with the
framing only: PFN arrays, metadata chunks and tails are parsed and checked
as the reader always checks them, while page data, qemu data and compressed
data are skipped over (a seek in a file), never copied.  It is read from the
start of the image to the end of the stream: the first checkpoint including
its tail and qemu record, and every later checkpoint's framing.  Xen's saver
sends at least VCPU_INFO in every checkpoint (and pages in the first), while
a wrong reading that has wandered into zero page data finds nothing but
empty bodies: so an empty body counts against a reading (below).

What each reading comes to:

* clean:  it ends on a checkpoint boundary exactly where the stream ends (or
          at a LAST_CHECKPOINT checkpoint with nothing after it);
* cut:    the stream ends inside one of its structures (a torn checkpoint,
          or a stream cut inside the first);
* prefix: (a pipe) everything held for inference fits it; see below;
* trailing: LAST_CHECKPOINT, then bytes it cannot account for;
* bad:    a value that cannot be, in bytes that are there.

The choice:

1. Exactly one clean reading: it wins.  Two or more: AmbiguousStream.
2. Else, among the readings that fit every byte there is (the end of the
   stream cuts them: a torn checkpoint, or a cut inside the first), the one
   that got through the most checkpoints (body, tail, qemu record).
3. A reading that meets a bad value beats it only where the bytes are shown
   to fit that reading further: up to its bad value, against up to the
   start of the record the cut interrupted (where the data ran out is no
   evidence: a wrong reading gets there with one bogus length).  The
   winner's problem is then reported precisely by the reader (a torn or
   corrupt checkpoint, a cut, a bad value, trailing bytes).
4. Ties: readings all cut inside their first checkpoint mean the stream is
   truncated whichever is right: AmbiguousTruncation (a TruncatedStream and
   an AmbiguousStream); other ties: AmbiguousStream.  No reading gets past
   its header: StreamError "not a legacy libxc image", listing every reading
   and where it failed.

What no saver writes is no evidence for a reading (it counts as failing
where it starts): a body with no chunk before its 0; in a PV stream without
extended info, a p2m frame list naming a page at or beyond p2m_size (Xen's
restore refuses it too) or page 0 first (page 0 never holds the p2m; a 0
there is the upper half of a 64-bit p2m_size read as 32-bit).

Given width/guest: only the readings they leave are tried.  When none of
those gets through (rules 1-3 find nothing) but a reading they exclude
would, the error (ReadingMismatch) names the reading the bytes fit and the
flag that selects it, as Xen's own converter fails on such input; with
force_reading the reader takes the given width/guest as they are.  When no
reading at all fits, the given one is read and the reader reports its own
precise error.

Sources that cannot be read twice (pipes, sockets): with both width and
guest given nothing is read ahead (a descriptor shared with another reader
stays exact) and only p2m_size is checked.  Otherwise a prefix is held in
memory (the source keeps it for the reader): PIPE_FIRST bytes, doubled
while more than one reading fits, up to PIPE_PROOF.  When the whole stream
fits in it, the proof is complete.  When it does not, a reading counts as
"prefix" if everything held fits it, and the rules above apply to what is
held: one reading left standing is taken (the reader then checks the rest
as it goes, so a later contradiction is an error, never a quiet result);
several at PIPE_PROOF are AmbiguousStream, which says to give the flags or
read from a file.  (A live Remus sender is not waited for beyond the prefix
that decides; bytes read ahead of the stream's end are not left in the
descriptor, so give both flags when another reader shares it.)
"""
from .. import format as F
from ..errors import (AmbiguousStream, AmbiguousTruncation, ReadingMismatch, StreamError,
                      TruncatedStream, UnsupportedStream)
from .records import BatchRun, CheckpointEnd, Chunk, EndOfBody, PageBatch
from .source import BytesSource

# Bytes of a pipe held for inference: first PIPE_FIRST, doubled while more
# than one reading fits them, up to PIPE_PROOF (a 1024-page batch is 4 MiB).
PIPE_FIRST = 1 << 20
PIPE_PROOF = 32 << 20
HEAD_BYTES = PIPE_FIRST      # the most read ahead of the framing, from a file: none

# Top byte of an entry's low word -> type nibble in the high four bits.
# Byte sets for translate(None, delete): what is left is the bytes wanted.
_KEEP_L4 = bytes(b for b in range(256) if (b >> 4) & 7 != 4)          # deletes all but L4
_KEEP_PT = bytes(b for b in range(256) if not 1 <= (b >> 4) & 7 <= 4 or b >> 4 >= 0xD)


class Reading:
    """One way to read the image: width in bytes, guest, and for PV
    without extended info the guest width tried."""

    def __init__(self, width, guest, extended=None, pv_guest_width=None):
        self.width = width
        self.guest = guest
        self.extended = extended
        self.pv_guest_width = pv_guest_width
        self.why = {}
        self.checkpoints = None     # complete checkpoints, once proven (choose)

    @property
    def label(self):
        text = f"{self.width * 8}-bit {self.guest.upper()}"
        if self.guest == "pv" and self.extended is not None:
            text += " with extended info" if self.extended else \
                f" without extended info, {self.pv_guest_width * 8}-bit guest"
        return text

    def __repr__(self):
        return f"Reading({self.label})"


class Outcome:
    """What reading the stream one way came to (see the module docstring)."""

    def __init__(self, reading):
        self.reading = reading
        self.kind = None
        self.checkpoints = 0        # complete checkpoints (body, tail, qemu record)
        self.error = None           # the exception that ended it
        self.trailing = 0
        self.levels = set()         # page-table levels seen ("L4", "PT")
        self.records = 0            # records read in full
        self.progress = 0           # how far the bytes are shown to fit it (see _walk)

    @property
    def consistent(self):
        return self.kind in ("clean", "cut", "prefix")

    def describe(self):
        n = self.checkpoints
        cps = f"{n} complete checkpoint{'s' if n != 1 else ''}"
        if self.kind == "clean":
            return f"reads to the end of the stream ({cps})"
        if self.kind == "cut":
            return f"fits up to the end of the stream, which cuts it ({cps}; {self.error})"
        if self.kind == "prefix":
            return f"fits all the bytes held ({cps})"
        if self.kind == "trailing":
            return f"{cps}, then {self.trailing} bytes after its last checkpoint"
        return f"{self.error} (after {cps})"


class _Implausible(StreamError):
    """Something no saver writes (an empty body): not evidence for a reading."""


def _walk(reading, src, wrapper, lenient, partial):
    """Read the stream one way, framing only; -> Outcome."""
    from .reader import LegacyStream
    out = Outcome(reading)
    w = reading.width
    try:
        # coalesce: runs of batches without pages in one kernel call (a
        # stream of a million one-entry batches is read in seconds).
        s = LegacyStream(src, reading.width * 8, reading.guest, wrapper=wrapper,
                         framing_only=True, lenient=lenient, prove=False, coalesce=True,
                         pv_guest_width=reading.pv_guest_width)
        if reading.guest == "pv" and s.pv_info.extended != reading.extended:
            raise StreamError("PV header", offset=s.pv_info.offset,
                              expected="the form peeked", found="the other")
        if reading.guest == "pv":
            _check_frames(s)
        items = 0
        old_pv = reading.guest == "pv" and not reading.extended
        for rec in s:
            if isinstance(rec, EndOfBody) and not items:
                raise _Implausible(f"checkpoint {rec.checkpoint} has an empty body",
                                   offset=rec.offset,
                                   expected="a page batch or metadata chunk",
                                   found="the 0 chunk that ends the body")
            out.records += 1
            out.progress = s.record_end()
            if isinstance(rec, PageBatch):
                items += 1
                if old_pv:
                    top = rec.raw[3::w]
                    if top.translate(None, _KEEP_L4):
                        out.levels.add("L4")
                    if top.translate(None, _KEEP_PT):
                        out.levels.add("PT")
            elif isinstance(rec, (Chunk, BatchRun)):
                items += 1
            elif isinstance(rec, EndOfBody):
                items = 0
            elif isinstance(rec, CheckpointEnd):
                out.checkpoints += 1
                out.trailing = rec.trailing
        out.kind = "trailing" if out.trailing else "prefix" if partial else "clean"
    except TruncatedStream as exc:
        # Where the data ran out after a length field is no evidence (a wrong
        # reading gets there with one bogus length): the reading fits up to
        # the record it cut.  Page data (its PFN array checked) and the end
        # of the bytes held from a pipe are: every byte there fits.
        out.error = exc
        out.kind = "prefix" if partial else "cut"
        if partial or getattr(exc, "in_page_data", False):
            out.progress = max(out.progress, exc.offset or 0)
    except UnsupportedStream as exc:
        # A TMEM chunk: recognised, and as far as the bytes can be read.
        out.error = exc
        out.kind = "cut"
        out.progress = max(out.progress, exc.offset or 0)
    except _Implausible as exc:
        out.error = exc
        out.kind = "bad"
    except StreamError as exc:
        # A bad value: after at least one record, the bytes fit this reading
        # up to it (the header alone is no evidence: any bytes make a p2m
        # frame list).
        out.error = exc
        out.kind = "bad"
        if exc.offset is not None and out.records:
            out.progress = max(out.progress, exc.offset)
    return out


def _check_frames(s):
    """Without extended info, the p2m frame list is all that stands between
    p2m_size and the body, and a wrong reading takes other bytes for it.
    The list holds pfns of the guest's own pages: Xen's restore refuses one
    >= p2m_size ("PFN-to-MFN frame number is bad"); page 0 never holds the
    p2m (a first frame 0 is the upper half of a 64-bit p2m_size read as
    32-bit)."""
    info = s.pv_info
    frames = info.p2m_frames
    if info.extended:
        return
    if not frames[0]:
        raise _Implausible("p2m frame 0", offset=info.p2m_frames_offset,
                           expected="the pfn of a page holding the p2m",
                           found="0 as the first p2m frame")
    top = max(frames)
    if top >= s.p2m_size:
        i = frames.index(top)
        raise _Implausible(f"p2m frame {i} is not a pfn of the guest",
                           offset=info.p2m_frames_offset + i * s.width,
                           expected=f"a pfn below p2m_size {s.p2m_size}", found=str(top))


def _readings(head, width, guest):
    """The readings to try, given the first bytes of the image."""
    out = []
    for w in ([width] if width else [8, 4]):
        for g in ([guest] if guest else ["hvm", "pv"]):
            if g == "hvm":
                out.append(Reading(w, g))
                continue
            marker = int.from_bytes(head[w:2 * w], "little") if len(head) >= 2 * w else None
            if marker == (1 << (8 * w)) - 1:
                out.append(Reading(w, g, extended=True))
            else:
                out += [Reading(w, g, extended=False, pv_guest_width=gw)
                        for gw in (w, 12 - w)]
    return out


def _rank(o):
    return (o.kind == "clean", o.consistent and o.checkpoints, o.progress)


def _twins(outcomes):
    """PV readings without extended info that differ only in the guest width
    tried: keep the better of each pair; on a tie, the one the page-table
    levels name (L4 pages: 64-bit guest; page tables without L4: 32-bit),
    else the toolstack's width (libxc's assumption)."""
    keep, pairs = [], {}
    for o in outcomes:
        r = o.reading
        if r.guest == "pv" and r.extended is False:
            pairs.setdefault(r.width, []).append(o)
        else:
            keep.append(o)
    for w, pair in pairs.items():
        if len(pair) == 1 or _rank(pair[0]) != _rank(pair[1]):
            keep.append(max(pair, key=_rank))
            continue
        levels = pair[0].levels | pair[1].levels
        gw = 8 if "L4" in levels else 4 if "PT" in levels else w
        keep.append(next(o for o in pair if o.reading.pv_guest_width == gw))
    return keep


def _decide(outcomes):
    """-> (winner Outcome, "won") or (list of Outcomes, verdict): verdict is
    "ambiguous", "truncated" or "none" (see the module docstring)."""
    outcomes = _twins(outcomes)
    clean = [o for o in outcomes if o.kind == "clean"]
    if len(clean) == 1:
        return clean[0], "won"
    if clean:
        return clean, "ambiguous"
    fits = [o for o in outcomes if o.consistent]
    bad = [o for o in outcomes if not o.consistent and o.records]
    if not fits and not bad:
        return outcomes, "none"
    top = []
    if fits:
        most = max(o.checkpoints for o in fits)
        top = [o for o in fits if o.checkpoints == most]
    # A reading that meets a bad value beats those the end of the stream
    # cuts only where it is shown to fit further than any of them.
    reach = max((o.progress for o in top), default=-1)
    if bad:
        far = max(o.progress for o in bad)
        if far > reach:
            best = [o for o in bad if o.progress == far]
            return (best[0], "won") if len(best) == 1 else (best, "ambiguous")
    if len(top) == 1:
        return top[0], "won"
    if top:
        cut = all(o.kind == "cut" and o.checkpoints == 0 for o in top)
        return top, "truncated" if cut else "ambiguous"
    return outcomes, "none"


def _flags(outcomes):
    out = []
    if len({o.reading.width for o in outcomes}) > 1:
        out.append("--width " + "|".join(sorted({str(o.reading.width * 8)
                                                 for o in outcomes})))
    if len({o.reading.guest for o in outcomes}) > 1:
        out.append("--guest pv|hvm")
    return " and ".join(out) or "--width and --guest"


def _tried(outcomes):
    return [f"{o.reading.label}: {o.describe()}" for o in outcomes]


def _run(src, wrapper, width, guest, lenient):
    """Try the readings width/guest leave; -> (outcomes, what they were
    tried on)."""
    readings = _readings(src.peek(16), width, guest)
    if src.fork() is not None:
        return [_walk(r, src.fork(), wrapper, lenient, False) for r in readings], \
            "the whole stream"
    # A pipe: hold a prefix, doubling it until one reading is left standing,
    # the stream ends or PIPE_PROOF is reached (a live sender is not waited
    # for once the first bytes decide).
    size = PIPE_FIRST
    while True:
        held = src.peek(size)
        partial = len(held) >= size
        outcomes = [_walk(r, BytesSource(held, src.name, base=src.pos), wrapper, lenient,
                          partial) for r in readings]
        if not partial:
            return outcomes, "the whole stream"
        if _decide(outcomes)[1] == "won" or size >= PIPE_PROOF:
            return outcomes, f"the first {len(held)} bytes (from a pipe)"
        size *= 2


def _explain(winner, outcomes, scope, width, guest):
    r = winner.reading
    r.checkpoints = winner.checkpoints
    if width and guest:
        r.why = {"width": "given", "guest": "given"}
        return r
    others = [o for o in outcomes if o is not winner]
    text = f"the only reading that {winner.describe()}; tried on {scope}"
    r.why = {
        "width": "given" if width else f"inferred: {text}",
        "guest": "given" if guest else f"inferred: {text}",
        "tried": _tried(outcomes),
        "rejected": _tried(others),
    }
    if r.guest == "pv" and r.extended is False and len(
            [o for o in outcomes if o.reading.guest == "pv" and o.reading.width == r.width]) > 1:
        r.why["pv_guest_width"] = (f"inferred: {r.pv_guest_width * 8}-bit (no extended info; "
                                   "vcpu context size in the tail, page-table levels)")
    return r


def _given(width, guest):
    r = Reading(width, guest)
    r.why = {"width": "given", "guest": "given"}
    return r


def _p2m_only(src, wrapper, width, guest, lenient):
    """Both given, source read once: check p2m_size without reading ahead."""
    p2m = int.from_bytes(src.peek(width)[:width], "little")
    if 1 <= p2m <= F.MAX_PFNS or len(src.peek(width)) < width:
        return _given(width, guest)
    failed = StreamError("implausible p2m_size", offset=src.pos, expected="1..2^28 pfns",
                         found=str(p2m))
    _mismatch(src, wrapper, width, guest, lenient, failed)
    return _given(width, guest)        # nothing fits: the reader says why


def _mismatch(src, wrapper, width, guest, lenient, failed):
    """The given width/guest do not get through: raise ReadingMismatch when
    another reading does; return when none does."""
    outcomes, scope = _run(src, wrapper, None, None, lenient)
    winner, verdict = _decide(outcomes)
    if verdict != "won" or (winner.kind == "bad" and not winner.checkpoints):
        return          # nothing fits better: the given reading says what is wrong
    r = winner.reading
    flags = []
    if width and r.width != width:
        flags.append(f"--width {r.width * 8}")
    if guest and r.guest != guest:
        flags.append(f"--guest {r.guest}")
    asked = " ".join(x for x in (f"{width * 8}-bit" if width else "",
                                 guest.upper() if guest else "") if x)
    raise ReadingMismatch(
        f"the stream does not read as {asked}: {failed}; it reads as {r.label} "
        f"({winner.describe()}): give {' and '.join(flags) or 'no width/guest'} (or "
        "--force-reading to read it as given)",
        offset=getattr(failed, "offset", None), fits=r)


def choose(src, wrapper, width=None, guest=None, lenient=False):
    """The Reading to read the image at src.pos with (src is left where it
    was).  width in bytes (4/8) or None, guest "pv"/"hvm" or None."""
    if not src.peek(1):
        if width and guest:
            return _given(width, guest)       # the reader says where it is cut
        raise StreamError("not a legacy libxc image", offset=src.pos,
                          expected="p2m_size, then PV extended info or a body of chunks",
                          found="the end of the stream")
    if width and guest and src.fork() is None:
        return _p2m_only(src, wrapper, width, guest, lenient)
    outcomes, scope = _run(src, wrapper, width, guest, lenient)
    winner, verdict = _decide(outcomes)
    if verdict == "won":
        return _explain(winner, outcomes, scope, width, guest)
    if width or guest:
        if verdict == "none":
            failed = max(outcomes, key=lambda o: (o.checkpoints, o.error.offset or 0
                                                  if o.error is not None else 0)).error
            _mismatch(src, wrapper, width, guest, lenient, failed)
            if width and guest:
                return _given(width, guest)
    if verdict == "ambiguous":
        readings = ", ".join(f"{o.reading.label} ({o.describe()})" for o in winner)
        hint = " or read it from a file" if "pipe" in scope else ""
        raise AmbiguousStream(f"cannot tell how to read this stream: tried on {scope}, it fits "
                              f"{readings}; say which with {_flags(winner)}{hint}")
    if verdict == "truncated":
        cut = next((o for o in winner if isinstance(o.error, TruncatedStream)), None)
        if cut is None:
            raise winner[0].error
        others = ", ".join(o.reading.label for o in winner if o is not cut)
        raise AmbiguousTruncation(cut.error, (
            f" (read as {cut.reading.label}; the bytes up to the end also fit {others}: the "
            f"stream is cut whichever is right; say which with {_flags(winner)})"))
    raise StreamError("not a legacy libxc image", offset=src.pos,
                      expected="a reading (64/32-bit toolstack, HVM or PV) that gets through "
                               f"the stream; give {_flags(outcomes)} to read it as one of them",
                      found="; ".join(_tried(outcomes)))
