"""Large legacy streams written fast: a header and a tail from
hostile_streams.Builder around one body record repeated n times.  For the
tests that check how memory and time scale with the stream (bounded
per-PFN state, per-batch overhead) without storing big inputs."""
import struct

from . import hostile_streams as H

HVM_IDENT_PT = -3


def _frame(width, guest, p2m_size):
    """(head, tail) bytes of a one-checkpoint stream with an empty body."""
    b = H.Builder(width, guest, p2m_size, seed=7)
    if guest == "pv":
        b.pv_header(guest_width=8)
    else:
        b.hvm_header()
    head = len(b.buf)
    b.end()
    if guest == "pv":
        b.pv_tail(unmapped=())
    else:
        b.hvm_tail()
    return bytes(b.buf[:head]), bytes(b.buf[head:])


def write_repeated(path, body, n, width=8, guest="hvm", p2m_size=1 << 20):
    """Write head + body * n + tail to path; returns the file size."""
    head, tail = _frame(width, guest, p2m_size)
    block = body * max(1, (1 << 20) // max(len(body), 1))
    per = len(block) // len(body)
    with open(path, "wb") as f:
        f.write(head)
        left = n
        while left >= per:
            f.write(block)
            left -= per
        f.write(body * left)
        f.write(tail)
    return len(head) + len(body) * n + len(tail)


def entries(width, pfns, typ):
    fmt = "<Q" if width == 8 else "<I"
    return b"".join(struct.pack(fmt, H.entry(p, typ)) for p in pfns)


def xalloc_batch(width=8, count=1024, first=0):
    """One batch of `count` XALLOC entries (no page data)."""
    return struct.pack("<i", count) + entries(width, range(first, first + count), H.XALLOC)


def page_batch(width=8, pfns=(0,), fill=0x5A):
    """One batch carrying a page per pfn (all bytes `fill`)."""
    pfns = list(pfns)
    return (struct.pack("<i", len(pfns)) + entries(width, pfns, H.NOTAB)
            + bytes([fill]) * (H.PAGE * len(pfns)))


def param_chunk(cid=HVM_IDENT_PT, value=0xFEFFC):
    return struct.pack("<iIQ", cid, 0, value)
