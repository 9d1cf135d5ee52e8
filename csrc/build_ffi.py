"""cffi builder for xlegacy._ffi (API mode, out-of-line).

The cdef is the part of csrc/xlegacy.h between the cdef markers, so the C
sources and the Python binding share one declaration of every kernel.
Extra compiler flags (e.g. sanitizers) come from XLEGACY_CFLAGS.
"""
import os
import pathlib
import shlex

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = (HERE / "xlegacy.h").read_text()
CDEF = HEADER.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]

SOURCES = ["pfn.c", "pages.c", "delta.c", "fdcopy.c", "pagemap.c", "pageiov.c"]
# Every header the sources include: build_ext compares only the timestamps
# of sources and `depends` with the built module, so an edited header
# must be listed to trigger a rebuild.
HEADERS = sorted(p.name for p in HERE.glob("*.h"))

extra = ["-O3", "-std=c11", "-Wall", "-Wextra", "-D_FILE_OFFSET_BITS=64",
         "-D_XOPEN_SOURCE=700"]
extra += shlex.split(os.environ.get("XLEGACY_CFLAGS", ""))
link = shlex.split(os.environ.get("XLEGACY_LDFLAGS", ""))

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "xlegacy._ffi",
    '#include "xlegacy.h"',
    # Paths relative to the project root: setuptools builds from there and
    # refuses absolute source paths in the sdist.
    sources=[os.path.relpath(HERE / s) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(HERE / h) for h in HEADERS],
    extra_compile_args=extra,
    extra_link_args=link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
