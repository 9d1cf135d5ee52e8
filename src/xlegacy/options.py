"""The one check of the options that the commands and the API share: width,
guest type, checkpoint number, thread count.

Each check returns the value to use or raises ValueError that names the
option and what was given.  The command line builds its argparse types from
these same functions (cli/options.py), so `--threads 0` and `threads=0`, or
`--checkpoint -1` and `checkpoint=2.5`, are refused alike and in the same
words.  Nothing here imports anything: the reader and every command use it.
"""
import operator

WIDTHS = (32, 64)
GUESTS = ("pv", "hvm")


def _whole(value, name):
    """An int (or an integer-like such as numpy's), never a bool or float."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None


def positive(value, name):
    """A whole number >= 1 (checkpoint numbers count from 1; a thread count
    of 0 would do nothing)."""
    n = _whole(value, name)
    if n < 1:
        raise ValueError(f"{name} must be 1 or more, not {n}")
    return n


def checkpoint(value):
    """None (the last complete checkpoint) or a checkpoint number >= 1."""
    return None if value is None else positive(value, "checkpoint")


def threads(value):
    """None (the default, one) or a thread count >= 1."""
    return None if value is None else positive(value, "threads")


def width(value):
    """None (inferred) or the toolstack width in bits: 32 or 64."""
    if value is None:
        return None
    if isinstance(value, bool) or value not in WIDTHS:
        raise ValueError(f"width must be 32 or 64, not {value!r}")
    return int(value)


def guest(value):
    """None (inferred) or the guest type: "pv" or "hvm"."""
    if value is None:
        return None
    if value not in GUESTS:
        raise ValueError(f"guest must be 'pv' or 'hvm', not {value!r}")
    return value
