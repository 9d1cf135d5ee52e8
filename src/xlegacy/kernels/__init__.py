"""The kernels the rest of the package calls, from the backend chosen by
XLEGACY_BACKEND: "native" (the compiled cffi module) or "reference" (the
plain numpy/Python twins).  Unset, it is native wherever the extension was
built, and reference (with a NativeBackendWarning from `import xlegacy`)
where the install had no C compiler.

count_data, which the reader calls on every page batch, mark_pfns
(info's per-PFN state), copy_raw_pages (a restore's checkpoint-1 pages) and
v2_entries (a converted batch's entries) come without numpy (_light); the
numpy kernels are loaded on first use, so that reading a stream's framing
does not import numpy.
"""
import importlib
import importlib.util
import os

# Whether the extension is installed, without loading it.
NATIVE_BUILT = importlib.util.find_spec("xlegacy._ffi") is not None

_choice = os.environ.get("XLEGACY_BACKEND", "").strip().lower() \
    or ("native" if NATIVE_BUILT else "reference")
if _choice == "reference":
    from ._reference import copy_raw_pages, count_data, mark_pfns, v2_entries
elif _choice == "native":
    from ._light import copy_raw_pages, count_data, mark_pfns, v2_entries
else:
    raise ImportError(f"XLEGACY_BACKEND must be 'native' or 'reference', not {_choice!r}")

BACKEND = _choice
# What `xlegacy --version` says about the backend.
BACKEND_NOTE = BACKEND if NATIVE_BUILT or BACKEND == "native" else \
    "reference, C extension not built"
_NUMPY_KERNELS = ("decode_pfns", "scatter_pages", "pwrite_pages", "compare_pages",
                  "delta_index", "delta_apply", "delta_decode", "delta_scan", "pread_pages", "copy_pages",
                  "gather_pages", "pwrite_at", "pread_at", "read_many", "scan_nodata")
__all__ = ["BACKEND", "copy_raw_pages", "count_data", "mark_pfns", "v2_entries",
           *_NUMPY_KERNELS]


def __getattr__(name):
    if name not in _NUMPY_KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    backend = importlib.import_module("._" + _choice, __package__)
    for kernel in _NUMPY_KERNELS:
        globals()[kernel] = getattr(backend, kernel)
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(_NUMPY_KERNELS))
