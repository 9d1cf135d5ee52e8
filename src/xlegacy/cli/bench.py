"""`xlegacy bench`: its options and the run that measures the planned groups
and prints the report.  The measurement code (xlegacy.bench) is imported
only when the command runs."""
import gc
import json
import os
import shutil
import sys
import tempfile
import time

from ..bench.units import DEFAULT_SIZE, MAX_KERNEL_BYTES, QUICK_SIZE, fmt_bytes, parse_size

# Groups not in the default run (kept here: the help names them without
# loading the measurement code).
IN_PROCESS_KEYS = ("restore-memory", "restore-file", "restore-remus", "restore-linear",
                   "convert", "convert-remus")
DEFAULT_RUN_SECONDS = 90      # the default run on a loaded 2-vCPU machine, at most
DEFAULT_REPEAT = 5

DESCRIPTION = """\
Measure xlegacy beside its baselines and print a table per group: GB/s
(median of the rounds), the ratio to the group's primary baseline as
median, min and max over the rounds (every round runs each case once, in
rotating order, so a round's subject and baseline ran side by side), the
min/median/max time, and the 1-minute load average before and after.

Without STREAM the inputs are generated: PFN arrays, page batches, Remus
compressed buffers of six kinds, and streams written by xlegacy's writer (an
xl save of an HVM guest with --size bytes of memory, and a compressed Remus
stream of the same guest with 10 more checkpoints).  With STREAM the kernels
run on that stream's own PFN arrays and largest compressed checkpoint, and
the whole-stream groups restore it.

Baselines, where they apply: the faster of a C memcpy (the C library's, as
the kernels call it) and a numpy copy of the same bytes into warm memory; a
numpy copy into fresh memory; reading the stream file; cp of the stream and
cp + sync of the copy, as processes; python -c pass; the reference (numpy)
twin; the best plain-numpy version of PFN decoding and page scatter; with
--xen, Xen's own decoder.  The whole-process groups time the xlegacy command
from start to exit.  Peak RSS of restores is measured in child processes.
--check compares the run with the performance targets and says which are
met."""

EPILOG = """\
examples:
  xlegacy bench                       # at most 90 s on a loaded 2-vCPU machine
  xlegacy bench --size 1G --repeat 9  # the figures of bench/README.md
  xlegacy bench --quick               # small inputs: seconds
  xlegacy bench --xen ~/src/xen-4.5   # beside Xen's own Remus decoder
  xlegacy bench --check --dir /tmp    # targets met? (outputs on /tmp's file system)
  xlegacy bench guest.save --json     # your own stream, machine-readable
  xlegacy bench --only delta,pfn      # some groups (see --list)"""


def configure(parser):
    parser.add_argument("stream", nargs="?",
                        help="measure on this legacy stream (a path) instead of generated inputs")
    parser.add_argument("--size", default=None,
                        help=f"guest memory of the generated streams, e.g. 256M, 1G "
                             f"(default {fmt_bytes(DEFAULT_SIZE)}; kernel inputs are a quarter "
                             f"of it, at most {fmt_bytes(MAX_KERNEL_BYTES)})")
    parser.add_argument("--repeat", type=int, default=None,
                        help=f"timed rounds per group (default {DEFAULT_REPEAT}; the default run "
                             f"runs fewer, at least 3, where its {DEFAULT_RUN_SECONDS} s "
                             f"budget runs short)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small inputs ({fmt_bytes(QUICK_SIZE)}): seconds")
    parser.add_argument("--only", default=None, metavar="GROUPS",
                        help="comma-separated group keys or prefixes (see --list)")
    parser.add_argument("--skip", default=None, metavar="GROUPS",
                        help="comma-separated group keys or prefixes to leave out")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--all", action="store_true",
                        help="also the in-process whole-stream groups: library calls without "
                             "the interpreter's start-up (" + ", ".join(IN_PROCESS_KEYS[:-1])
                             + "); --only selects any group")
    parser.add_argument("--linear", action="store_true",
                        help="also restore a 4x --size stream (cost per byte; needs the space)")
    parser.add_argument("--dir", default=None,
                        help="where generated streams and outputs go, i.e. the file system "
                             "measured (default: a new temporary directory, removed afterwards, "
                             "in /dev/shm when it has room, else in the system's temporary "
                             "directory; a given one keeps the streams for the next run)")
    parser.add_argument("--no-prime", action="store_true",
                        help="do not pre-touch fresh memory before timed runs")
    parser.add_argument("--xen", default=None, metavar="PATH",
                        help="also time Xen's own Remus decoder: PATH is a Xen 4.1-4.6 source "
                             "tree (or its tools/libxc/xc_compression.c), compiled here at "
                             "bench time with Xen's flags and with -O3 -march=native")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a performance target is not met (the report says which)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


MEMORY_FS = "/dev/shm"


def _default_parent(size):
    """Where the default run's streams and outputs go: a memory file system
    (tmpfs) when there is one with room for them, as in the performance
    targets' own measurements, else the system's temporary directory.  The
    file system is named in each group's title; --dir measures another."""
    try:
        st = os.statvfs(MEMORY_FS)
    except OSError:
        return None
    need = 6 * size + (256 << 20)      # two streams (Remus ~1.3x), outputs, slack
    # tmpfs lives in memory: its size limit says nothing of what is free.
    return MEMORY_FS if min(st.f_bavail * st.f_frsize, _mem_available()) >= need else None


def _mem_available():
    """MemAvailable of /proc/meminfo in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run(args):
    from ..bench.engine import PRIME, _loadavg, run_group
    from ..bench.groups import GROUP_KEYS, plan, weight
    from ..bench.machine import core_check, machine_info
    from ..bench.report import format_memory, format_report, thread_speedups
    from ..bench import xen as xen_build
    if args.list:
        print("\n".join(GROUP_KEYS))
        return 0
    size = parse_size(args.size) if args.size else (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    repeat = args.repeat or DEFAULT_REPEAT
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    skip = [o.strip() for o in args.skip.split(",") if o.strip()] if args.skip else None
    default_run = not (args.size or args.repeat or args.quick or args.only or args.skip
                       or args.linear or args.all or args.stream)
    if args.linear and only:
        only.append("restore-linear")
    elif not args.linear:
        skip = (skip or []) + ["restore-linear"]
    if not (args.all or only or args.stream):
        skip = (skip or []) + [k for k in IN_PROCESS_KEYS if k != "restore-linear"]
    quiet = args.quiet or args.json
    log = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    PRIME["on"] = not args.no_prime
    own_dir = args.dir is None
    workdir = tempfile.mkdtemp(prefix="xlegacy-bench-", dir=_default_parent(size)) \
        if own_dir else args.dir
    os.makedirs(workdir, exist_ok=True)
    results, extras, memory = [], [], []
    t_start = time.perf_counter()
    load_before = _loadavg()
    cores_before = core_check()
    xen = None
    if any(k.startswith("delta") for k, _ in plan(size, args.stream, workdir, only, skip)):
        xen, line = xen_build.load(args.xen, log)
        extras += ["", line]
    steps = plan(size, args.stream, workdir, only, skip, log, xen,
                 detail=bool(args.all or only or args.stream))
    # The default run keeps to its time budget by running fewer rounds (at
    # least 3) where the machine is slow: each group gets a share of what
    # is left by its weight.  Memory rows and the report need the rest.
    deadline = t_start + DEFAULT_RUN_SECONDS - 8 if default_run else None
    try:
        for i, (key, build) in enumerate(steps):
            group_deadline = None
            if deadline is not None:
                left = sum(weight(k) for k, _ in steps[i:])
                now = time.perf_counter()
                group_deadline = now + (deadline - now) * weight(key) / left
            if key == "memory":
                if log:
                    log("memory: peak RSS of restores in child processes")
                memory += build()
                continue
            if log:
                log(f"{key}: preparing")
            group = build()
            if group is None:
                continue
            try:
                if log:
                    log(f"{key}: {len(group.cases)} cases x {repeat} rounds")
                results.append(run_group(group, repeat=repeat, warmup=group.warmup,
                                         deadline=group_deadline))
            finally:
                if group.close:
                    group.close()
                del group
                gc.collect()
    finally:
        if xen is not None:
            xen.close()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info(workdir)
    machine.update(size=size, repeat=repeat, seconds=round(time.perf_counter() - t_start, 1),
                   load_before=load_before, load_after=_loadavg(),
                   core_check_before=cores_before, core_check_after=core_check())
    if memory:
        extras += format_memory(memory)
    rows = [r for g in results for r in g.target_rows()]
    if default_run:
        # The run itself: the default must stay short on a loaded machine.
        sec = machine["seconds"]
        rows.append({"group": "bench", "target": f"xlegacy bench, default run: <= "
                     f"{DEFAULT_RUN_SECONDS} s", "kind": "seconds", "need": DEFAULT_RUN_SECONDS,
                     "ratio": sec, "min": sec, "max": sec,
                     "load": (load_before, machine["load_after"]),
                     "met": sec <= DEFAULT_RUN_SECONDS})
    if args.json:
        json.dump({"machine": machine, "groups": [g.as_dict() for g in results],
                   "thread_speedups": [{"group": k, "case": n, "speedup": round(x, 3)}
                                       for k, n, x in thread_speedups(results)],
                   "targets": rows,
                   "memory": memory}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(results, machine, extras, rows))
    failed = any(r["met"] is False for r in rows) or any(not d["met"] for d in memory)
    return 1 if args.check and failed else 0
