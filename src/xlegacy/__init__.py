"""xlegacy: read Xen's legacy (pre-4.6) save, migration and Remus streams.

    import xlegacy
    image, meta = xlegacy.restore("guest.save")          # numpy uint8, page p at p*4096
    for rec in xlegacy.open("guest.save"):               # typed records with offsets
        print(rec.offset, type(rec).__name__)
"""
from ._version import __version__
from .errors import (AmbiguousStream, CorruptCheckpoint, StreamError, TruncatedStream,
                     UnsupportedStream, XLegacyError)
from .kernels import BACKEND
from .reader import LegacyStream, open  # noqa: A004
from .restore import restore, restore_result

__all__ = ["__version__", "BACKEND", "open", "restore", "restore_result", "LegacyStream",
           "XLegacyError", "StreamError", "TruncatedStream", "CorruptCheckpoint",
           "AmbiguousStream", "UnsupportedStream"]
