"""Reading a whole span of a file at an offset.

pread() may return fewer bytes than asked before the end of a file (a signal,
a file system's limit per call, a file that shrinks under us), so every reader
of stream data, held checkpoints and image files needs the same resume loop.
This is its one home, below the stream layer so that every layer may import it
(outputs/fdio.py holds the writing side).
"""
import errno
import os
import stat

from .errors import TruncatedStream


def pread_exact(fd, view, offset, what=None, at=None):
    """Fill the writable buffer `view` with the bytes at `offset` of fd.

    Returns the number of bytes read: fewer than len(view) only where the
    file ends.  Given `what`, such a short read raises
    TruncatedStream(what, at + read, len(view), read) instead, `at` being the
    stream offset of the buffer's first byte (default: `offset`).
    """
    mv = memoryview(view).cast("B")
    n = len(mv)
    done = 0
    while done < n:
        got = os.preadv(fd, [mv[done:]], offset + done)
        if not got:
            break
        done += got
    if done < n and what is not None:
        raise TruncatedStream(what, (offset if at is None else at) + done, n, done)
    return done


# What copy_file_range answers when it cannot copy between two files (the
# C kernels then use a bounce buffer: two copies in user space).
REFUSED = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)


def kernel_copies(in_fd, out_fd):
    """Whether the kernel copies from in_fd to out_fd: two regular files (the
    copy kernels splice them through a pipe, across file systems too), or a
    pair copy_file_range accepts (asked with a copy of no bytes: the kernel
    checks the pair, e.g. EXDEV across file systems, before the length)."""
    try:
        if all(stat.S_ISREG(os.fstat(fd).st_mode) for fd in (in_fd, out_fd)):
            return True
    except OSError:
        return False
    if not hasattr(os, "copy_file_range"):
        return False
    try:
        os.copy_file_range(in_fd, out_fd, 0, 0, 0)
    except OSError as exc:
        return exc.errno not in REFUSED
    return True
