"""`xlegacy bench` smoke tests: tiny sizes, one round, no timing assertions.
Also checks that the benchmark inputs are what they claim to be."""
import json
import subprocess
import sys

import numpy as np
import pytest

from xlegacy import bench, kernels
from xlegacy.kernels import _reference
from xlegacy.cli import main

from conftest import load_sample


def run(*args):
    return subprocess.run([sys.executable, "-m", "xlegacy", "bench", *args],
                          capture_output=True, text=True, timeout=120)


def test_quick_table_with_baselines_and_memory():
    r = run("--size", "8M", "--repeat", "1", "-q",
            "--only", "pfn32,delta-scattered-10,restore-memory,restore-file,memory")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("PFN decoding, 32-bit", "delta decoder: 10% of 32-bit words",
                 "restore in memory", "restore to a raw file", "cp of the stream",
                 "numpy copy of the stream bytes (fresh memory)", "reference twin",
                 "targets (median ratios of this run)", "peak RSS", "GB/s"):
        assert text in out, f"{text!r} missing from:\n{out}"


def test_json_and_check(capsys):
    rc = main(["bench", "--size", "4M", "--repeat", "1", "--json",
               "--only", "pfn64,scatter-seq,delta-full,restore-remus"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    keys = [g["key"] for g in d["groups"]]
    assert keys == ["pfn64", "scatter-seq", "delta-full", "restore-remus"]
    for g in d["groups"]:
        primary = [c for c in g["cases"] if c["name"] == g["primary"]]
        assert primary and primary[0]["ratio"] == 1.0
        assert any(c["role"] == "subject" for c in g["cases"])
        for c in g["cases"]:
            assert c["gb_per_s"] > 0 and len(c["seconds"]["all"]) == 1
    remus = d["groups"][-1]
    assert remus["info"]["compressed"] and remus["info"]["checkpoints"] == 11
    assert d["machine"]["cpus"] >= 1 and "targets" in d


def test_list_and_bad_size(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "pfn32" in listed and "restore-file" in listed and "delta-empty" in listed
    assert main(["bench", "--size", "lots"]) == 1
    assert "cannot read size" in capsys.readouterr().err


def test_own_stream(samples, capsys):
    path, _ = load_sample("remus_compressed_3cp")
    rc = main(["bench", str(path), "--repeat", "1", "--json",
               "--only", "pfn,delta,restore-memory"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert [g["key"] for g in d["groups"]] == ["pfn64", "delta-stream", "restore-memory"]
    assert d["groups"][1]["info"]["source"].startswith("this stream")


@pytest.mark.parametrize("text,value", [("8M", 8 << 20), ("1G", 1 << 30), ("1.5GiB", 3 << 29),
                                        ("4096", 4096), ("64k", 64 << 10), ("2 MB", 2 << 20)])
def test_parse_size(text, value):
    assert bench.parse_size(text) == value


@pytest.mark.parametrize("kind", list(bench.DELTA_KINDS))
def test_delta_data_sets_decode_to_their_pages(kind):
    old = np.random.default_rng(1).integers(0, 256, 64 * 4096, dtype=np.uint8)
    buf, new = bench.delta_buffer(kind, old, block=16)
    starts, kinds = _reference.delta_index(buf, 64)
    image = old.copy()
    _reference.delta_apply(buf, starts, np.arange(64, dtype=np.uint64), image)
    assert np.array_equal(image, new)
    expect = {"full": "full", "empty": "empty"}.get(kind, "delta")
    assert kinds[expect] == 64
    changed = np.count_nonzero(new.view("<u4") != old.view("<u4")) / (64 * 1024)
    want = {"scattered-1": 0.01, "scattered-10": 0.1, "changed-100": 1.0, "full": 1.0,
            "empty": 0.0}.get(kind)
    if want is not None:
        assert abs(changed - want) < 0.02


def test_numpy_baseline_matches_kernel():
    for width in (4, 8):
        raw, p2m = bench.pfn_entries(5000, width)
        t = np.empty(5000, np.uint8)
        p = np.empty(5000, np.uint64)
        got = bench.numpy_decode_pfns(raw, width, p2m, t, p)
        want = _reference.decode_pfns(raw, width, p2m)
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


def test_reference_kernels_swaps_and_restores():
    before = kernels.delta_apply
    with bench.reference_kernels():
        assert kernels.delta_apply is _reference.delta_apply
        assert kernels.decode_pfns is _reference.decode_pfns
    assert kernels.delta_apply is before


def test_help_is_self_contained(capsys):
    """The help speaks of the tool, not of the tracker that asked for it."""
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--check" in out and "issue" not in out.lower()
