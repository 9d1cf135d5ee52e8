"""Whole-process groups: the commands a user runs, each timed from start to
exit as a child process, beside the same machine's baselines run the same
way (`python -c pass`, `cp`, `cp` + `sync` of the copy).  Interpreter
start-up, imports and the final fsync are all inside the figures."""
import os
import subprocess
import sys

from .engine import Case, Group, Target, _chain, _fs_type, _unlinker, prime_memory
from .units import MiB, fmt_bytes

STARTUP_STREAM = MiB                  # `xlegacy info` of a stream of this size
STARTUP_EXTRA_MS = 60                 # over `python -c pass`
COPY_ONCE = 1.15                      # uncompressed restore to a file / cp + sync
CONVERT_COPY = 1.10                   # uncompressed convert / cp
REMUS_FILE, REMUS_MEMORY, REMUS_CONVERT = 1.3, 1.2, 1.4


def compile_package():
    """Write the package's byte-code (as installing it does) before timing
    processes: an editable checkout run with PYTHONDONTWRITEBYTECODE=1 has
    none, and each process would compile every module it imports again
    (30-60 ms, half the start-up target)."""
    import compileall
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        compileall.compile_dir(root, quiet=2, workers=1)
    except OSError:       # pragma: no cover - a read-only install has its byte-code
        pass


def xlegacy_command():
    """argv prefix of the installed `xlegacy` command: the console script
    beside this interpreter when there is one, else `python -m xlegacy`."""
    script = os.path.join(os.path.dirname(sys.executable), "xlegacy")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "xlegacy"]


def run_process(argv):
    """Run a command to its end; its output is discarded, a failure raises
    with the end of its stderr."""
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): "
                           f"{r.stderr.decode(errors='replace').strip()[-400:]}")


def _cases_to_file(name, argv, out, nbytes, role="baseline", prime=0):
    unlink = _unlinker(out)
    return Case(name, lambda: run_process(argv), nbytes, role=role,
                setup=_chain(unlink, lambda: prime_memory(prime)), cleanup=unlink)


def cp_sync_case(path, out, nbytes, name="cp + sync of the copy (processes)"):
    """`cp STREAM OUT && sync OUT`: the copy made durable, as restore does."""
    unlink = _unlinker(out)

    def run():
        run_process(["cp", path, out])
        run_process(["sync", out])

    return Case(name, run, nbytes, setup=_chain(unlink, lambda: prime_memory(nbytes)),
                cleanup=unlink)


def startup_group(files):
    """`xlegacy --version` and `xlegacy info` of a small stream beside
    `python -c pass`: what the interpreter and the imports cost."""
    small = files.get("hvm", STARTUP_STREAM)
    compile_package()
    xl = xlegacy_command()
    cases = [Case("python -c pass", lambda: run_process([sys.executable, "-c", "pass"]), 1),
             Case("xlegacy --version", lambda: run_process(xl + ["--version"]), 1,
                  role="subject"),
             Case(f"xlegacy info of a {fmt_bytes(os.path.getsize(small))} stream",
                  lambda: run_process(xl + ["info", small]), 1, role="subject")]
    targets = [Target(c.name, "python -c pass", STARTUP_EXTRA_MS,
                      f"start-up: {c.name}: <= +{STARTUP_EXTRA_MS} ms over python -c pass",
                      kind="extra_ms") for c in cases[1:]]
    return Group("startup", "start-up: whole processes (ratio: runs per second)",
                 "process runs", cases, "python -c pass", targets,
                 {"command": " ".join(xl)}, warmup=1)


# convert's target is against plain cp, which makes nothing durable: convert
# runs with --no-sync (as Xen's script, which never fsyncs).  With its
# default fsync before the rename it would be timed against cp + the disk:
# on ext4 the fsync of a 1 GiB stream alone is about the time of cp.  The
# default (fsync) is timed too, as a user runs it: its ratio column is to
# cp + sync, the group's primary baseline.
CONVERT_CASE = "xlegacy convert --no-sync -i STREAM -o OUT"
CONVERT_SYNC_CASE = "xlegacy convert -i STREAM -o OUT (fsync, the default)"


def restore_process_group(path, workdir, info, key="process-restore"):
    """`xlegacy restore STREAM -o OUT` (fsync before rename, the default)
    beside `cp` + `sync` of the stream and plain `cp`; for a compressed Remus
    stream also the in-memory restore and, for both, `xlegacy convert
    --no-sync` (beside cp: see CONVERT_CASE) and with its default fsync."""
    from .engine import warm_page_cache
    n = info["stream_bytes"]
    image = info["image_bytes"]
    fs = _fs_type(workdir)
    remus = info["compressed"]
    warm_page_cache(path)
    compile_package()
    xl = xlegacy_command()
    out = os.path.join(workdir, "process-bench.out")
    cases = [_cases_to_file("xlegacy restore STREAM -o OUT", xl + ["restore", path, "-o", out,
                                                                  "-q"],
                            out, n, role="subject", prime=n),
             cp_sync_case(path, out, n),
             _cases_to_file("cp (process)", ["cp", path, out], out, n, prime=n),
             _cases_to_file(CONVERT_CASE,
                            xl + ["convert", "--no-sync", "-i", path, "-o", out], out, n,
                            role="subject", prime=n),
             _cases_to_file(CONVERT_SYNC_CASE, xl + ["convert", "-i", path, "-o", out], out, n,
                            role="subject", prime=n)]
    what = (f"{fmt_bytes(n)} {'compressed Remus ' if remus else ''}stream "
            f"({fmt_bytes(image)} guest), on {fs}")
    if remus:
        code = "import sys, xlegacy; xlegacy.restore(sys.argv[1])"
        cases.insert(1, Case("python: xlegacy.restore(STREAM) in memory",
                             lambda: run_process([sys.executable, "-c", code, path]), n,
                             role="subject", setup=lambda: prime_memory(image + 64 * MiB)))
        targets = [
            Target("xlegacy restore STREAM -o OUT", "cp + sync of the copy (processes)",
                   REMUS_FILE, f"Remus restore to a file: time <= {REMUS_FILE}x cp + sync "
                   f"({what})", kind="time"),
            Target("python: xlegacy.restore(STREAM) in memory", "cp (process)", REMUS_MEMORY,
                   f"Remus restore in memory: time <= {REMUS_MEMORY}x cp ({what})",
                   kind="time"),
            Target(CONVERT_CASE, "cp (process)", REMUS_CONVERT,
                   f"Remus convert: time <= {REMUS_CONVERT}x cp ({what})", kind="time")]
        title = f"whole processes, compressed Remus: {what}, {info['checkpoints']} checkpoints"
    else:
        targets = [
            Target("xlegacy restore STREAM -o OUT", "cp + sync of the copy (processes)",
                   COPY_ONCE, f"restore to a file: time <= {COPY_ONCE}x cp + sync ({what})",
                   kind="time"),
            Target(CONVERT_CASE, "cp (process)", CONVERT_COPY,
                   f"convert: time <= {CONVERT_COPY}x cp ({what})", kind="time")]
        title = f"whole processes: {what}"
    # No untimed round: the stream is in the page cache already, and each
    # case writes its output anew; a warm-up would cost a third more time.
    return Group(key, title, "stream bytes", cases, "cp + sync of the copy (processes)",
                 targets, dict(info, fs=fs, command=" ".join(xl)), warmup=0)
