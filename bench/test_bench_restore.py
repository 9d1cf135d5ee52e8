"""Whole-stream groups: restore of an uncompressed HVM stream in memory and
to a raw file, a whole compressed Remus restore (11 checkpoints) with 1 and 2
threads, optionally the cost per byte at 4x the size, and the peak RSS of
restores in child processes (from a pipe to a file; in memory)."""
import pytest
from conftest import run_case
from datasets import RESTORE_KEYS, case_names

from xlegacy import bench as B


@pytest.mark.parametrize("key,name", case_names(RESTORE_KEYS))
def test_restore(benchmark, bench_data, key, name):
    run_case(benchmark, bench_data, key, name)


@pytest.mark.parametrize("mode", ["pipe-to-file", "memory"])
def test_peak_rss(benchmark, bench_data, mode):
    """Peak RSS of one restore in a child process (recorded, not asserted:
    the summary says whether the bound is met)."""
    bench_data.release()
    path = B.StreamFiles(bench_data.workdir).get("hvm", bench_data.size)
    out = {}

    def once():
        out.update(B.memory_row(path, bench_data.workdir, mode))

    benchmark.group = f"memory: peak RSS of a restore in a child process ({mode})"
    benchmark.pedantic(once, rounds=1, iterations=1)
    bench_data.memory.append(out)
    benchmark.extra_info.update({k: v for k, v in out.items() if k != "text"})
