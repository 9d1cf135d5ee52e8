/*
 * Pages that lie anywhere in a buffer, moved to or from a file with one
 * system call per run of neighbours (pwritev/preadv), for the Remus page
 * overlay of a file image (image.py): its pages sit in memory slots or in
 * the input's mapping, in no particular order, and each is written once.
 */
#define _GNU_SOURCE
#include <sys/uio.h>
#include "fileio.h"

/* Pages a single pwritev/preadv carries at most (well under IOV_MAX). */
#define XL_IOV 256

/* Every page i lies inside the buffer: at[i] + 4096 <= len. */
static int64_t check_at(const uint64_t *at, size_t npages, size_t len,
                        xl_fault *fault)
{
    for (size_t i = 0; i < npages; i++)
        if (len < XL_PAGE_SIZE || at[i] > len - XL_PAGE_SIZE)
            return xl_fail(fault, XL_E_BAD_ARG, (int64_t)i, 0, at[i], len);
    return XL_OK;
}

/* Move len bytes through iov[0..n) at off, riding out EINTR and short
   transfers.  Returns 0, an errno, or -1 when a read meets the end of the
   file (*done says how much moved). */
static int iov_all(int fd, struct iovec *iov, int n, off_t off, int writing,
                   size_t *done)
{
    *done = 0;
    while (n > 0) {
        ssize_t r = writing ? pwritev(fd, iov, n, off + (off_t)*done)
                            : preadv(fd, iov, n, off + (off_t)*done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return writing ? EIO : -1;
        *done += (size_t)r;
        size_t left = (size_t)r;
        while (n > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

int64_t xl_pwrite_at(int fd, const uint8_t *src, size_t src_len,
                     const uint64_t *at, const uint64_t *pfns, size_t npages,
                     uint64_t image_pages, xl_fault *fault)
{
    int64_t rc = xl_check_file_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    rc = check_at(at, npages, src_len, fault);
    if (rc < 0)
        return rc;
    struct iovec iov[XL_IOV];
    size_t i = 0;
    while (i < npages) {
        size_t k = 1;
        while (i + k < npages && k < XL_IOV && pfns[i + k] == pfns[i + k - 1] + 1)
            k++;
        for (size_t j = 0; j < k; j++) {
            /* The iovec type wants a mutable pointer; pwritev only reads. */
            iov[j].iov_base = (void *)(uintptr_t)(src + at[i + j]);
            iov[j].iov_len = XL_PAGE_SIZE;
        }
        size_t done;
        int err = iov_all(fd, iov, (int)k, (off_t)(pfns[i] * XL_PAGE_SIZE), 1,
                          &done);
        if (err)
            return xl_fail(fault, XL_E_IO, (int64_t)i, 0, (uint64_t)err, 0);
        i += k;
    }
    return (int64_t)npages;
}

int64_t xl_pread_at(int fd, const uint64_t *offs, size_t npages, uint8_t *dst,
                    size_t dst_len, const uint64_t *at, xl_fault *fault)
{
    for (size_t i = 0; i < npages; i++)
        if (offs[i] > (uint64_t)INT64_MAX - XL_PAGE_SIZE)
            return xl_fail(fault, XL_E_BAD_ARG, (int64_t)i, 0, offs[i],
                           (uint64_t)INT64_MAX - XL_PAGE_SIZE);
    int64_t rc = check_at(at, npages, dst_len, fault);
    if (rc < 0)
        return rc;
    struct iovec iov[XL_IOV];
    size_t i = 0;
    while (i < npages) {
        size_t k = 1;
        while (i + k < npages && k < XL_IOV
               && offs[i + k] == offs[i + k - 1] + XL_PAGE_SIZE)
            k++;
        for (size_t j = 0; j < k; j++) {
            iov[j].iov_base = dst + at[i + j];
            iov[j].iov_len = XL_PAGE_SIZE;
        }
        size_t done;
        int err = iov_all(fd, iov, (int)k, (off_t)offs[i], 0, &done);
        if (err)
            return xl_run_fault(fault, err, i, done, npages);
        i += k;
    }
    return (int64_t)npages;
}
