/*
 * Remus checkpoint compression (format B), receiver side.
 *
 * A page encoding is one of
 *   0x00                 EMPTY_PAGE: the receiver's copy is current
 *   0x80 + 4096 bytes    FULL_PAGE
 *   markers...           bit 7 = SKIP(1)/RUN(0), bits 6..0 = length in
 *                        4-byte words; RUN is followed by its bytes, which
 *                        replace the page's; markers continue until exactly
 *                        4096 bytes are covered.
 * The rules and their order follow libxc's xc_compression.c, which refuses a
 * zero-length marker, a marker crossing the end of the page and data crossing
 * the end of the buffer.
 */
#include "common.h"

#define EMPTY_PAGE 0x00u
#define FULL_PAGE 0x80u
#define SKIP_FLAG 0x80u
#define LEN_MASK 0x7fu
#define WORD 4u

enum { KIND_EMPTY, KIND_FULL, KIND_DELTA };

/*
 * Walk one page encoding starting at *pos.  With page != NULL the page is
 * updated as the encoding says.  Returns the kind or a negative code.
 */
static inline int64_t walk_page(const uint8_t *buf, size_t len, size_t *pos,
                                uint8_t *page, int64_t index, xl_fault *fault)
{
    size_t p = *pos;
    if (p >= len)
        return xl_fail(fault, XL_E_PAGES_SHORT, index, (int64_t)p, 0, len);
    uint8_t first = buf[p];
    if (first == EMPTY_PAGE) {
        *pos = p + 1;
        return KIND_EMPTY;
    }
    if (first == FULL_PAGE) {
        if (len - p - 1 < XL_PAGE_SIZE)
            return xl_fail(fault, XL_E_RUN_PAST_BUFFER, index, (int64_t)p,
                           XL_PAGE_SIZE, len - p - 1);
        if (page)
            memcpy(page, buf + p + 1, XL_PAGE_SIZE);
        *pos = p + 1 + XL_PAGE_SIZE;
        return KIND_FULL;
    }
    size_t in_page = 0;
    while (in_page < XL_PAGE_SIZE) {
        if (p >= len)
            return xl_fail(fault, XL_E_PAGES_SHORT, index, (int64_t)p,
                           in_page, XL_PAGE_SIZE);
        uint8_t marker = buf[p];
        size_t bytes = (size_t)(marker & LEN_MASK) * WORD;
        if (bytes == 0)
            return xl_fail(fault, XL_E_ZERO_MARKER, index, (int64_t)p, marker,
                           in_page);
        if (in_page + bytes > XL_PAGE_SIZE)
            return xl_fail(fault, XL_E_RUN_PAST_PAGE, index, (int64_t)p,
                           in_page + bytes, XL_PAGE_SIZE);
        p++;
        if (!(marker & SKIP_FLAG)) {
            if (len - p < bytes)
                return xl_fail(fault, XL_E_RUN_PAST_BUFFER, index,
                               (int64_t)(p - 1), bytes, len - p);
            if (page)
                memcpy(page + in_page, buf + p, bytes);
            p += bytes;
        }
        in_page += bytes;
    }
    *pos = p;
    return KIND_DELTA;
}

int64_t xl_delta_index(const uint8_t *buf, size_t len, size_t npages,
                       uint64_t *starts, uint64_t *kinds, xl_fault *fault)
{
    size_t pos = 0;
    uint64_t counts[3] = {0, 0, 0};
    for (size_t i = 0; i < npages; i++) {
        starts[i] = pos;
        int64_t kind = walk_page(buf, len, &pos, NULL, (int64_t)i, fault);
        if (kind < 0)
            return kind;
        counts[kind]++;
    }
    starts[npages] = pos;
    if (pos != len)
        return xl_fail(fault, XL_E_PAGES_EXTRA, (int64_t)npages, (int64_t)pos,
                       len - pos, npages);
    if (kinds)
        memcpy(kinds, counts, sizeof counts);
    return (int64_t)npages;
}

int64_t xl_delta_apply(const uint8_t *buf, size_t len, const uint64_t *starts,
                       const uint64_t *pfns, size_t first, size_t count,
                       uint8_t *image, uint64_t image_pages, xl_fault *fault)
{
    int64_t rc = xl_check_pfns(pfns + first, count, image_pages, fault);
    if (rc < 0) {
        if (fault)
            fault->index += (int64_t)first;
        return rc;
    }
    for (size_t i = first; i < first + count; i++) {
        size_t pos = starts[i];
        int64_t kind = walk_page(buf, len, &pos,
                                 image + pfns[i] * XL_PAGE_SIZE, (int64_t)i,
                                 fault);
        if (kind < 0)
            return kind;
    }
    return (int64_t)count;
}

int64_t xl_delta_decode(const uint8_t *buf, size_t len, size_t npages,
                        const uint64_t *pfns, uint8_t *image,
                        uint64_t image_pages, uint64_t *kinds,
                        xl_fault *fault)
{
    int64_t rc = xl_check_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    size_t pos = 0;
    uint64_t counts[3] = {0, 0, 0};
    for (size_t i = 0; i < npages; i++) {
        int64_t kind = walk_page(buf, len, &pos,
                                 image + pfns[i] * XL_PAGE_SIZE, (int64_t)i,
                                 fault);
        if (kind < 0)
            return kind;
        counts[kind]++;
    }
    if (pos != len)
        return xl_fail(fault, XL_E_PAGES_EXTRA, (int64_t)npages, (int64_t)pos,
                       len - pos, npages);
    if (kinds)
        memcpy(kinds, counts, sizeof counts);
    return (int64_t)npages;
}
