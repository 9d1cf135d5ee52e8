"""Comparing two implementations of the same call: outcomes (a result or a
described exception) and deep equality that understands numpy arrays.
Used by test_kernels.py and the fuzz harnesses."""
import numpy as np

# Argument errors: the class is the contract, the wording is not.
ARG_ERRORS = ("TypeError", "ValueError", "OverflowError", "IndexError", "AttributeError")


class Mismatch(AssertionError):
    """The two sides of a differential run disagree."""


def describe(exc):
    d = {"type": type(exc).__name__, "str": str(exc)}
    for name in ("code", "index", "offset", "expected", "found", "errno", "checkpoint",
                 "last_good"):
        if hasattr(exc, name):
            d[name] = getattr(exc, name)
    return d


def outcome(fn, *args, **kwargs):
    """('ok', value) or ('err', description of the exception)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - every exception is compared
        return ("err", describe(exc))


def same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def _loose(o):
    if o[0] == "err" and o[1]["type"] in ARG_ERRORS:
        return ("err", {"type": o[1]["type"]})
    return o


def check_same(what, a, b):
    """Raise Mismatch unless a and b agree (argument errors: by class only)."""
    if isinstance(a, tuple) and a and a[0] in ("ok", "err"):
        a, b = _loose(a), _loose(b)
    if not same(a, b):
        raise Mismatch(f"{what}: the two sides disagree:\n  {a!r}\n  {b!r}")
