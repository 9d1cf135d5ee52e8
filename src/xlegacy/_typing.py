"""Type aliases of the public API.  Imported only by type checkers (under
TYPE_CHECKING): nothing here runs when xlegacy is used."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO, Union

from .stream.source import Source

# What every reader entry point accepts as its input: a path, "-" (standard
# input), an open file descriptor, a binary file object, bytes-like data, or
# an already opened Source.
StreamSource = Union[str, "os.PathLike[str]", int, BinaryIO, bytes, bytearray, memoryview,
                     Source]

# Where an output goes: a path ("-" is standard output), a file descriptor or
# a binary file object.
OutputTarget = Union[str, "os.PathLike[str]", int, BinaryIO]

# progress=: called with the input offset reached.
Progress = Callable[[int], object]
