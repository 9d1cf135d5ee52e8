"""Legacy stream -> v2/v3 stream (libxc, optionally inside a libxl stream).

The output is byte for byte what Xen's tools/python/scripts/convert-legacy-
stream (the current one: libxc stream version 3 with STATIC_DATA_END)
writes, for every stream that script converts.  Beyond it:

* width and guest type are inferred when not given; the xend, XenServer and
  libvirt wrappers are read (their headers are not part of the output); an
  xl header is copied as Xen's -x does, with or without -x;
* checkpointed (Remus) streams, compressed or not, become a plain v3 stream
  holding the state of the last complete checkpoint.  Checkpoint 1 is
  written as the script writes it (page batches become PAGE_DATA records
  one to one, TSC_INFO where it is read, HVM params at the end of the body),
  but its tail records are held back until it is known whether more
  follows.  Each later checkpoint is held back (pages or compressed data
  spooled to a temporary file) until its tail has been read, then applied
  to a sparse temporary "shadow" file; a torn last checkpoint is dropped.
  The output then carries, after checkpoint 1's records, one PAGE_DATA
  record set with every page a later committed checkpoint changed (pfn
  order, last type), then the committed checkpoint's TSC, params, tail and
  qemu record.  See _Later.  (Restoring the image first and writing it out
  would need the whole image and, for a pipe, a second pass; this needs
  only the pages changed after checkpoint 1.)
* errors carry byte offsets (xlegacy.errors), never a traceback.

Data movement (bounded memory, page data never in Python objects): a
regular-file input is read with positional reads and its page data copied
by Output.copy_range (pread into one reusable 4 MiB buffer + write for a
regular-file output, sendfile for a pipe or socket, writev from a read-only
mapping for a character device such as /dev/null); a pipe or socket input
is read with exact reads -- never past what the stream needs, so a caller
sharing the descriptor (xenopsd reads the qemu record after the converter)
finds the rest where it was -- and its page data is spliced.  For a
regular-file descriptor the file offset is left after the last byte used.

Start-up cost matters for a converter run once per guest: with width and
guest given, a stream of ordinary pages is converted without importing
numpy or the compiled kernels.  numpy is loaded when inference is needed,
for batches with other entries than ordinary pages (XTAB holes, page
tables, XALLOC/BROKEN), and for checkpoints after the first.

Deliberate differences from Xen's script, on streams it accepts but reads
differently from libxc (we follow libxc):
* no VCPU_INFO chunk in a PV stream means vcpu 0 alone (the script would
  read no vcpu context and misparse the tail); a second VCPU_INFO replaces
  the first (the script appends); map bits beyond max_vcpu_id are ignored;
* a further checkpoint after the first (uncompressed Remus) is applied when
  the input is a regular file (the script ignores it); from a pipe or socket
  the converter stops after the first checkpoint unless compression was
  enabled, because reading on could block on a live sender; with
  --skip-qemu (libxc format) it stops after the first HVM context, as the
  script does.
Streams the script refuses are converted: duplicate pfns in a batch (split
into PAGE_DATA records without repeats, applied in order as libxc applies
the batch), unknown extended-info blocks and HVM param chunks in a PV
stream (skipped, with a warning), PV streams without extended info (Xen
3.0 era), other qemu signatures (written as DeviceModelRecord0002 or
EMULATOR_CONTEXT), compressed Remus streams.  TMEM state cannot be carried
by a v2 stream and is refused (exit status 2, like the script's "todo").
"""
import bisect
import errno
import os
import stat
import struct
import sys
from array import array

from . import format as F
from . import v2
from .errors import CorruptCheckpoint, StreamError, TruncatedStream, UnsupportedStream
from .source import PreadSource, Source, open_source

PAGE = F.PAGE_SIZE
MAX_TOOLSTACK = 64 << 20
MAX_HVM_CONTEXT = 64 << 20
MAX_QEMU = 1 << 30
MAX_EXT_INFO = 1 << 20
MAX_XSAVE = 1 << 20
BARE_XTAB = 0xF0000000
_LITTLE = sys.byteorder == "little"
_WRAPPER_MAGICS = (F.XEND_MAGIC, F.XENSERVER_MAGIC, F.XENSERVER_V2_MAGIC, F.LIBVIRT_MAGIC,
                   b"\xff" * 8 + b"XenF", b"Xen libxl\0")


# ==================================================================== sources
class PipeSource(Source):
    """A pipe, socket or character device read with exact reads: nothing is
    read beyond what the stream needs (peeks aside), so the descriptor is
    left right after the last byte the converter used.  Page data can be
    spliced to the output (splice_to)."""

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
            chunk = os.read(self.fd, n - len(self._buf))
            if not chunk:
                break
            self._buf += chunk

    def _take(self, n):
        if self._ahead():
            part = bytes(self._consume(min(n, self._ahead())))
        else:
            part = os.read(self.fd, min(n, 1 << 20))
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
        if len(self._scratch) < n:
            self._scratch = bytearray(max(n, 64))
        mv = memoryview(self._scratch)[:n]
        self.readinto(mv, what)
        return mv

    def peek(self, n):
        if self._ahead() < n:
            self._fill(n)
        return bytes(self._buf[self._lo:self._lo + n])

    def splice_to(self, out, n, what):
        """Move n stream bytes to the output; returns how many there were."""
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


def open_input(source):
    """A Source for the converter: regular files get positional reads
    (PreadSource), pipes and sockets exact reads (PipeSource), anything else
    what open_source() makes of it.  An int is a file descriptor (not closed)."""
    if isinstance(source, Source):
        return source
    if isinstance(source, int) and not isinstance(source, bool):
        return fd_source(source, f"<fd {source}>")
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) != "-":
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            return fd_source(fd, os.fspath(source), own=True)
        except BaseException:
            os.close(fd)
            raise
    if hasattr(source, "fileno") and not isinstance(source, (bytes, bytearray, memoryview)):
        try:
            fd = source.fileno()
            st = os.fstat(fd)
        except (OSError, AttributeError, ValueError):
            fd = None
        if fd is not None and not stat.S_ISREG(st.st_mode) and \
                getattr(source, "raw", source) is source and \
                not hasattr(source, "peek"):   # unbuffered: nothing read ahead
            return PipeSource(fd, str(getattr(source, "name", f"<fd {fd}>")))
    return open_source(source)


def fd_source(fd, name, own=False):
    """PreadSource for a regular file (from the descriptor's current offset),
    PipeSource for anything else; own=True closes fd with the source."""
    st = os.fstat(fd)
    closer = _Closer(fd) if own else None
    if stat.S_ISREG(st.st_mode):
        base = os.lseek(fd, 0, os.SEEK_CUR)
        return PreadSource(fd, name, base, max(st.st_size - base, 0), closer=closer)
    return PipeSource(fd, name, closer)


class _Closer:
    def __init__(self, fd):
        self.fd = fd

    def close(self):
        os.close(self.fd)


# ==================================================================== output
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF,
           errno.EPERM, errno.ETXTBSY, errno.EOVERFLOW}
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EOVERFLOW}
BOUNCE = 4 << 20            # one full batch of pages (1024 x 4096)


class Output:
    """Where the v2/v3 stream goes: a file descriptor (written with write()
    and writev()) or a binary file object.

    Small records gather in a buffer that goes out with the next page data.
    Page data of a regular-file input reaches
    * a regular file: pread() into one reusable 4 MiB buffer (a whole batch;
      it stays in the CPU's last-level cache) and write().  copy_file_range()
      would take the kernel's splice path, because the legacy and v2 headers
      have different lengths and the source and destination offsets never
      agree modulo the page size; that measured about 40% slower than cp on
      ext4, and a populated read-only mapping + writev() suffered under CPU
      contention;
    * a character device (/dev/null): writev() from a read-only mapping of
      the input, so a device that discards data never touches it;
    * a pipe or socket: sendfile() (page references, no copy);
    falling back to copy_file_range() and plain pread()/write().  A pipe
    input is spliced (copy_stream)."""

    FLUSH_AT = 1 << 16
    WINDOW = 64 << 20

    def __init__(self, target):
        self.fd = None
        self.f = None
        self._close = None
        if isinstance(target, int) and not isinstance(target, bool):
            self.fd = target
        elif isinstance(target, (str, os.PathLike)):
            self.fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                              | getattr(os, "O_CLOEXEC", 0), 0o666)
            self._close = self.fd
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
        self._splice = hasattr(os, "splice")
        self._win = None            # (fd, start, end, mmap, memoryview)

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
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self.fd is None:
            self.f.write(mv)
        else:
            while mv:
                k = os.write(self.fd, mv)
                mv = mv[k:]
        self.pos += n

    def _writev_all(self, parts):
        parts = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(p) for p in parts)
        while parts:
            k = os.writev(self.fd, parts)
            while parts and k >= len(parts[0]):
                k -= len(parts[0])
                parts.pop(0)
            if k:
                parts[0] = parts[0][k:]
        self.pos += total

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
            m.close()

    def copy_range(self, in_fd, offset, n):
        """Copy n bytes at `offset` of regular file in_fd; returns the bytes
        copied (fewer only if the file ends first)."""
        if self._mmap and self.fd is not None:
            try:
                part = self._window(in_fd, offset, n)
            except (OSError, ValueError, ImportError):
                part = None
                self._mmap = False
                self._sendfile = hasattr(os, "sendfile")
            if part is not None:
                try:
                    self._writev_all([self._pend, part])
                finally:
                    part.release()
                self._pend = bytearray()
                self.methods.add("mmap+writev")
                return n
        if self._sendfile or self._cfr:
            self.flush()
        done = 0
        while done < n:
            k = None
            if self.fd is not None and self._sendfile:
                try:
                    k = os.sendfile(self.fd, in_fd, offset + done, n - done)
                    self.methods.add("sendfile")
                except OSError as exc:
                    if exc.errno not in _NO_SENDFILE:
                        raise
                    self._sendfile = False
                    continue
            elif self.fd is not None and self._cfr:
                try:
                    k = os.copy_file_range(in_fd, self.fd, n - done, offset + done)
                    self.methods.add("copy_file_range")
                except OSError as exc:
                    if exc.errno not in _NO_CFR:
                        raise
                    self._cfr = False
                    continue
            else:
                buf = self._buffer()
                k = os.preadv(in_fd, [buf[:min(n - done, len(buf))]], offset + done)
                if not k:
                    break
                if self.fd is not None and self._pend:
                    self._writev_all([self._pend, buf[:k]])
                    self._pend = bytearray()
                else:
                    self.flush()
                    self._write_all(buf[:k])
                self.methods.add("pread+write")
                done += k
                continue
            if not k:
                break
            done += k
            self.pos += k
        return done

    def copy_stream(self, in_fd, n):
        """Copy n bytes read from pipe/socket in_fd; returns the bytes copied."""
        self.flush()
        done = 0
        while done < n:
            k = None
            if self.fd is not None and self._splice:
                try:
                    k = os.splice(in_fd, self.fd, n - done)
                    self.methods.add("splice")
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                         errno.EBADF):
                        raise
                    self._splice = False
                    continue
                if k:
                    self.pos += k
            else:
                buf = self._buffer()
                k = os.readv(in_fd, [buf[:min(n - done, len(buf))]])
                if k:
                    self._write_all(buf[:k])
                self.methods.add("read+write")
            if not k:
                break
            done += k
        return done

    def close(self):
        try:
            self.flush()
        finally:
            self._drop_window()
            if self._close is not None:
                os.close(self._close)
                self._close = None
            elif self.f is not None and hasattr(self.f, "flush"):
                self.f.flush()


def copy_extent(src, out, n, what):
    """Move n bytes of stream data from src to out without keeping them.
    Returns the number of bytes moved (fewer when the stream ends)."""
    if n <= 0:
        return 0
    where = src.defer(n, what)
    if where is not None:
        fd, offset = where
        done = out.copy_range(fd, offset, n)
        if done < n:      # the file shrank under us
            src.pos -= n - done
        return done
    if isinstance(src, PipeSource):
        return src.splice_to(out, n, what)
    done = 0
    while done < n:
        k = min(n - done, 1 << 20)
        try:
            part = src.view(k, what)
        except TruncatedStream:
            rest = src.read_to_eof(what, limit=k)
            out.write(rest)
            return done + len(rest)
        out.write(part)
        done += k
    return done


# ==================================================================== records
class Batch:
    """A page batch with its entries mapped the way the v2 stream wants them.

    kept:      raw entries after dropping bare XTAB (0xf0000000) ones
    out:       array('Q') of v2 entries, (type << 60) | pfn, for `kept`
    n_data:    entries that carry a page (type nibble < 0xd)
    data_pfns / data_types: pfns and type nibbles of those (types None = all 0)
    dup:       a raw value repeats (Xen's script refuses such a batch)
    pages_at:  stream offset of the page data (format A: n_data pages follow)
    """
    __slots__ = ("offset", "checkpoint", "count", "kept", "out", "n_data", "data_pfns",
                 "data_types", "dup", "pages_at", "verify", "compressed", "odd")

    def __init__(self, offset, checkpoint, count):
        self.offset = offset
        self.checkpoint = checkpoint
        self.count = count
        self.odd = None


class Chunk:
    __slots__ = ("offset", "checkpoint", "id", "value", "size")

    def __init__(self, offset, checkpoint, cid, value=None, size=4):
        self.offset = offset
        self.checkpoint = checkpoint
        self.id = cid
        self.value = value
        self.size = size


class EndOfBody:
    __slots__ = ("offset", "checkpoint")

    def __init__(self, offset, checkpoint):
        self.offset = offset
        self.checkpoint = checkpoint


class HVMTail:
    __slots__ = ("offset", "checkpoint", "magic_pfns", "context")

    def __init__(self, offset, checkpoint, magic_pfns, context):
        self.offset = offset
        self.checkpoint = checkpoint
        self.magic_pfns = magic_pfns
        self.context = context


class Qemu:
    """A qemu record.  `data` is the payload when it was read; otherwise
    `length` bytes of payload follow in the source at data_at, for the
    consumer to read (read()) or move (copy_extent)."""
    __slots__ = ("offset", "checkpoint", "signature", "variant", "length", "data", "data_at",
                 "_src")

    def __init__(self, offset, checkpoint, signature, variant, length, data, data_at, src):
        self.offset = offset
        self.checkpoint = checkpoint
        self.signature = signature
        self.variant = variant
        self.length = length
        self.data = data
        self.data_at = data_at
        self._src = src

    def read(self):
        if self.data is None:
            if self._src.pos != self.data_at:
                raise RuntimeError("qemu data must be read before the next record")
            self.data = self._src.read(self.length, "qemu data")
        return self.data


class PVTail:
    __slots__ = ("offset", "checkpoint", "unmapped", "vcpus", "shared_info")

    def __init__(self, offset, checkpoint, unmapped, vcpus, shared_info):
        self.offset = offset
        self.checkpoint = checkpoint
        self.unmapped = unmapped          # count of unmapped pfns
        self.vcpus = vcpus                # [(id, context, extended or None, xsave or None)]
        self.shared_info = shared_info


class CheckpointEnd:
    __slots__ = ("offset", "checkpoint", "last")

    def __init__(self, offset, checkpoint, last):
        self.offset = offset
        self.checkpoint = checkpoint
        self.last = last


class PVHeader:
    __slots__ = ("offset", "extended", "blocks", "guest_width", "levels", "vcpu_size", "extv",
                 "xcnt", "frames", "pv_info_records")


# ==================================================================== parser
class LegacyParser:
    """A numpy-free reading of the legacy stream for the converter.

    It knows the same framing as xlegacy.reader (see FORMAT.md) and yields
    light records; page data and qemu payloads are left in the source for
    the consumer to move (whatever it leaves is skipped when it asks for
    the next record).  Entry-level oddities that Xen's converter passes
    through (entries with bits 63..32 set, types 5-7, pfns >= p2m_size) are
    converted as that script does and reported in `warnings`; strict
    checking is xlegacy.reader's and `xlegacy verify`'s job.
    """

    def __init__(self, src, width=None, guest=None, warn=None, wrapper="none"):
        self.src = src
        self.warnings = []
        self._warn_cb = warn
        self.wrapper = wrapper
        start = src.pos
        given = bool(width and guest)
        if given:
            w, g, why = width // 8, guest, {"width": "given", "guest": "given"}
        else:
            from . import infer as _infer     # (numpy) only when there is something to infer
            head = src.peek(_infer.HEAD_BYTES)
            try:
                w, g, why = _infer.infer(head, width // 8 if width else None, guest)
            except StreamError as exc:
                exc.offset = start
                raise
        self.width, self.guest, self.inferred = w, g, why
        self.acode = "Q" if w == 8 else "I"
        if array(self.acode).itemsize != w:      # pragma: no cover - exotic platforms
            self.acode = "L" if array("L").itemsize == w else self.acode
        self.start = start
        self.p2m_size = struct.unpack("<Q" if w == 8 else "<I",
                                      src.read(w, "libxc header (p2m_size)"))[0]
        if not 1 <= self.p2m_size <= F.MAX_PFNS:
            if g == "pv" or not given:
                raise StreamError("implausible p2m_size", offset=start,
                                  expected="1..2^28 pfns", found=str(self.p2m_size))
            self.warn(f"p2m_size {self.p2m_size} at offset {start} is outside 1..2^28; "
                      "converted anyway (an HVM v2 stream does not carry it)")
        self.pv = self._pv_header() if g == "pv" else None
        self.online = [0]
        self._pending_end = None

    def warn(self, msg):
        self.warnings.append(msg)
        if self._warn_cb:
            self._warn_cb(msg)

    # ---------------------------------------------------------- helpers
    def _i32(self, what):
        return F.I32.unpack(self.src.read(4, what))[0]

    def _u32(self, what):
        return F.U32.unpack(self.src.read(4, what))[0]

    def _ulong(self, what):
        return struct.unpack("<Q" if self.width == 8 else "<I",
                             self.src.read(self.width, what))[0]

    def _bounded(self, n, limit, what, at):
        if n > limit:
            raise StreamError(f"{what} too long", offset=at,
                              expected=f"at most {limit} bytes", found=f"{n} bytes")
        return self.src.read(n, what)

    def _ulongs(self, n, what):
        a = array(self.acode)
        if n:
            a.frombytes(self.src.read(n * self.width, what))
            if not _LITTLE:   # pragma: no cover
                a.byteswap()
        return a

    # ---------------------------------------------------------- PV header
    def _pv_header(self):
        src, w = self.src, self.width
        h = PVHeader()
        h.offset = at = src.pos
        ones = (1 << (8 * w)) - 1
        first = self._ulong("PV extended-info marker")
        h.blocks = []
        h.guest_width = w
        h.vcpu_size = F.PV_VCPU_SIZE_64 if w == 8 else F.PV_VCPU_SIZE_32
        h.extv = False
        h.xcnt = 0
        h.pv_info_records = []
        h.extended = first == ones
        if h.extended:
            total = self._u32("extended-info size")
            if total > MAX_EXT_INFO:
                raise StreamError("extended info too long", offset=at + w,
                                  expected=f"at most {MAX_EXT_INFO} bytes", found=str(total))
            used = 0
            saw_vcpu = False
            while used < total:
                b_at = src.pos
                if total - used < F.EXT_BLOCK.size:
                    raise StreamError("extended-info block header overruns total_bytes",
                                      offset=b_at, expected=f"{F.EXT_BLOCK.size} bytes",
                                      found=f"{total - used} left of {total}")
                bid, size = F.EXT_BLOCK.unpack(src.read(F.EXT_BLOCK.size, "extended-info block"))
                used += F.EXT_BLOCK.size
                if size > total - used:
                    raise StreamError(f"extended-info block {bid!r} overruns total_bytes",
                                      offset=b_at + 4, expected=f"at most {total - used}",
                                      found=str(size))
                data = src.read(size, f"extended-info block {bid!r}")
                used += size
                h.blocks.append((b_at, bid, size))
                if bid == b"vcpu":
                    if size == F.PV_VCPU_SIZE_64:
                        h.guest_width = 8
                    elif size == F.PV_VCPU_SIZE_32:
                        h.guest_width = 4
                    else:
                        raise StreamError("bad 'vcpu' extended-info block size", offset=b_at + 4,
                                          expected="0x1430 (64-bit guest) or 0xaf0 (32-bit guest)",
                                          found=hex(size))
                    h.vcpu_size = size
                    saw_vcpu = True
                    # Xen's script writes X86_PV_INFO for each 'vcpu' block it meets.
                    h.pv_info_records.append(h.guest_width)
                elif bid == b"extv":
                    h.extv = True
                elif bid == b"xcnt":
                    if size < 4:
                        raise StreamError("short 'xcnt' block", offset=b_at + 4,
                                          expected="at least 4 bytes", found=str(size))
                    h.xcnt = F.U32.unpack_from(data, 0)[0]
                    if h.xcnt and (h.xcnt < 16 or h.xcnt > MAX_XSAVE):
                        raise StreamError("bad xsave size in 'xcnt' block", offset=b_at + 8,
                                          expected=f"0 or 16..{MAX_XSAVE}", found=str(h.xcnt))
                else:
                    self.warn(f"unknown extended-info block {bid!r} ({size} bytes) at offset "
                              f"{b_at} skipped, as libxc does")
            if not saw_vcpu:
                self.warn("PV extended info has no 'vcpu' block: assuming a "
                          f"{8 * w}-bit guest (the toolstack's width)")
                h.pv_info_records.append(w)
        else:
            self.warn("PV stream without extended info (Xen 3.0 era): assuming a "
                      f"{8 * w}-bit guest")
            h.pv_info_records.append(w)
        h.levels = 4 if h.guest_width == 8 else 3
        nframes = F.p2m_frame_count(self.p2m_size, h.guest_width)
        frames = self._ulongs(nframes - (0 if h.extended else 1), "p2m frame list")
        frames = array("Q", frames)
        if not h.extended:
            frames.insert(0, first)
        h.frames = frames
        return h

    # ---------------------------------------------------------- body
    def __iter__(self):
        return self._records()

    def _records(self):
        src = self.src
        cp = 1
        compress_next = False
        while True:
            compressed = cp > 1 and compress_next
            verify = False
            last = False
            while True:
                at = src.pos
                cid = self._i32("chunk id")
                if cid > 0:
                    b = self._batch(at, cid, cp, compressed, verify)
                    yield b
                    if not compressed and b.n_data:
                        left = b.pages_at + b.n_data * PAGE - src.pos
                        if left > 0:
                            src.skip(left, "page data")
                    continue
                if cid == 0:
                    yield EndOfBody(at, cp)
                    break
                chunk = self._chunk(at, cid, cp, compressed)
                if cid == F.ENABLE_VERIFY_MODE:
                    verify = True
                elif cid == F.LAST_CHECKPOINT:
                    last = True
                elif cid == F.ENABLE_COMPRESSION and cp == 1:
                    compress_next = True
                elif cid == F.VCPU_INFO:
                    self.online = chunk.value[1]
                yield chunk
            if self.guest == "hvm":
                yield self._hvm_tail(cp)
                q = self._qemu(cp)
                yield q
                if q.data is None:
                    left = q.data_at + q.length - src.pos
                    if left > 0:
                        src.skip(left, "qemu data")
            else:
                yield self._pv_tail(cp)
            yield CheckpointEnd(src.pos, cp, last)
            # Asked for more: is there more?
            if last or src.at_eof():
                return
            cp += 1

    def _batch(self, at, count, cp, compressed, verify):
        if count > F.MAX_BATCH:
            raise StreamError("page batch too large", offset=at,
                              expected=f"at most {F.MAX_BATCH} entries (MAX_BATCH)",
                              found=f"{count} entries")
        arr = self._ulongs(count, "PFN array")
        b = Batch(at, cp, count)
        b.verify = verify
        b.compressed = compressed
        p2m = self.p2m_size
        mx = max(arr)
        if mx < 0x10000000 and mx < p2m:
            # Every entry an ordinary page with a valid pfn: the v2 entries are
            # the values themselves, and every entry carries a page.
            out = arr if self.width == 8 else array("Q", arr)
            b.kept = arr
            b.out = out
            b.n_data = count
            b.data_pfns = out
            b.data_types = None
            b.dup = len(set(arr)) != count
        else:
            self._odd_batch(b, arr, at + 4)
        b.pages_at = self.src.pos
        if not compressed and b.n_data:
            try:
                self.src.need(b.n_data * PAGE, "page data")
            except TruncatedStream as exc:
                raise _page_truncation(b, exc) from None
        return b

    def _odd_batch(self, b, arr, entries_at):
        """A batch with other entries than ordinary pages (XTAB holes, page
        tables, XALLOC, BROKEN, or values libxc would refuse): numpy, loaded
        the first time one is met."""
        import numpy as np
        a = np.frombuffer(arr, dtype=np.uint64 if self.width == 8 else np.uint32) \
            .astype(np.uint64)
        keep = a != np.uint64(BARE_XTAB)
        kept = a[keep]
        nib = kept & np.uint64(0xF0000000)
        pfn = kept & np.uint64(0x0FFFFFFF)
        isdata = nib < np.uint64(0xD0000000)
        b.kept = kept
        b.out = (nib << np.uint64(32)) | pfn
        b.data_pfns = pfn[isdata]
        b.n_data = int(b.data_pfns.size)
        b.data_types = (nib[isdata] >> np.uint64(28)).astype(np.uint8).tobytes()
        srt = np.sort(kept)
        b.dup = bool((srt[1:] == srt[:-1]).any())
        # What libxc would refuse; Xen's converter passes it on.
        t = (nib >> np.uint64(28)).astype(np.uint8)
        upper = (kept >> np.uint64(32)) != 0
        badtype = (t >= 5) & (t <= 7)
        badpfn = (t != F.XTAB) & (pfn >= np.uint64(self.p2m_size))
        odd = np.flatnonzero(upper | badtype | badpfn)
        if odd.size:
            i = int(odd[0])
            x = int(kept[i])
            if upper[i]:
                why = f"entry {x:#x} has bits 63..32 set (converted as pfn {x & 0x0FFFFFFF:#x})"
            elif badtype[i]:
                why = f"entry {x:#x} has the invalid page type {int(t[i])}"
            else:
                why = f"entry {x:#x}: pfn {x & 0x0FFFFFFF} is not below p2m_size {self.p2m_size}"
            at = entries_at + int(np.flatnonzero(keep)[i]) * self.width
            b.odd = (at, why)
            self.warn(f"{why} at offset {at}; libxc would refuse it, Xen's converter passes "
                      "it on and so does this one")

    def _chunk(self, at, cid, cp, compressed):
        src = self.src
        name = F.CHUNK_NAMES.get(cid)
        if name is None:
            raise StreamError("unknown chunk id", offset=at,
                              expected="a batch size 1..1024, 0, or a chunk id -1..-20",
                              found=str(cid))
        value = None
        if cid in F.HVM_PARAM_CHUNKS:
            value = F.PAD_U64.unpack(src.read(F.PAD_U64.size, name))[1]
        elif cid == F.VCPU_INFO:
            max_id = self._i32("VCPU_INFO max_vcpu_id")
            if max_id > F.MAX_VCPU_ID:
                raise StreamError("bad VCPU_INFO max_vcpu_id", offset=at + 4,
                                  expected=f"0..{F.MAX_VCPU_ID}", found=str(max_id))
            words = max(max_id // 64 + 1, 0)
            bitmap = struct.unpack(f"<{words}Q", src.read(words * 8, "VCPU_INFO map"))
            online = [i * 64 + bit for i, word in enumerate(bitmap) if word
                      for bit in range(64) if word >> bit & 1 and i * 64 + bit <= max_id]
            if max_id < 0:
                self.warn(f"VCPU_INFO at offset {at} has max_vcpu_id {max_id}: no vcpu online")
            value = (max_id, online)
        elif cid == F.TSC_INFO:
            value = F.TSC_INFO_LAYOUT.unpack(src.read(F.TSC_INFO_LAYOUT.size, name))
        elif cid == F.TOOLSTACK:
            n = self._u32("TOOLSTACK length")
            value = self._bounded(n, MAX_TOOLSTACK, "TOOLSTACK data", at + 4)
        elif cid == F.COMPRESSED_DATA:
            n = self._ulong("COMPRESSED_DATA length")
            if not compressed:
                raise StreamError("COMPRESSED_DATA outside a compressed checkpoint", offset=at,
                                  expected="page data only after ENABLE_COMPRESSION, "
                                           "from checkpoint 2 on",
                                  found=f"{n} compressed bytes in checkpoint {cp}")
            value = src.read(n, "COMPRESSED_DATA")
        elif cid in (F.TMEM, F.TMEM_EXTRA):
            raise UnsupportedStream(f"{name} chunk (transcendent memory state) is not "
                                    "supported; the guest used tmem", offset=at)
        return Chunk(at, cp, cid, value, src.pos - at)

    # ---------------------------------------------------------- tails
    def _hvm_tail(self, cp):
        src = self.src
        at = src.pos
        magic = F.MAGIC_PFNS.unpack(src.read(F.MAGIC_PFNS.size, "HVM tail magic pfns"))
        n = self._u32("HVM context length")
        context = self._bounded(n, MAX_HVM_CONTEXT, "HVM context", src.pos - 4)
        return HVMTail(at, cp, magic, context)

    def _qemu(self, cp):
        src = self.src
        at = src.pos
        sig = src.read(F.QEMU_SIG_LEN, "qemu record signature")
        if sig == F.QEMU_TO_EOF:
            nxt = src.peek(5)
            rem = src.remaining()
            if nxt[:1] == b"\n" and len(nxt) == 5 and (
                    self.wrapper == "xenserver"
                    or (rem is not None and int.from_bytes(nxt[1:5], "big") == rem - 5)):
                src.skip(1, "XenServer qemu record")
                n = int.from_bytes(src.read(4, "XenServer qemu length"), "big")
                if n > MAX_QEMU:
                    raise StreamError("qemu data too long", offset=src.pos - 4,
                                      expected=f"at most {MAX_QEMU} bytes", found=f"{n} bytes")
                src.need(n, "qemu data")
                return Qemu(at, cp, sig.decode() + "\\n", "xenserver", n, None, src.pos, src)
            if rem is not None:
                return Qemu(at, cp, sig.decode(), "to-eof", rem, None, src.pos, src)
            data_at = src.pos
            data = src.read_to_eof("qemu data", MAX_QEMU)
            return Qemu(at, cp, sig.decode(), "to-eof", len(data), data, data_at, src)
        if sig in (F.QEMU_V2, F.QEMU_REMUS):
            n = self._u32("qemu record length")
            if n > MAX_QEMU:
                raise StreamError("qemu data too long", offset=src.pos - 4,
                                  expected=f"at most {MAX_QEMU} bytes", found=f"{n} bytes")
            src.need(n, "qemu data")
            return Qemu(at, cp, sig.decode(), "length", n, None, src.pos, src)
        raise StreamError("bad qemu record signature", offset=at,
                          expected="'QemuDeviceModelRecord', 'DeviceModelRecord0002' or "
                                   "'RemusDeviceModelState'",
                          found=repr(sig))

    def _pv_tail(self, cp):
        src, h = self.src, self.pv
        at = src.pos
        count = self._u32("PV tail unmapped pfn count")
        if count > F.MAX_UNMAPPED:
            raise StreamError("bad unmapped pfn count", offset=at,
                              expected=f"at most {F.MAX_UNMAPPED}", found=str(count))
        src.skip(count * self.width, "unmapped pfn list")
        vcpus = []
        for vid in self.online:
            ctx = src.read(h.vcpu_size, f"vcpu {vid} context")
            ext = src.read(F.PV_EXT_VCPU_SIZE, f"vcpu {vid} extended context") if h.extv else None
            xsave = None
            if h.xcnt:
                x_at = src.pos
                blob = src.read(h.xcnt, f"vcpu {vid} xsave area")
                _mask, size = F.XSAVE_HEAD.unpack_from(blob, 0)
                if size != h.xcnt - F.XSAVE_HEAD.size:
                    raise StreamError(f"vcpu {vid} xsave size disagrees with 'xcnt'",
                                      offset=x_at + 8,
                                      expected=str(h.xcnt - F.XSAVE_HEAD.size), found=str(size))
                xsave = blob[F.XSAVE_HEAD.size:]
            vcpus.append((vid, ctx, ext, xsave))
        shared = src.read(F.SHARED_INFO_SIZE, "shared info page")
        return PVTail(at, cp, count, vcpus, shared)


# ==================================================================== helpers
def libxl_physmap(data, width, at):
    """libxl's version-1 toolstack record -> the xenstore key/value blob
    Xen's converter makes of it (EMULATOR_XENSTORE_DATA), with its checks."""
    def bad(msg):
        return StreamError(msg, offset=at, expected="a libxl version-1 toolstack record",
                           found=f"{len(data)} bytes")
    if len(data) < 8:
        raise bad("overly short libxl toolstack data")
    version, count = struct.unpack_from("<II", data, 0)
    if version != 1:
        raise StreamError("cannot decode the libxl toolstack record", offset=at,
                          expected="version 1", found=f"version {version}")
    pos = 8
    leak = 4 if width == 8 else 0
    out = bytearray()
    for i in range(count):
        if len(data) - pos < 28:
            raise bad(f"toolstack data too short for physmap entry {i}")
        phys, start, size, namelen = struct.unpack_from("<QQQI", data, pos)
        pos += 28
        if namelen == 0:
            raise bad(f"physmap entry {i} has no name")
        if len(data) - pos < namelen + leak:
            raise bad(f"toolstack data too short for the name of physmap entry {i}")
        name = bytes(data[pos:pos + namelen])
        pos += namelen + leak
        if name[-1] != 0:
            raise bad(f"physmap entry {i}: name not NUL terminated")
        root = b"physmap/%x" % phys
        out += b"\0".join([root + b"/start_addr", b"%x" % start, root + b"/size", b"%x" % size,
                           root + b"/name", name[:-1]]) + b"\0"
    return bytes(out)


def _split_batch(b):
    """Groups (first entry, end entry, first page, end page) of a batch such
    that no pfn repeats inside a group (for batches Xen's script refuses;
    a rare case, walked entry by entry)."""
    groups = []
    seen = set()
    e0 = p0 = 0
    page = 0
    for i, x in enumerate(int(v) for v in b.kept):
        pfn = x & 0x0FFFFFFF
        if pfn in seen:
            groups.append((e0, i, p0, page))
            seen = set()
            e0, p0 = i, page
        seen.add(pfn)
        if (x & 0xF0000000) < 0xD0000000:
            page += 1
    groups.append((e0, len(b.kept), p0, page))
    return groups


def _entries_bytes(a):
    """v2 entries (array('Q') or a numpy uint64 array) as little-endian bytes."""
    if isinstance(a, array):
        if not _LITTLE:   # pragma: no cover
            a = array("Q", a)
            a.byteswap()
        return a.tobytes()
    return a.astype("<u8").tobytes()


class ConvertStats:
    """What convert() did.  as_dict() for JSON."""

    def __init__(self):
        self.wrapper = "none"
        self.width = None
        self.guest = None
        self.inferred = {}
        self.p2m_size = None
        self.format = None
        self.checkpoints = 0            # complete checkpoints read
        self.committed_checkpoint = 0   # the checkpoint the output holds
        self.compressed = False
        self.torn = None
        self.page_records = 0
        self.pages = 0
        self.records = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.qemu = None
        self.warnings = []
        self.copy_methods = []
        self.xl_header = None

    def count(self, name, n=1):
        self.records[name] = self.records.get(name, 0) + n

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items()}


# ==================================================================== converter
class Converter:
    def __init__(self, src, out, fmt="libxc", xl=False, skip_qemu=False, width=None,
                 guest=None, warn=None, info=None):
        if fmt not in ("libxc", "libxl"):
            raise ValueError("fmt must be 'libxc' or 'libxl'")
        if width not in (None, 32, 64):
            raise ValueError("width must be 32 or 64")
        if guest not in (None, "pv", "hvm"):
            raise ValueError("guest must be 'pv' or 'hvm'")
        self.src = src
        self.out = out
        self.libxl = fmt == "libxl"
        self.xl = xl
        self.skip_qemu = skip_qemu
        self.width = width
        self.guest = guest
        self._warn_cb = warn
        self._info_cb = info
        self.stats = ConvertStats()
        self.stats.format = fmt
        self.consumed = 0               # stream offset up to which the output used the input

    def warn(self, msg):
        self.stats.warnings.append(msg)
        if self._warn_cb:
            self._warn_cb(msg)

    def info(self, msg):
        if self._info_cb:
            self._info_cb(msg)

    # ---------------------------------------------------------- headers
    def _wrapper(self):
        src, out = self.src, self.out
        head = src.peek(64)
        if head.startswith(F.XL_MAGIC):
            at = src.pos
            src.skip(len(F.XL_MAGIC), "xl header")
            byteorder, mflags, oflags, optlen = F.XL_HEADER.unpack(
                src.read(F.XL_HEADER.size, "xl header"))
            if mflags & F.XL_FLAG_STREAMV2:
                raise UnsupportedStream("this xl save file carries a v2 stream (mandatory flag "
                                        "STREAMv2), not a legacy stream", offset=at + 36)
            if byteorder != F.XL_BYTEORDER:
                self.warn(f"xl header byte order 0x{byteorder:08x} at offset {at + 32} is not "
                          "0x01020304 (copied as it is)")
            if mflags & ~(F.XL_FLAG_JSON | F.XL_FLAG_STREAMV2):
                self.warn(f"xl header has unknown mandatory flags 0x{mflags:x} (copied)")
            if optlen > 64 << 20:
                raise StreamError("xl optional data too long", offset=at + 44,
                                  expected="at most 64 MiB", found=str(optlen))
            opt = src.read(optlen, "xl optional data")
            if self.libxl:
                mflags |= F.XL_FLAG_STREAMV2
            out.write(F.XL_MAGIC + F.XL_HEADER.pack(byteorder, mflags, oflags, optlen))
            out.write(opt)
            self.stats.wrapper = "xl"
            self.stats.xl_header = {"input_length": 48 + optlen, "mandatory_flags": mflags}
            if not self.xl:
                self.info("xl header found: copied to the output as with -x")
            return "xl"
        if self.xl:
            raise StreamError("no xl header", offset=src.pos,
                              expected=f"the xl magic {F.XL_MAGIC!r} (-x/--xl was given)",
                              found=repr(head[:32]))
        if any(head.startswith(m) for m in _WRAPPER_MAGICS):
            from .wrappers import detect   # loads numpy; only for these wrappers
            w = detect(src)
            self.stats.wrapper = w.kind
            if w.kind != "none":
                self.info(f"{w.kind} wrapper: libxc image at offset {w.image_offset}; the "
                          "wrapper's header is not part of the output")
            return w.kind
        return "none"

    def _headers(self, p):
        out = self.out
        if self.libxl:
            out.write(v2.libxl_header())
            out.write(v2.record(v2.LREC_LIBXC_CONTEXT))
            self.stats.count("libxl LIBXC_CONTEXT")
        out.write(v2.image_header())
        out.write(v2.domain_header(p.guest))
        if p.pv is not None:
            for gw in p.pv.pv_info_records:
                out.write(v2.pv_info(gw, 4 if gw == 8 else 3))
                self.stats.count("X86_PV_INFO")
        out.write(v2.record(v2.REC_STATIC_DATA_END))
        self.stats.count("STATIC_DATA_END")
        if p.pv is not None:
            out.write(v2.p2m_frames(p.p2m_size, _entries_bytes(p.pv.frames)))
            self.stats.count("X86_PV_P2M_FRAMES")

    # ---------------------------------------------------------- first checkpoint
    def _emit_batch(self, b):
        out, src = self.out, self.src
        groups = _split_batch(b) if b.dup else ((0, len(b.out), 0, b.n_data),)
        if b.dup:
            self.warn(f"the {b.count}-entry batch at offset {b.offset} repeats a pfn: written "
                      f"as {len(groups)} PAGE_DATA records applied in order, as libxc applies "
                      "the batch (Xen's converter refuses it)")
        ents = _entries_bytes(b.out)
        for e0, e1, p0, p1 in groups:
            out.write(v2.page_data_head(e1 - e0, p1 - p0))
            out.write(ents[8 * e0:8 * e1] if (e0, e1) != (0, len(b.out)) else ents)
            n = (p1 - p0) * PAGE
            if n:
                try:
                    done = copy_extent(src, out, n, "page data")
                except TruncatedStream as exc:
                    raise _page_truncation(b, exc) from None
                if done < n:
                    raise _page_truncation(b, TruncatedStream("page data", b.pages_at +
                                                              p0 * PAGE + done, n - done, 0))
            self.stats.page_records += 1
            self.stats.pages += p1 - p0
        self.stats.count("PAGE_DATA", len(groups))

    def run(self):
        st = self.stats
        src = self.src
        kind = self._wrapper()
        p = LegacyParser(src, self.width, self.guest, warn=self.warn, wrapper=kind)
        self.parser = p
        st.width, st.guest, st.inferred, st.p2m_size = p.width * 8, p.guest, p.inferred, \
            p.p2m_size
        self.info(f"libxc image at offset {p.start}: {p.width * 8}-bit toolstack "
                  f"({p.inferred.get('width')}), {p.guest.upper()} guest "
                  f"({p.inferred.get('guest')}), p2m_size {p.p2m_size}")
        self._headers(p)
        hvm = p.guest == "hvm"
        want_qemu = hvm and (self.libxl or not self.skip_qemu)

        # ---- checkpoint 1, written as it is read (Xen's record order)
        params = []            # (index, value) in stream order, duplicates kept
        emu_xs = bytearray()
        held = []              # records after the body, written once it is known
        compression = False
        last = False
        tail = qemu = None
        it = iter(p)
        regular = isinstance(src, PreadSource)
        cp1_batches = [] if regular else None
        end = None
        trailer_done = False
        for rec in it:
            if isinstance(rec, Batch):
                self._emit_batch(rec)
                if cp1_batches is not None and not rec.verify and rec.n_data:
                    cp1_batches.append((rec.offset, rec.count, rec.pages_at))
            elif isinstance(rec, Chunk):
                cid = rec.id
                if cid == F.TSC_INFO:
                    mode, nsec, khz, inc = rec.value
                    self.out.write(v2.tsc_info(mode, khz, nsec, inc))
                    st.count("X86_TSC_INFO")
                elif cid in F.HVM_PARAM_CHUNKS:
                    params.append((F.HVM_PARAM_CHUNKS[cid][1], rec.value))
                elif cid == F.TOOLSTACK:
                    if self.libxl and rec.value:
                        emu_xs += libxl_physmap(rec.value, p.width, rec.offset)
                elif cid == F.ENABLE_COMPRESSION:
                    compression = True
                elif cid == F.LAST_CHECKPOINT:
                    last = True
                elif cid == F.ENABLE_VERIFY_MODE:
                    self.info(f"debug stream: verification pass from offset {rec.offset} "
                              "(converted as ordinary pages, as Xen's converter does)")
            elif isinstance(rec, EndOfBody):
                if params:
                    if hvm:
                        held.append(("HVM_PARAMS", v2.hvm_params(params)))
                    else:
                        self.warn(f"{len(params)} HVM param chunk(s) in a PV stream ignored, "
                                  "as libxc ignores them")
            elif isinstance(rec, HVMTail):
                tail = rec
                held.extend(self._hvm_tail_records(rec))
                self.consumed = src.pos
                if not want_qemu and not compression:
                    break          # Xen reads nothing more (xenopsd reads the qemu record)
            elif isinstance(rec, Qemu):
                qemu = rec
                if not want_qemu:
                    continue
                if not compression and (last or self._ends_at_eof(rec)):
                    # Nothing can follow: finish now, moving the qemu data
                    # straight from the input.
                    self._write_held(held)
                    held = []
                    self._write_trailer(emu_xs, rec)
                    trailer_done = True
                else:
                    rec.read()
            elif isinstance(rec, PVTail):
                tail = rec
                held.extend(self._pv_tail_records(rec))
            elif isinstance(rec, CheckpointEnd):
                end = rec
                self.consumed = rec.offset
                st.checkpoints = 1
                break
        st.committed_checkpoint = 1
        st.compressed = compression
        more = end is not None and not last and (compression or (regular and not src.at_eof()))
        if not more:
            if not trailer_done:
                self._finish_single(held, emu_xs, qemu if want_qemu else None)
        else:
            later = _Later(self, p, it, cp1_batches, params, emu_xs, tail, qemu)
            try:
                later.run()
                if later.committed > 1:
                    later.finish(want_qemu)
                else:
                    # Nothing after checkpoint 1 was complete (or it was not a
                    # checkpoint at all, just trailing bytes): Xen's output.
                    self._finish_single(held, emu_xs, qemu if want_qemu else None)
            finally:
                later.close()
        self.out.flush()
        st.bytes_out = self.out.pos
        st.bytes_in = self.consumed
        st.copy_methods = sorted(self.out.methods)
        st.warnings = list(st.warnings)
        return st

    def _ends_at_eof(self, q):
        rem = self.src.remaining()
        return rem is not None and q.data is None and q.data_at + q.length == self.src.size

    def _hvm_tail_records(self, t):
        io, bufio, store = t.magic_pfns
        return [("HVM_PARAMS", v2.hvm_params([(5, io), (6, bufio), (1, store)])),
                ("HVM_CONTEXT", v2.record(v2.REC_HVM_CONTEXT, t.context)),
                ("END", v2.end_record())]

    def _pv_tail_records(self, t):
        recs = []
        for vid, ctx, ext, xsave in t.vcpus:
            recs.append(("X86_PV_VCPU_BASIC", v2.vcpu_record(v2.REC_X86_PV_VCPU_BASIC, vid, ctx)))
            if ext is not None:
                recs.append(("X86_PV_VCPU_EXTENDED",
                             v2.vcpu_record(v2.REC_X86_PV_VCPU_EXTENDED, vid, ext)))
            if xsave is not None:
                recs.append(("X86_PV_VCPU_XSAVE",
                             v2.vcpu_record(v2.REC_X86_PV_VCPU_XSAVE, vid, xsave)))
        recs.append(("SHARED_INFO", v2.record(v2.REC_SHARED_INFO, t.shared_info)))
        recs.append(("END", v2.end_record()))
        return recs

    def _write_held(self, held):
        for name, data in held:
            self.out.write(data)
            self.stats.count(name)

    def _finish_single(self, held, emu_xs, qemu):
        self._write_held(held)
        self._write_trailer(emu_xs, qemu)

    def _write_trailer(self, emu_xs, qemu):
        """What follows the libxc END: libxl's emulator records and END, or
        for a bare libxc stream the raw qemu record Xen's script appends."""
        out, st = self.out, self.stats
        if self.libxl and emu_xs:
            out.write(v2.emulator_record(v2.LREC_EMULATOR_XENSTORE_DATA, bytes(emu_xs)))
            st.count("libxl EMULATOR_XENSTORE_DATA")
        if qemu is not None:
            st.qemu = {"signature": qemu.signature, "length": qemu.length}
            if qemu.signature != v2.QEMU_RAW_SIGNATURE.decode():
                self.info(f"qemu record {qemu.signature!r} written as "
                          + ("EMULATOR_CONTEXT" if self.libxl else "DeviceModelRecord0002"))
            if self.libxl:
                out.write(v2.RH.pack(v2.LREC_EMULATOR_CONTEXT, 8 + qemu.length)
                          + v2.EMULATOR_HEAD.pack(v2.EMULATOR_ID_UNKNOWN, 0))
                self._qemu_payload(qemu)
                out.write(bytes(v2.padding(8 + qemu.length)))
                st.count("libxl EMULATOR_CONTEXT")
            else:
                out.write(v2.QEMU_RAW_SIGNATURE + struct.pack("<I", qemu.length))
                self._qemu_payload(qemu)
                st.count("raw qemu record")
        if self.libxl:
            out.write(v2.record(v2.LREC_END))
            st.count("libxl END")

    def _qemu_payload(self, q):
        if q.data is not None:
            self.out.write(q.data)
            return
        done = copy_extent(self.src, self.out, q.length, "qemu data")
        if done < q.length:
            raise TruncatedStream("qemu data", q.data_at + done, q.length, done)
        self.consumed = max(self.consumed, self.src.pos)


def _page_truncation(b, exc):
    """A truncation inside a batch's page data, named by page (as the reader does)."""
    page = max(0, min((exc.offset - b.pages_at) // PAGE, b.n_data - 1))
    pfn = b.data_pfns[page] if b.n_data else 0
    return TruncatedStream(
        f"data page {page} (pfn {pfn}) of the {b.count}-entry batch at offset {b.offset}, "
        f"which starts at offset {b.pages_at + page * PAGE}",
        exc.offset, b.pages_at + (page + 1) * PAGE - exc.offset,
        exc.offset - b.pages_at - page * PAGE)


# ==================================================================== later checkpoints
class _Later:
    """Checkpoints after the first (Remus).

    Each is held back until its tail has been read: format A pages go to a
    spool file, format B compressed bytes too.  When it commits, its pages
    are applied to the shadow, a sparse temporary file with room for every
    pfn, and the pfns whose content (or page type) changed are remembered.
    At the end one set of PAGE_DATA records carries every changed page, in
    pfn order, followed by the committed checkpoint's metadata and tail.

    A delta-encoded page needs the receiver's previous copy.  Xen's
    compressor sends a page in full the first time it goes through its
    cache, so that copy is normally in the shadow already; if the previous
    copy is a first-checkpoint page, it is read back from the input (regular
    files only).
    """

    def __init__(self, conv, parser, it, cp1_batches, params, emu_xs, tail, qemu):
        import tempfile

        import numpy as np

        from . import kernels
        self.np = np
        self.kernels = kernels
        self.conv = conv
        self.p = parser
        self.it = it
        self.src = conv.src
        self.cp1_batches = cp1_batches
        self._cp1_offsets = None
        p2m = parser.p2m_size
        self.p2m = p2m
        tmpdir = os.environ.get("XLEGACY_TMPDIR") or None
        self.shadow_file = tempfile.TemporaryFile(prefix="xlegacy-shadow-", dir=tmpdir)
        os.ftruncate(self.shadow_file.fileno(), p2m * PAGE)
        import mmap
        self._map = mmap.mmap(self.shadow_file.fileno(), p2m * PAGE) if p2m else None
        self.shadow = np.frombuffer(self._map, dtype=np.uint8) if p2m else \
            np.zeros(0, np.uint8)
        self.valid = np.zeros(p2m, dtype=np.bool_)     # shadow holds the latest copy
        self.changed = np.zeros(p2m, dtype=np.bool_)   # goes into the final records
        self.ptype = np.zeros(p2m, dtype=np.uint8)     # latest page type nibble
        self.nodata = {}                               # pfn -> XALLOC/BROKEN type
        self.spool = tempfile.TemporaryFile(prefix="xlegacy-spool-", dir=tmpdir, buffering=0)
        self.spool_out = Output(self.spool.fileno())
        self._spool_map = None
        # committed metadata (start: checkpoint 1's)
        self.params = {}
        for i, v in params:
            self.params[i] = v
        self.emu_xs = bytes(emu_xs)
        self.tail = tail
        self.qemu = qemu
        self.tsc = None
        self.committed = 1
        # Checkpoint 1 was streamed without keeping anything; for a regular
        # file its pages can be found again (delta bases) and, for PV, the
        # page types a later checkpoint may change (pinned page tables).
        self._cp1_types = None
        if cp1_batches is not None and parser.guest == "pv":
            self._cp1_page_offsets()
            self.ptype[:] = self._cp1_types

    # ---------------------------------------------------------- reading
    def run(self):
        """Read checkpoints until the last, the end of the stream or one that
        is cut or unreadable (dropped: the output holds the one before).  An
        error while applying a complete checkpoint is raised."""
        conv, st = self.conv, self.conv.stats
        self.cp = None
        while True:
            try:
                rec = next(self.it, None)
                if rec is None:
                    return
                if self.cp is None:
                    self._begin(rec.checkpoint)
                if not isinstance(rec, CheckpointEnd):
                    self._record(rec)
                    continue
            except CorruptCheckpoint:
                raise
            except (StreamError, UnsupportedStream) as exc:
                number = self.cp if self.cp is not None else self.committed + 1
                st.torn = {"checkpoint": number, "offset": getattr(exc, "offset", None),
                           "reason": str(exc)}
                conv.warn(f"checkpoint {number} is incomplete or unreadable ({exc}); it was "
                          f"discarded and the output holds checkpoint {self.committed}, the "
                          "last complete one")
                return
            self._commit(rec)
            conv.consumed = rec.offset
            st.checkpoints = st.committed_checkpoint = rec.checkpoint
            self.cp = None
            if rec.last:
                return

    def _record(self, rec):
        if isinstance(rec, Batch):
            self._batch(rec)
        elif isinstance(rec, Chunk):
            self._chunk(rec)
        elif isinstance(rec, (HVMTail, PVTail)):
            self.pend["tail"] = rec
        elif isinstance(rec, Qemu):
            rec.read()
            self.pend["qemu"] = rec

    def _begin(self, cp):
        self.cp = cp
        self._release_spool()
        self.spool.seek(0)
        self.spool.truncate(0)
        self.spool_pos = 0
        self.pend = {"batches": [], "cmap": [0], "cstream": [0], "params": [], "tsc": None,
                     "emu": None, "tail": None, "qemu": None, "cbytes": 0}

    def _batch(self, b):
        np = self.np
        kept = np.asarray(b.kept, dtype=np.uint64)
        types = ((kept >> np.uint64(28)) & np.uint64(0xF)).astype(np.uint8)
        pfns = (kept & np.uint64(0x0FFFFFFF)).astype(np.int64)
        bad = np.flatnonzero((types != 0xF) & (pfns >= self.p2m))
        if bad.size:
            i = int(bad[0])
            raise StreamError("pfn out of range in a later checkpoint", offset=b.offset + 4,
                              expected=f"pfns below p2m_size {self.p2m}",
                              found=f"pfn {int(pfns[i])} (entry {int(kept[i]):#x})")
        entry = {"types": types, "pfns": pfns, "verify": b.verify, "n_data": b.n_data}
        if not b.compressed and b.n_data:
            n = b.n_data * PAGE
            if b.verify:
                self.src.skip(n, "page data")
            else:
                entry["spool"] = self.spool_pos
                done = copy_extent(self.src, self.spool_out, n, "page data")
                self.spool_out.flush()
                if done < n:
                    raise _page_truncation(b, TruncatedStream("page data", b.pages_at + done,
                                                              n - done, 0))
                self.spool_pos += n
        self.pend["batches"].append(entry)

    def _chunk(self, c):
        pend = self.pend
        cid = c.id
        if cid in F.HVM_PARAM_CHUNKS:
            pend["params"].append((F.HVM_PARAM_CHUNKS[cid][1], c.value))
        elif cid == F.TSC_INFO:
            pend["tsc"] = c.value
        elif cid == F.TOOLSTACK:
            if self.conv.libxl and c.value:
                pend["emu"] = (pend["emu"] or b"") + libxl_physmap(c.value, self.p.width,
                                                                   c.offset)
            elif pend["emu"] is None:
                pend["emu"] = b""
        elif cid == F.COMPRESSED_DATA:
            data = c.value
            if data:
                pend["cmap"].append(self.spool_pos)
                pend["cstream"].append(c.offset + 4 + self.p.width)
                self.spool_out.write(data)
                self.spool_out.flush()
                self.spool_pos += len(data)
                pend["cbytes"] += len(data)
        elif cid == F.ENABLE_COMPRESSION:
            self.conv.info(f"ENABLE_COMPRESSION in checkpoint {c.checkpoint} at offset "
                           f"{c.offset} has no effect (only checkpoint 1's counts)")

    # ---------------------------------------------------------- commit
    def _spool_array(self):
        np = self.np
        if not self.spool_pos:
            return np.zeros(0, np.uint8)
        import mmap
        self._spool_map = mmap.mmap(self.spool.fileno(), self.spool_pos,
                                    access=mmap.ACCESS_READ)
        return np.frombuffer(self._spool_map, dtype=np.uint8)

    def _release_spool(self):
        if self._spool_map is not None:
            try:
                self._spool_map.close()
            except BufferError:   # pragma: no cover - a view is still alive
                pass
            self._spool_map = None

    def _commit(self, end):
        np = self.np
        pend = self.pend
        live = [e for e in pend["batches"] if not e["verify"]]
        if live:
            types = np.concatenate([e["types"] for e in live])
            pfns = np.concatenate([e["pfns"] for e in live])
        else:
            types = np.zeros(0, np.uint8)
            pfns = np.zeros(0, np.int64)
        isdata = types < 0xD
        dpfns = pfns[isdata]
        dtypes = types[isdata]
        data = self._spool_array()
        if self._compressed():
            cmap, cstream = pend["cmap"], pend["cstream"]

            def locate(off):
                i = bisect.bisect_right(cmap, off) - 1
                return cstream[i] + (off - cmap[i])
            from .faults import KernelFault
            try:
                starts, _kinds = self.kernels.delta_index(data, dpfns.size, locate=locate)
            except KernelFault as exc:
                # (no last_good: CorruptCheckpoint would advise a restore option)
                raise CorruptCheckpoint(
                    f"checkpoint {self.cp} cannot be applied: {exc.message}",
                    offset=exc.offset, expected=exc.expected, found=exc.found,
                    checkpoint=self.cp) from exc
            first = data[starts[:-1].astype(np.int64)] if dpfns.size else np.zeros(0, np.uint8)
            empty = first == 0x00
            full = first == 0x80
            # A delta needs the previous copy; so does an unchanged page whose
            # type changes (it is written again with its new type).
            retype = empty & (dtypes != self.ptype[dpfns])
            self._ensure_base(dpfns[(~empty & ~full) | retype])
            if dpfns.size:
                self.kernels.delta_apply(data, starts, dpfns.astype(np.uint64), self.shadow,
                                         0, dpfns.size, locate=locate)
            touched = dpfns[~empty | retype]
        else:
            touched = dpfns
            shadow2d = self.shadow.reshape(-1, PAGE)
            for e in live:
                k = e["n_data"]
                if not k:
                    continue
                bp = e["pfns"][e["types"] < 0xD]
                pages = data[e["spool"]:e["spool"] + k * PAGE].reshape(-1, PAGE)
                if np.unique(bp).size == k:
                    shadow2d[bp] = pages
                else:     # a pfn repeated in the batch ends with its last copy
                    for i in range(k):
                        shadow2d[bp[i]] = pages[i]
        if touched.size:
            self.valid[touched] = True
            self.changed[touched] = True
        if dpfns.size:
            self.ptype[dpfns] = dtypes
        nodata = ~isdata & (types != 0xF)
        for pfn, t in zip(pfns[nodata].tolist(), types[nodata].tolist()):
            self.nodata[pfn] = t
        del data
        self._release_spool()
        self._unmap_resident()
        # metadata: what this checkpoint sent replaces what came before
        for i, v in pend["params"]:
            self.params[i] = v
        if pend["tsc"] is not None:
            self.tsc = pend["tsc"]
        if pend["emu"] is not None:
            self.emu_xs = pend["emu"]
        if pend["tail"] is not None:
            self.tail = pend["tail"]
        if pend["qemu"] is not None:
            self.qemu = pend["qemu"]
        self.committed = self.cp

    def _unmap_resident(self, start=0, end=None):
        """Let go of the shadow pages this process has mapped (all, or bytes
        start..end): they stay in the file (page cache), so memory use does
        not grow with the number of pages the checkpoints change."""
        import mmap
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            end = len(self._map) if end is None else end
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def _compressed(self):
        return self.conv.stats.compressed and self.cp > 1

    def _ensure_base(self, pfns):
        """Make the shadow hold the current copy of these pfns: read back
        first-checkpoint pages the shadow does not have."""
        np = self.np
        if not pfns.size:
            return
        missing = pfns[~self.valid[pfns]]
        if not missing.size:
            return
        offs = self._cp1_page_offsets()
        if offs is None:
            raise UnsupportedStream(
                f"checkpoint {self.cp} has {missing.size} compressed page(s) encoded against "
                "pages of the first checkpoint, which the converter can read back only from "
                "a regular file: convert the stream from a file, not a pipe")
        where = offs[missing]
        have = where >= 0
        fd = self.src.fd
        for pfn, off in zip(missing[have].tolist(), where[have].tolist()):
            self.shadow[pfn * PAGE:(pfn + 1) * PAGE] = np.frombuffer(
                os.pread(fd, PAGE, off), dtype=np.uint8)
        self.valid[missing] = True

    def _cp1_page_offsets(self):
        """File offset of every pfn's last checkpoint-1 page (-1: none), and
        (in self._cp1_types) its page type, read back from the input."""
        if self._cp1_offsets is not None:
            return self._cp1_offsets
        if self.cp1_batches is None:
            return None
        np = self.np
        offs = np.full(self.p2m, -1, dtype=np.int64)
        ptypes = np.zeros(self.p2m, dtype=np.uint8)
        src = self.src
        w = self.p.width
        for at, count, pages_at in self.cp1_batches:
            raw = os.pread(src.fd, count * w, src.base + at + 4)
            ents = np.frombuffer(raw, dtype="<u8" if w == 8 else "<u4").astype(np.uint64)
            data = (ents & np.uint64(0xF0000000)) < np.uint64(0xD0000000)
            pfns = (ents[data] & np.uint64(0x0FFFFFFF)).astype(np.int64)
            types = ((ents[data] >> np.uint64(28)) & np.uint64(0xF)).astype(np.uint8)
            idx = np.arange(pfns.size, dtype=np.int64)
            ok = pfns < self.p2m
            offs[pfns[ok]] = src.base + pages_at + idx[ok] * PAGE
            ptypes[pfns[ok]] = types[ok]
        self._cp1_offsets = offs
        self._cp1_types = ptypes
        return offs

    # ---------------------------------------------------------- output
    def finish(self, want_qemu):
        np = self.np
        conv, out, st = self.conv, self.conv.out, self.conv.stats
        if self.tsc is not None:
            mode, nsec, khz, inc = self.tsc
            out.write(v2.tsc_info(mode, khz, nsec, inc))
            st.count("X86_TSC_INFO")
        pfns = np.flatnonzero(self.changed)
        shadow2d = self.shadow.reshape(-1, PAGE) if self.p2m else None
        for i in range(0, pfns.size, F.MAX_BATCH):
            part = pfns[i:i + F.MAX_BATCH]
            ents = (self.ptype[part].astype(np.uint64) << np.uint64(60)) | part.astype(np.uint64)
            out.write(v2.page_data_head(part.size, part.size))
            out.write(ents.astype("<u8").tobytes())
            out.flush()
            out._write_all(memoryview(np.ascontiguousarray(shadow2d[part])).cast("B"))
            self._unmap_resident(int(part[0]) * PAGE, (int(part[-1]) + 1) * PAGE)
            st.page_records += 1
            st.pages += int(part.size)
            st.count("PAGE_DATA")
        extra = sorted((pfn, t) for pfn, t in self.nodata.items() if not self.changed[pfn])
        for i in range(0, len(extra), F.MAX_BATCH):
            part = extra[i:i + F.MAX_BATCH]
            out.write(v2.page_data_head(len(part), 0))
            out.write(struct.pack(f"<{len(part)}Q", *((t << 60) | pfn for pfn, t in part)))
            st.page_records += 1
            st.count("PAGE_DATA")
        held = []
        if self.p.guest == "hvm":
            if self.params:
                held.append(("HVM_PARAMS", v2.hvm_params(list(self.params.items()))))
            held.extend(conv._hvm_tail_records(self.tail))
        else:
            held.extend(conv._pv_tail_records(self.tail))
        conv._write_held(held)
        qemu = self.qemu if want_qemu else None
        if qemu is not None and qemu.data is None:
            qemu.read()
        conv._write_trailer(self.emu_xs, qemu)
        conv.info(f"checkpoint {self.committed} converted: {int(pfns.size)} pages changed "
                  "after checkpoint 1")

    def close(self):
        if self.shadow_file is None:
            return
        self.shadow = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
        self.shadow_file.close()
        self.shadow_file = None
        self._release_spool()
        self.spool_out.close()
        self.spool.close()


# ==================================================================== API
def convert(source, out, fmt="libxc", xl=False, skip_qemu=False, width=None, guest=None,
            warn=None, info=None):
    """Convert a legacy stream to a v2/v3 stream.

    source:    a path, a file descriptor (int), a binary file object, bytes
               or an xlegacy Source
    out:       a path (created/truncated), a file descriptor, or a binary file
               object (its fileno() is used when it has one)
    fmt:       "libxc" (a libxc v3 stream) or "libxl" (libxl v2 stream around it)
    xl:        the input must start with an xl header (copied to the output
               with the STREAMv2 flag set for libxl output); an xl header is
               copied even without it
    skip_qemu: libxc format: neither read nor write the qemu record (stop after
               the HVM context, as Xen's script does); libxl format ignores it
    width, guest: 32|64 and "pv"|"hvm"; inferred when None
    warn, info: optional callables for warnings and progress notes

    Returns a ConvertStats.  Raises StreamError (with offsets),
    UnsupportedStream, AmbiguousStream or OSError; output written before an
    error stays (as with Xen's script).  For a regular-file descriptor the
    file offset is left after the last input byte the output used.
    """
    src = open_input(source)
    own_src = not isinstance(source, (Source, int)) and src is not source
    o = out if isinstance(out, Output) else Output(out)
    conv = Converter(src, o, fmt=fmt, xl=xl, skip_qemu=skip_qemu, width=width, guest=guest,
                     warn=warn, info=info)
    try:
        stats = conv.run()
    finally:
        try:
            o.flush()
        finally:
            if not isinstance(out, Output):
                o.close()
            if isinstance(src, PreadSource) and isinstance(source, int):
                try:
                    os.lseek(src.fd, src.base + conv.consumed, os.SEEK_SET)
                except OSError:
                    pass
            if own_src:
                src.close()
    return stats


__all__ = ["convert", "ConvertStats", "Converter", "LegacyParser", "Output", "PipeSource",
           "open_input", "fd_source", "copy_extent", "libxl_physmap"]
