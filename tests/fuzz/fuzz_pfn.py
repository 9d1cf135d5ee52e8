"""Fuzz PFN-array decoding and the page movers (scatter, compare, pwrite),
native against the reference twin.

Input layout (parsed without atheris, so a crash file replays anywhere):
  byte 0   bit 0: width 8 (else 4); bits 1-4: p2m_size from P2M; bit 5: pass
           caller-owned output arrays; bit 6: make them oversized; bit 7: pwrite
  byte 1   bits 0-4: image pages (0..31) for the movers
  rest     the raw entries (not always a whole number of them)

    python tests/fuzz/fuzz_pfn.py CORPUS -max_total_time=600
    python tests/fuzz/fuzz_pfn.py --replay crash-...
"""
import os
import sys

import fuzz_common as C

atheris, np, _native, _reference = C.load_instrumented("kernels._native", "kernels._reference")

PAGE = 4096
P2M = [0, 1, 2, 3, 7, 16, 64, 0x0FFFFFFF, 0x10000000, 0x10000001, 2 ** 32, 2 ** 63,
       2 ** 64 - 1, -1, 2 ** 64, 5]


def _outputs(n, oversized):
    extra = 3 if oversized else 0
    return (np.full(n + extra, 0xAA, np.uint8), np.full(n + extra, 7, np.uint64),
            np.full(n + extra, 9, np.uint64))


def test_one_input(data):
    if len(data) < 2:
        return
    ctl, arg = data[0], data[1]
    raw = data[2:]
    width = 8 if ctl & 1 else 4
    p2m = P2M[(ctl >> 1) & 0xF]
    n = len(raw) // width
    outs = {}
    if ctl & 0x20:
        outs = [_outputs(n, ctl & 0x40) for _ in range(2)]
    ra = C.outcome(_native.decode_pfns, raw, width, p2m,
                   *(outs[0] if outs else ()))
    rb = C.outcome(_reference.decode_pfns, raw, width, p2m,
                   *(outs[1] if outs else ()))
    C.check_same("decode_pfns outcome", ra, rb)
    # On failure the caller's arrays hold unspecified partial output.
    if outs and ra[0] == "ok" and not all(np.array_equal(x, y) for x, y in zip(outs[0], outs[1])):
        raise C.Mismatch("decode_pfns wrote different caller-owned arrays")
    if ra[0] != "ok":
        return
    types, pfns, data_pfns = ra[1]
    assert types.size == pfns.size == n
    assert np.all((types < 5) | (types > 7))
    nd = data_pfns.size
    if nd == 0 or nd > 64:
        return
    image_pages = arg & 0x1F
    pages = np.frombuffer((raw * (nd * PAGE // max(len(raw), 1) + 1))[:nd * PAGE], np.uint8)
    base = np.arange(image_pages * PAGE, dtype=np.uint64).astype(np.uint8)
    ia, ib = base.copy(), base.copy()
    sa = C.outcome(_native.scatter_pages, pages, data_pfns, ia)
    sb = C.outcome(_reference.scatter_pages, pages, data_pfns, ib)
    C.check_same("scatter_pages outcome", sa, sb)
    if not np.array_equal(ia, ib):
        raise C.Mismatch("scatter_pages left different images")
    if sa[0] == "err" and not np.array_equal(ia, base):
        raise AssertionError("a failed scatter_pages wrote to the image")
    ca = C.outcome(_native.compare_pages, pages, data_pfns, base)
    cb = C.outcome(_reference.compare_pages, pages, data_pfns, base)
    C.check_same("compare_pages outcome", ca, cb)
    if ctl & 0x80:
        files = [os.memfd_create("fuzz_pfn"), os.memfd_create("fuzz_pfn")]
        try:
            wa = C.outcome(_native.pwrite_pages, files[0], pages, data_pfns, image_pages)
            wb = C.outcome(_reference.pwrite_pages, files[1], pages, data_pfns, image_pages)
            C.check_same("pwrite_pages outcome", wa, wb)
            got = [os.pread(fd, (image_pages + 1) * PAGE, 0) for fd in files]
            if got[0] != got[1]:
                raise C.Mismatch("pwrite_pages wrote different files")
            if wa[0] == "err" and got[0]:
                raise AssertionError("a failed pwrite_pages wrote to the file")
        finally:
            for fd in files:
                os.close(fd)


def make_seeds():
    import struct
    ents = [0x00000001, 0x10000002, 0xF0000000, 0xE0000003, 0xD0000004, 0x90000005,
            0xC0000006, 0x00000007]
    yield "w8", bytes([0x01 | (6 << 1), 0x10]) + struct.pack("<8Q", *ents)
    yield "w4", bytes([0x00 | (6 << 1), 0x08]) + struct.pack("<8I", *ents)
    yield "w8_out", bytes([0x01 | (5 << 1) | 0x20 | 0x40 | 0x80, 0x05]) + \
        struct.pack("<8Q", *ents)
    yield "bad_type", bytes([0x01 | (6 << 1), 0x10]) + struct.pack("<2Q", 1, 0x50000001)
    yield "upper", bytes([0x01 | (6 << 1), 0x10]) + struct.pack("<2Q", 1, 1 << 40)
    yield "range", bytes([0x00 | (4 << 1), 0x10]) + struct.pack("<3I", 1, 2, 9)
    yield "ragged", bytes([0x01 | (6 << 1), 0x10]) + b"\x01" * 13
    yield "pwrite", bytes([0x81 | (6 << 1), 0x03]) + struct.pack("<3Q", 0, 1, 2)


if __name__ == "__main__":
    sys.exit(C.fuzz_main(test_one_input, make_seeds))
