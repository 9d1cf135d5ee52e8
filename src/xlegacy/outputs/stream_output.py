"""Where a converted (v2/v3) stream's bytes go: Output, which takes small
records and page data still in the input file, and writes them in order to
a path, a caller's output, a file descriptor or a binary file object --
moved here from converter.py, which decides what the bytes are."""
from __future__ import annotations

import os
import stat

from ..errors import TruncatedStream
from . import fdio
from .atomic import describe, open_output
from .background import Background

BOUNCE = 4 << 20            # one full batch of pages (1024 x 4096)


class Output:
    """Where the v2/v3 stream goes: a path (an output of outputs/atomic.py:
    a file appears under its name only by commit(); a device, FIFO or `-`
    is written in place), an output opened by the caller, a file
    descriptor (written with write() and writev()) or a binary file object.

    Small records gather in a buffer that goes out with the next page data.
    Page data of a regular-file input reaches
    * a regular file: splice() through a private 1 MiB pipe (fdio.SplicePipe:
      one copy, in the kernel, in 1 MiB writes).  copy_file_range() and
      sendfile() between two files take the kernel's splice path with a
      64 KiB pipe: the legacy and v2 headers have different lengths, so the
      source and destination offsets never agree modulo the page size, and
      such small misaligned writes cost ext4 ~60% more than cp; pread()
      into a 4 MiB buffer + write() (two copies) costs ~15-20% more than cp
      on tmpfs, ~10% on ext4;
    * a character device (/dev/null): writev() from a read-only mapping of
      the input, so a device that discards data never touches it;
    * a pipe or socket: sendfile() (page references, no copy);
    falling back to copy_file_range() and plain pread()/write().  A pipe
    input is spliced (copy_stream)."""

    FLUSH_AT = 1 << 16
    WINDOW = 64 << 20

    def __init__(self, target, inputs=()):
        self.fd = None
        self.f = None
        self._close = None
        self.output = None          # an output of atomic.py this Output commits
        self.name = None
        if isinstance(target, int) and not isinstance(target, bool):
            self.fd = target
            self.name = describe(target)
        elif isinstance(target, (str, os.PathLike)):
            self.output = open_output(target, inputs=inputs)
            self.fd = self.output.fd
            self.name = describe(target)
        elif hasattr(target, "fd") and hasattr(target, "commit"):
            self.fd = target.fd     # opened (and committed) by the caller
            self.name = describe(target.path)
        else:
            fd = None
            if hasattr(target, "fileno"):
                try:
                    target.flush()
                    fd = target.fileno()
                except (OSError, AttributeError, ValueError):
                    fd = None
            if fd is not None:
                self.fd = fd
            else:
                self.f = target
        self.pos = 0
        self._pend = bytearray()
        self._bounce = None
        self.methods = set()
        mode = os.fstat(self.fd).st_mode if self.fd is not None else 0
        self.regular = stat.S_ISREG(mode)
        self._mmap = stat.S_ISCHR(mode)
        self._sendfile = hasattr(os, "sendfile") and not self._mmap and not self.regular
        self._cfr = False           # kept as a fallback (see the class comment)
        self._spipe = self.regular and hasattr(os, "splice")   # SplicePipe wanted
        self._pipe = None
        self._splice = hasattr(os, "splice")
        self._win = None            # (fd, start, end, mmap, memoryview)
        self._bg = None             # a background.Background while writing on its thread

    # ---------------------------------------------------------- small writes
    def write(self, data):
        self._pend += data
        if len(self._pend) >= self.FLUSH_AT:
            self.flush()

    def flush(self):
        if self._pend:
            self._write_all(self._pend)
            self._pend = bytearray()

    def _write_all(self, data):
        """Write `data` now, or in background mode queue it (the caller
        hands it over: it must not change it afterwards)."""
        if self._bg is not None:
            self._bg.put(("bytes", data), len(data))
        else:
            self._write_now(data)

    def _write_now(self, data):
        if self.fd is None:
            mv = memoryview(data).cast("B")
            self.f.write(mv)
            self.pos += len(mv)
        else:
            self.pos += fdio.write_all(self.fd, data)

    def _writev_all(self, parts):
        self.pos += fdio.writev_all(self.fd, parts)

    def _buffer(self):
        if self._bounce is None:
            self._bounce = memoryview(bytearray(BOUNCE))
        return self._bounce

    # ---------------------------------------------------------- page data
    def _window(self, in_fd, offset, n):
        """A memoryview of input bytes [offset, offset+n), or None."""
        import mmap
        w = self._win
        if w is not None and w[0] == in_fd and w[1] <= offset and offset + n <= w[2]:
            return w[4][offset - w[1]:offset - w[1] + n]
        self._drop_window()
        size = os.fstat(in_fd).st_size
        if offset + n > size:
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        end = min(size, max(start + self.WINDOW, offset + n))
        m = mmap.mmap(in_fd, end - start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                      offset=start)
        mv = memoryview(m)
        self._win = (in_fd, start, end, m, mv)
        return mv[offset - start:offset - start + n]

    def _drop_window(self):
        if self._win is not None:
            _fd, _s, _e, m, mv = self._win
            self._win = None
            mv.release()
            try:
                m.close()
            except BufferError:
                pass    # a failed writev's traceback still holds a slice: the GC unmaps it

    def copy_range(self, in_fd, offset, n):
        """Copy n bytes at `offset` of regular file in_fd, after the queued
        small writes; returns the bytes copied (fewer only if the file ends
        first; in background mode n, the file having been measured: a file
        that shrinks meanwhile fails the drain)."""
        pend, self._pend = self._pend, bytearray()
        if self._bg is not None:
            self._bg.put(("copy", in_fd, offset, n, pend), len(pend))
            return n
        return self._move(in_fd, offset, n, pend)

    def _move(self, in_fd, offset, n, pend):
        """copy_range's work: `pend` (bytes to write first), then the n bytes."""
        if self._mmap and self.fd is not None:
            try:
                part = self._window(in_fd, offset, n)
            except (OSError, ValueError, ImportError):
                part = None
                self._mmap = False
                self._sendfile = hasattr(os, "sendfile")
            if part is not None:
                try:
                    self._writev_all([pend, part])
                finally:
                    part.release()
                self.methods.add("mmap+writev")
                return n
        if pend and (self._sendfile or self._cfr or self._spipe):
            self._write_now(pend)
            pend = b""
        done = 0

        def put(part):
            """Write bytes read into the bounce buffer, after `pend`."""
            nonlocal pend
            if pend and self.fd is not None:
                self._writev_all([pend, part])
            else:
                if pend:
                    self._write_now(pend)
                self._write_now(part)
            pend = b""

        while done < n:
            if self.fd is not None and self._spipe:
                k = self._splice_pipe(in_fd, offset + done, n - done)
                if k is None:
                    continue                        # refused: the next method
                self.pos += k
                if k:
                    self.methods.add("splice")
                if self._pipe is not None and self._pipe.refused and done + k < n:
                    self._drop_pipe()
                    done += k
                    continue
            elif self.fd is not None and self._sendfile:
                k = fdio.sendfile_all(self.fd, in_fd, offset + done, n - done)
                if k is None:                       # refused: the next method
                    self._sendfile = False
                    continue
                self.methods.add("sendfile")
                self.pos += k
            elif self.fd is not None and self._cfr:
                k = fdio.copy_file_range_all(in_fd, offset + done, self.fd, n - done)
                if k is None:
                    self._cfr = False
                    continue
                self.methods.add("copy_file_range")
                self.pos += k
            else:
                k = fdio.pread_copy(in_fd, offset + done, n - done, self._buffer(), put)
                if k:
                    self.methods.add("pread+write")
            done += k
            if done < n:
                break                               # the input ended first
        if pend:
            self._write_now(pend)
        return done

    def _splice_pipe(self, in_fd, offset, n):
        """fdio.SplicePipe.copy to the output, or None when no pipe can be
        had or the kernel refuses before moving anything (splicing is then
        off for this Output)."""
        if self._pipe is None:
            try:
                self._pipe = fdio.SplicePipe()
            except OSError:
                self._spipe = False
                return None
        try:
            k = self._pipe.copy(in_fd, offset, self.fd, n)
        except BaseException:
            self._drop_pipe()       # it may hold bytes that never went out
            raise
        if self._pipe.refused and not k:
            self._drop_pipe()
            return None
        return k

    def _drop_pipe(self):
        self._spipe = False
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def copy_stream(self, in_fd, n):
        """Copy n bytes read from pipe/socket in_fd; returns the bytes copied."""
        self.flush()
        self.drain()            # (a pipe input is never written in background)
        done = 0
        while done < n:
            k = None
            if self.fd is not None and self._splice:
                try:
                    k = os.splice(in_fd, self.fd, n - done)
                    self.methods.add("splice")
                except OSError as exc:
                    if exc.errno not in fdio.NO_SPLICE:
                        raise
                    self._splice = False
                    continue
                if k:
                    self.pos += k
            else:
                buf = self._buffer()
                k = os.readv(in_fd, [buf[:min(n - done, len(buf))]])
                if k:
                    self._write_now(buf[:k])
                self.methods.add("read+write")
            if not k:
                break
            done += k
        return done

    # ---------------------------------------------------------- background
    def background(self):
        """From now on, write on a thread of its own (see background.Background); only
        to a regular file (or a descriptor of one).  Returns whether it is on."""
        if self._bg is None and self.fd is not None and self.regular:
            self.flush()
            self._bg = Background(self._do_background, "xlegacy-convert-writer")
        return self._bg is not None

    def _do_background(self, op):
        """One job of the writing thread: bytes, or a copy of page data."""
        if op[0] == "bytes":
            self._write_now(op[1])
            return
        _, in_fd, offset, n, pend = op
        done = self._move(in_fd, offset, n, pend)
        if done < n:
            raise TruncatedStream("page data (the input file shrank during the conversion)",
                                  offset + done, n, done)

    def drain(self):
        """Wait until everything queued is written; raises what writing
        raised."""
        if self._bg is not None:
            self._bg.drain()

    def foreground(self, discard=False):
        """Stop the thread (after what is queued, unless writing failed or
        `discard`: then the rest is dropped) and write in the caller's
        thread again."""
        bg, self._bg = self._bg, None
        if bg is not None:
            bg.stop(discard)

    def close(self, ok=True):
        """Flush and close; a path given to the constructor takes its name
        now when ok, and is removed (never left incomplete) when not or when
        the last writes fail."""
        try:
            if ok:
                try:
                    self.flush()
                    self.drain()
                except BaseException:
                    ok = False
                    raise
        finally:
            self.foreground(discard=not ok)
            self._drop_window()
            if self._pipe is not None:
                self._pipe.close()
                self._pipe = None
            if self._close is not None:
                os.close(self._close)
                self._close = None
            elif self.f is not None and hasattr(self.f, "flush") and ok:
                self.f.flush()
            if self.output is not None:
                out, self.output = self.output, None
                if ok:
                    out.commit()
                else:
                    out.abort()
