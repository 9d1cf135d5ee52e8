"""Fuzz the Remus page-delta (format B) decoder: delta_index and delta_apply,
native against the reference twin.

Input layout (parsed without atheris, so a crash file replays anywhere):
  byte 0   bits 0-3: npages (0..15); bits 4-5: mode; bit 6: one pfn out of range
  byte 1   image pages (1..16) and the page range for mode 2
  rest     the compressed buffer
Modes: 0 index then apply everything; 1 apply with forged `starts` taken
from the buffer (no index first); 2 apply a sub-range; 3 index only, with
npages far larger than the buffer.

    python tests/fuzz/fuzz_delta.py CORPUS -max_total_time=600
    python tests/fuzz/fuzz_delta.py --replay crash-...
"""
import hashlib
import sys

import fuzz_common as C

atheris, np, _native, _reference = C.load_instrumented("kernels._native", "kernels._reference")

PAGE = 4096


def _image(seed, pages):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, pages * PAGE, dtype=np.uint8)


def _pfns(data, npages, pages, out_of_range):
    h = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    pfns = np.array([(h >> (i % 60)) % pages for i in range(npages)], dtype=np.uint64)
    if out_of_range and npages:
        pfns[h % npages] = pages + (h % 3)
    return pfns


def _apply_both(buf, starts, pfns, img, first, count):
    a, b = img.copy(), img.copy()
    ra = C.outcome(_native.delta_apply, buf, starts, pfns, a, first, count)
    rb = C.outcome(_reference.delta_apply, buf, starts, pfns, b, first, count)
    C.check_same("delta_apply outcome", ra, rb)
    # Partial writes on failure must match too: the image is caller-visible.
    if not np.array_equal(a, b):
        raise C.Mismatch("delta_apply left different images")
    return ra


def test_one_input(data):
    if len(data) < 2:
        return
    ctl, arg = data[0], data[1]
    buf = data[2:]
    npages = ctl & 0xF
    mode = (ctl >> 4) & 0x3
    pages = (arg & 0xF) + 1
    img = _image(arg, pages)
    pfns = _pfns(data, max(npages, 1), pages, ctl & 0x40)

    if mode == 3:
        npages = len(buf) + 1 + arg
    ra = C.outcome(_native.delta_index, buf, npages)
    rb = C.outcome(_reference.delta_index, buf, npages)
    C.check_same("delta_index outcome", ra, rb)
    if ra[0] == "ok":
        starts, kinds = ra[1]
        assert int(starts[-1]) == len(buf) and sum(kinds.values()) == npages
        assert np.all(np.diff(starts.astype(np.int64)) >= 1)
    if mode == 0 and ra[0] == "ok":
        _apply_both(buf, ra[1][0], pfns[:npages], img, 0, npages)
    elif mode == 1:
        raw = np.frombuffer(buf[:2 * (npages + 1)].ljust(2 * (npages + 1), b"\0"), "<u2")
        starts = (raw.astype(np.uint64) % np.uint64(len(buf) + 2))
        _apply_both(buf, starts, pfns[:npages] if npages else pfns[:0], img, 0, npages)
    elif mode == 2 and ra[0] == "ok" and npages:
        first = (arg >> 4) % npages
        count = (arg >> 6) % (npages - first + 1)
        _apply_both(buf, ra[1][0], pfns[:npages], img, first, count)


def make_seeds():
    from support import hostile_streams as H
    rng = np.random.default_rng(7)
    old = bytes(rng.integers(0, 256, PAGE, dtype=np.uint8))
    new = bytearray(old)
    new[100:180] = bytes(80)
    new[4000:4096] = b"\x55" * 96
    encs = [H.encode_page(old, bytes(new)), H.encode_page(old, old),
            H.encode_page(old, bytes(new), full=True)]
    yield "delta1", bytes([0x01, 0x03]) + encs[0]
    yield "three", bytes([0x03, 0x13]) + b"".join(encs)
    yield "forged", bytes([0x12, 0x05]) + encs[0] + encs[1]
    yield "range", bytes([0x23, 0x47]) + encs[1] + encs[0] + encs[1]
    yield "oob", bytes([0x42, 0x02]) + encs[0] + encs[1]
    yield "skips", bytes([0x01, 0x00]) + bytes([0xFF] * 32 + [0xA0])
    yield "runpast", bytes([0x01, 0x00]) + bytes([0xFF] * 31 + [0x7F]) + bytes(508)


if __name__ == "__main__":
    sys.exit(C.fuzz_main(test_one_input, make_seeds))
