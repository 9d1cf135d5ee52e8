/* Moving whole pages: into a memory image, into a file, or comparing. */
#include "fileio.h"

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

int64_t xl_pwrite_pages(int fd, const uint8_t *pages, size_t npages,
                        const uint64_t *pfns, uint64_t image_pages,
                        xl_fault *fault)
{
    int64_t rc = xl_check_file_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    size_t i = 0;
    while (i < npages) {
        size_t k = xl_run_length(pfns, i, npages);
        int err = xl_pwrite_all(fd, pages + i * XL_PAGE_SIZE, k * XL_PAGE_SIZE,
                                (off_t)(pfns[i] * XL_PAGE_SIZE));
        if (err)
            return xl_fail(fault, XL_E_IO, (int64_t)i, 0, (uint64_t)err, 0);
        i += k;
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
