"""Small Remus streams that are torn or corrupt in one later checkpoint, with
the verdict every command must give (libxc's rules, issue "one verdict per
stream"):

* ("ok", committed, torn): the stream restores checkpoint `committed`;
  `torn` is the checkpoint the stream ends inside (None: none);
* ("corrupt", checkpoint, offset): a CorruptCheckpoint for `checkpoint` at
  byte `offset` (None: wherever the restore says; every command must agree);
* ("tolerated", committed, checkpoint): restores `committed`; `checkpoint`
  carried COMPRESSED_DATA with no page entries, ignored as libxc ignores it.

Built with tests/support/hostile_streams.Builder, independent of xlegacy's
own writer.
"""
import struct

from .hostile_streams import Builder, entry

P2M = 32


def remus(checkpoints=4, compressed=True, width=8, seed=11, hook=None, first=20):
    """A Remus stream (checkpoint 1 sends pfns 0..first-1); hook(builder, cp,
    where) may add or replace parts of checkpoint cp at where="body"
    (instead of its page batches when it returns True) or where="pages"
    (after them)."""
    b = Builder(width, "hvm", max(P2M, first), seed)
    b.hvm_header()
    b.vcpu_info(0, [0])
    for i in range(0, first, 1024):
        b.batch([entry(p) for p in range(i, min(first, i + 1024))])
    if compressed:
        b.marker(-13)
    b.end()
    b.hvm_tail(signature=b"RemusDeviceModelState")
    b.checkpoint_done()
    for cp in range(2, checkpoints + 1):
        replaced = hook is not None and hook(b, cp, "body")
        if not replaced:
            dirty = [p for p in range(P2M) if (p * 5 + cp) % 3 == 0]
            b.batch([entry(p) for p in dirty], compressed=compressed)
            if compressed:
                b.flush_compressed(1500)
            if hook is not None:
                hook(b, cp, "pages")
        b.remus_checkpoint_end(cp)
    return b.build()


def _pfn_arrays(built, cp):
    return [s for s, e, w in built.layout if w == "PFN array" and built.checkpoint_of(s) == cp]


def _patched(built, at, new):
    d = bytearray(built.data)
    d[at:at + len(new)] = new
    return bytes(d)


def cases():
    """[(name, stream bytes, verdict)]"""
    out = []
    for compressed in (True, False):
        tag = "compressed" if compressed else "plain"
        good = remus(compressed=compressed)
        out.append((f"{tag}-intact", good.data, ("ok", 4, None)))
        ends = good.checkpoint_ends
        # cut short by the end of the stream: the checkpoint is dropped
        for cp in (3, 4):
            start, end = ends[cp - 2], ends[cp - 1]
            for cut in (start + 1, (start + end) // 2, end - 1):
                out.append((f"{tag}-cut-cp{cp}-at{cut}", good.data[:cut], ("ok", cp - 1, cp)))
        # bytes present that do not parse or cannot be applied: an error
        arr = _pfn_arrays(good, 3)[0]
        w = good.width
        for name, value in (("pfn-range", P2M + 5), ("upper-bits", (1 << 40) | 3),
                            ("bogus-type", (0x5 << 28) | 3)):
            out.append((f"{tag}-{name}-cp3", _patched(good, arr + w, value.to_bytes(w, "little")),
                        ("corrupt", 3, arr + w)))
        chunk = _pfn_arrays(good, 3)[0] - 4
        out.append((f"{tag}-unknown-chunk-cp3", _patched(good, chunk, struct.pack("<i", -77)),
                    ("corrupt", 3, chunk)))
        out.append((f"{tag}-batch-too-large-cp3", _patched(good, chunk, struct.pack("<i", 5000)),
                    ("corrupt", 3, chunk)))
    # compressed encodings that cannot be applied
    def overrun(b, cp, where):
        if cp == 3 and where == "body":
            b.batch([entry(1), entry(2)], compressed=True, pages=[bytes(4096)] * 2)
            b.pending = []
            # a run of 127 words, then one of 127 more: past the page's end
            b.compressed_chunk(b"\x80" + bytes(4096) + (bytes([127]) + bytes(508)) * 9)
            return True
        return False
    out.append(("compressed-delta-overrun-cp3", remus(hook=overrun).data, ("corrupt", 3, None)))

    def extra(b, cp, where):
        if cp == 3 and where == "pages":
            b.compressed_chunk(b"\x00\x00\x00")
        return False
    out.append(("compressed-data-after-last-page-cp3", remus(hook=extra).data,
                ("corrupt", 3, None)))

    # what libxc tolerates: COMPRESSED_DATA without any page entry
    def pageless(b, cp, where):
        if cp == 3 and where == "body":
            b.compressed_chunk(b"\x80" + bytes(4096) + b"\x00" * 7)
            return True
        return False
    out.append(("compressed-without-pages-cp3", remus(hook=pageless).data,
                ("tolerated", 4, 3)))
    return out
