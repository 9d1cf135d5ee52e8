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
    the summary says whether the issue's bound is met)."""
    bench_data.release()
    path = bench_data.builders and B.StreamFiles(bench_data.workdir).get("hvm", bench_data.size)
    out = {}

    def once():
        out.update(B.peak_rss(path, bench_data.workdir, mode))

    benchmark.group = f"memory: peak RSS of a restore in a child process ({mode})"
    benchmark.pedantic(once, rounds=1, iterations=1)
    limit = 128 * B.MiB
    row = dict(out, stream_bytes=B.os.path.getsize(path), limit=limit, met=out["over_image"] <= limit,
               text="restore from a pipe to a file: peak RSS < 128 MiB" if mode == "pipe-to-file"
               else "in-memory restore: peak RSS <= image + 128 MiB")
    bench_data.memory.append(row)
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "text"})
