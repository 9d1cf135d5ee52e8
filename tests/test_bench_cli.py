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


def test_memcpy_baseline_and_round_ratios(capsys):
    """The decoder's baseline is the faster of a C memcpy into the same
    image and a numpy copy; every ratio comes with min and max over rounds;
    the decoder target is a time bound; the load average is recorded."""
    rc = main(["bench", "--size", "4M", "--repeat", "2", "--json", "--only", "delta-full"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    g = d["groups"][0]
    assert g["primary_of"] == ["C memcpy of the page bytes into the image (warm)",
                               "numpy copy of the page bytes (warm destination)"]
    assert g["primary"] in g["primary_of"]
    times = {c["name"]: c["seconds"]["median"] for c in g["cases"]}
    assert times[g["primary"]] == min(times[n] for n in g["primary_of"])
    for c in g["cases"]:
        assert c["ratio_min"] <= c["ratio"] <= c["ratio_max"]
    assert len(g["load_average"]) == 2
    (t,) = [t for t in d["targets"] if t["kind"] == "time"]
    assert t["need"] == 1.3 and t["baseline"] == g["primary"] and t["met"] in (True, False)


def test_round_ratios_are_paired():
    """Ratios pair the rounds: round i of the subject with round i of the
    baseline, then median/min/max over rounds."""
    from xlegacy.bench.engine import CaseResult, GroupResult, Target
    a = CaseResult("a", "subject", 100, [1.0, 2.0, 4.0])
    b = CaseResult("b", "baseline", 100, [1.0, 1.0, 2.0])
    c = CaseResult("c", "baseline", 100, [3.0, 3.0, 3.0])
    g = GroupResult("k", "t", "bytes", ("c", "b"), [a, b, c],
                    [Target("a", None, 1.5, "a vs fastest", kind="time"),
                     Target("a", "c", 500, "a - c", kind="extra_ms")], {})
    assert g.primary == "b" and g.primary_of == ("c", "b")
    assert g.ratio_stats("a", kind="time") == (1.0, 2.0, 2.0)
    t_time, t_ms = g.target_rows()
    assert (t_time["ratio"], t_time["met"]) == (2.0, False)
    assert (t_ms["min"], t_ms["ratio"], t_ms["max"], t_ms["met"]) == (-2000, -1000, 1000, True)


def test_deadline_gives_fewer_rounds_never_under_three():
    import time as _time
    from xlegacy.bench.engine import Case, Group, run_group
    g = Group("k", "t", "bytes", [Case("s", lambda: _time.sleep(0.002), 1)], "s")
    r = run_group(g, repeat=10, warmup=0, deadline=_time.perf_counter())
    assert len(r.cases[0].times) == 3
    r = run_group(g, repeat=4, warmup=0, deadline=_time.perf_counter() + 60)
    assert len(r.cases[0].times) == 4


def test_xen_tree_absent_says_so(tmp_path, capsys):
    rc = main(["bench", "--size", "4M", "--repeat", "1", "--only", "delta-empty",
               "--xen", str(tmp_path / "no-xen")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Xen's decoder: not measured:" in out and "xc_compression.c not found" in out
    rc = main(["bench", "--size", "4M", "--repeat", "1", "--only", "delta-empty"])
    assert "Xen's decoder: not measured: no Xen tree given" in capsys.readouterr().out


# A stand-in for Xen's file, written for this test: the same entry point,
# EMPTY and FULL pages only (what the data sets below use).
FAKE_XC_COMPRESSION = r"""
#include "xc_private.h"
int xc_compression_uncompress_page(xc_interface *xch, char *compbuf,
                                   unsigned long compbuf_size,
                                   unsigned long *compbuf_pos, char *destpage)
{
    unsigned long pos = *compbuf_pos;
    (void)xch;
    if (pos >= compbuf_size)
        return -1;
    if (compbuf[pos] == 0) {
        *compbuf_pos = pos + 1;
        return 0;
    }
    if ((unsigned char)compbuf[pos] != 0x80 || pos + 1 + XC_PAGE_SIZE > compbuf_size)
        return -1;
    memcpy(destpage, compbuf + pos + 1, XC_PAGE_SIZE);
    *compbuf_pos = pos + 1 + XC_PAGE_SIZE;
    return 0;
}
"""


def test_xen_decoder_built_from_a_tree(tmp_path, capsys):
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / "xen" / "tools" / "libxc"
    src.mkdir(parents=True)
    (src / "xc_compression.c").write_text(FAKE_XC_COMPRESSION)
    rc = main(["bench", "--size", "4M", "--repeat", "1", "--json", "--only", "delta-full",
               "--xen", str(tmp_path / "xen")])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in d["groups"][0]["cases"]]
    assert "Xen's decoder (Xen's flags: -O2 -fomit-frame-pointer)" in names
    assert "Xen's decoder (-O3 -march=native)" in names
    reports = [t for t in d["targets"] if t["kind"] == "report"]
    assert len(reports) == 2 and all(t["ratio"] > 0 for t in reports)


def test_whole_process_groups(capsys):
    """Start-up, restore and convert as processes, beside python -c pass,
    cp and cp + sync; their targets, and the Remus peak-RSS bound."""
    rc = main(["bench", "--size", "4M", "--repeat", "1", "--json",
               "--only", "startup,process-restore,process-remus,memory"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert [g["key"] for g in d["groups"]] == ["startup", "process-restore", "process-remus"]
    kinds = [(t["group"], t["kind"]) for t in d["targets"]]
    assert kinds == [("startup", "extra_ms")] * 2 + [("process-restore", "time")] * 2 + \
        [("process-remus", "time")] * 3
    assert all(t["met"] in (True, False) for t in d["targets"])
    assert any(m["mode"] == "remus-memory" and m["limit"] == 160 << 20 for m in d["memory"])


def test_delta_cases_start_with_cold_caches(monkeypatch):
    """Every case of a decoder group evicts the caches first (untimed), so
    no decoder finds the lines the one before it left."""
    from xlegacy.bench import groups
    calls = []
    monkeypatch.setattr(groups, "evict_caches", lambda: calls.append(1))
    g = groups.delta_group("scattered-1", 16, detail=False)
    try:
        for c in g.cases:
            before = len(calls)
            c.setup()
            assert len(calls) == before + 1, c.name
    finally:
        g.close()


def test_time_targets_are_stated_as_time(capsys):
    """A target phrased "time <= 1.10x cp" is judged and printed as a time
    ratio, not as the inverse GB/s ratio."""
    rc = main(["bench", "--size", "4M", "--repeat", "1", "--json", "--only", "restore-file"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["targets"]
    assert [(r["kind"], r["need"]) for r in rows] == [("time", 1.10), ("time", 1.10)]


def test_default_dir_in_memory_only_when_memory_is_free(monkeypatch):
    """Outputs go to /dev/shm only when free memory (not only the tmpfs
    limit) holds them."""
    from xlegacy.cli import bench as cli_bench
    monkeypatch.setattr(cli_bench, "_mem_available", lambda: 1 << 40)
    assert cli_bench._default_parent(1 << 20) in (cli_bench.MEMORY_FS, None)
    monkeypatch.setattr(cli_bench, "_mem_available", lambda: 1 << 20)
    assert cli_bench._default_parent(1 << 20) is None


def test_convert_is_timed_without_fsync_beside_plain_cp(tmp_path):
    """cp syncs nothing: the convert case it is compared with runs with
    --no-sync (on ext4 the fsync alone costs about a cp of the stream)."""
    from xlegacy.bench import process
    stream = tmp_path / "s"
    stream.write_bytes(b"\0" * 4096)
    info = {"stream_bytes": 4096, "image_bytes": 4096, "compressed": False, "checkpoints": 1}
    g = process.restore_process_group(str(stream), str(tmp_path), info)
    assert "--no-sync" in process.CONVERT_CASE
    assert process.CONVERT_CASE in [c.name for c in g.cases]
    assert [t.baseline for t in g.targets if t.subject == process.CONVERT_CASE] == ["cp (process)"]
    # the default, as a user runs it, is timed too (its ratio: to cp + sync)
    assert process.CONVERT_SYNC_CASE in [c.name for c in g.cases]
    assert g.primary == "cp + sync of the copy (processes)"


def test_processes_are_timed_with_byte_code(tmp_path):
    """The process groups write the package's byte-code first, as an
    install does, so that no timed process compiles a module."""
    import importlib.util
    import os

    import xlegacy.converter
    from xlegacy.bench import process
    pyc = importlib.util.cache_from_source(xlegacy.converter.__file__)
    if os.path.exists(pyc):
        os.unlink(pyc)
    process.compile_package()
    assert os.path.exists(pyc)
