"""xlegacy: read Xen's legacy (pre-4.6) save, migration and Remus streams.

    import xlegacy
    image, meta = xlegacy.restore("guest.save")          # numpy uint8, page p at p*4096
    for rec in xlegacy.open("guest.save"):               # typed records with offsets
        print(rec.offset, type(rec).__name__)
    xlegacy.convert("guest.save", "guest.v3")            # to a stream today's Xen restores
    report = xlegacy.verify("guest.save")                # every rule, every problem
"""
import importlib
import importlib.util
import os
import warnings

from ._version import __version__
from .errors import (NO_NATIVE_BACKEND, AmbiguousStream, CorruptCheckpoint, KernelFault,
                     NativeBackendWarning, OutputError, ReadingMismatch, StreamError,
                     TruncatedStream, UnsupportedStream, XLegacyError)

# An install without a C compiler has no extension and runs on the reference
# kernels (kernels/__init__.py chooses); say so once, here, unless the user
# chose a backend.  find_spec only looks for the file: nothing is loaded.
if not os.environ.get("XLEGACY_BACKEND", "").strip() \
        and importlib.util.find_spec(__name__ + "._ffi") is None:
    warnings.warn(NO_NATIVE_BACKEND, NativeBackendWarning, stacklevel=2)

# The rest loads on first use: `xlegacy-convert-legacy-stream` is started
# once per migration by libxl/xenopsd, and numpy alone costs ~70 ms there.
_LAZY = {"BACKEND": ("kernels", "BACKEND"),
         "open": ("stream.reader", "open"), "LegacyStream": ("stream.reader", "LegacyStream"),
         "restore": ("restorer", "restore"), "restore_result": ("restorer", "restore_result"),
         "Result": ("restorer", "Result"),
         "convert": ("converter", "convert"), "verify": ("verifier", "verify"),
         "export": ("outputs.exporters", "export"),
         "PageMap": ("pagemap", "PageMap"), "open_pagemap": ("pagemap", "open_pagemap")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'xlegacy' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module("." + module, __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "BACKEND", "open", "LegacyStream", "restore", "restore_result",
           "Result", "convert", "verify", "export", "PageMap", "open_pagemap",
           "XLegacyError", "StreamError", "TruncatedStream", "CorruptCheckpoint",
           "AmbiguousStream", "ReadingMismatch", "UnsupportedStream", "KernelFault",
           "OutputError", "NativeBackendWarning"]
