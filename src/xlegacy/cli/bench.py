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

DESCRIPTION = """\
Measure xlegacy beside its baselines and print a table: GB/s (median of the
rounds), the ratio to the group's primary baseline, and min/median/max time.

Without STREAM the inputs are generated: PFN arrays, page batches, Remus
compressed buffers of six kinds, and streams written by xlegacy's writer (an
xl save of an HVM guest with --size bytes of memory, and a compressed Remus
stream of the same guest with 10 more checkpoints).  With STREAM the kernels
run on that stream's own PFN arrays and largest compressed checkpoint, and
the whole-stream groups restore it.

Baselines, where they apply: numpy copies of the same bytes (into warm and
into fresh memory), reading the stream file, cp of the stream (and cp +
fsync), the reference (numpy) twin, and the best plain-numpy version of PFN
decoding and page scatter.  Peak RSS of a restore from a pipe and of an in-memory restore is
measured in child processes."""

EPILOG = """\
examples:
  xlegacy bench                       # about a minute; generated inputs
  xlegacy bench --size 1G --repeat 7  # the figures of bench/README.md
  xlegacy bench --quick               # seconds
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
                        help="timed rounds per group (default 5; --quick: 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small inputs ({fmt_bytes(QUICK_SIZE)}) and 3 rounds: seconds")
    parser.add_argument("--only", default=None, metavar="GROUPS",
                        help="comma-separated group keys or prefixes (see --list)")
    parser.add_argument("--skip", default=None, metavar="GROUPS",
                        help="comma-separated group keys or prefixes to leave out")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--linear", action="store_true",
                        help="also restore a 4x --size stream (cost per byte; needs the space)")
    parser.add_argument("--dir", default=None,
                        help="where generated streams and outputs go (default: a new temporary "
                             "directory, removed afterwards; a given one keeps the streams "
                             "for the next run)")
    parser.add_argument("--no-prime", action="store_true",
                        help="do not pre-touch fresh memory before timed runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a performance target is not met (the report says which)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def run(args):
    from ..bench.engine import PRIME, _loadavg, run_group
    from ..bench.groups import GROUP_KEYS, plan
    from ..bench.machine import core_check, machine_info
    from ..bench.report import format_memory, format_report, thread_speedups
    if args.list:
        print("\n".join(GROUP_KEYS))
        return 0
    size = parse_size(args.size) if args.size else (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    repeat = args.repeat or (3 if args.quick else 5)
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    skip = [o.strip() for o in args.skip.split(",") if o.strip()] if args.skip else None
    if args.linear and only:
        only.append("restore-linear")
    elif not args.linear:
        skip = (skip or []) + ["restore-linear"]
    quiet = args.quiet or args.json
    log = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    PRIME["on"] = not args.no_prime
    own_dir = args.dir is None
    workdir = tempfile.mkdtemp(prefix="xlegacy-bench-") if own_dir else args.dir
    os.makedirs(workdir, exist_ok=True)
    results, extras, memory = [], [], []
    t_start = time.perf_counter()
    load_before = _loadavg()
    cores_before = core_check()
    try:
        for key, build in plan(size, args.stream, workdir, only, skip, log):
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
                results.append(run_group(group, repeat=repeat, warmup=1))
            finally:
                if group.close:
                    group.close()
                del group
                gc.collect()
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info(workdir)
    machine.update(size=size, repeat=repeat, seconds=round(time.perf_counter() - t_start, 1),
                   load_before=load_before, load_after=_loadavg(),
                   core_check_before=cores_before, core_check_after=core_check())
    if memory:
        extras += format_memory(memory)
    if args.json:
        json.dump({"machine": machine, "groups": [g.as_dict() for g in results],
                   "thread_speedups": [{"group": k, "case": n, "speedup": round(x, 3)}
                                       for k, n, x in thread_speedups(results)],
                   "targets": [r for g in results for r in g.target_rows()],
                   "memory": memory}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(results, machine, extras))
    failed = any(r["met"] is False for g in results for r in g.target_rows()) or \
        any(not d["met"] for d in memory)
    return 1 if args.check and failed else 0
