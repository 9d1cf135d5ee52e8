/* PFN array decoding: raw legacy entries -> type nibbles and pfns. */
#include <stdlib.h>

#include "common.h"

#define PFN_MASK 0x0fffffffu
#define TYPE_XALLOC 0xeu
#define TYPE_BROKEN 0xdu
#define TYPE_XTAB 0xfu

int xl_abi_version(void)
{
    return XL_ABI_VERSION;
}

/* Which nibbles carry a page: 0..4 and 8..c.  5..7 are invalid, d..f not. */
static const uint8_t carries_data[16] = {1, 1, 1, 1, 1, 0, 0, 0,
                                         1, 1, 1, 1, 1, 0, 0, 0};
static const uint8_t invalid_type[16] = {0, 0, 0, 0, 0, 1, 1, 1,
                                         0, 0, 0, 0, 0, 0, 0, 0};

/*
 * The rules every entry must pass (nibble 5..7, bits 63..32 of a 64-bit
 * entry, pfn >= p2m_size except for XTAB).  Kept out of line of the hot
 * loops: it only runs once an entry has failed the folded check below.
 */
static int64_t entry_fault(uint64_t raw, size_t i, int wide, uint64_t p2m_size,
                           xl_fault *fault)
{
    uint32_t type = (uint32_t)(raw >> 28) & 0xfu;
    int64_t off = (int64_t)(i * (wide ? 8 : 4));
    if ((raw >> 32) != 0)
        return xl_fail(fault, XL_E_UPPER_BITS, (int64_t)i, off, raw, 0);
    if (invalid_type[type])
        return xl_fail(fault, XL_E_BAD_TYPE, (int64_t)i, off, raw, type);
    return xl_fail(fault, XL_E_PFN_RANGE, (int64_t)i, off, raw & PFN_MASK,
                   p2m_size);
}

static inline int entry_bad(uint64_t raw, uint64_t p2m_size)
{
    uint32_t type = (uint32_t)(raw >> 28) & 0xfu;
    return (raw >> 32) != 0 || invalid_type[type] ||
           (type != TYPE_XTAB && (raw & PFN_MASK) >= p2m_size);
}

/*
 * One loop for both widths, specialised by the compiler through the constant
 * `wide`.  The checks are folded into a single rarely-taken branch so the
 * common path stays a load, two masks and three stores.
 */
static inline int64_t decode(const uint8_t *src, size_t n, int wide,
                             uint64_t p2m_size, uint8_t *types,
                             uint64_t *pfns, uint64_t *data_pfns,
                             size_t data_cap, xl_fault *fault)
{
    size_t nd = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t raw = wide ? xl_le64(src + 8 * i) : xl_le32(src + 4 * i);
        uint32_t type = (uint32_t)(raw >> 28) & 0xfu;
        uint64_t pfn = raw & PFN_MASK;
        if (__builtin_expect(entry_bad(raw, p2m_size), 0))
            return entry_fault(raw, i, wide, p2m_size, fault);
        types[i] = (uint8_t)type;
        pfns[i] = pfn;
        if (carries_data[type]) {
            if (nd >= data_cap)
                return xl_fail(fault, XL_E_BAD_ARG, (int64_t)i, 0, nd, data_cap);
            data_pfns[nd++] = pfn;
        }
    }
    return (int64_t)nd;
}

int64_t xl_decode_pfns(const uint8_t *src, size_t n, unsigned width,
                       uint64_t p2m_size, uint8_t *types, uint64_t *pfns,
                       uint64_t *data_pfns, size_t data_cap, xl_fault *fault)
{
    if (width == 8)
        return decode(src, n, 1, p2m_size, types, pfns, data_pfns, data_cap,
                      fault);
    if (width == 4)
        return decode(src, n, 0, p2m_size, types, pfns, data_pfns, data_cap,
                      fault);
    return xl_fail(fault, XL_E_BAD_ARG, -1, 0, width, 8);
}

/* The same checks with only the count of data-carrying entries as output. */
static inline int64_t count(const uint8_t *src, size_t n, int wide,
                            uint64_t p2m_size, xl_fault *fault)
{
    int64_t nd = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t raw = wide ? xl_le64(src + 8 * i) : xl_le32(src + 4 * i);
        if (__builtin_expect(entry_bad(raw, p2m_size), 0))
            return entry_fault(raw, i, wide, p2m_size, fault);
        nd += carries_data[(raw >> 28) & 0xfu];
    }
    return nd;
}

int64_t xl_count_data(const uint8_t *src, size_t n, unsigned width,
                      uint64_t p2m_size, xl_fault *fault)
{
    if (width == 8)
        return count(src, n, 1, p2m_size, fault);
    if (width == 4)
        return count(src, n, 0, p2m_size, fault);
    return xl_fail(fault, XL_E_BAD_ARG, -1, 0, width, 8);
}

/* Checked first in full (xl_count_data), so a fault writes nothing. */
static inline void mark(const uint8_t *src, size_t n, int wide,
                        uint8_t *present, uint8_t *last_type, uint8_t *xalloc,
                        uint8_t *broken, uint8_t *chunks, int64_t *counts,
                        int64_t *held)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t raw = wide ? xl_le64(src + 8 * i) : xl_le32(src + 4 * i);
        uint32_t type = (uint32_t)(raw >> 28) & 0xfu;
        uint64_t pfn = raw & PFN_MASK;
        counts[type]++;
        if (carries_data[type]) {
            if (present[pfn])
                held[last_type[pfn] & 0xfu]--;
            present[pfn] = 1;
            last_type[pfn] = (uint8_t)type;
            chunks[pfn >> 16] = 1;
            held[type]++;
        } else if (type == TYPE_XALLOC) {
            xalloc[pfn] = 1;
        } else if (type == TYPE_BROKEN) {
            broken[pfn] = 1;
        }
    }
}

int64_t xl_mark_pfns(const uint8_t *src, size_t n, unsigned width,
                     uint64_t p2m_size, uint8_t *present, uint8_t *last_type,
                     uint8_t *xalloc, uint8_t *broken, uint64_t map_size,
                     uint8_t *chunks, uint64_t chunks_size,
                     int64_t *counts, int64_t *held, xl_fault *fault)
{
    if (width != 4 && width != 8)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, width, 8);
    /* Every pfn that passes the checks is below p2m_size. */
    if (p2m_size > map_size)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, p2m_size, map_size);
    if ((p2m_size + 0xffffu) >> 16 > chunks_size)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, (p2m_size + 0xffffu) >> 16,
                       chunks_size);
    int64_t nd = xl_count_data(src, n, width, p2m_size, fault);
    if (nd < 0)
        return nd;
    mark(src, n, width == 8, present, last_type, xalloc, broken, chunks, counts,
         held);
    return nd;
}

/* Is this a no-data entry (XTAB, XALLOC, BROKEN) the reader would accept? */
static inline int nodata_ok(uint64_t raw, uint64_t p2m_size)
{
    uint32_t type = (uint32_t)(raw >> 28) & 0xfu;
    return type >= TYPE_BROKEN && !entry_bad(raw, p2m_size);
}

static inline int64_t scan(const uint8_t *buf, size_t len, int wide,
                           uint64_t p2m_size, uint8_t *types, uint64_t *pfns,
                           size_t cap, uint32_t *counts, size_t ncap,
                           uint64_t *used)
{
    size_t w = wide ? 8 : 4, pos = 0, ne = 0, nb = 0;
    while (nb < ncap && len - pos >= 4) {
        int32_t id = (int32_t)xl_le32(buf + pos);
        if (id < 1 || id > 1024)
            break;
        size_t n = (size_t)id;
        if (len - pos - 4 < n * w || cap - ne < n)
            break;
        const uint8_t *e = buf + pos + 4;
        size_t i;
        for (i = 0; i < n; i++) {
            uint64_t raw = wide ? xl_le64(e + 8 * i) : xl_le32(e + 4 * i);
            if (!nodata_ok(raw, p2m_size))
                break;
            types[ne + i] = (uint8_t)((raw >> 28) & 0xfu);
            pfns[ne + i] = raw & PFN_MASK;
        }
        if (i < n)
            break;
        ne += n;
        counts[nb++] = (uint32_t)n;
        pos += 4 + n * w;
    }
    *used = pos;
    return (int64_t)nb;
}

int64_t xl_scan_nodata(const uint8_t *buf, size_t len, unsigned width,
                       uint64_t p2m_size, uint8_t *types, uint64_t *pfns,
                       size_t cap, uint32_t *counts, size_t ncap,
                       uint64_t *used)
{
    *used = 0;
    if (width == 8)
        return scan(buf, len, 1, p2m_size, types, pfns, cap, counts, ncap, used);
    if (width == 4)
        return scan(buf, len, 0, p2m_size, types, pfns, cap, counts, ncap, used);
    return xl_fail(NULL, XL_E_BAD_ARG, -1, 0, width, 8);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int64_t xl_v2_entries(const uint8_t *src, size_t n, unsigned width,
                      uint64_t *kept, uint8_t *out, uint64_t *scratch,
                      size_t cap, int32_t *repeats)
{
    if (width != 4 && width != 8)
        return XL_E_BAD_ARG;
    if (cap < n)         /* kept, scratch: cap entries; out: 8 * cap bytes */
        return XL_E_BAD_ARG;
    int wide = width == 8;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t raw = wide ? xl_le64(src + 8 * i) : xl_le32(src + 4 * i);
        if (raw == (uint64_t)TYPE_XTAB << 28)    /* bare XTAB: nothing to say */
            continue;
        kept[k] = raw;
        /* The type nibble moves from bits 31-28 to 63-60; bits 63-32 of a
           64-bit entry and nothing else are dropped. */
        xl_put_le64(out + 8 * k, ((raw & 0xf0000000u) << 32) | (raw & PFN_MASK));
        k++;
    }
    /* A repeated raw value (Xen's script refuses such a batch): sorted copy. */
    memcpy(scratch, kept, k * sizeof *kept);
    qsort(scratch, k, sizeof *scratch, cmp_u64);
    *repeats = 0;
    for (size_t i = 1; i < k; i++)
        if (scratch[i] == scratch[i - 1]) {
            *repeats = 1;
            break;
        }
    return (int64_t)k;
}
