"""Xen's own Remus decoder, built at bench time from a Xen source tree the
user names (`xlegacy bench --xen PATH`), so the delta decoder can be
measured beside it in one process.

Nothing of Xen is shipped: the file tools/libxc/xc_compression.c (Xen 4.1 to
4.6; later trees dropped it) is compiled from the given tree into a
temporary directory, beside a few declarations it needs from libxc's
headers (written here, minimal) and a driver that decodes a whole
checkpoint the way libxc's restore did: one xc_compression_uncompress_page
call per page, into the page of its pfn.  Two builds: with the flags of a
Xen tools release build, and with -O3 -march=native.
"""
import ctypes
import os
import shutil
import subprocess
import tempfile

import numpy as np

from ..errors import XLegacyError
from ..format import PAGE_SIZE

SOURCE = os.path.join("tools", "libxc", "xc_compression.c")

# tools/libxc of a release build (debug=n): Config.mk, config/StdGNU.mk,
# config/x86_64.mk, tools/libxc/Makefile (shared-library objects).
XEN_FLAGS = ["-m64", "-O2", "-fomit-frame-pointer", "-fno-strict-aliasing", "-std=gnu99",
             "-Wall", "-Wstrict-prototypes", "-Wdeclaration-after-statement",
             "-Wno-unused-but-set-variable", "-Wno-unused-local-typedefs", "-D_GNU_SOURCE",
             "-fPIC"]
NATIVE_FLAGS = ["-O3", "-march=native", "-std=gnu99", "-D_GNU_SOURCE", "-fPIC"]
VARIANTS = (("Xen's flags: -O2 -fomit-frame-pointer", XEN_FLAGS),
            ("-O3 -march=native", NATIVE_FLAGS))

# What xc_compression.c takes from libxc's private headers, declared anew:
# types, the page size, error reporting (a call, as libxc's ERROR is) and
# the prototypes of its functions.
_SHIM = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef unsigned long xen_pfn_t;
typedef struct xlb_interface xc_interface;
typedef struct compression_ctx comp_ctx;
#define XC_PAGE_SIZE 4096
#define PRIpfn "lx"
#define INVALID_P2M_ENTRY ((xen_pfn_t)-1)
#define NRPAGES(x) (((x) + XC_PAGE_SIZE - 1) / XC_PAGE_SIZE)
void xlb_report(const char *fmt, ...);
#define ERROR(...) xlb_report(__VA_ARGS__)
#define PERROR(...) xlb_report(__VA_ARGS__)
#define DPRINTF(...) ((void)0)
void *xc_memalign(xc_interface *xch, size_t alignment, size_t size);
int xc_compression_add_page(xc_interface *xch, comp_ctx *ctx, char *page,
                            xen_pfn_t pfn, int israw);
int xc_compression_compress_pages(xc_interface *xch, comp_ctx *ctx,
                                  char *compbuf, unsigned long compbuf_size,
                                  unsigned long *compbuf_len);
void xc_compression_reset_pagebuf(xc_interface *xch, comp_ctx *ctx);
int xc_compression_uncompress_page(xc_interface *xch, char *compbuf,
                                   unsigned long compbuf_size,
                                   unsigned long *compbuf_pos, char *destpage);
void xc_compression_free_context(xc_interface *xch, comp_ctx *ctx);
comp_ctx *xc_compression_create_context(xc_interface *xch, unsigned long p2m_size);
"""

_DRIVER = r"""
#include "xc_private.h"
void xlb_report(const char *fmt, ...) { (void)fmt; }
void *xc_memalign(xc_interface *xch, size_t alignment, size_t size)
{
    void *p = NULL;
    (void)xch;
    return posix_memalign(&p, alignment, size) ? NULL : p;
}
/* Decode npages pages of one checkpoint's buffer into the image, one
   uncompress_page call per page as libxc's restore did.  Returns npages,
   or -(page + 1) where Xen's decoder refused the data. */
long xlb_decode(char *buf, unsigned long len, const uint64_t *pfns,
                unsigned long npages, char *image);
long xlb_decode(char *buf, unsigned long len, const uint64_t *pfns,
                unsigned long npages, char *image)
{
    unsigned long pos = 0;
    for (unsigned long i = 0; i < npages; i++)
        if (xc_compression_uncompress_page(NULL, buf, len, &pos,
                                           image + pfns[i] * XC_PAGE_SIZE) < 0)
            return -(long)i - 1;
    return (long)npages;
}
"""


class XenUnavailable(XLegacyError):
    """Why Xen's decoder is not measured (printed in the report)."""


def find_source(path):
    """xc_compression.c in a Xen tree (or the file itself)."""
    if path is None:
        raise XenUnavailable("no Xen tree given (--xen PATH, a Xen 4.1-4.6 source tree "
                             "with " + SOURCE + ")")
    src = path if os.path.isfile(path) else os.path.join(path, SOURCE)
    if not os.path.isfile(src):
        raise XenUnavailable(f"{src} not found (--xen wants a Xen 4.1-4.6 source tree)")
    return src


class XenDecoders:
    """The two builds of Xen's decoder, in a temporary directory that lives
    as long as this object; `variants` is [(label, decode)] where
    decode(buf, pfns, image) raises ValueError where Xen refuses the data."""

    def __init__(self, path, cc=None):
        src = find_source(path)
        self.source = src
        cc = cc or os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            raise XenUnavailable(f"no C compiler ({cc}) to build {src}")
        self._dir = tempfile.TemporaryDirectory(prefix="xlegacy-bench-xen-")
        d = self._dir.name
        shutil.copyfile(src, os.path.join(d, "xc_compression.c"))
        with open(os.path.join(d, "xc_private.h"), "w") as f:
            f.write(_SHIM)
        for name in ("xenctrl.h", "xg_save_restore.h", "xg_private.h", "xc_dom.h"):
            with open(os.path.join(d, name), "w") as f:
                f.write("/* declarations: xc_private.h */\n")
        with open(os.path.join(d, "driver.c"), "w") as f:
            f.write(_DRIVER)
        self.variants = []
        self.flags = {}
        for i, (label, flags) in enumerate(VARIANTS):
            so = os.path.join(d, f"xen{i}.so")
            cmd = [cc, *flags, "-shared", "-o", so, "xc_compression.c", "driver.c"]
            r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
            if r.returncode != 0:
                self.close()
                raise XenUnavailable(f"building {src} failed ({' '.join(cmd)}): "
                                     f"{r.stderr.strip()[-400:]}")
            fn = ctypes.CDLL(so).xlb_decode
            fn.argtypes = (ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_void_p)
            fn.restype = ctypes.c_long
            self.variants.append((label, self._wrap(fn)))
            self.flags[label] = " ".join(flags)

    @staticmethod
    def _wrap(fn):
        def decode(buf, pfns, image):
            buf = np.ascontiguousarray(buf, dtype=np.uint8)
            pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
            if pfns.size and int(pfns.max()) >= image.nbytes // PAGE_SIZE:
                raise ValueError("pfn beyond the image")
            rc = fn(buf.ctypes.data, buf.size, pfns.ctypes.data, pfns.size, image.ctypes.data)
            if rc < 0:
                raise ValueError(f"Xen's decoder refused page {-rc - 1}")
            return rc
        return decode

    def close(self):
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def load(path, log=None):
    """(XenDecoders or None, a line for the report)."""
    try:
        dec = XenDecoders(path)
    except XenUnavailable as exc:
        return None, f"Xen's decoder: not measured: {exc}"
    if log:
        log(f"built Xen's decoder from {dec.source}")
    return dec, (f"Xen's decoder: {dec.source}, built here with "
                 + "; ".join(f"[{k}] {v}" for k, v in dec.flags.items()))
