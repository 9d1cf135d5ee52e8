/* File I/O helpers shared by the kernels that read or write descriptors;
   not part of the cffi boundary. */
#ifndef XLEGACY_FILEIO_H
#define XLEGACY_FILEIO_H

#include <errno.h>
#include <unistd.h>
#include "common.h"

/* Length of the run of consecutive pfns starting at i: one system call
   moves a whole run. */
static inline size_t xl_run_length(const uint64_t *pfns, size_t i, size_t n)
{
    size_t j = i + 1;
    while (j < n && pfns[j] == pfns[j - 1] + 1)
        j++;
    return j - i;
}

/* pread exactly len bytes, riding out EINTR and short reads.  Returns 0, an
   errno, or -1 at the end of the file (*done says how much arrived). */
static inline int xl_pread_all(int fd, uint8_t *dst, size_t len, off_t off,
                               size_t *done)
{
    *done = 0;
    while (*done < len) {
        ssize_t r = pread(fd, dst + *done, len - *done, off + (off_t)*done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return -1;
        *done += (size_t)r;
    }
    return 0;
}

/* pwrite all of len bytes, riding out EINTR and short writes.  Returns 0 or
   an errno. */
static inline int xl_pwrite_all(int fd, const uint8_t *src, size_t len,
                                off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(fd, src + done, len - done, off + (off_t)done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        done += (size_t)w;
    }
    return 0;
}

/* The checks every file-image kernel starts with: offsets of the image
   must fit an off_t, and every pfn must lie inside it. */
static inline int64_t xl_check_file_pfns(const uint64_t *pfns, size_t npages,
                                         uint64_t image_pages, xl_fault *fault)
{
    if (image_pages > XL_MAX_FILE_PAGES)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, image_pages,
                       XL_MAX_FILE_PAGES);
    return xl_check_pfns(pfns, npages, image_pages, fault);
}

/* A read of the run starting at page i ended `got` bytes in. */
static inline int64_t xl_short_read(xl_fault *fault, size_t i, size_t got,
                                    size_t npages)
{
    return xl_fail(fault, XL_E_SHORT_READ, (int64_t)(i + got / XL_PAGE_SIZE),
                   (int64_t)(i * XL_PAGE_SIZE + got), 0, npages * XL_PAGE_SIZE);
}

/* The fault of the run starting at page i that stopped with err (as
   xl_pread_all returns it: > 0 an errno, < 0 the input ended `got` bytes in). */
static inline int64_t xl_run_fault(xl_fault *fault, int err, size_t i,
                                   size_t got, size_t npages)
{
    if (err > 0)
        return xl_fail(fault, XL_E_IO, (int64_t)i, 0, (uint64_t)err, 0);
    return xl_short_read(fault, i, got, npages);
}

#endif
