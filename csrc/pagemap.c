/* Random page reads through a page index (xlegacy.pagemap). */
#include "common.h"

/* Position of pfn in the sorted index, or n when it is not there. */
static size_t xl_find(const uint64_t *pfns, size_t n, uint64_t pfn)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (pfns[mid] < pfn)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (lo < n && pfns[lo] == pfn) ? lo : n;
}

int64_t xl_read_many(const uint8_t *map, uint64_t map_len,
                     const uint64_t *index_pfns, const uint64_t *index_offs,
                     size_t n_index, const uint64_t *want, size_t n_want,
                     uint8_t *out, uint8_t *found, xl_fault *fault)
{
    /* Check every page that will be read before anything is written, so a
       bad index leaves `out` untouched. */
    for (size_t i = 0; i < n_want; i++) {
        size_t k = xl_find(index_pfns, n_index, want[i]);
        if (k == n_index)
            continue;
        uint64_t off = index_offs[k];
        if (off > map_len || map_len - off < XL_PAGE_SIZE)
            return xl_fail(fault, XL_E_SHORT_READ, (int64_t)i, 0, off, map_len);
    }
    /* Random pages of a large mapping cost a TLB walk and a trip to memory
       at the start of each; asking for page i+AHEAD's first lines while
       page i is copied overlaps those.  slots[] holds the lookups of the
       pages between (a ring on the stack: no allocation). */
    enum { AHEAD = 8 };
    size_t slots[AHEAD];
    size_t pre = n_want < AHEAD ? n_want : AHEAD;
    for (size_t j = 0; j < pre; j++) {
        slots[j] = xl_find(index_pfns, n_index, want[j]);
        if (slots[j] != n_index)
            __builtin_prefetch(map + index_offs[slots[j]]);
    }
    int64_t hits = 0;
    for (size_t i = 0; i < n_want; i++) {
        size_t k = slots[i % AHEAD];
        if (i + AHEAD < n_want) {
            size_t nk = xl_find(index_pfns, n_index, want[i + AHEAD]);
            slots[i % AHEAD] = nk;
            if (nk != n_index) {
                const uint8_t *p = map + index_offs[nk];
                __builtin_prefetch(p);
                __builtin_prefetch(p + 64);
            }
        }
        uint8_t *dst = out + i * XL_PAGE_SIZE;
        if (k == n_index) {
            memset(dst, 0, XL_PAGE_SIZE);
        } else {
            memcpy(dst, map + index_offs[k], XL_PAGE_SIZE);
            hits++;
        }
        if (found)
            found[i] = (uint8_t)(k != n_index);
    }
    return hits;
}
