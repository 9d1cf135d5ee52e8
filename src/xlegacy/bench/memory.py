"""Peak RSS of restores, measured in child processes."""
import json
import os
import subprocess
import sys

from .engine import _unlinker
from .units import MiB

# ============================================================ memory checks
_CHILD = r"""
import json, sys, time
import xlegacy
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = status("VmHWM")
t0 = time.perf_counter()
if mode == "pipe-to-file":
    xlegacy.restore("-", output=out)
    image = 0
else:
    img, meta = xlegacy.restore(path)
    image = int(img.size)
print(json.dumps({"mode": mode, "peak_rss": status("VmHWM"), "start_rss": base,
                  "image": image, "seconds": time.perf_counter() - t0}))
"""


def peak_rss(path, workdir, mode):
    """Peak RSS of a restore in a child process: "pipe-to-file" (the stream
    arrives through a pipe from cat) or "memory" (image in memory)."""
    out = os.path.join(workdir, "rss-bench.raw")
    cmd = [sys.executable, "-c", _CHILD, mode, path, out]
    try:
        if mode == "pipe-to-file":
            cat = subprocess.Popen(["cat", path], stdout=subprocess.PIPE)
            try:
                r = subprocess.run(cmd, stdin=cat.stdout, capture_output=True, text=True)
            finally:
                cat.stdout.close()
                cat.wait()
        else:
            r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        _unlinker(out)()
    if r.returncode != 0:
        raise RuntimeError(f"child restore failed: {r.stderr.strip()[-500:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["over_image"] = d["peak_rss"] - d["image"]
    return d


MEMORY_BOUNDS = {
    # mode: (bound on peak RSS beyond the image, the bound as printed)
    "pipe-to-file": (128 * MiB, "restore from a pipe to a file: peak RSS < 128 MiB"),
    "memory": (128 * MiB, "in-memory restore: peak RSS <= image + 128 MiB"),
}
# Measured on the compressed Remus stream, not by memory_rows.
REMUS_BOUNDS = {
    "remus-memory": (160 * MiB, "Remus in-memory restore: peak RSS <= image + 160 MiB"),
}


def memory_row(path, workdir, mode):
    """One peak-RSS measurement against its bound, as a dict row."""
    limit, text = {**MEMORY_BOUNDS, **REMUS_BOUNDS}[mode]
    d = peak_rss(path, workdir, mode)
    d.update(stream_bytes=os.path.getsize(path), limit=limit, text=text,
             met=d["over_image"] <= limit)
    return d


def memory_rows(path, workdir):
    """The memory bounds for one stream."""
    return [memory_row(path, workdir, mode) for mode in MEMORY_BOUNDS]
