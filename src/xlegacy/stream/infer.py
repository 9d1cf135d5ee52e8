"""Inferring the toolstack width and guest type from the first bytes of a
libxc image, when the user has not said.

Nothing in a legacy stream records either, so each of the four readings
(32/64-bit toolstack x PV/HVM) is tried on the first bytes (HEAD_BYTES):

* p2m_size must be 1..2^28 (an entry has 28 bits of pfn).  A 32-bit stream
  read as 64-bit puts the next field into the upper half: implausible.
* PV with extended info: the next unsigned long is ~0 and a known block id
  ("vcpu", "extv", "xcnt") follows.  Conclusive.
* HVM: the body starts right away; PV without extended info (Xen 3.0 era):
  the p2m frame list comes first, then the body.  Either way the body is
  walked chunk by chunk as far as the head reaches -- batch sizes, entry
  types, pfns < p2m_size, metadata chunk ids and lengths -- and a reading
  that hits an impossible value is dropped.  The more chunks check out, the
  stronger the reading.

Readings whose walk checks out beat readings that hit an impossible value;
among those that fail, the one that got furthest is taken (so a corrupt
stream still gets its precise error from the reader).  A tie is ambiguous
and the caller must say which with width/guest.
"""
import struct

from .. import format as F
from .. import kernels
from ..errors import AmbiguousStream, StreamError
from ..kernels.faults import KernelFault

HEAD_BYTES = 1 << 20
KNOWN_EXT_IDS = (b"vcpu", b"extv", b"xcnt")
CONCLUSIVE = 100
WALK_LIMIT = 16           # chunks walked at most per reading



def walk_body(head, pos, width, p2m_size):
    """Walk chunks from pos as far as the head reaches.

    Returns (ok, n, reason): n chunks checked out; ok is False when the walk
    then hit something this reading cannot be (the reason says what, with
    its offset from the start of the image)."""
    n = 0
    while n < WALK_LIMIT:
        if pos + 4 > len(head):
            return True, n, f"{n} chunks check out"
        at = pos
        (cid,) = struct.unpack_from("<i", head, pos)
        pos += 4
        if cid == 0:
            if n == 0:
                return False, 0, f"the body ends before any chunk (+{at})"
            return True, n + 1 + _tail_bonus(head, pos, p2m_size), \
                f"{n} chunks and the end of the body check out"
        if cid > 0:
            if cid > F.MAX_BATCH:
                return False, n, f"a batch of {cid} entries (+{at})"
            avail = min(cid, (len(head) - pos) // width)
            try:
                n_data = kernels.count_data(head[pos:pos + avail * width], width, p2m_size)
            except KernelFault as exc:
                at = pos + exc.index * width
                raw = int.from_bytes(head[at:at + width], "little")
                return False, n, f"PFN entry 0x{raw:x} (+{at})"
            if avail < cid:
                return True, n + (avail > 0), f"{n} chunks check out"
            pos += cid * width + n_data * F.PAGE_SIZE
        elif cid in F.FIXED_CHUNK_SIZES:
            pos += F.FIXED_CHUNK_SIZES[cid]
        elif cid == F.VCPU_INFO:
            if pos + 4 > len(head):
                return True, n, f"{n} chunks check out"
            (max_id,) = struct.unpack_from("<i", head, pos)
            if not 0 <= max_id <= F.MAX_VCPU_ID:
                return False, n, f"VCPU_INFO max_vcpu_id {max_id} (+{pos})"
            pos += 4 + 8 * (max_id // 64 + 1)
        elif cid == F.TOOLSTACK:
            if pos + 4 > len(head):
                return True, n, f"{n} chunks check out"
            (length,) = struct.unpack_from("<I", head, pos)
            pos += 4 + length
        elif cid in (F.TMEM, F.TMEM_EXTRA):
            return True, n + 1, f"{n} chunks check out before TMEM data"
        else:
            # COMPRESSED_DATA cannot occur in the first checkpoint.
            return False, n, f"chunk id {cid} (+{at})"
        n += 1
    return True, n, f"{n} chunks check out"


def _tail_bonus(head, pos, p2m_size):
    """After the end of the body: an HVM tail whose context starts with the
    hvm_save header (typecode 1, magic 0x54381286) settles it.  Only the HVM
    tail has such a mark; for other readings this is just no bonus."""
    at = pos + F.MAGIC_PFNS.size + 4
    if at + F.HVM_SAVE_DESC.size + 4 > len(head):
        return 0
    typecode, _inst, _len = F.HVM_SAVE_DESC.unpack_from(head, at)
    (magic,) = struct.unpack_from("<I", head, at + F.HVM_SAVE_DESC.size)
    return CONCLUSIVE if typecode == F.HVM_SAVE_HEADER and magic == F.HVM_SAVE_MAGIC else 0


def _hvm(head, width, p2m_size):
    ok, n, why = walk_body(head, width, width, p2m_size)
    return (ok, n), f"the body from the start: {why}"


def _pv(head, width, p2m_size):
    if len(head) < 2 * width:
        return (False, 0), "too short"
    ones = (1 << (8 * width)) - 1
    marker = int.from_bytes(head[width:2 * width], "little")
    if marker == ones:
        block = head[2 * width + 4:2 * width + 8]
        if block in KNOWN_EXT_IDS:
            return (True, CONCLUSIVE), \
                f"~0 marker followed by extended-info block {block.decode()!r}"
        if head[2 * width:2 * width + 4] == b"\0\0\0\0":
            return (True, CONCLUSIVE), "~0 marker with empty extended info"
        return (False, 0), "~0 marker without a known extended-info block"
    # Old form: the p2m frame list (guest width = toolstack width), then the body.
    # A frame number 0 never occurs there (it is where the list itself would
    # have to live); it is what a 64-bit p2m_size's upper half looks like.
    if marker == 0:
        return (False, 0), "no extended info, and p2m frame 0"
    frames = F.p2m_frame_count(p2m_size, width)
    ok, n, why = walk_body(head, width + frames * width, width, p2m_size)
    return (ok, n), f"no extended info; body after the {frames}-entry p2m frame list: {why}"


def infer(head, width=None, guest=None):
    """Return (width_bytes, guest, explanation dict).  width in bytes (4/8)."""
    if width and guest:
        return width, guest, {"width": "given", "guest": "given"}
    widths = [width] if width else [8, 4]
    guests = [guest] if guest else ["pv", "hvm"]
    candidates = []
    notes = {}
    for w in widths:
        if len(head) < w:
            continue
        p2m = int.from_bytes(head[:w], "little")
        if not 1 <= p2m <= F.MAX_PFNS:
            notes[f"{w * 8}-bit"] = f"p2m_size {p2m} outside 1..2^28"
            continue
        for g in guests:
            key, why = (_hvm if g == "hvm" else _pv)(head, w, p2m)
            notes[f"{w * 8}-bit {g}"] = why
            if key[0] or key[1] > 0:
                candidates.append((key, w, g, why))
    if not candidates:
        raise StreamError("not a legacy libxc image", offset=None,
                          expected="p2m_size (1..2^28) then PV extended info or a body of chunks "
                                   "(offsets below are from the start of the image)",
                          found="; ".join(f"{k}: {v}" for k, v in notes.items()) or "no data")
    best = max(c[0] for c in candidates)
    top = [c for c in candidates if c[0] == best]
    if len(top) > 1:
        options = ", ".join(f"{w * 8}-bit {g} ({why})" for _, w, g, why in top)
        flags = []
        if len({w for _, w, _, _ in top}) > 1:
            flags.append("--width 32|64")
        if len({g for _, _, g, _ in top}) > 1:
            flags.append("--guest pv|hvm")
        raise AmbiguousStream(f"cannot tell how to read this stream: it fits {options}; "
                              f"say which with {' and '.join(flags)}")
    _, w, g, why = top[0]
    others = [f"{k}: {v}" for k, v in notes.items() if k not in (f"{w * 8}-bit {g}",)]
    other = [v for k, v in notes.items() if not k.startswith(f"{w * 8}-bit")]
    width_why = f"inferred: {w * 8}-bit"
    if other:
        width_why += f"; as {(12 - w) * 8}-bit: {other[0]}"
    return w, g, {"width": "given" if width else width_why,
                  "guest": "given" if guest else f"inferred: {why}",
                  "rejected": others}
