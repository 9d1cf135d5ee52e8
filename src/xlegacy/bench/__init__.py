"""Throughput of the kernels and of whole-stream operations, each measured
beside its baselines in the same run: the code behind `xlegacy bench` (whose
options live in xlegacy.cli.bench) and the pytest-benchmark suite in bench/,
so both measure exactly the same operations.

  units     sizes, parse_size, fmt_bytes (no numpy)
  engine    cases, groups, interleaved timing, shared baseline cases
  inputs    PFN arrays, Remus compressed buffers, synthetic guests and streams
  groups    one group per operation and input; plan() orders them
  process   whole processes: start-up, restore, convert beside cp and cp + sync
  memory    peak RSS of restores in child processes
  xen       Xen's own decoder, built at bench time from a given Xen tree
  machine   what the machine is, whether a second core is free
  report    the text tables

Vocabulary:
  group     one operation on one input: xlegacy's way of doing it (the
            subject cases, marked *) and baselines: numpy copies of the same
            bytes, reading or cp-ing the stream file, the reference twin, the
            best plain-numpy version;
  case      one timed callable of a group, with the number of bytes its
            throughput is counted on (the group's unit, e.g. guest page bytes);
  ratio     GB/s of a case / GB/s of the group's primary baseline; for cases
            over the same bytes that is baseline time / case time.

Cases of a group run interleaved (the order rotates every round) after one
untimed warm-up round, so noise from other work spreads over all of them;
the table gives medians with min and max.

The names of the modules are available here too (xlegacy.bench.plan, ...),
loaded on first use, so importing xlegacy.bench.units costs no numpy.
"""
import importlib

_EXPORTS = {
    "units": ("BATCH", "DEFAULT_SIZE", "GiB", "MAX_KERNEL_BYTES", "MiB", "QUICK_SIZE",
              "REF_REMUS_SIZE", "REF_STREAM_SIZE", "REMUS_CHECKPOINTS", "fmt_bytes",
              "parse_size"),
    "engine": ("Case", "CaseResult", "Group", "GroupResult", "Holder", "PRIME", "Target",
               "c_memcpy", "copy_cases", "evict_caches", "cp_case", "cp_fsync_case", "fastest", "memcpy_case",
               "prime_memory", "read_case",
               "read_file", "reference_kernels", "run_case_once", "run_group",
               "warm_page_cache"),
    "inputs": ("DELTA_KINDS", "StreamFiles", "SyntheticGuest", "WORDS", "delta_buffer",
               "delta_changes", "pfn_entries", "scan_stream", "write_hvm_stream",
               "write_remus_stream"),
    "groups": ("GROUP_KEYS", "convert_group", "delta_group", "linear_group",
               "numpy_decode_pfns", "pfn_group", "plan", "remus_group",
               "restore_file_group", "restore_memory_group", "scatter_group", "stream_plan"),
    "memory": ("MEMORY_BOUNDS", "REMUS_BOUNDS", "memory_row", "memory_rows", "peak_rss"),
    "machine": ("core_check", "machine_info"),
    "process": ("restore_process_group", "startup_group", "xlegacy_command"),
    "xen": ("XenDecoders", "XenUnavailable"),
    "report": ("format_group", "format_memory", "format_report", "format_target",
               "thread_speedups"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_HOME))
