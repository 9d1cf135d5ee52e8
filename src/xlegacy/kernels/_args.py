"""Argument checks shared by both kernel backends, so the native kernels and
their reference twins accept and refuse exactly the same calls.

ffi.from_buffer checks only that a buffer is contiguous; everything else
(dtype and byte order, dimensions, writability, sizes) is checked here.
Errors in arguments are TypeError/ValueError, never StreamError.
"""
import numpy as np

from ..format import PAGE_SIZE

# Largest image (in pages) whose byte offsets fit an int64 file offset.
MAX_IMAGE_PAGES = (2 ** 63 - 1) // PAGE_SIZE


def u8_in(buf):
    """Any contiguous bytes-like object as a read-only uint8 view."""
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return arr


def out_array(arr, dtype, n, name):
    """A caller-supplied output array (or a new one when None)."""
    if arr is None:
        return np.empty(n, dtype=dtype)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must be a numpy array of {np.dtype(dtype)} (native byte order)")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writable")
    if arr.size < n:
        raise ValueError(f"{name} holds {arr.size} items, needs {n}")
    return arr


def image_pages(image, writable):
    """Pages in a guest image array (1-D, uint8, C-contiguous)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 1:
        raise TypeError("image must be a 1-D numpy uint8 array")
    if not image.flags.c_contiguous:
        raise ValueError("image must be C-contiguous")
    if writable and not image.flags.writeable:
        raise ValueError("image must be writable")
    return image.size // PAGE_SIZE


def file_pages(n):
    """A page count for a file image: offsets must fit a 64-bit file offset."""
    n = int(n)
    if not 0 <= n <= MAX_IMAGE_PAGES:
        raise ValueError(f"image of {n} pages does not fit 64-bit file offsets")
    return n


def pfn_list(pfns, n):
    """pfns as a contiguous uint64 array holding at least n items."""
    pfns = np.asarray(pfns)
    if pfns.dtype != np.uint64 or not pfns.flags.c_contiguous:
        if pfns.dtype.kind not in "ui":
            raise TypeError(f"pfns must be integers, not {pfns.dtype}")
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
    if pfns.ndim != 1:
        pfns = pfns.reshape(-1)
    if pfns.size < n:
        raise ValueError(f"pfns holds {pfns.size} items, needs {n}")
    return pfns


def pages(buf):
    """Consecutive page data: (uint8 view, number of pages)."""
    arr = u8_in(buf)
    if arr.size % PAGE_SIZE:
        raise ValueError(f"page data of {arr.size} bytes is not a whole number of pages")
    return arr, arr.size // PAGE_SIZE


def width(w):
    if w not in (4, 8):
        raise ValueError(f"width must be 4 or 8, not {w}")
    return w


def pfn_entries(raw, w, types, pfns, data_pfns):
    """decode_pfns' arguments: (entries as uint8, entry count, and the
    types, pfns and data_pfns outputs, supplied or new)."""
    width(w)
    src = u8_in(raw)
    if src.size % w:
        raise ValueError(f"{src.size} bytes is not a whole number of {w}-byte entries")
    n = src.size // w
    return (src, n, out_array(types, np.uint8, n, "types"), out_array(pfns, np.uint64, n, "pfns"),
            out_array(data_pfns, np.uint64, n, "data_pfns"))


def starts_array(starts):
    if not isinstance(starts, np.ndarray) or starts.dtype != np.uint64 \
            or not starts.flags.c_contiguous or starts.ndim != 1:
        raise TypeError("starts must be the contiguous uint64 array from delta_index")
    return starts


def page_range(first, count, npages):
    if count is None:
        count = npages - first
    if first < 0 or count < 0 or first + count > npages:
        raise ValueError(f"page range {first}+{count} outside 0..{npages}")
    return first, count


def page_index(map_, index_pfns, index_offs):
    """The arguments of read_many that describe the index: (map as a uint8
    view, pfns, offsets), checked as the kernel relies on them."""
    m = u8_in(map_)
    for name, a in (("index_pfns", index_pfns), ("index_offs", index_offs)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != 1 \
                or not a.flags.c_contiguous:
            raise TypeError(f"{name} must be a 1-D contiguous uint64 array")
    if index_pfns.size != index_offs.size:
        raise ValueError(f"index_pfns holds {index_pfns.size} items, index_offs "
                         f"{index_offs.size}")
    return m, index_pfns, index_offs


def page_out(out, n, name="out"):
    """A caller's output buffer for n pages (uint8, C-contiguous, writable,
    any shape), as a flat view; a new (n, 4096) array when None.
    Returns (the array to hand back, its flat view)."""
    if out is None:
        out = np.empty((n, PAGE_SIZE), np.uint8)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
        raise TypeError(f"{name} must be a numpy uint8 array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writable")
    if out.size < n * PAGE_SIZE:
        raise ValueError(f"{name} holds {out.size} bytes, needs {n * PAGE_SIZE} "
                         f"({n} pages)")
    return out, out.reshape(-1)


def flags_out(found, n):
    """An optional per-pfn found flag array (uint8 or bool, >= n items)."""
    if found is None:
        return None
    if not isinstance(found, np.ndarray) or found.dtype not in (np.uint8, np.bool_) \
            or found.ndim != 1:
        raise TypeError("found must be a 1-D numpy uint8 or bool array")
    if not found.flags.c_contiguous or not found.flags.writeable:
        raise ValueError("found must be C-contiguous and writable")
    if found.size < n:
        raise ValueError(f"found holds {found.size} items, needs {n}")
    return found


def offsets(a, n, name):
    """Byte offsets (of pages in a buffer or a file) as a contiguous uint64
    array of n items."""
    a = np.asarray(a)
    if a.dtype.kind not in "ui":
        raise TypeError(f"{name} must be integers, not {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.uint64).reshape(-1)
    if a.size != n:
        raise ValueError(f"{name} holds {a.size} items, needs {n}")
    return a
