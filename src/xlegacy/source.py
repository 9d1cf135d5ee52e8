"""Byte sources: a path, '-' (stdin), a binary file object or a bytes-like
object, read sequentially with an absolute offset and no seeking.

Reads of untrusted lengths never allocate more than the source can still
deliver: with a known size the length is checked first; with an unknown
size (a pipe) the buffer grows in bounded steps as the bytes arrive.
"""
import io
import os
import stat
import sys

from .errors import TruncatedStream

CHUNK = 1 << 20          # refill size for file sources
STEP = 1 << 20           # growth step for reads of unknown-size sources


class Source:
    """Sequential reader with `pos` (absolute offset) and `size` (None if unknown)."""

    pos = 0
    size = None
    name = "<stream>"

    # -- subclasses provide _fill(n) -> bytes available, and the buffer ----
    def remaining(self):
        return None if self.size is None else self.size - self.pos

    def need(self, n, what):
        """Fail early (no allocation) if a known-size source cannot hold n more bytes."""
        rem = self.remaining()
        if rem is not None and n > rem:
            raise TruncatedStream(what, self.size, n, rem)

    def read(self, n, what):
        """Exactly n bytes as bytes, or TruncatedStream at the end of the data."""
        self.need(n, what)
        if n <= STEP:
            return bytes(self.view(n, what))
        out = bytearray()
        start = self.pos
        while len(out) < n:
            part = self._take(min(STEP, n - len(out)))
            if not part:   # same words as need(): the whole read, what arrived
                raise TruncatedStream(what, self.pos, n, len(out))
            out += part
        assert self.pos == start + n
        return bytes(out)

    def view(self, n, what):
        """Exactly n bytes as a memoryview valid until the next read."""
        raise NotImplementedError

    def readinto(self, buf, what):
        """Fill the writable buffer completely."""
        raise NotImplementedError

    def peek(self, n):
        """Up to n bytes ahead without consuming them (fewer only at the end)."""
        raise NotImplementedError

    def at_eof(self):
        return len(self.peek(1)) == 0

    def skip(self, n, what):
        self.need(n, what)
        left = n
        while left:
            part = self._take(min(STEP, left))
            if not part:
                raise TruncatedStream(what, self.pos, n, n - left)
            left -= len(part)

    def read_to_eof(self, what, limit=None):
        """Everything that is left (bounded by `limit` bytes when given)."""
        out = bytearray()
        while True:
            part = self._take(STEP)
            if not part:
                return bytes(out)
            out += part
            if limit is not None and len(out) > limit:
                raise TruncatedStream(what, self.pos, limit, len(out))

    def defer(self, n, what):
        """Skip n bytes and say where they are in a file, (fd, file offset), so
        the caller can move them with pread/copy_file_range itself; None when
        this source is not a regular file (the caller then reads them)."""
        return None

    def close(self):
        pass


class BytesSource(Source):
    """A bytes-like object: every view is zero-copy."""

    def __init__(self, data, name="<bytes>"):
        self._mv = memoryview(data).cast("B")
        self.size = len(self._mv)
        self.pos = 0
        self.name = name

    def _take(self, n):
        part = self._mv[self.pos:self.pos + n]
        self.pos += len(part)
        return part

    def view(self, n, what):
        self.need(n, what)
        part = self._mv[self.pos:self.pos + n]
        self.pos += n
        return part

    def readinto(self, buf, what):
        mv = memoryview(buf).cast("B")
        mv[:] = self.view(len(mv), what)

    def peek(self, n):
        return bytes(self._mv[self.pos:self.pos + n])


class FileSource(Source):
    """A binary file object (or raw fd-backed file), read through one buffer.

    Large reads (page data) go straight into the caller's buffer with
    readinto, so page bytes are copied once, from the kernel to their
    destination.
    """

    def __init__(self, fileobj, name="<file>", size=None, close=False):
        self._f = fileobj
        self._close = close
        self.name = name
        self.size = size
        self.pos = 0
        self._buf = bytearray(CHUNK)
        self._mv = memoryview(self._buf)
        self._lo = self._hi = 0
        self._scratch = bytearray()

    def _buffered(self):
        return self._hi - self._lo

    def _refill(self, want):
        """Make at least `want` bytes (<= CHUNK) buffered unless the data ends."""
        if self._lo and self._hi - self._lo < want:
            n = self._hi - self._lo
            self._mv[:n] = self._mv[self._lo:self._hi]
            self._lo, self._hi = 0, n
        while self._hi - self._lo < want:
            got = self._f.readinto(self._mv[self._hi:])
            if not got:
                break
            self._hi += got

    def _take(self, n):
        if not self._buffered():
            self._refill(min(n, CHUNK))
        k = min(n, self._buffered())
        part = self._mv[self._lo:self._lo + k]
        self._lo += k
        self.pos += k
        return part

    def view(self, n, what):
        self.need(n, what)
        if n <= CHUNK:
            if self._buffered() < n:
                self._refill(n)
                if self._buffered() < n:
                    raise TruncatedStream(what, self.pos + self._buffered(), n,
                                          self._buffered())
            part = self._mv[self._lo:self._lo + n]
            self._lo += n
            self.pos += n
            return part
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        mv = memoryview(self._scratch)[:n]
        self.readinto(mv, what)
        return mv

    def readinto(self, buf, what):
        mv = memoryview(buf).cast("B")
        n = len(mv)
        self.need(n, what)
        k = min(n, self._buffered())
        mv[:k] = self._mv[self._lo:self._lo + k]
        self._lo += k
        done = k
        while done < n:
            got = self._f.readinto(mv[done:])
            if not got:
                self.pos += done
                raise TruncatedStream(what, self.pos, n, done)
            done += got
        self.pos += n

    def peek(self, n):
        if self._buffered() < n:
            self._refill(min(n, CHUNK))
        return bytes(self._mv[self._lo:self._lo + min(n, self._buffered())])

    def close(self):
        if self._close:
            self._f.close()


class PreadSource(Source):
    """A regular file, read with positional reads from where it was handed
    over.  No read-ahead buffer, so page data can be left in the file and
    moved by the kernel (defer()); small reads cost one system call each,
    which is a handful per page batch."""

    SMALL = 1 << 16

    def __init__(self, fd, name, base, size, closer=None):
        self.fd = fd
        self.name = name
        self.base = base
        self.size = size
        self.pos = 0
        self._closer = closer
        self._scratch = bytearray()

    def _pread(self, n):
        return os.pread(self.fd, n, self.base + self.pos)

    def _take(self, n):
        part = self._pread(n)
        self.pos += len(part)
        return part

    def _fill(self, mv, what):
        n = len(mv)
        done = 0
        while done < n:
            got = os.preadv(self.fd, [mv[done:]], self.base + self.pos + done)
            if not got:
                self.pos += done
                raise TruncatedStream(what, self.pos, n, done)
            done += got
        self.pos += n

    def view(self, n, what):
        self.need(n, what)
        if n <= self.SMALL:
            part = self._pread(n)
            if len(part) < n:   # the file shrank under us
                self.pos += len(part)
                raise TruncatedStream(what, self.pos, n, len(part))
            self.pos += n
            return memoryview(part)
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        mv = memoryview(self._scratch)[:n]
        self._fill(mv, what)
        return mv

    def readinto(self, buf, what):
        mv = memoryview(buf).cast("B")
        self.need(len(mv), what)
        self._fill(mv, what)

    def peek(self, n):
        return self._pread(n)

    def at_eof(self):
        return self.pos >= self.size if self.size is not None else super().at_eof()

    def skip(self, n, what):
        self.need(n, what)
        self.pos += n

    def defer(self, n, what):
        self.need(n, what)
        where = (self.fd, self.base + self.pos)
        self.pos += n
        return where

    def close(self):
        if self._closer is not None:
            self._closer.close()
            self._closer = None


def open_source(source):
    """Make a Source from a path, '-', a binary file object or bytes-like data."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BytesSource(source)
    if isinstance(source, (str, os.PathLike)):
        if os.fspath(source) == "-":
            raw = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
            size = _regular_size(raw)
            if size is not None:   # redirected from a file: positional reads work
                base = os.lseek(raw.fileno(), 0, os.SEEK_CUR)
                return PreadSource(raw.fileno(), "<stdin>", base, size - base)
            return FileSource(raw, name="<stdin>", size=None)
        f = open(source, "rb", buffering=0)
        size = _regular_size(f)
        if size is not None:
            return PreadSource(f.fileno(), os.fspath(source), 0, size, closer=f)
        return FileSource(f, name=os.fspath(source), size=None, close=True)
    if hasattr(source, "readinto") or hasattr(source, "read"):
        name = str(getattr(source, "name", "<file>"))
        size = _regular_size(source)
        if size is not None:
            try:
                base = source.tell()
            except (OSError, AttributeError, ValueError):
                base = None
            if base is not None:
                # The object's own position is left where it was.
                return PreadSource(source.fileno(), name, base, max(size - base, 0))
        f = source if hasattr(source, "readinto") else _ReadAdapter(source)
        return FileSource(f, name=name, size=None)
    try:
        return BytesSource(memoryview(source))
    except TypeError:
        raise TypeError("source must be a path, '-', a binary file object or "
                        f"bytes-like, not {type(source).__name__}") from None


def _regular_size(f):
    """The size of a regular file behind f, else None (pipes, sockets, ttys)."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class _ReadAdapter:
    """readinto() for objects that only have read()."""

    def __init__(self, f):
        self._f = f

    def readinto(self, buf):
        data = self._f.read(len(buf))
        buf[:len(data)] = data
        return len(data)
