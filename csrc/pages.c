/* Moving whole pages: into a memory image, into a file, or comparing. */
#include <errno.h>
#include <unistd.h>
#include "common.h"

int64_t xl_scatter_pages(const uint8_t *pages, size_t npages,
                         const uint64_t *pfns, uint8_t *image,
                         uint64_t image_pages, xl_fault *fault)
{
    int64_t rc = xl_check_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < npages; i++)
        memcpy(image + pfns[i] * XL_PAGE_SIZE, pages + i * XL_PAGE_SIZE,
               XL_PAGE_SIZE);
    return (int64_t)npages;
}

/* pwrite all of [buf, buf+len) at off, riding out EINTR and short writes. */
static int write_all(int fd, const uint8_t *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t w = pwrite(fd, buf, len, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        buf += w;
        len -= (size_t)w;
        off += w;
    }
    return 0;
}

int64_t xl_pwrite_pages(int fd, const uint8_t *pages, size_t npages,
                        const uint64_t *pfns, uint64_t image_pages,
                        xl_fault *fault)
{
    if (image_pages > XL_MAX_FILE_PAGES)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, image_pages,
                       XL_MAX_FILE_PAGES);
    int64_t rc = xl_check_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    size_t i = 0;
    while (i < npages) {
        /* Coalesce a run of ascending consecutive pfns into one write. */
        size_t j = i + 1;
        while (j < npages && pfns[j] == pfns[j - 1] + 1)
            j++;
        int err = write_all(fd, pages + i * XL_PAGE_SIZE,
                            (j - i) * XL_PAGE_SIZE,
                            (off_t)(pfns[i] * XL_PAGE_SIZE));
        if (err)
            return xl_fail(fault, XL_E_IO, (int64_t)i, 0, (uint64_t)err, 0);
        i = j;
    }
    return (int64_t)npages;
}

int64_t xl_compare_pages(const uint8_t *pages, size_t npages,
                         const uint64_t *pfns, const uint8_t *image,
                         uint64_t image_pages, uint8_t *differs,
                         xl_fault *fault)
{
    int64_t rc = xl_check_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    int64_t ndiff = 0;
    for (size_t i = 0; i < npages; i++) {
        int d = memcmp(image + pfns[i] * XL_PAGE_SIZE,
                       pages + i * XL_PAGE_SIZE, XL_PAGE_SIZE) != 0;
        differs[i] = (uint8_t)d;
        ndiff += d;
    }
    return ndiff;
}
