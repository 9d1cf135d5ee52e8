/* Small helpers shared by the kernels; not part of the cffi boundary. */
#ifndef XLEGACY_COMMON_H
#define XLEGACY_COMMON_H

#include <string.h>
#include "xlegacy.h"

/* Record a fault (when the caller gave somewhere to put it) and return code. */
static inline int64_t xl_fail(xl_fault *fault, int code, int64_t index,
                              int64_t offset, uint64_t value, uint64_t limit)
{
    if (fault) {
        fault->index = index;
        fault->offset = offset;
        fault->value = value;
        fault->limit = limit;
    }
    return code;
}

/* Unaligned little-endian loads: the stream buffer has no alignment promise. */
static inline uint32_t xl_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t xl_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void xl_put_le64(uint8_t *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, sizeof v);
}

/* Check a list of pfns against the image before any page is written. */
static inline int64_t xl_check_pfns(const uint64_t *pfns, size_t n,
                                    uint64_t image_pages, xl_fault *fault)
{
    for (size_t i = 0; i < n; i++)
        if (pfns[i] >= image_pages)
            return xl_fail(fault, XL_E_PFN_RANGE, (int64_t)i, 0, pfns[i],
                           image_pages);
    return XL_OK;
}

/* Largest image, in pages, whose byte offsets fit a signed 64-bit offset. */
#define XL_MAX_FILE_PAGES ((uint64_t)INT64_MAX / XL_PAGE_SIZE)

#endif
