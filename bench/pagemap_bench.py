"""Page index (xlegacy.pagemap) benchmarks, each beside a same-run baseline.

    python bench/pagemap_bench.py                     # 1 GiB stream, 5 rounds
    python bench/pagemap_bench.py --size 256M --rounds 3 --vol-size 64M

1. index: `xlegacy index STREAM` (a whole process) against `cp STREAM COPY`
   of the same, warm file, in alternating pairs; also the build alone
   (in-process) and a process that only imports xlegacy.pagemap (start-up
   baseline); peak RSS of each process (wait4's ru_maxrss).
2. reads: PageMap.read_many over 1M random present pfns, 1024 a call (warm
   page cache, pages already mapped) against a numpy gather of the same
   pages from the restored raw image (np.take on its mmap) and a 64 MiB
   memcpy (np.copyto) as pages/s; the same pfns sorted; and a Python loop
   of page() (a zero-copy view each).
3. vol: one `banners.Banners` run (it reads every physical page) with
   `vol -p $(xlegacy vol-path) -f STREAM` against `vol -f RESTORED.raw`
   (Volatility's FileLayer), whole processes, alternating.

Every figure is the median of the rounds; ratios are of medians taken in
the same run.  `uptime`'s load average is printed with the results.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from xlegacy.bench.inputs import write_hvm_stream
from xlegacy.pagemap import open_pagemap
from xlegacy.volatility import plugin_dir

PAGE = 4096


def size_arg(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def load():
    return os.getloadavg()


# A Python process that runs `xlegacy ARGS` (or only imports, with no
# ARGS) and reports its peak RSS: VmHWM of its own address space.  (wait4's
# ru_maxrss would not do: Linux carries the forking parent's high-water mark
# over exec into the child's.)
HWM = """import sys
if sys.argv[1:]:
    from xlegacy.cli import main
    rc = main(sys.argv[1:])
else:
    import xlegacy.pagemap
    rc = 0
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print('HWM', int(hwm) * 1024, file=sys.stderr)
sys.exit(rc)
"""


def timed_process(argv):
    """(wall seconds, peak RSS bytes or None) of a whole process."""
    t = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{argv} failed: {p.stderr.decode(errors='replace')[-300:]}")
    hwm = [int(x.split()[1]) for x in p.stderr.decode().splitlines() if x.startswith("HWM ")]
    return wall, (hwm[-1] if hwm else None)


def warm(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def make(path, size):
    if not os.path.exists(path) or os.path.getsize(path) < size:
        print(f"writing a {size >> 20} MiB stream to {path} ...", file=sys.stderr)
        write_hvm_stream(path, size)
    return path


def restored(stream):
    raw = stream + ".raw"
    if not os.path.exists(raw):
        subprocess.run([sys.executable, "-m", "xlegacy", "restore", stream, "-o", raw, "-q",
                        "--no-sync"], check=True)
    return raw


def index_group(stream, rounds):
    size = os.path.getsize(stream)
    copy = stream + ".copy"
    idx = stream + ".bench.xlidx"
    xl = [sys.executable, "-c", HWM]
    warm(stream)
    cp_t, ix_t, ix_rss, base_t, base_rss, build = [], [], [], [], [], []
    for _ in range(rounds):
        t, _ = timed_process(["cp", stream, copy])
        cp_t.append(t)
        os.unlink(copy)
        t, r = timed_process(xl + ["index", stream, "-o", idx])
        ix_t.append(t)
        ix_rss.append(r)
        t, r = timed_process([sys.executable, "-c", HWM])
        base_t.append(t)
        base_rss.append(r)
        t = time.perf_counter()
        pm = open_pagemap(stream, index=False)
        build.append(time.perf_counter() - t)
        pm.close()
    os.unlink(idx)
    m = statistics.median
    return {
        "stream_bytes": size, "rounds": rounds,
        "cp_s": m(cp_t), "index_process_s": m(ix_t), "import_only_process_s": m(base_t),
        "build_in_process_s": m(build),
        "index_process_over_cp": m(ix_t) / m(cp_t),
        "index_minus_startup_over_cp": (m(ix_t) - m(base_t)) / m(cp_t),
        "build_in_process_over_cp": m(build) / m(cp_t),
        "index_peak_rss": m(ix_rss), "import_only_peak_rss": m(base_rss),
        "index_rss_over_stream": m(ix_rss) / size,
        "index_rss_minus_import_over_stream": (m(ix_rss) - m(base_rss)) / size,
    }


def reads_group(stream, rounds, n=1 << 20, batch=1 << 10):
    pm = open_pagemap(stream)
    raw = np.memmap(restored(stream), np.uint8, mode="r").reshape(-1, PAGE)
    rng = np.random.default_rng(5)
    want = pm.pfns[rng.integers(0, len(pm), n)]
    out = np.empty((batch, PAGE), np.uint8)
    out2 = np.empty((batch, PAGE), np.uint8)
    idx = want.astype(np.intp)

    def ours():
        for i in range(0, n, batch):
            pm.read_many(want[i:i + batch], out=out)

    def numpy_gather():
        for i in range(0, n, batch):
            np.take(raw, idx[i:i + batch], axis=0, out=out2)

    loop_n = 1 << 17
    ordered = np.sort(want)
    src = np.ones(64 << 20, np.uint8)
    dst = np.empty_like(src)

    def ours_sorted():
        for i in range(0, n, batch):
            pm.read_many(ordered[i:i + batch], out=out)

    def memcpy():
        np.copyto(dst, src)

    def page_loop():
        page = pm.page
        for p in want[:loop_n].tolist():
            page(p)

    ours()
    numpy_gather()          # both mappings populated, the file in the page cache
    assert np.array_equal(out, out2)        # the same pages, the last batch of each
    cases = (ours, numpy_gather, page_loop, ours_sorted, memcpy)
    a, b, c, d, e = times = [[] for _ in cases]
    for _ in range(rounds):             # every case once a round, in this order
        for case, spent in zip(cases, times):
            t = time.perf_counter()
            case()
            spent.append(time.perf_counter() - t)
    m = statistics.median
    memcpy_pages = (64 << 20) // PAGE / m(e)
    return {"pages": n, "batch": batch, "rounds": rounds,
            "read_many_pages_per_s": n / m(a), "numpy_take_raw_pages_per_s": n / m(b),
            "read_many_over_numpy_take": m(b) / m(a),
            "read_many_sorted_pfns_pages_per_s": n / m(d),
            "memcpy_64MiB_pages_per_s": memcpy_pages,
            "read_many_over_memcpy": n / m(a) / memcpy_pages,
            "page_loop_pages_per_s": loop_n / m(c)}


def vol_group(stream, rounds, plugin="banners.Banners"):
    vol = os.path.join(os.path.dirname(sys.executable), "vol")
    raw = restored(stream)
    warm(stream)
    warm(raw)
    ours = [vol, "-q", "-p", plugin_dir(), "-f", stream, plugin]
    theirs = [vol, "-q", "-f", raw, plugin]
    subprocess.run([sys.executable, "-m", "xlegacy", "index", stream], check=True,
                   stdout=subprocess.DEVNULL)
    a, b = [], []
    for _ in range(rounds):
        a.append(timed_process(ours)[0])
        b.append(timed_process(theirs)[0])
    m = statistics.median
    return {"plugin": plugin, "stream_bytes": os.path.getsize(stream), "rounds": rounds,
            "vol_on_save_s": m(a), "vol_on_restored_raw_s": m(b),
            "save_over_raw": m(a) / m(b), "runs_save": a, "runs_raw": b}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_arg, default=1 << 30)
    ap.add_argument("--vol-size", type=size_arg, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp/xlegacy-pagemap-bench")
    ap.add_argument("--only", choices=("index", "reads", "vol"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    big = make(os.path.join(args.dir, f"hvm-{args.size >> 20}M.save"), args.size)
    out = {"load_before": load()}
    if args.only in (None, "index"):
        out["index"] = index_group(big, args.rounds)
    if args.only in (None, "reads"):
        out["reads"] = reads_group(big, args.rounds)
    if args.only in (None, "vol"):
        small = make(os.path.join(args.dir, f"hvm-{args.vol_size >> 20}M.save"), args.vol_size)
        out["vol"] = vol_group(small, args.rounds)
    out["load_after"] = load()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
