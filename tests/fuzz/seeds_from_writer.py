"""Small seed streams written by xlegacy's own writer (src/xlegacy/testing/writer.py),
added to the hand-built ones of tests/support/hostile_streams.py.  Kept tiny (a few
dozen pages, short qemu and context blobs) so libFuzzer mutates them fast."""
import numpy as np


def _image(p2m, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (p2m, 4096), dtype=np.uint8)
    img[:, 2048:] = 0x11 * (seed % 7)          # compressible halves
    return img


def seeds():
    from xlegacy.testing.writer import PVOptions, make_stream
    out = []
    img = _image(16, 1)
    data, _ = make_stream(img, width=8, guest="hvm", qemu=b"QEVM" + bytes(28),
                          params={"ident_pt": 0xfeffd000}, vcpus=[0, 1], tsc=(1, 2, 3, 4),
                          xtab=[14], xalloc=[15], pfns=np.arange(14),
                          iterations=[{"pfns": [1, 2, 3], "image": _image(16, 2)}])
    out.append(("writer_hvm64_live", data))
    data, _ = make_stream(_image(12, 3), width=4, guest="hvm", qemu=b"QEVM" + bytes(12),
                          wrapper="xl", config=b"name='x'\n")
    out.append(("writer_hvm32_xl", data))
    data, _ = make_stream(_image(10, 4), width=8, guest="pv",
                          pv=PVOptions(guest_width=8, extv=True, xcnt=48),
                          types={0: 0xC, 1: 0x3, 2: 0x2, 3: 0x1}, vcpus=[0, 1],
                          unmapped=[9])
    out.append(("writer_pv64", data))
    base = _image(12, 5)
    cps = []
    for k in range(2):
        nxt = base.copy()
        nxt[k::3, :64] ^= 0x5A
        cps.append({"image": nxt, "pfns": list(range(k, 12, 3)) + [k + 1]})
        base = nxt
    data, _ = make_stream(_image(12, 5), width=8, guest="hvm", checkpoints=cps,
                          compress=True, qemu_signature="remus",
                          qemu=b"QEVM" + bytes(20),
                          compress_options={"page_buffer_pages": 3})
    out.append(("writer_remus_compressed", data))
    return out
