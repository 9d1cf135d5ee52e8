"""`xlegacy info`'s numpy-free path (inspector.py) against the restorer's:
the same kernel results, the same --json and text output for every shared
sample and for writer-built streams, and the fallback where it cannot serve."""
import random

import numpy as np
import pytest

from xlegacy import inspector, kernels, restorer
from xlegacy.kernels import _reference
from xlegacy.testing import writer as W

from conftest import SAMPLES
from support.differential import check_same, outcome
from support.hostile_streams import catalogue

NATIVE = kernels.BACKEND == "native"


def _state(p2m, chunks=None):
    maps = [bytearray(p2m) for _ in range(4)]
    return maps + [bytearray((p2m + 0xFFFF) >> 16 if chunks is None else chunks)], \
        [0] * 16, [0] * 16


def _mark(fn, raw, width, p2m):
    maps, counts, held = _state(p2m)
    got = outcome(fn, raw, width, p2m, maps, counts, held, locate=100)
    return got, [bytes(m) for m in maps], counts, held


def _entries(rng, n, width, p2m, bad=None):
    out = []
    for _ in range(n):
        t = rng.choice([0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 0xD, 0xE, 0xF])
        out.append((t << 28) | rng.randrange(p2m if t != 0xF else 1 << 28))
    if bad is not None:
        out[n // 2] = bad
    return b"".join(x.to_bytes(width, "little") for x in out)


@pytest.mark.skipif(not NATIVE, reason="the native kernel is compared with its twin")
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("bad", [None, 5 << 28, (1 << 28) - 1, 1 << 40])
def test_mark_pfns_matches_reference(width, bad):
    from xlegacy.kernels import _light
    if bad == 1 << 40 and width == 4:
        bad = 6 << 28
    rng = random.Random(width * 7 + (bad or 0) % 13)
    p2m = 300           # few pfns, many entries: repeats end with their last type
    for n in (0, 1, 1024, 3000):
        raw = _entries(rng, n, width, p2m, bad if n else None)
        a = _mark(_light.mark_pfns, raw, width, p2m)
        b = _mark(_reference.mark_pfns, raw, width, p2m)
        check_same(f"mark_pfns n={n}", a, b)
        if bad is not None and n:
            assert a[0][0] == "err" and not any(map(any, a[1])) and a[2] == [0] * 16
        else:       # held: the present pfns by last type
            present, last = a[1][0], a[1][1]
            assert a[3] == [sum(1 for p in range(p2m) if present[p] and last[p] == t)
                            for t in range(16)]
    # State smaller than p2m_size, a partial entry, a bad width, no chunk
    # map: refused alike.
    for raw, w, size, chunks in ((b"", width, p2m + 1, None), (b"\0" * 3, width, p2m, None),
                                 (b"\0" * 8, 5, p2m, None), (b"", width, p2m, 0)):
        check_same(f"mark_pfns refused {w} {size} {chunks}",
                   outcome(_light.mark_pfns, raw, w, size, *_state(p2m, chunks)),
                   outcome(_reference.mark_pfns, raw, w, size, *_state(p2m, chunks)))


def _both(source):
    """(light to_dict or 'fallback', restorer to_dict), as outcomes."""
    light = outcome(lambda: inspector.inspect(source).to_dict())
    if light[0] == "err" and light[1]["type"] == "NeedsNumpy":
        return None, None
    return light, outcome(lambda: restorer.restore_result(source, inspect_only=True).to_dict())


def _sample_paths():
    return sorted(SAMPLES.glob("*.bin")) if SAMPLES.is_dir() else []


def _cli(capsys, monkeypatch, argv, light):
    from xlegacy.cli import main
    if not light:
        def refuse(*a, **k):
            raise inspector.NeedsNumpy("test")
        monkeypatch.setattr(inspector, "inspect", refuse)
    rc = main(argv)
    out = capsys.readouterr()
    monkeypatch.undo()
    return rc, out.out, out.err


def _writer_streams(tmp_path):
    p2m = 320
    img = np.random.default_rng(9).integers(0, 256, p2m * 4096, dtype=np.uint8)
    cases = {
        "hvm64_xtab": dict(width=8, guest="hvm", xtab=list(range(200, 260)),
                           pfns=[p for p in range(p2m) if not 200 <= p < 260],
                           toolstack=W.libxl_toolstack([(1, 2, 3, "a")], width=8)),
        "hvm32_xalloc_broken": dict(width=4, guest="hvm", xalloc=[311, 5], broken=[312, 6],
                                    pfns=[p for p in range(p2m) if p not in (311, 312)]),
        "pv64_tables": dict(width=8, guest="pv", vcpus=[0, 1, 3],
                            types={1: 1, 2: 2, 3: 3, 4: 4 | 8, 9: 1 | 8},
                            pv={"xcnt": 16 + 512}),
        "pv32": dict(width=4, guest="pv", vcpus=2, pv={"guest_width": 4, "extv": False}),
        "verify": dict(width=8, guest="hvm", verify=True, iterations=[(range(0, 50),)]),
        "live_sparse": dict(width=8, guest="hvm", pfns=[0, 1, 2, 100, 101, 319],
                            iterations=[(range(10, 40),), (range(30, 90, 3),)]),
        "xl": dict(width=8, guest="hvm", wrapper="xl", config='{"c_info": {}}'),
        "remus_plain": dict(width=8, guest="hvm",
                            checkpoints=[dict(image=img, pfns=[1, 2, 3])]),
    }
    out = {}
    for name, opts in cases.items():
        path = tmp_path / f"{name}.bin"
        W.write_guest(str(path), img, **opts)
        out[name] = path
    for name, built in catalogue().items():
        path = tmp_path / f"cat_{name}.bin"
        path.write_bytes(built.data)
        out["cat_" + name] = path
    return out


def _same_everywhere(capsys, monkeypatch, path):
    """The light path, where it serves, equals the restorer's: the object,
    and the CLI's --json and text output.  Returns whether it served."""
    light, full = _both(str(path))
    if light is None:
        return False
    check_same(f"{path.name} to_dict", light, full)
    for extra in (["--json"], [], ["-v"]):
        argv = ["info", *extra, str(path)]
        check_same(f"{path.name} info {extra}", _cli(capsys, monkeypatch, argv, True),
                   _cli(capsys, monkeypatch, argv, False))
    return True


def test_info_light_path_equals_restorer_on_samples(samples, capsys, monkeypatch):
    served = [p.name for p in _sample_paths() if _same_everywhere(capsys, monkeypatch, p)]
    # Every uncompressed sample goes the fast way (and the bad one fails the same).
    assert {"hvm64_save.bin", "pv64_xl_xsave.bin", "bad_truncated_page.bin"} <= set(served)


def test_info_light_path_equals_restorer_on_built_streams(tmp_path, capsys, monkeypatch):
    streams = _writer_streams(tmp_path)
    served = {name for name, p in streams.items() if _same_everywhere(capsys, monkeypatch, p)}
    assert {"hvm64_xtab", "hvm32_xalloc_broken", "pv64_tables", "verify", "cat_pv64",
            "cat_hvm32"} <= served
    # Later checkpoints and compressed pages go to the restorer.
    assert not served & {"remus_plain", "cat_remus64_compressed", "cat_remus64_plain"}
    res = inspector.inspect(str(streams["hvm32_xalloc_broken"])).to_dict()
    assert (res["xalloc_pfns"], res["broken_pfns"]) == ([5, 311], [6, 312])


def test_info_light_path_sparse_p2m(tmp_path):
    # The largest p2m with pages at both ends: the maps are zeroed lazily
    # and searched at memchr speed (bytearrays, zeroed up front, took ~9 s).
    from support import bulk_streams as B
    path = tmp_path / "sparse.bin"
    top = (1 << 28) - 2
    B.write_repeated(path, B.page_batch(8, [5, 6, top]) + B.xalloc_batch(8, 2, top - 4), 2,
                     p2m_size=top + 1)
    # A run across a 64 Ki-pfn chunk boundary is one range.
    path2 = tmp_path / "boundary.bin"
    B.write_repeated(path2, B.page_batch(8, range((1 << 16) - 2, (1 << 16) + 2)), 1,
                     p2m_size=1 << 17)
    light2 = inspector.inspect(str(path2)).to_dict()
    assert light2["pfn_ranges"] == [[(1 << 16) - 2, (1 << 16) + 1]]
    check_same("boundary", light2,
               restorer.restore_result(str(path2), inspect_only=True).to_dict())
    light = inspector.inspect(str(path)).to_dict()
    assert light["pfn_ranges"] == [[5, 6], [top, top]] and light["pfns"] == 3
    assert light["xalloc_pfns"] == [top - 4, top - 3]
    check_same("sparse", light, restorer.restore_result(str(path), inspect_only=True).to_dict())


def test_info_falls_back_for_later_checkpoints(tmp_path, capsys, monkeypatch):
    path = _writer_streams(tmp_path)["cat_remus64_plain"]
    with pytest.raises(inspector.NeedsNumpy):
        inspector.inspect(str(path))
    # checkpoint 1 alone is served; the CLI output is the restorer's either way
    inspector.inspect(str(path), checkpoint=1)
    for extra in ([], ["--checkpoint", "1"], ["--checkpoint", "2"]):
        argv = ["info", "--json", *extra, str(path)]
        check_same(f"info {extra}", _cli(capsys, monkeypatch, argv, True),
                   _cli(capsys, monkeypatch, argv, False))
