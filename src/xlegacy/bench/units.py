"""Sizes of the benchmark and how they are read and printed.

No numpy here: the command line builds its help from these without loading
the measurement code."""

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZE = 512 * MiB
QUICK_SIZE = 32 * MiB
MAX_KERNEL_BYTES = 256 * MiB
REF_STREAM_SIZE = 64 * MiB         # reference twin of uncompressed restores
REF_REMUS_SIZE = 4 * MiB           # ... of compressed ones (it walks markers in Python)
BATCH = 1024                       # entries per PFN array (MAX_BATCH)
REMUS_CHECKPOINTS = 10             # compressed checkpoints after the first


# ====================================================================== sizes
def parse_size(text):
    """'8M', '1G', '1.5GiB', '4096', '64k' -> bytes (binary units)."""
    s = str(text).strip().lower().replace(" ", "")
    for suffix in ("ib", "b"):
        if s.endswith(suffix) and len(s) > len(suffix) and not s[-len(suffix) - 1].isdigit():
            s = s[:-len(suffix)]
            break
    mult = 1
    if s and s[-1] in "kmgt":
        mult = 1 << (10 * ("kmgt".index(s[-1]) + 1))
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}: use e.g. 64M, 1G, 4096") from None
    n = int(value * mult)
    if n <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return n


def fmt_bytes(n):
    for unit, s in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= s:
            v = n / s
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"
