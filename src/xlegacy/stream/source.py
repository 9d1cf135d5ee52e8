"""Byte sources: a path, '-' (stdin), a file descriptor, a binary file
object or a bytes-like object, read sequentially with an absolute offset
and no seeking.

Reads of untrusted lengths never allocate more than the source can still
deliver: with a known size the length is checked first; with an unknown
size (a pipe) the buffer grows in bounded steps as the bytes arrive.

A regular file is read with positional reads from where it was handed over
(PreadSource), so page data can be left in the file for the consumer to
move (defer).  A pipe or socket is read through a read-ahead buffer
(FileSource), or, for a file descriptor or with exact=True, with exact
reads that never take more than the stream needs (PipeSource): a caller
sharing the descriptor (xenopsd reads the qemu record after the converter)
finds the rest where it was, and page data can be spliced.
"""
import io
import os
import stat
import sys

from ..errors import TruncatedStream
from ..fileio import pread_exact

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

    def _scratch_view(self, n, what):
        """n bytes read into the source's reused buffer `_scratch`: a view
        valid until the next read."""
        if len(self._scratch) < n:
            self._scratch = bytearray(max(n, 64))
        mv = memoryview(self._scratch)[:n]
        self.readinto(mv, what)
        return mv

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

    def peek_some(self, n):
        """Up to n bytes ahead without consuming them, reading at most once
        more from a pipe: what is there now, not necessarily n bytes (it
        blocks only while nothing at all is available)."""
        return self.peek(n)

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

    def fork(self):
        """An independent source over the same bytes from the current
        position (same absolute `pos`), for reading ahead and coming back;
        None when the bytes cannot be read twice (a pipe)."""
        return None

    def close(self):
        pass


class BytesSource(Source):
    """A bytes-like object: every view is zero-copy.

    base: the absolute offset of data[0] (a window of a longer stream, such
    as the prefix of a pipe held for inference); `pos` and `size` stay
    absolute."""

    def __init__(self, data, name="<bytes>", base=0):
        self._mv = memoryview(data).cast("B")
        self._base = base
        self.size = base + len(self._mv)
        self.pos = base
        self.name = name

    def _take(self, n):
        i = self.pos - self._base
        part = self._mv[i:i + n]
        self.pos += len(part)
        return part

    def view(self, n, what):
        self.need(n, what)
        i = self.pos - self._base
        part = self._mv[i:i + n]
        self.pos += n
        return part

    def readinto(self, buf, what):
        mv = memoryview(buf).cast("B")
        mv[:] = self.view(len(mv), what)

    def peek(self, n):
        i = self.pos - self._base
        return bytes(self._mv[i:i + n])

    def fork(self):
        twin = BytesSource(self._mv, self.name, self._base)
        twin.pos = self.pos
        return twin


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
        return self._scratch_view(n, what)

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
        if self._buffered() < n and n <= CHUNK:
            self._refill(n)
        while self._buffered() < n:
            # A long peek (the prefix of a pipe that inference reads twice):
            # the buffer grows as the bytes arrive, never ahead of them.
            if self._lo:
                self._grow(len(self._buf))
            if self._hi == len(self._buf):
                self._grow(min(n, 2 * len(self._buf)))
            got = self._f.readinto(self._mv[self._hi:self._lo + n])
            if not got:
                break
            self._hi += got
        return bytes(self._mv[self._lo:self._lo + min(n, self._buffered())])

    def peek_some(self, n):
        n = min(n, CHUNK)
        if self._buffered() < n:
            if self._lo:
                k = self._buffered()
                self._mv[:k] = self._mv[self._lo:self._hi]
                self._lo, self._hi = 0, k
            got = self._f.readinto(self._mv[self._hi:])
            self._hi += got or 0
        return bytes(self._mv[self._lo:self._lo + min(n, self._buffered())])

    def _grow(self, n):
        """A buffer of n bytes holding what is buffered.  Views handed out
        earlier keep the old buffer alive, so it is replaced, not resized."""
        buf = bytearray(n)
        k = self._buffered()
        buf[:k] = self._mv[self._lo:self._hi]
        self._buf, self._mv = buf, memoryview(buf)
        self._lo, self._hi = 0, k

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
        got = pread_exact(self.fd, mv, self.base + self.pos)
        self.pos += got
        if got < len(mv):
            raise TruncatedStream(what, self.pos, len(mv), got)

    def view(self, n, what):
        self.need(n, what)
        if n <= self.SMALL:
            part = self._pread(n)
            if len(part) < n:   # the file shrank under us
                self.pos += len(part)
                raise TruncatedStream(what, self.pos, n, len(part))
            self.pos += n
            return memoryview(part)
        return self._scratch_view(n, what)

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

    def fork(self):
        twin = PreadSource(self.fd, self.name, self.base, self.size)
        twin.pos = self.pos
        return twin

    def close(self):
        if self._closer is not None:
            self._closer.close()
            self._closer = None


class PipeSource(Source):
    """A pipe, socket or character device read with exact reads: nothing is
    read beyond what was asked for (peeks aside), so the descriptor is left
    right after the last byte used.  Bytes can be spliced to an output
    (splice_to)."""

    def __init__(self, fd, name="<pipe>", closer=None):
        self.fd = fd
        self.name = name
        self.size = None
        self.pos = 0
        self._closer = closer
        self._buf = bytearray()          # peeked bytes; _buf[_lo:] not consumed yet
        self._lo = 0
        self._scratch = bytearray()

    def _ahead(self):
        return len(self._buf) - self._lo

    def _consume(self, k):
        part = self._buf[self._lo:self._lo + k]
        self._lo += k
        if self._lo == len(self._buf):
            self._buf = bytearray()
            self._lo = 0
        return part

    def _fill(self, n):
        """Have at least n bytes peeked unless the data ends first."""
        if self._lo:
            del self._buf[:self._lo]
            self._lo = 0
        while len(self._buf) < n:
            chunk = os.read(self.fd, min(n - len(self._buf), STEP))
            if not chunk:
                break
            self._buf += chunk

    def _take(self, n):
        if self._ahead():
            part = bytes(self._consume(min(n, self._ahead())))
        else:
            part = os.read(self.fd, min(n, STEP))
        self.pos += len(part)
        return memoryview(part)

    def readinto(self, buf, what):
        mv = memoryview(buf).cast("B")
        n = len(mv)
        k = min(n, self._ahead())
        if k:
            mv[:k] = self._consume(k)
            self.pos += k
        done = k
        while done < n:
            got = os.readv(self.fd, [mv[done:]])
            if not got:
                raise TruncatedStream(what, self.pos, n, done)
            done += got
            self.pos += got

    def view(self, n, what):
        return self._scratch_view(n, what)

    def peek(self, n):
        if self._ahead() < n:
            self._fill(n)
        return bytes(self._buf[self._lo:self._lo + n])

    def peek_some(self, n):
        if self._ahead() < n:
            if self._lo:
                del self._buf[:self._lo]
                self._lo = 0
            self._buf += os.read(self.fd, n - len(self._buf))
        return bytes(self._buf[self._lo:self._lo + n])

    def splice_to(self, out, n, what):
        """Move n stream bytes to `out` (an object with write(bytes) and
        copy_stream(fd, n) -> bytes moved, such as converter.Output); returns
        how many there were."""
        k = min(n, self._ahead())
        if k:
            out.write(self._consume(k))
            self.pos += k
        done = k + out.copy_stream(self.fd, n - k)
        self.pos += done - k
        return done

    def close(self):
        if self._closer is not None:
            self._closer.close()
            self._closer = None


def fd_source(fd, name=None, own=False):
    """A Source on a file descriptor, from its current offset: PreadSource
    for a regular file, PipeSource (exact reads) for anything else.
    own=True closes fd with the source."""
    name = name or f"<fd {fd}>"
    st = os.fstat(fd)
    closer = _FdCloser(fd) if own else None
    if stat.S_ISREG(st.st_mode):
        base = os.lseek(fd, 0, os.SEEK_CUR)
        return PreadSource(fd, name, base, max(st.st_size - base, 0), closer=closer)
    return PipeSource(fd, name, closer)


class _FdCloser:
    def __init__(self, fd):
        self.fd = fd

    def close(self):
        os.close(self.fd)


def open_source(source, exact=False):
    """Make a Source from a path, '-', a file descriptor (an int, read from
    its current offset and not closed), a binary file object or bytes-like
    data.

    exact=True: a path or an unbuffered file object that is not a regular
    file (a FIFO, socket or device) is read with exact reads (PipeSource)
    rather than through a read-ahead buffer.
    """
    if isinstance(source, Source):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BytesSource(source)
    if isinstance(source, int) and not isinstance(source, bool):
        return fd_source(source)
    if isinstance(source, (str, os.PathLike)):
        if os.fspath(source) == "-":
            raw = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
            size = _regular_size(raw)
            if size is not None:   # redirected from a file: positional reads work
                base = os.lseek(raw.fileno(), 0, os.SEEK_CUR)
                return PreadSource(raw.fileno(), "<stdin>", base, size - base)
            return FileSource(raw, name="<stdin>", size=None)
        if exact:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                return fd_source(fd, os.fspath(source), own=True)
            except BaseException:
                os.close(fd)
                raise
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
        elif exact and getattr(source, "raw", source) is source and \
                not hasattr(source, "peek") and _fileno(source) is not None:
            # Unbuffered (nothing read ahead in the object): exact reads.
            return PipeSource(_fileno(source), name)
        f = source if hasattr(source, "readinto") else _ReadAdapter(source)
        return FileSource(f, name=name, size=None)
    try:
        return BytesSource(memoryview(source))
    except TypeError:
        raise TypeError("source must be a path, '-', a file descriptor, a binary file "
                        f"object or bytes-like, not {type(source).__name__}") from None


def _fileno(f):
    try:
        return f.fileno()
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None


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
