"""The exception tree.  Every problem with a stream's bytes is a StreamError
carrying the byte offset, what was expected there and what was found."""


class XLegacyError(Exception):
    """Root of every error xlegacy raises on purpose."""


class StreamError(XLegacyError, ValueError):
    """The stream's bytes are not what the format allows.

    offset:   absolute byte offset in the input where the problem is
    expected: what the format wants there (text)
    found:    what is there instead (text)
    """

    def __init__(self, message, offset=None, expected=None, found=None):
        self.message = message
        self.offset = offset
        self.expected = expected
        self.found = found
        super().__init__(self.__str__())

    def __str__(self):
        text = self.message
        if self.expected is not None:
            text += f": expected {self.expected}"
        if self.found is not None:
            text += f", found {self.found}"
        if self.offset is not None:
            text += f" at offset {self.offset}"
        return text


def shortfall(needed, available, end="the stream ends"):
    """The one wording of "ran out" as (expected, found): the item (a field,
    a page, a run) is `needed` bytes long counted from its start, and only
    `available` of them are there before `end`.  Every truncation message
    uses it, so "expected N bytes, found M" never means two things."""
    return f"{needed} bytes", f"{available} before {end}"


class TruncatedStream(StreamError, EOFError):
    """The stream ended before a structure was complete.

    needed:    the structure's whole size in bytes, from its start
    available: how many of those bytes the stream holds
    offset:    where the stream ends (the structure starts at offset - available)
    """

    def __init__(self, what, offset, needed, available):
        self.needed = needed
        self.available = available
        expected, found = shortfall(needed, available)
        super().__init__(f"stream truncated in {what}", offset=offset, expected=expected,
                         found=found)


class CorruptCheckpoint(StreamError):
    """A checkpoint was read in full but cannot be applied (libxc fails the
    whole restore there, and so does xlegacy: the output is discarded).
    `last_good` names the last checkpoint that committed; restoring with
    checkpoint=last_good gives that state."""

    def __init__(self, message, offset=None, expected=None, found=None,
                 checkpoint=None, last_good=None):
        self.checkpoint = checkpoint
        self.last_good = last_good
        super().__init__(message, offset=offset, expected=expected, found=found)

    def __str__(self):
        text = super().__str__()
        if self.last_good:
            text += (f" (checkpoint {self.last_good} was the last good one; "
                     f"--checkpoint {self.last_good} restores it)")
        return text


class AmbiguousStream(XLegacyError):
    """The bytes fit more than one reading; the caller must say which."""


class AmbiguousTruncation(TruncatedStream, AmbiguousStream):
    """The stream is cut inside its first checkpoint under every reading
    that fits it: truncated (offset: the end of the data) whichever reading
    is right, and which one is cannot be told (the message says the flags)."""

    def __init__(self, cut, note):
        self.__dict__.update(cut.__dict__)
        self.message = cut.message + note
        Exception.__init__(self, str(self))


class ReadingMismatch(StreamError):
    """The width/guest the caller gave contradict the bytes, which read
    another way: `fits` is that reading (infer.Reading: width, guest, label).
    force_reading=True (--force-reading) reads them as given anyway."""

    def __init__(self, message, offset=None, fits=None):
        self.fits = fits
        super().__init__(message, offset=offset)

    def __str__(self):
        return self.message       # names its offsets itself


class UnsupportedStream(XLegacyError):
    """Valid, but not something xlegacy reads (a v2 stream, TMEM data...)."""

    def __init__(self, message, offset=None):
        self.offset = offset
        super().__init__(message + (f" at offset {offset}" if offset is not None else ""))


class OutputError(XLegacyError, OSError):
    """An output that must not or cannot be written (it is an input, a
    directory, a stream for a format that needs seeking...): refused before
    anything is opened for writing."""

    def __init__(self, message):
        super().__init__(message)

    def __str__(self):
        return self.args[0]


class KernelFault(StreamError):
    """A StreamError raised by a kernel; `code` (an XL_E_* value, see
    kernels/faults.py) and `index` say which rule failed on which entry or
    page (index counts from the call's first one)."""

    def __init__(self, message, code, index, offset, expected=None, found=None):
        self.code = code
        self.index = index
        super().__init__(message, offset=offset, expected=expected, found=found)


class V2Error(XLegacyError, ValueError):
    """A v2/v3 stream (Xen >= 4.6: what convert writes) that does not parse."""

    def __init__(self, message, offset):
        self.offset = offset
        super().__init__(f"{message} at offset {offset}")


class ToolstackError(XLegacyError, ValueError):
    """The bytes are not a libxl version-1 toolstack record; the message
    says where the layout breaks."""


class NativeBackendWarning(RuntimeWarning):
    """The C extension was not built at install time (no compiler): xlegacy
    runs on its reference kernels, correct but several times slower."""


NO_NATIVE_BACKEND = (
    "xlegacy's C extension (xlegacy._ffi) was not built when xlegacy was installed "
    "(no working C compiler?): running on the reference kernels, which are correct but "
    "several times slower.  Install a C compiler and the Python headers and reinstall "
    "for the native backend; set XLEGACY_BACKEND=reference to silence this warning.")
