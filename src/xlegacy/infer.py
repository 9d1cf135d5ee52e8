"""Inferring the toolstack width and guest type from the first bytes of a
libxc image, when the user has not said.

Nothing in a legacy stream records either.  The evidence used, strongest
first:
  * p2m_size must be 1..2^28 (an entry has 28 bits of pfn).  A 32-bit stream
    read as 64-bit puts the next field into the upper half: implausible.
  * PV: the next unsigned long is ~0 and an extended-info block id ("vcpu",
    "extv", "xcnt") follows: conclusive.
  * HVM: the next int32 is a chunk id: -20..-1, or a batch of 1..1024
    entries whose first entries decode to valid types and pfns < p2m_size.
  * PV without extended info (Xen 3.0 era): the next unsigned long is a p2m
    frame (an MFN); only taken when nothing else fits.
When more than one reading survives at the same strength the stream is
ambiguous and the caller must pass width/guest.
"""
import struct

from . import format as F
from .errors import AmbiguousStream, StreamError

HEAD_BYTES = 8 + 4 + F.MAX_BATCH * 8
KNOWN_EXT_IDS = (b"vcpu", b"extv", b"xcnt")

STRONG, PLAUSIBLE, WEAK = 3, 2, 1


def _batch_ok(head, at, count, width, p2m_size):
    """Do the entries of a batch starting at `at` look valid (as far as seen)?"""
    fmt = "<Q" if width == 8 else "<I"
    seen = 0
    for i in range(min(count, 16)):
        o = at + i * width
        if o + width > len(head):
            break
        (raw,) = struct.unpack_from(fmt, head, o)
        typ = (raw >> 28) & 0xF
        if raw >> 32 or typ in F.INVALID_TYPES or (typ != F.XTAB and (raw & 0x0FFFFFFF) >= p2m_size):
            return False
        seen += 1
    return seen > 0


def _hvm_strength(head, width, p2m_size):
    if len(head) < width + 4:
        return 0, "too short"
    (chunk,) = struct.unpack_from("<i", head, width)
    if -20 <= chunk <= -1:
        return PLAUSIBLE, f"first chunk id {chunk} ({F.CHUNK_NAMES[chunk]})"
    if 1 <= chunk <= F.MAX_BATCH:
        if _batch_ok(head, width + 4, chunk, width, p2m_size):
            return PLAUSIBLE, f"first chunk is a batch of {chunk} valid entries"
        return 0, f"batch of {chunk} entries with invalid entries"
    return 0, f"first int32 {chunk} is no chunk id"


def _pv_strength(head, width):
    if len(head) < 2 * width:
        return 0, "too short"
    ones = (1 << (8 * width)) - 1
    marker = int.from_bytes(head[width:2 * width], "little")
    if marker == ones:
        if len(head) >= 2 * width + 8 and head[2 * width + 4:2 * width + 8] in KNOWN_EXT_IDS:
            return STRONG, "~0 marker followed by extended-info block " \
                           f"{head[2 * width + 4:2 * width + 8].decode()!r}"
        if len(head) >= 2 * width + 4 and head[2 * width:2 * width + 4] == b"\0\0\0\0":
            return STRONG, "~0 marker with empty extended info"
        return WEAK, "~0 marker but no known extended-info block"
    return WEAK, "no extended info (first p2m frame list entry follows)"


def infer(head, width=None, guest=None):
    """Return (width_bytes, guest, explanation dict).  width in bytes (4/8)."""
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
            if g == "hvm":
                s, why = _hvm_strength(head, w, p2m)
            else:
                s, why = _pv_strength(head, w)
            notes[f"{w * 8}-bit {g}"] = why
            if s:
                candidates.append((s, w, g, why))
    if not candidates:
        if width and guest:
            return width, guest, {"width": "given", "guest": "given"}
        raise StreamError("not a legacy libxc image", offset=None,
                          expected="p2m_size (1..2^28) then PV extended info or HVM chunks",
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
    return w, g, {"width": "given" if width else f"inferred: {w * 8}-bit p2m_size is plausible",
                  "guest": "given" if guest else f"inferred: {why}"}
