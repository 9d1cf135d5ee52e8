"""Shared pieces of the atheris harnesses (tests/fuzz/fuzz_*.py).

Every harness is differential: it runs the native kernels and their
reference twins (or two kinds of source) on the same input and fails when
they disagree in any way an API user could see: result arrays, exception
class, fault code, index, offset, message, and what was written to the
image.  Any exception outside the documented ones is a crash as well.

The harnesses also run without atheris (`python fuzz_x.py --replay FILE...`)
so a crash file can be reproduced under plain pytest or a debugger.
"""
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


class Mismatch(AssertionError):
    """The two sides of a differential run disagree."""


def outcome(fn, *args, **kwargs):
    """('ok', value) or ('err', comparable description of the exception)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - every exception is compared
        return ("err", describe(exc))


def describe(exc):
    d = {"type": type(exc).__name__, "str": str(exc)}
    for name in ("code", "index", "offset", "expected", "found", "errno", "checkpoint",
                 "last_good"):
        if hasattr(exc, name):
            d[name] = getattr(exc, name)
    return d


def same(a, b):
    """Deep equality that understands numpy arrays and dicts of them."""
    import numpy as np
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check_same(what, a, b):
    if not same(a, b):
        raise Mismatch(f"{what}: native/reference disagree:\n  {a!r}\n  {b!r}")


def digest(arr):
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def replay_main(test_one_input, argv):
    """`--replay FILE...`: run inputs once without atheris; exit 1 on failure."""
    files = argv[argv.index("--replay") + 1:]
    bad = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            test_one_input(data)
        except Exception as exc:  # noqa: BLE001
            bad += 1
            print(f"{path}: {type(exc).__name__}: {exc}")
    print(f"replayed {len(files)} inputs, {bad} failed")
    return 1 if bad else 0


def fuzz_main(test_one_input, make_seeds, instrument=True):
    """Entry point shared by the harnesses.

    --make-seeds DIR   write the seed corpus and exit
    --replay FILE...   run inputs without atheris
    anything else      libFuzzer arguments (corpus dirs, -max_total_time=...)
    """
    argv = list(sys.argv)
    if "--make-seeds" in argv:
        out = argv[argv.index("--make-seeds") + 1]
        os.makedirs(out, exist_ok=True)
        n = 0
        for name, data in make_seeds():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
            n += 1
        print(f"wrote {n} seeds to {out}")
        return 0
    if "--replay" in argv:
        return replay_main(test_one_input, argv)
    import atheris
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0
