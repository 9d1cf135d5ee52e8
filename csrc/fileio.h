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

#endif
