"""Bounded resources on streams that repeat themselves (issue 14 items 2-4).

Memory is measured from outside: each command runs in a child process and
its peak RSS comes from wait4().  Bounds are checked by scaling: the same
stream with 4x the repeated body must not need more memory, up to a small
slack (what a per-entry list would need is many times that).
"""
import json
import os
import subprocess
import sys
import threading

import pytest

from support import bulk_streams as B

SANITIZED = bool(os.environ.get("XLEGACY_SANITIZE"))
pytestmark = pytest.mark.skipif(SANITIZED, reason="RSS is not meaningful under AddressSanitizer")
MiB = 1 << 20


def run_cli(args, stdin_path=None, pipe=False, limit_as=None):
    """Run `python -m xlegacy ARGS` in a child; returns (rc, stdout, peak RSS
    in bytes).  pipe=True feeds stdin_path through a real pipe."""
    def preexec():
        if limit_as:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    stdin = subprocess.PIPE if pipe else None
    proc = subprocess.Popen([sys.executable, "-m", "xlegacy"] + list(args), stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec if limit_as else None)
    feeder = None
    if pipe:
        def feed():
            try:
                with open(stdin_path, "rb") as f:
                    while True:
                        block = f.read(1 << 20)
                        if not block:
                            break
                        proc.stdin.write(block)
            except BrokenPipeError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    out = []
    err = []
    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read())),
               threading.Thread(target=lambda: err.append(proc.stderr.read()))]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    if feeder:
        feeder.join()
    return proc.returncode, out[0].decode(), err[0].decode(), usage.ru_maxrss * 1024


def _growth(tmp_path, body, n, args, pipe=False, **kw):
    """Peak RSS of the command on n and 4n repeats of body; returns the
    two results of the larger run and the RSS growth."""
    rss = []
    for k in (n, 4 * n):
        path = tmp_path / f"s{k}"
        B.write_repeated(path, body, k, **kw)
        full = [a.replace("{in}", "-" if pipe else str(path))
                .replace("{out}", str(tmp_path / "out.img")) for a in args]
        rc, out, err, peak = run_cli(full, path, pipe=pipe)
        path.unlink()
        rss.append(peak)
    return rc, out, err, rss[1] - rss[0]


# ------------------------------------------------------------ item 2
# 1024 XALLOC entries, repeated: before, every entry of them was kept in
# a Python list (about 35 bytes of RSS per stream byte here).
@pytest.mark.parametrize("args,pipe", [
    (["info", "--json", "{in}"], False),
    (["verify", "--json", "{in}"], False),
    (["restore", "{in}", "-o", "{out}", "--no-sync", "-q"], False),
    (["info", "--json", "{in}"], True),
])
def test_repeated_xalloc_entries_memory_is_bounded(tmp_path, args, pipe):
    body = B.xalloc_batch(8, 1024)          # 8 KiB of stream each
    rc, out, err, growth = _growth(tmp_path, body, 600, args, pipe=pipe)
    assert rc == 0, err
    # 1800 more batches are 14.8 MB more stream, 1.8M more entries.
    assert growth < 6 * MiB, f"RSS grew by {growth / MiB:.1f} MiB with the stream"
    if args[0] == "info":
        meta = json.loads(out)
        assert meta["xalloc_pfns"] == list(range(1024))
        assert meta["entry_counts"] == {"XALLOC": 2400 * 1024}
        assert meta["checkpoint_details"][0]["batches"] == 2400


def test_verify_keeps_first_problems_of_a_kind_and_counts_the_rest(tmp_path):
    """One warning per chunk used to be kept (1M HVM_IDENT_PT chunks in a
    PV stream: 358 MB, 33 MB of JSON)."""
    from xlegacy.verifier import KEEP_PER_KIND, verify
    path = tmp_path / "params"
    B.write_repeated(path, B.param_chunk(), 3000, guest="pv")
    rep = verify(str(path))
    assert rep["warnings"] == 3000 and rep["errors"] == 0 and rep["valid"]
    rules = [p["rule"] for p in rep["problems"]]
    assert rules.count("hvm-param-in-pv") == KEEP_PER_KIND + 1
    last = rep["problems"][-1]
    assert last["omitted"] == 3000 - KEEP_PER_KIND and "not listed" in last["message"]
    assert len(json.dumps(rep)) < 64 << 10


def test_verify_problem_memory_is_bounded(tmp_path):
    rc, out, err, growth = _growth(tmp_path, B.param_chunk(), 40000,
                                   ["verify", "--json", "{in}"], guest="pv")
    assert rc == 0, err
    assert json.loads(out)["warnings"] == 160000
    assert growth < 6 * MiB, f"RSS grew by {growth / MiB:.1f} MiB with the stream"
