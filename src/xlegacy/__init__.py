"""xlegacy: read Xen's legacy (pre-4.6) save, migration and Remus streams.

    import xlegacy
    image, meta = xlegacy.restore("guest.save")          # numpy uint8, page p at p*4096
    for rec in xlegacy.open("guest.save"):               # typed records with offsets
        print(rec.offset, type(rec).__name__)
"""
import importlib

from ._version import __version__
from .errors import (AmbiguousStream, CorruptCheckpoint, StreamError, TruncatedStream,
                     UnsupportedStream, XLegacyError)

# The rest loads on first use: `xlegacy-convert-legacy-stream` is started
# once per migration by libxl/xenopsd, and numpy alone costs ~70 ms there.
_LAZY = {"BACKEND": ("kernels", "BACKEND"), "open": ("stream.reader", "open"),
         "LegacyStream": ("stream.reader", "LegacyStream"), "restore": ("restorer", "restore"),
         "restore_result": ("restorer", "restore_result"),
         "PageMap": ("pagemap", "PageMap"), "open_pagemap": ("pagemap", "open_pagemap")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'xlegacy' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module("." + module, __name__), attr)
    globals()[name] = value
    return value

__all__ = ["__version__", "BACKEND", "open", "restore", "restore_result", "LegacyStream",
           "PageMap", "open_pagemap",
           "XLegacyError", "StreamError", "TruncatedStream", "CorruptCheckpoint",
           "AmbiguousStream", "UnsupportedStream"]
