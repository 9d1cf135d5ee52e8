"""The checkpoint engine's memory: a held checkpoint has a budget and spills
beyond it; EMPTY pages cost nothing (issue 14.1, 13.3)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import xlegacy
from xlegacy.checkpoints import Hold
from xlegacy.converter import convert

from support import hostile_streams as H
from support.hostile_streams import PipeLike

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZED = bool(os.environ.get("XLEGACY_SANITIZE"))


def test_hold_spills_beyond_its_budget(tmp_path):
    h = Hold(budget=10, spill_dir=str(tmp_path))
    h.append(b"0123456789")
    assert not h.spilled
    h.append(b"abcdefghijklmnopqrst")
    assert h.spilled and bytes(h.view()) == b"0123456789abcdefghijklmnopqrst"
    h.reset()
    assert h.size == 0 and bytes(h.view()) == b""
    h.append(b"xyz")
    assert bytes(h.view()) == b"xyz"
    h.close()
    assert os.listdir(tmp_path) == []        # an unnamed file: nothing to clean up


def test_hold_without_directory_spills_to_anonymous_memory():
    h = Hold(budget=0)
    h.append(b"abc")
    assert h.spilled and bytes(h.view()) == b"abc"
    h.close()


@pytest.mark.parametrize("name", ["remus64_compressed", "remus32_compressed", "remus64_plain"])
@pytest.mark.parametrize("budget", [0, 5000, None])
def test_any_budget_restores_and_converts_the_same(name, budget, tmp_path):
    built = H.catalogue()[name]
    img, meta = xlegacy.restore(built.data, checkpoint_buffer=budget)
    assert bytes(img) == built.image
    out = tmp_path / "img"
    xlegacy.restore(PipeLike(built.data), output=str(out), checkpoint_buffer=budget)
    assert out.read_bytes() == built.image
    path = tmp_path / "s"
    path.write_bytes(built.data)
    convert(str(path), str(tmp_path / "a.v3"), checkpoint_buffer=budget)
    convert(str(path), str(tmp_path / "b.v3"))
    assert (tmp_path / "a.v3").read_bytes() == (tmp_path / "b.v3").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.v3", "b.v3", "img", "s"]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "1"])
def test_checkpoint_buffer_is_checked(bad, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_buffer"):
        xlegacy.restore(H.catalogue()["remus64_compressed"].data, checkpoint_buffer=bad)
    with pytest.raises(ValueError, match="checkpoint_buffer"):
        convert(H.catalogue()["remus64_compressed"].data, str(tmp_path / "o"),
                checkpoint_buffer=bad)


_RSS = textwrap.dedent(r"""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import numpy, xlegacy, xlegacy.restorer, xlegacy.converter
    path, out, mode, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "restore":
        img, meta = xlegacy.restore(path, output=out, checkpoint_buffer=budget)
        print(json.dumps({{"checkpoints": meta["checkpoints"],
                          "kinds": meta["checkpoint_details"][-1]["page_kinds"]}}))
    elif mode == "convert":
        st = xlegacy.converter.convert(path, out, checkpoint_buffer=budget)
        print(json.dumps({{"checkpoints": st.committed_checkpoint}}))
    else:
        print(json.dumps({{}}))
""")


def _child_peak(*args):
    script = _RSS.format(tests=os.path.join(ROOT, "tests"))
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", script, *map(str, args)],
                         os.environ)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss * 1024


@pytest.mark.skipif(SANITIZED, reason="RSS is not meaningful under AddressSanitizer")
@pytest.mark.parametrize("mode", ["restore", "convert"])
def test_million_empty_pages_cost_no_page_buffer(mode, tmp_path):
    """Checkpoint 2 names 2^20 distinct pfns, each carried by a 1-byte
    EMPTY_PAGE marker (~9 stream bytes a pfn).  Before: restore -o allocated
    4 KiB a pfn (4.3 GB RSS) and wrote every page back (no longer sparse).
    Now the growth over an idle interpreter stays within the budget + 64 MiB
    and the image stays sparse."""
    from support import amplify
    stream = tmp_path / "amp.bin"
    amplify.write(stream, n=1 << 20)
    budget = 8 << 20
    base = _child_peak(stream, tmp_path / "none", "idle", budget)
    out = tmp_path / "out"
    peak = _child_peak(stream, out, mode, budget)
    assert peak - base <= budget + (64 << 20), \
        f"RSS grew by {(peak - base) >> 20} MiB over an idle interpreter"
    if mode == "restore":
        st = out.stat()
        assert st.st_size == (1 << 20) * 4096
        assert st.st_blocks * 512 < (1 << 20), "the image file is not sparse"


def test_file_restore_reads_only_delta_bases(tmp_path, monkeypatch):
    """A compressed checkpoint reaches a file image knowing each page's kind
    first: FULL and EMPTY pages are never read back, EMPTY ones never
    written; only pages whose first encoding is a delta are read."""
    from xlegacy import image as image_mod
    from support import amplify
    reads, writes = [], []
    gather, pwrite = image_mod.kernels.gather_pages, image_mod.kernels.pwrite_pages

    def counting_gather(fd, pfns, *a, **k):
        reads.extend(int(p) for p in pfns)
        return gather(fd, pfns, *a, **k)

    def counting_pwrite(fd, pages, pfns, *a, **k):
        writes.extend(int(p) for p in pfns)
        return pwrite(fd, pages, pfns, *a, **k)
    pwrite_at, pread_at = image_mod.kernels.pwrite_at, image_mod.kernels.pread_at

    def counting_pwrite_at(fd, src, at, pfns, *a, **k):   # the overlay's writes
        writes.extend(int(p) for p in pfns)
        return pwrite_at(fd, src, at, pfns, *a, **k)

    def counting_pread_at(fd, offs, *a, **k):              # delta bases in the input
        reads.extend(int(o) for o in offs)
        return pread_at(fd, offs, *a, **k)
    monkeypatch.setattr(image_mod.kernels, "gather_pages", counting_gather)
    monkeypatch.setattr(image_mod.kernels, "pwrite_pages", counting_pwrite)
    monkeypatch.setattr(image_mod.kernels, "pwrite_at", counting_pwrite_at)
    monkeypatch.setattr(image_mod.kernels, "pread_at", counting_pread_at)
    stream = tmp_path / "s"
    amplify.write(stream, n=64, first=1, full_every=3)  # pages 0, 3, 6 ... FULL, others EMPTY
    out = tmp_path / "img"
    img, meta = xlegacy.restore(str(stream), output=str(out))
    assert meta["checkpoint_details"][-1]["page_kinds"] == {"empty": 42, "full": 22,
                                                           "delta": 0}
    assert reads == []
    assert sorted(set(writes)) == list(range(0, 64, 3))
    # the built-in remus streams mix all three kinds: reads are delta bases only
    reads.clear()
    built = H.catalogue()["remus64_compressed"]
    xlegacy.restore(built.data, output=str(tmp_path / "img2"))
    assert (tmp_path / "img2").read_bytes() == built.image
    kinds = xlegacy.restore(built.data)[1]["checkpoint_details"]
    assert 0 < len(reads) <= sum(c["page_kinds"]["delta"] for c in kinds[1:])
