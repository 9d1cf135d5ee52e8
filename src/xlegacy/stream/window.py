"""Read-only mapped windows of an input file, for page data that goes
straight from the input's page cache to the output by one pwrite (the only
copy; a pread into a buffer first would be a second).

Only a window is mapped (16 MiB, or one batch if larger), so the address
space and the resident set stay bounded whatever the input's size: a 4 GiB
stream restores under RLIMIT_AS=4G.  The bytes are never touched in user
space, only handed to the kernel: should the file shrink under us, the
write fails with EFAULT instead of the process dying of SIGBUS.
"""
import mmap
import os

WINDOW = 16 << 20


class InputWindow:
    def __init__(self, size=WINDOW):
        self.size = size
        self._fd = None
        self._lo = self._hi = 0
        self._map = None
        self._mv = None
        self.usable = hasattr(mmap, "PROT_READ")

    def view(self, fd, offset, n):
        """A read-only memoryview of bytes [offset, offset+n) of fd, or None
        when they cannot be mapped (beyond the end, not mappable); the view
        is valid until the next call or close()."""
        if not self.usable:
            return None
        if not (fd == self._fd and self._lo <= offset and offset + n <= self._hi):
            self.close()
            try:
                end_of_file = os.fstat(fd).st_size
                lo = offset - offset % mmap.ALLOCATIONGRANULARITY
                hi = min(end_of_file, max(lo + self.size, offset + n))
                if offset + n > hi:
                    return None
                self._map = mmap.mmap(fd, hi - lo, mmap.MAP_SHARED, mmap.PROT_READ,
                                      offset=lo)
            except (OSError, ValueError, OverflowError):
                self.usable = False         # e.g. a file system without mmap
                return None
            self._mv = memoryview(self._map)
            self._fd, self._lo, self._hi = fd, lo, hi
        return self._mv[offset - self._lo:offset - self._lo + n]

    def close(self):
        if self._map is not None:
            self._mv.release()
            try:
                self._map.close()
            except BufferError:
                pass    # a caller still holds a slice: the GC unmaps it
            self._map = self._mv = None
            self._fd = None
            self._lo = self._hi = 0
