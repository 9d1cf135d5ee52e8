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

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Applies of at least this many pages copy FULL_PAGE data with
   non-temporal stores: such an image is far larger than the caches, and
   skipping the read-for-ownership of the destination halves the memory
   traffic of a page copy. */
#define NT_MIN_PAGES 2048

/* Copy one RUN (4..508 bytes, a multiple of 4).  Scattered deltas are
   mostly runs of one or two words, where a call to memcpy costs more than
   the copy: short runs use two overlapping fixed-size moves instead. */
static inline void copy_run(uint8_t *dst, const uint8_t *src, size_t n)
{
    if (n <= 8) {
        uint32_t a, b;
        memcpy(&a, src, 4);
        memcpy(&b, src + n - 4, 4);
        memcpy(dst, &a, 4);
        memcpy(dst + n - 4, &b, 4);
    } else if (n <= 16) {
        uint64_t a, b;
        memcpy(&a, src, 8);
        memcpy(&b, src + n - 8, 8);
        memcpy(dst, &a, 8);
        memcpy(dst + n - 8, &b, 8);
    } else if (n <= 32) {
        uint64_t a, b, c, d;
        memcpy(&a, src, 8);
        memcpy(&b, src + 8, 8);
        memcpy(&c, src + n - 16, 8);
        memcpy(&d, src + n - 8, 8);
        memcpy(dst, &a, 8);
        memcpy(dst + 8, &b, 8);
        memcpy(dst + n - 16, &c, 8);
        memcpy(dst + n - 8, &d, 8);
    } else {
        memcpy(dst, src, n);
    }
}

/* Non-temporal stores need 16-byte aligned destinations: pages sit at
   multiples of 4096 from the image base, so the base decides. */
static inline int use_stream(const uint8_t *image, size_t npages)
{
    return npages >= NT_MIN_PAGES && ((uintptr_t)image & 15) == 0;
}

/* One FULL_PAGE into a page of the image (16-byte aligned when stream). */
static inline void copy_page(uint8_t *dst, const uint8_t *src, int stream)
{
#if defined(__SSE2__)
    if (stream) {
        for (size_t o = 0; o < XL_PAGE_SIZE; o += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + o));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + o + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + o + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + o + 48));
            _mm_stream_si128((__m128i *)(dst + o), a);
            _mm_stream_si128((__m128i *)(dst + o + 16), b);
            _mm_stream_si128((__m128i *)(dst + o + 32), c);
            _mm_stream_si128((__m128i *)(dst + o + 48), d);
        }
        return;
    }
#else
    (void)stream;
#endif
    memcpy(dst, src, XL_PAGE_SIZE);
}

/* A page that RUNs cover all but a little of (a page the guest rewrote) is
   assembled in a cache-resident bounce page and streamed to the image like
   a FULL_PAGE: written in place, each line of it would first be read for
   ownership, half again the memory traffic of a copy.  Only pages whose
   first marker is a long RUN are looked at, so scattered deltas, which
   touch a few words of a page, keep their in-place writes. */
#define BOUNCE_FIRST_RUN 64u    /* bytes: the first RUN at least this long */
#define BOUNCE_MAX_SKIP 512u    /* bytes of SKIP a bounced page may hold */

/* Is the encoding at p a valid delta page with at most BOUNCE_MAX_SKIP
   skipped bytes?  Any rule broken: no (the ordinary walk reports it). */
static inline int mostly_runs(const uint8_t *buf, size_t len, size_t p)
{
    size_t in_page = 0, skipped = 0;
    while (in_page < XL_PAGE_SIZE) {
        if (p >= len)
            return 0;
        uint8_t marker = buf[p++];
        size_t bytes = (size_t)(marker & LEN_MASK) * WORD;
        if (bytes == 0 || in_page + bytes > XL_PAGE_SIZE)
            return 0;
        if (marker & SKIP_FLAG) {
            skipped += bytes;
            if (skipped > BOUNCE_MAX_SKIP)
                return 0;
        } else {
            if (len - p < bytes)
                return 0;
            p += bytes;
        }
        in_page += bytes;
    }
    return 1;
}

/* Apply a page mostly_runs() accepted: RUN bytes and the page's own SKIP
   bytes into a bounce page, then one streamed page copy.  Returns the
   position after the encoding. */
static inline size_t bounce_page(const uint8_t *buf, size_t p, uint8_t *page)
{
    _Alignas(64) uint8_t tmp[XL_PAGE_SIZE];
    size_t in_page = 0;
    while (in_page < XL_PAGE_SIZE) {
        uint8_t marker = buf[p++];
        size_t bytes = (size_t)(marker & LEN_MASK) * WORD;
        if (marker & SKIP_FLAG) {
            memcpy(tmp + in_page, page + in_page, bytes);
        } else {
            memcpy(tmp + in_page, buf + p, bytes);
            p += bytes;
        }
        in_page += bytes;
    }
    copy_page(page, tmp, 1);
    return p;
}

/* Streamed stores are weakly ordered: fence them before returning. */
static inline void stream_fence(int stream)
{
#if defined(__SSE2__)
    if (stream)
        _mm_sfence();
#else
    (void)stream;
#endif
}


/*
 * Walk one page encoding starting at *pos.  With page != NULL the page is
 * updated as the encoding says.  Returns the kind or a negative code.
 */
static inline int64_t walk_page(const uint8_t *buf, size_t len, size_t *pos,
                                uint8_t *page, int64_t index, xl_fault *fault,
                                int stream)
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
            copy_page(page, buf + p + 1, stream);
        *pos = p + 1 + XL_PAGE_SIZE;
        return KIND_FULL;
    }
    if (page && stream && !(first & SKIP_FLAG)
        && (size_t)(first & LEN_MASK) * WORD >= BOUNCE_FIRST_RUN
        && mostly_runs(buf, len, p)) {
        *pos = bounce_page(buf, p, page);
        return KIND_DELTA;
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
                copy_run(page + in_page, buf + p, bytes);
            else if (bytes >= 64)
                /* Index walk: long runs jump over cache lines, so the next
                   markers are loads the hardware prefetcher does not see
                   coming; ask for the line a page ahead. */
                __builtin_prefetch(buf + p + bytes + XL_PAGE_SIZE);
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
        int64_t kind = walk_page(buf, len, &pos, NULL, (int64_t)i, fault, 0);
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
    int stream = use_stream(image, count);
    int64_t ret = (int64_t)count;
    for (size_t i = first; i < first + count; i++) {
        size_t pos = starts[i];
        int64_t kind = walk_page(buf, len, &pos,
                                 image + pfns[i] * XL_PAGE_SIZE, (int64_t)i,
                                 fault, stream);
        if (kind < 0) {
            ret = kind;
            break;
        }
    }
    stream_fence(stream);
    return ret;
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
    int stream = use_stream(image, npages);
    for (size_t i = 0; i < npages; i++) {
        int64_t kind = walk_page(buf, len, &pos,
                                 image + pfns[i] * XL_PAGE_SIZE, (int64_t)i,
                                 fault, stream);
        if (kind < 0) {
            stream_fence(stream);
            return kind;
        }
        counts[kind]++;
    }
    stream_fence(stream);
    if (pos != len)
        return xl_fail(fault, XL_E_PAGES_EXTRA, (int64_t)npages, (int64_t)pos,
                       len - pos, npages);
    if (kinds)
        memcpy(kinds, counts, sizeof counts);
    return (int64_t)npages;
}

int64_t xl_delta_scan(const uint8_t *buf, size_t len, size_t max_pages,
                      uint64_t *starts, uint64_t *used, xl_fault *fault)
{
    (void)fault;
    size_t pos = 0, i = 0;
    while (i < max_pages && pos < len) {
        size_t p = pos;
        if (walk_page(buf, len, &p, NULL, (int64_t)i, NULL, 0) < 0)
            break;              /* not whole inside buf (or broken): not taken */
        starts[i++] = pos;
        pos = p;
    }
    *used = pos;
    return (int64_t)i;
}
