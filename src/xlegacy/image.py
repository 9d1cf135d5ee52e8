"""Where restored guest memory goes: a numpy buffer, a sparse raw file, or
nowhere (for inspection).  Page p lives at byte p*4096 in every case."""
import mmap
import os

import numpy as np

from . import kernels
from .outputs.atomic import AtomicFile
from .format import PAGE_SIZE


def anonymous_buffer(nbytes):
    """A zero-filled uint8 array backed by lazily-populated anonymous memory.

    MAP_NORESERVE keeps a huge, mostly sparse guest from being refused up
    front; MADV_HUGEPAGE (where the kernel offers transparent huge pages)
    cuts the page faults of filling a multi-GB image by 512x.
    """
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        m = mmap.mmap(-1, nbytes, flags=flags)
    except OSError as exc:
        raise MemoryError(f"cannot map {nbytes} bytes for the guest image ({exc}); "
                          "restore to a file instead") from exc
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(m, dtype=np.uint8)


class MemoryImage:
    """The image in memory: a caller's writable uint8 buffer or a new one."""

    kind = "memory"

    def __init__(self, nbytes, array=None):
        if array is None:
            array = anonymous_buffer(nbytes)
        else:
            if not isinstance(array, np.ndarray):
                array = np.frombuffer(array, dtype=np.uint8)
            if array.dtype != np.uint8 or array.ndim != 1 or not array.flags.c_contiguous:
                raise TypeError("image must be a 1-D C-contiguous numpy uint8 array")
            if not array.flags.writeable:
                raise ValueError("image buffer is read-only")
            if array.size < nbytes:
                raise ValueError(f"image buffer holds {array.size} bytes; the stream needs "
                                 f"{nbytes} (p2m_size * 4096)")
        self.nbytes = nbytes
        self.array = array[:nbytes]
        self.pages = nbytes // PAGE_SIZE

    def write_pages(self, pages, pfns, locate=0):
        kernels.scatter_pages(pages, pfns, self.array, locate=locate)

    def write_pages_from(self, fd, offset, pfns, locate=0):
        """Pages lying consecutively at `offset` of fd: read straight in."""
        kernels.pread_pages(fd, offset, pfns, self.array, locate=locate)

    def commit(self):
        return self.array

    def abort(self):
        pass


class FileImage:
    """A sparse raw image file, written under a temporary name in the target
    directory and renamed into place only by commit() (see outputs/atomic.py)."""

    kind = "file"

    def __init__(self, path, nbytes, sync=True):
        self.nbytes = nbytes
        self.pages = nbytes // PAGE_SIZE
        self._out = AtomicFile(path, sync=sync)
        self.path = self._out.path
        self.fd = self._out.fd
        self._map = None
        self._array = None
        try:
            os.ftruncate(self.fd, nbytes)   # holes read as zero: never-sent pages
        except OSError:
            self.abort()
            raise

    @property
    def array(self):
        """A writable view of the file (mapped on first use: verify, deltas)."""
        if self._array is None:
            self._map = mmap.mmap(self.fd, self.nbytes, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self._array = np.frombuffer(self._map, dtype=np.uint8)
        return self._array

    def write_pages(self, pages, pfns, locate=0):
        kernels.pwrite_pages(self.fd, pages, pfns, self.pages, locate=locate)

    def write_pages_from(self, fd, offset, pfns, locate=0):
        """Pages lying consecutively at `offset` of fd: copied in the kernel."""
        kernels.copy_pages(fd, offset, pfns, self.fd, self.pages, locate=locate)

    def _unmap(self, flush):
        if self._array is not None:
            self._array = None
            if flush:
                self._map.flush()
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the GC unmaps it later
            self._map = None

    def commit(self):
        self._unmap(flush=self._out.sync)
        self.fd = None
        return self._out.commit()

    def abort(self):
        self._unmap(flush=False)
        self.fd = None
        self._out.abort()


class NullImage:
    """Pages are checked but not kept (inspection without a restore)."""

    kind = "none"
    array = None

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.pages = nbytes // PAGE_SIZE

    def write_pages(self, pages, pfns, locate=0):
        pass

    def write_pages_from(self, fd, offset, pfns, locate=0):
        pass

    def commit(self):
        return None

    def abort(self):
        pass
