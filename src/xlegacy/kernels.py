"""The kernels the rest of the package calls, from the backend chosen by
XLEGACY_BACKEND: "native" (the default, the compiled cffi module) or
"reference" (the plain numpy/Python twins)."""
import os

_choice = os.environ.get("XLEGACY_BACKEND", "native").strip().lower() or "native"
if _choice == "reference":
    from . import _reference as backend
elif _choice == "native":
    from . import _native as backend
else:
    raise ImportError(f"XLEGACY_BACKEND must be 'native' or 'reference', not {_choice!r}")

BACKEND = backend.NAME
decode_pfns = backend.decode_pfns
scatter_pages = backend.scatter_pages
pwrite_pages = backend.pwrite_pages
compare_pages = backend.compare_pages
delta_index = backend.delta_index
delta_apply = backend.delta_apply
pread_pages = backend.pread_pages
copy_pages = backend.copy_pages
