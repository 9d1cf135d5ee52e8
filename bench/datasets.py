"""The inputs of the benchmark suite, bound to sizes from the environment.

The generators themselves live in xlegacy.bench, because `xlegacy bench`
(the installed command) needs the same inputs:

  pfn_entries(n, width, kind)   PFN arrays: "mixed" (ascending pfns, ~1% PV
                                page-table types, XTAB holes, a few XALLOC)
                                or "random" types
  scatter_group(npages, order)  page batches with sequential or shuffled pfns
  delta_buffer(kind, old)       one checkpoint's Remus compressed buffer for
                                each data set of DELTA_KINDS (1% / 10% of
                                32-bit words changed scattered, 1-3 changed
                                runs per page, 100% changed, all FULL_PAGE,
                                all EMPTY_PAGE), encoded by xlegacy.testing.compress,
                                with the image a decoder must produce
  write_hvm_stream / write_remus_stream
                                whole streams written by xlegacy.testing.writer from
                                a SyntheticGuest (no image held in memory)

This module picks the sizes and keeps one group's data alive at a time.

Environment:
  XLEGACY_BENCH_SIZE    guest memory of the generated streams (default 256M);
                        kernel inputs are a quarter of it, at most 256 MiB
  XLEGACY_BENCH_ROUNDS  timed rounds per case (default 5)
  XLEGACY_BENCH_DIR     keep generated streams here between runs (default: a
                        temporary directory of the session)
  XLEGACY_BENCH_LINEAR  1: also restore a stream 4x the size (cost per byte)
  XLEGACY_BENCH_PRIME   0: do not pre-touch fresh memory (see xlegacy.bench)
"""
import os
import tempfile

from xlegacy import bench as B

SIZE = B.parse_size(os.environ.get("XLEGACY_BENCH_SIZE", "256M"))
ROUNDS = int(os.environ.get("XLEGACY_BENCH_ROUNDS", "5"))
LINEAR = os.environ.get("XLEGACY_BENCH_LINEAR", "0") == "1"
B.PRIME["on"] = os.environ.get("XLEGACY_BENCH_PRIME", "1") != "0"

KERNEL_KEYS = ["pfn32", "pfn64", "scatter-seq", "scatter-ran"] + \
    [f"delta-{k}" for k in B.DELTA_KINDS]
RESTORE_KEYS = ["restore-memory", "restore-file", "restore-remus"] + \
    (["restore-linear"] if LINEAR else [])
CONVERT_KEYS = ["convert", "convert-remus"]

# Case names are read off groups built on tiny inputs (so test ids match
# what runs); that costs well under a second at collection time.
NAMES_SIZE = 4 * B.MiB


class BenchData:
    """Builds groups on demand from xlegacy.bench.plan(), one at a time: asking
    for another group closes the previous one and frees its data."""

    def __init__(self, size=SIZE, workdir=None, log=None):
        self.size = size
        self._tmp = None
        if workdir is None:
            workdir = os.environ.get("XLEGACY_BENCH_DIR")
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="xlegacy-bench-")
            workdir = self._tmp.name
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.builders = dict(B.plan(size, None, workdir, log=log))
        self.key = None
        self.current = None
        self.targets = {}        # group key -> [Target]
        self.titles = {}
        self.memory = []         # peak-RSS rows

    def group(self, key):
        if key != self.key:
            self.release()
            build = self.builders.get(key)
            self.current = build() if build else None
            self.key = key
            if self.current is not None:
                self.targets[key] = self.current.targets
                self.titles[key] = self.current.title
        return self.current

    def release(self):
        if self.current is not None and self.current.close:
            self.current.close()
        self.current = None
        self.key = None

    def close(self):
        self.release()
        if self._tmp is not None:
            self._tmp.cleanup()


_names = {}


def case_names(keys):
    """[(key, case name)] for parametrising tests, from groups on tiny inputs."""
    missing = [k for k in keys if k not in _names]
    if missing:
        data = BenchData(NAMES_SIZE)
        try:
            for k in missing:
                g = data.group(k)
                _names[k] = [c.name for c in g.cases] if g is not None else []
        finally:
            data.close()
    return [(k, n) for k in keys for n in _names[k]]
