"""Kernel fault codes (the XL_E_* of csrc/xlegacy.h; tests/test_api.py
checks they agree) and the one place they become exceptions, shared by the
native kernels and their reference twins so both report a fault in exactly
the same words."""
import os

# KernelFault lives with the other exceptions; imported from here too.
from ..errors import KernelFault, shortfall

OK = 0
BAD_TYPE = -1
PFN_RANGE = -2
UPPER_BITS = -3
BAD_ARG = -4
ZERO_MARKER = -5
RUN_PAST_PAGE = -6
RUN_PAST_BUFFER = -7
PAGES_SHORT = -8
PAGES_EXTRA = -9
IO = -10
SHORT_READ = -11


def _locate(locate, offset):
    if callable(locate):
        return locate(offset)
    return locate + offset


def raise_fault(code, index, offset, value, limit, locate=0, what="page"):
    """Turn a kernel's (code, index, offset, value, limit) into an exception.

    locate maps an offset inside the kernel's input buffer to an absolute
    stream offset: an int base, or a callable for buffers stitched together
    from several chunks.
    """
    if code == IO:
        raise OSError(value, os.strerror(value) if value else "I/O error")
    if code == BAD_ARG:
        raise ValueError(f"kernel called with inconsistent sizes (value {value}, limit {limit})")
    at = _locate(locate, offset)
    if code == BAD_TYPE:
        raise KernelFault(f"bogus page type in PFN entry {index}", code, index, at,
                          expected="type nibble 0-4 or 8-15",
                          found=f"entry 0x{value:x} (type {limit})")
    if code == UPPER_BITS:
        raise KernelFault(f"PFN entry {index} has bits 63..32 set", code, index, at,
                          expected="a 28-bit pfn and 4-bit type",
                          found=f"entry 0x{value:x}")
    if code == PFN_RANGE:
        raise KernelFault(f"pfn out of range in {what} {index}", code, index, at,
                          expected=f"pfn < {limit} (p2m_size)", found=f"pfn {value}")
    if code == ZERO_MARKER:
        raise KernelFault(f"zero-length RUN/SKIP marker in compressed page {index}",
                          code, index, at, expected="a length of 1..127 words",
                          found=f"marker 0x{value:02x} at byte {limit} of the page")
    if code == RUN_PAST_PAGE:
        raise KernelFault(f"compressed run crosses the end of page {index}",
                          code, index, at, expected="a run ending at or before byte 4096",
                          found=f"a run ending at byte {value}")
    if code == RUN_PAST_BUFFER:
        raise KernelFault(f"compressed page {index} runs past the end of the compressed data",
                          code, index, at,
                          *shortfall(value, limit, "the end of the compressed data"))
    if code == PAGES_SHORT:
        raise KernelFault(f"compressed data ends inside page {index}",
                          code, index, at, expected="a complete page encoding",
                          found="the end of the checkpoint's compressed data")
    if code == PAGES_EXTRA:
        raise KernelFault("compressed data continues after the last page",
                          code, index, at, expected=f"{limit} pages exactly",
                          found=f"{value} bytes more")
    if code == SHORT_READ:
        raise KernelFault(f"stream ends inside data page {index}", code, index, at,
                          *shortfall(limit, offset))
    raise RuntimeError(f"unknown kernel status {code}")

