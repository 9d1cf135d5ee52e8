"""Fuzz the whole reader + restore on mutated streams.

The seeds are the small streams of tests/support/hostile_streams.py (and, when
xlegacy.testing.writer exists, streams it writes).  Each input is restored four
ways that must agree:
  A  bytes source, native kernels
  B  a pipe-like source (no size, short reads), native kernels
  C  bytes source, reference kernels
  D  a regular file (memfd) by path: positional reads, page data moved by
     the pread kernel, native kernels
A and C must match exactly (image, metadata or exception); B and D must give
the same image and metadata, or the same exception class at the same offset.
Only xlegacy's own exceptions may escape; anything else is a crash.

p2m_size is capped at 4096 pfns here (format.MAX_PFNS) to keep every run
fast; huge p2m sizes are covered by tests/test_hostile.py.

    python tests/fuzz/fuzz_stream.py CORPUS -max_total_time=600
    python tests/fuzz/fuzz_stream.py --replay crash-...
"""
import os
import sys

import fuzz_common as C

atheris, np, xlegacy, _reference, F, kernels = C.load_instrumented(
    "xlegacy", "kernels._reference", "format", "kernels")

from support.hostile_streams import PipeLike  # noqa: E402 (tests/ is on sys.path via fuzz_common)

FUZZ_MAX_PFNS = 4096
KERNELS = ("decode_pfns", "scatter_pages", "pwrite_pages", "compare_pages", "delta_index",
           "delta_apply")


class reference_kernels:
    """Context manager: run the package on the reference twins."""

    def __enter__(self):
        self.saved = {k: getattr(kernels, k) for k in KERNELS}
        for k in KERNELS:
            setattr(kernels, k, getattr(_reference, k))

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(kernels, k, v)


def run(source):
    try:
        img, meta = xlegacy.restore(source)
    except xlegacy.XLegacyError as exc:
        return ("err", C.describe(exc), exc)
    assert img.size == meta["p2m_size"] * F.PAGE_SIZE, "image size is not p2m_size pages"
    assert meta["checkpoints"] >= 1
    return ("ok", (np.asarray(img).copy(), meta), None)


def _meta_for_pipe(meta):
    m = dict(meta)
    m.pop("warnings", None)
    if m.get("torn_checkpoint"):
        m["torn_checkpoint"] = dict(m["torn_checkpoint"], reason=None)
    return m


def test_one_input(data):
    saved = F.MAX_PFNS
    F.MAX_PFNS = FUZZ_MAX_PFNS
    try:
        a = run(bytes(data))
        with reference_kernels():
            c = run(bytes(data))
        b = run(PipeLike(data))
        fd = os.memfd_create("fuzz_stream")
        try:
            os.write(fd, bytes(data))
            d = run(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    finally:
        F.MAX_PFNS = saved
    C.check_same("bytes: native vs reference", a[:2], c[:2])
    for name, other in (("pipe", b), ("file", d)):
        if a[0] != other[0]:
            raise C.Mismatch(f"bytes vs {name}: {a[:2]!r} / {other[:2]!r}")
        if a[0] == "ok":
            if not np.array_equal(a[1][0], other[1][0]):
                raise C.Mismatch(f"bytes vs {name}: different images")
            C.check_same(f"bytes vs {name}: metadata", _meta_for_pipe(a[1][1]),
                         _meta_for_pipe(other[1][1]))
        else:
            ea, eo = a[1], other[1]
            if (ea["type"], ea.get("offset")) != (eo["type"], eo.get("offset")):
                raise C.Mismatch(f"bytes vs {name} errors: {ea!r} / {eo!r}")


def make_seeds():
    from support import hostile_streams as H
    for name, built in H.catalogue().items():
        yield name, built.data
    yield "remus_small", H.remus_stream(8, 3, True, p2m_size=8, seed=11, chunk_size=900).data
    yield "remus_small32", H.remus_stream(4, 2, True, p2m_size=6, seed=12, chunk_size=500).data
    yield "hvm_small", H.hvm_stream(8, p2m_size=16, seed=13).data
    for name, data in writer_seeds():
        yield name, data


def writer_seeds():
    """Streams from xlegacy's own writer, when the package has one."""
    import importlib.util
    if importlib.util.find_spec("xlegacy.testing.writer") is None:
        return []
    import seeds_from_writer
    return seeds_from_writer.seeds()


if __name__ == "__main__":
    sys.exit(C.fuzz_main(test_one_input, make_seeds))
