"""What the machine is and whether a second core is free, printed beside
the figures."""
import os
import platform
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import kernels
from .._version import __version__
from .engine import PRIME, _fs_type
from .units import fmt_bytes

try:
    from ..kernels import _native
except ImportError:  # pragma: no cover - reference-only installs
    _native = None  # type: ignore[assignment]

# ================================================================ machine
def machine_info(workdir=None):
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "xlegacy": __version__, "backend": kernels.BACKEND,
            "native": _native is not None, "platform": platform.platform(),
            "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                k, _, v = line.partition(":")
                if k.strip() in ("Model name", "CPU family", "Model", "Thread(s) per core",
                                 "Core(s) per socket", "L2 cache", "L3 cache",
                                 "Hypervisor vendor"):
                    info["lscpu " + k.strip()] = v.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/meminfo") as f:
            info["memory"] = fmt_bytes(int(f.readline().split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for key, p in (("transparent_hugepage", "/sys/kernel/mm/transparent_hugepage/enabled"),
                   ("thp_defrag", "/sys/kernel/mm/transparent_hugepage/defrag")):
        try:
            with open(p) as f:
                info[key] = f.read().strip()
        except OSError:
            pass
    if workdir:
        info["workdir"] = workdir
        info["workdir_fs"] = _fs_type(workdir)
    info["prime_fresh_memory"] = PRIME["on"]
    return info


def core_check(rounds=7):
    """Is a second core free right now?  A compute-bound numpy operation
    (sqrt + sum, which releases the GIL) on 1 thread and split over 2:
    returns t(1) / t(2), about 2 on two idle cores, about 1 when other work
    holds the second one.  Reported beside the 2-thread figures."""
    x = np.random.default_rng(0).random(1 << 23)
    half = x.size // 2

    def part(a):
        return float(np.sqrt(a).sum())

    with ThreadPoolExecutor(2) as pool:
        def two():
            a, b = pool.submit(part, x[:half]), pool.submit(part, x[half:])
            return a.result() + b.result()
        one_t, two_t = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            part(x)
            one_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            two()
            two_t.append(time.perf_counter() - t0)
    return round(float(np.median(one_t) / np.median(two_t)), 2)
