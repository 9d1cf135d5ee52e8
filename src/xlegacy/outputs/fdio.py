"""Moving bytes to a file descriptor: the loops every writer shares.

Each system call here may move fewer bytes than asked (a pipe, a signal, a
full socket buffer), and the in-kernel copies (copy_file_range, sendfile,
splice) are refused by some pairs of files.  These helpers resume short
writes and say plainly when the kernel refuses, so that the converter's
Output, the exporters' writer and the streaming of a sparse image to a pipe
do not each carry their own copy of the loops and of the errno sets.
(csrc/fdcopy.c is the C twin for the restorer's page copies: it runs
without the GIL, per batch.)
"""
import errno
import os

from ..fileio import pread_exact

# copy_file_range() cannot serve these two files (other file systems, a
# pipe or device, an old kernel): fall back to reading and writing.
NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                errno.EBADF, errno.EPERM, errno.ETXTBSY, errno.EOVERFLOW})
# sendfile()/splice() cannot serve these two files.
NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF,
                         errno.EOVERFLOW})
NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})

IOV_MAX = 1024
ZEROS = 1 << 20             # the zero block written for a hole of a streamed image
_zeros = None


def write_all(fd, data):
    """Write every byte of `data` to fd; returns the count."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    while mv:
        mv = mv[os.write(fd, mv):]
    return n


def writev_all(fd, parts):
    """Write the buffers `parts` in order with writev(), resuming after short
    writes and in slices of IOV_MAX; returns the byte count."""
    iov = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(p) for p in iov)
    i = 0
    while i < len(iov):
        k = os.writev(fd, iov[i:i + IOV_MAX])
        while k:
            if k >= len(iov[i]):
                k -= len(iov[i])
                i += 1
            else:
                iov[i] = iov[i][k:]
                k = 0
    return total


def copy_file_range_all(in_fd, offset, out_fd, n):
    """Append n bytes at `offset` of in_fd to out_fd in the kernel.  Returns
    the bytes copied: fewer than n when the input ends first, None when the
    kernel refuses these files before anything was copied."""
    return _in_kernel(lambda done: os.copy_file_range(in_fd, out_fd, n - done, offset + done),
                      NO_COPY_FILE_RANGE, n)


def sendfile_all(out_fd, in_fd, offset, n):
    """Like copy_file_range_all, with sendfile() (any output: a pipe, a
    socket, a device)."""
    return _in_kernel(lambda done: os.sendfile(out_fd, in_fd, offset + done, n - done),
                      NO_SENDFILE, n)


def _in_kernel(move, refused, n):
    """Call move(done) (bytes moved) until n bytes are moved or it moves
    none; None when its first call fails with an errno in `refused`."""
    done = 0
    while done < n:
        try:
            k = move(done)
        except OSError as exc:
            if done == 0 and exc.errno in refused:
                return None
            raise
        if not k:
            break
        done += k
    return done


class SplicePipe:
    """A private pipe through which bytes of a regular file reach another
    file descriptor in the kernel: splice() into the pipe takes references
    to the input's page-cache pages, splice() out of it makes the one copy.

    Unlike copy_file_range() and sendfile() between two files (which go
    through the same splice machinery with a 64 KiB internal pipe), the
    pipe is made PIPE_SIZE large, so each write into the output moves up to
    a megabyte.  With input and output offsets that disagree modulo the
    page size (a legacy page batch and a v2 PAGE_DATA record never agree),
    64 KiB writes cost ext4 about 60% more system time than cp's aligned
    copy while 1 MiB writes match it; a pread()/write() loop through a user
    buffer (two copies) costs 15-20% more than cp on tmpfs.  The
    constructor raises OSError when no pipe of MIN_SIZE can be had."""

    PIPE_SIZE = 1 << 20
    MIN_SIZE = 256 << 10      # below this, a pread()/write() loop does as well

    def __init__(self):
        import fcntl
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.size = 0
        self.refused = False
        try:
            for want in (self.PIPE_SIZE, self.MIN_SIZE):
                try:
                    self.size = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, want)
                    break
                except OSError:
                    continue       # above /proc/sys/fs/pipe-max-size for this user
        except BaseException:
            self.close()
            raise
        if self.size < self.MIN_SIZE:
            self.close()
            raise OSError(errno.EINVAL, "no pipe of at least 256 KiB")

    def copy(self, in_fd, offset, out_fd, n):
        """Append n bytes at `offset` of in_fd to out_fd; returns the bytes
        copied: fewer than n when the input ends first or when the kernel
        refuses these files (then self.refused is set, every byte counted
        is in the output and the pipe is empty: the caller goes on with
        another method).  After an error the pipe may hold bytes: close it.

        With the compiled kernels the whole range is one call that holds no
        GIL (kernels splice_append): the converter's writing thread would
        otherwise wait for the GIL after every splice while the decoding
        thread holds it (measured: 200 ms of Python on the other thread
        held a 1 GiB copy up by as much)."""
        native = _splice_append()
        if native is not None:
            err, done = native(in_fd, offset, n, out_fd, self.r, self.w, self.size)
            if err:
                if err not in NO_SPLICE:
                    raise OSError(err, os.strerror(err))
                self.refused = True     # (what the pipe held was written: counted)
            return done
        return self._copy_loop(in_fd, offset, out_fd, n)

    def _copy_loop(self, in_fd, offset, out_fd, n):
        """copy() a splice at a time (the reference backend's way)."""
        done = 0
        while done < n and not self.refused:
            try:
                k = os.splice(in_fd, self.w, min(self.size, n - done), offset_src=offset + done)
            except OSError as exc:
                if exc.errno not in NO_SPLICE:
                    raise
                self.refused = True
                break
            if not k:
                break                   # the input ended
            m = 0
            while m < k:
                try:
                    m += os.splice(self.r, out_fd, k - m)
                except OSError as exc:
                    if exc.errno not in NO_SPLICE:
                        raise
                    # The output refuses splice (O_APPEND, an odd file
                    # system): write out what the pipe holds, then refuse.
                    self.refused = True
                    while m < k:
                        m += write_all(out_fd, os.read(self.r, k - m))
            done += k
        return done

    def close(self):
        for fd in (self.r, self.w):
            if fd is not None:
                os.close(fd)
        self.r = self.w = None


def _splice_append():
    """The compiled splice_append, or None on the reference backend."""
    from .. import kernels
    if kernels.BACKEND != "native":
        return None
    from ..kernels._light import splice_append
    return splice_append


def pread_copy(in_fd, offset, n, buf, put):
    """Pass n bytes at `offset` of in_fd to put(view), a fill of the writable
    buffer `buf` at a time (put must be done with the view when it returns:
    the buffer is reused); returns the bytes passed (fewer when the input
    ends)."""
    buf = memoryview(buf).cast("B")
    done = 0
    while done < n:
        part = buf[:min(n - done, len(buf))]
        k = pread_exact(in_fd, part, offset + done)
        if k:
            put(part[:k])
        done += k
        if k < len(part):
            break
    return done


def pread_write(in_fd, offset, out_fd, n, buf):
    """Copy n bytes at `offset` of in_fd to out_fd through the writable
    buffer `buf`; returns the bytes copied (fewer when the input ends)."""
    return pread_copy(in_fd, offset, n, buf, lambda part: write_all(out_fd, part))


def zeros():
    """A shared read-only block of ZEROS zero bytes."""
    global _zeros
    if _zeros is None:
        _zeros = memoryview(bytes(ZEROS))
    return _zeros


def write_zeros(fd, n):
    z = zeros()
    while n:
        k = min(n, len(z))
        write_all(fd, z[:k])
        n -= k


def copy_sparse(in_fd, out_fd, size, buf=None):
    """Write bytes [0, size) of the (possibly sparse) regular file in_fd to
    out_fd in order, as a non-seekable output needs them: data extents by
    sendfile (or read/write), holes as zeros.  Returns size."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(in_fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:          # only a hole remains
                data = size
            elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                data = pos                        # no hole information: all data
            else:
                raise
        data = min(data, size)
        if data > pos:
            write_zeros(out_fd, data - pos)
            pos = data
            continue
        try:
            hole = min(os.lseek(in_fd, pos, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        n = hole - pos
        done = sendfile_all(out_fd, in_fd, pos, n)
        if done is None:
            if buf is None:
                buf = bytearray(4 << 20)
            done = pread_write(in_fd, pos, out_fd, n, buf)
        if done < n:
            raise OSError(errno.EIO, f"the image file ended at byte {pos + done} of {size}")
        pos = hole
    return size


# Only writing fails with these: an error without a file name that carries
# one of them is the output's, and is reported under the output's name.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EPIPE})


def output_error(exc, name):
    """`exc`, naming the output `name` when it is a write failure without a
    file name; otherwise `exc` itself."""
    if name is None or exc.filename is not None or exc.errno not in WRITE_ERRNOS or \
            exc.__class__.__module__.startswith("xlegacy"):
        return exc
    return OSError(exc.errno, exc.strerror, name)    # the errno's subclass, as raised
