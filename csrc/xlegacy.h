/*
 * xlegacy native kernels: the boundary between Python and C.
 *
 * Everything between the cdef markers is fed verbatim to cffi's cdef(), so it
 * must stay parsable by cffi (plain typedefs, prototypes and integer #defines).
 *
 * House rules for every kernel:
 *   - Python allocates, C fills.  Every buffer comes with its length and every
 *     index read from untrusted data is checked against it before use.
 *   - No global state, no allocation, no Python.h: the kernels are reentrant
 *     and cffi releases the GIL around each call.
 *   - A kernel either succeeds or returns a negative XL_E_* code and fills the
 *     xl_fault it was given; where a kernel writes into the guest image it
 *     validates everything first, so a failed call leaves the image untouched.
 */
#ifndef XLEGACY_H
#define XLEGACY_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define XL_ABI_VERSION 19

#define XL_PAGE_SIZE 4096

#define XL_OK 0
#define XL_E_BAD_TYPE -1          /* page type nibble 5..7 */
#define XL_E_PFN_RANGE -2         /* pfn >= p2m_size / image pages */
#define XL_E_UPPER_BITS -3        /* 64-bit entry with bits 63..32 set */
#define XL_E_BAD_ARG -4           /* width, sizes or capacities inconsistent */
#define XL_E_ZERO_MARKER -5       /* RUN/SKIP marker of length 0 inside a page */
#define XL_E_RUN_PAST_PAGE -6     /* RUN/SKIP crosses byte 4096 of the page */
#define XL_E_RUN_PAST_BUFFER -7   /* RUN/FULL_PAGE data runs past the buffer */
#define XL_E_PAGES_SHORT -8       /* buffer ended before all pages were decoded */
#define XL_E_PAGES_EXTRA -9       /* bytes left over after the last page */
#define XL_E_IO -10               /* a write/read system call failed (value = errno) */
#define XL_E_SHORT_READ -11       /* the input file ended before the pages did */

/* Where and why a kernel failed.  Fields not meaningful for a code are 0. */
typedef struct {
    int64_t index;   /* entry or page index the fault belongs to */
    int64_t offset;  /* byte offset within the input buffer */
    uint64_t value;  /* the offending value (raw entry, pfn, length, errno) */
    uint64_t limit;  /* what it was checked against */
} xl_fault;

int xl_abi_version(void);

/*
 * PFN arrays.  n raw entries of `width` (4 or 8) bytes, little endian, at src.
 * Writes types[i] (the 4-bit type nibble) and pfns[i] (bits 27..0) for every
 * entry, and the pfns of the data-carrying entries (every type except XTAB,
 * XALLOC and BROKEN), in order, to data_pfns (capacity data_cap).
 * Checks: nibble 5..7 -> XL_E_BAD_TYPE; with width 8, bits 63..32 set ->
 * XL_E_UPPER_BITS; pfn >= p2m_size on any entry but XTAB -> XL_E_PFN_RANGE.
 * Returns the number of data-carrying entries, or a negative XL_E_* code.
 */
int64_t xl_decode_pfns(const uint8_t *src, size_t n, unsigned width,
                       uint64_t p2m_size, uint8_t *types, uint64_t *pfns,
                       uint64_t *data_pfns, size_t data_cap, xl_fault *fault);

/*
 * The same checks, and only the number of data-carrying entries as result:
 * what a reader needs to know how many page bytes follow the PFN array.
 * Returns that number, or a negative XL_E_* code with the first bad entry
 * in fault (as xl_decode_pfns reports it).
 */
int64_t xl_count_data(const uint8_t *src, size_t n, unsigned width,
                      uint64_t p2m_size, xl_fault *fault);

/*
 * The same checks, and a batch's entries folded into per-PFN state of
 * map_size bytes each (what `info` reports, without numpy): for every
 * data-carrying entry present[pfn] = 1 and last_type[pfn] = its type; for
 * XALLOC xalloc[pfn] = 1, for BROKEN broken[pfn] = 1; counts[type] += 1 for
 * every entry; held[t] is kept equal to the number of present pfns whose
 * last type is t (so the caller never scans the maps for totals);
 * chunks[pfn >> 16] = 1 for every data-carrying entry (so a search for the
 * present pfns skips the 64 Ki-pfn chunks without any).  Entries
 * are applied in order (a repeated pfn ends with its last type).  Nothing
 * is written when an entry faults.
 * Returns the number of data-carrying entries or a negative XL_E_* code.
 */
int64_t xl_mark_pfns(const uint8_t *src, size_t n, unsigned width,
                     uint64_t p2m_size, uint8_t *present, uint8_t *last_type,
                     uint8_t *xalloc, uint8_t *broken, uint64_t map_size,
                     uint8_t *chunks, uint64_t chunks_size,
                     int64_t *counts, int64_t *held, xl_fault *fault);

/*
 * Copy npages consecutive 4096-byte pages into image (image_pages pages) at
 * their pfns.  All pfns are checked before anything is written.
 * Returns npages or a negative XL_E_* code.
 */
int64_t xl_scatter_pages(const uint8_t *pages, size_t npages,
                         const uint64_t *pfns, uint8_t *image,
                         uint64_t image_pages, xl_fault *fault);

/*
 * Same, into the open file descriptor fd (page p at byte p*4096); runs of
 * consecutive pfns become one pwrite.  Returns npages or a negative code
 * (XL_E_IO with the errno in fault->value).
 */
int64_t xl_pwrite_pages(int fd, const uint8_t *pages, size_t npages,
                        const uint64_t *pfns, uint64_t image_pages,
                        xl_fault *fault);

/*
 * Page data straight from a file, without passing through a buffer.
 *
 * xl_pread_pages reads npages pages that sit consecutively at in_off in
 * in_fd into image at their pfns (runs of consecutive pfns become one pread).
 * xl_copy_pages does the same into out_fd (page p at p*4096) in the
 * kernel: by splice through the caller's pipe (pipe_r/pipe_w, empty, of
 * pipe_size bytes; -1/-1/0: none) where it can, else copy_file_range; where
 * the kernel cannot do either for these files it falls back to pread/pwrite
 * through the caller's bounce buffer (bounce_len >= 4096).  The pipe is
 * left empty, also after a failure.
 * Both return npages or a negative code (XL_E_IO: errno in fault->value;
 * XL_E_SHORT_READ: the input ended, fault->offset = bytes of the range read).
 */
int64_t xl_pread_pages(int in_fd, int64_t in_off, size_t npages,
                       const uint64_t *pfns, uint8_t *image,
                       uint64_t image_pages, xl_fault *fault);

int64_t xl_copy_pages(int in_fd, int64_t in_off, size_t npages,
                      const uint64_t *pfns, int out_fd, uint64_t image_pages,
                      int pipe_r, int pipe_w, size_t pipe_size,
                      uint8_t *bounce, size_t bounce_len, xl_fault *fault);

/*
 * xl_copy_raw_pages: xl_copy_pages for a batch as the stream has it (n raw
 * `width`-byte PFN entries, checked as xl_count_data does, before any
 * copy): the pages of its data-carrying entries, consecutive at in_off of
 * in_fd, go to out_fd at pfn*4096, a run of consecutive pfns per call.  No
 * pfn array is built, so the caller needs no numpy.  p2m_size must not
 * exceed image_pages.  skip (NULL: none), skip_len >= p2m_size bytes: the
 * page of an entry whose pfn p has skip[p] != 0 is not copied (another
 * writer owns that pfn).  Returns the number of data pages or a negative code:
 * entry faults as xl_count_data (index, offset: the entry's), copy faults as
 * xl_copy_pages (index: the data page, offset: into the page data).
 */
int64_t xl_copy_raw_pages(const uint8_t *src, size_t n, unsigned width,
                          uint64_t p2m_size, int in_fd, int64_t in_off,
                          int out_fd, uint64_t image_pages, int pipe_r,
                          int pipe_w, size_t pipe_size, uint8_t *bounce,
                          size_t bounce_len, const uint8_t *skip,
                          size_t skip_len, xl_fault *fault);

/*
 * The opposite direction: read the pages at pfns of an image file (page p
 * at p*4096 of fd) into npages consecutive pages at out.  Lets a file image
 * be updated page by page (Remus deltas) through a buffer the size of the
 * checkpoint instead of a mapping of the whole file.
 * Returns npages or a negative code (XL_E_SHORT_READ: the file is shorter).
 */
int64_t xl_gather_pages(int fd, const uint64_t *pfns, size_t npages,
                        uint8_t *out, uint64_t image_pages, xl_fault *fault);

/*
 * Pages that lie anywhere in a buffer (memory slots, a mapping of the
 * input), in one system call per run of neighbours.
 *
 * xl_pwrite_at writes page i, the 4096 bytes at src + at[i], to fd at
 * pfns[i] * 4096; runs of consecutive pfns become one pwritev.
 * xl_pread_at reads page i from byte offset offs[i] of fd into dst + at[i];
 * runs of consecutive offsets (offs[i+1] == offs[i] + 4096) become one
 * preadv.  Every pfn, offset and at[i] (at[i] + 4096 <= the buffer's
 * length: else XL_E_BAD_ARG, fault->index = i) is checked before any I/O.
 * Both return npages or a negative code (XL_E_IO: errno in fault->value;
 * XL_E_SHORT_READ: the file ended, as xl_gather_pages reports it).
 */
int64_t xl_pwrite_at(int fd, const uint8_t *src, size_t src_len,
                     const uint64_t *at, const uint64_t *pfns, size_t npages,
                     uint64_t image_pages, xl_fault *fault);

int64_t xl_pread_at(int fd, const uint64_t *offs, size_t npages, uint8_t *dst,
                    size_t dst_len, const uint64_t *at, xl_fault *fault);

/*
 * Verify mode: compare npages pages with the image at their pfns; sets
 * differs[i] to 1 where page i is not equal to the image.  Never writes to
 * the image.  Returns the number of differing pages or a negative code.
 */
int64_t xl_compare_pages(const uint8_t *pages, size_t npages,
                         const uint64_t *pfns, const uint8_t *image,
                         uint64_t image_pages, uint8_t *differs,
                         xl_fault *fault);

/*
 * Remus page-delta (format B) buffers.
 *
 * xl_delta_index walks a checkpoint's whole compressed buffer, which must hold
 * exactly npages page encodings, and writes the start offset of each to
 * starts[0..npages-1] and the end of the last one to starts[npages].  It
 * checks every rule libxc checks without touching any image.  kinds, when not
 * NULL, receives the number of EMPTY, FULL and delta pages.
 * Returns npages or a negative code (fault->index = page, ->offset = byte).
 */
int64_t xl_delta_index(const uint8_t *buf, size_t len, size_t npages,
                       uint64_t *starts, uint64_t *kinds, xl_fault *fault);

/*
 * Apply pages [first, first+count) of an indexed buffer to the image: EMPTY
 * leaves the page, FULL copies it, RUN bytes replace, SKIP leaves.  Every
 * access is bounds-checked again (starts may come from anywhere); pfns are
 * all checked before anything is written.  Page ranges may be applied from
 * several threads at once when their pfns are distinct.
 * Returns count or a negative code.
 */
int64_t xl_delta_apply(const uint8_t *buf, size_t len, const uint64_t *starts,
                       const uint64_t *pfns, size_t first, size_t count,
                       uint8_t *image, uint64_t image_pages, xl_fault *fault);

/*
 * Index and apply in one pass: the buffer is read once, which is what the
 * single-threaded restore uses (the two-pass form costs a second trip
 * through memory).  Same checks, same faults as xl_delta_index; pfns are
 * checked before anything is written, but a fault in the data leaves the
 * pages before it applied (the caller discards the image, as libxc does).
 * kinds, when not NULL, receives the EMPTY/FULL/delta counts.
 */
int64_t xl_delta_decode(const uint8_t *buf, size_t len, size_t npages,
                        const uint64_t *pfns, uint8_t *image,
                        uint64_t image_pages, uint64_t *kinds,
                        xl_fault *fault);

/*
 * The whole page encodings at the start of one piece of a compressed
 * buffer (one COMPRESSED_DATA payload, where the pieces are not adjacent):
 * walks at most max_pages encodings, writing each one's start to starts[i],
 * and stops before the first that does not lie whole and valid inside buf
 * (it crosses the end, or breaks a rule: xl_delta_index says which).
 * *used receives the bytes walked.  Returns the number of pages taken.
 */
int64_t xl_delta_scan(const uint8_t *buf, size_t len, size_t max_pages,
                      uint64_t *starts, uint64_t *used, xl_fault *fault);
/*
 * Random page reads through a page index (xlegacy.pagemap).  The index is
 * n_index pfns in strictly increasing order (index_pfns) and the byte offset
 * of each one's page in map (index_offs).  For each of the n_want pfns in
 * want, copy its page to out + i*4096, or zero that page when the index does
 * not hold it; found (when not NULL) receives 1 or 0 per pfn.  Every offset
 * used is checked against map_len before anything is written.
 * Returns the number of pages found, or XL_E_SHORT_READ (fault->index = the
 * wanted pfn whose page lies beyond the map, ->value = its offset,
 * ->limit = map_len).
 */
int64_t xl_read_many(const uint8_t *map, uint64_t map_len,
                     const uint64_t *index_pfns, const uint64_t *index_offs,
                     size_t n_index, const uint64_t *want, size_t n_want,
                     uint8_t *out, uint8_t *found, xl_fault *fault);
/*
 * A run of page batches none of whose entries carries a page (each entry
 * XTAB, XALLOC or BROKEN), which a stream may send one tiny batch at a time
 * (1.25M one-entry batches): read in one call instead of one record each.
 * buf (len bytes) starts at a chunk id.  The walk takes batch after batch
 * while the next one has 1..1024 entries, lies whole inside buf and every
 * entry is such a no-data entry passing the reader's checks (no bits 63..32,
 * pfn < p2m_size except XTAB); it stops before anything else (another
 * chunk, a batch with pages, a bad entry, a batch cut by the end of buf)
 * and leaves that to the per-record path, which reports any error.
 * Writes the entries' type nibbles to types[] and pfns to pfns[] (capacity
 * cap) and each batch's entry count to counts[] (capacity ncap); stops
 * early where one more would not fit.  *used receives the bytes walked.
 * Returns the number of batches taken (0 when the first record is not such
 * a batch), or XL_E_BAD_ARG for a bad width.
 */
int64_t xl_scan_nodata(const uint8_t *buf, size_t len, unsigned width,
                       uint64_t p2m_size, uint8_t *types, uint64_t *pfns,
                       size_t cap, uint32_t *counts, size_t ncap,
                       uint64_t *used);
/*
 * xl_v2_entries: a batch's n raw `width`-byte PFN entries as a v2 PAGE_DATA
 * record carries them (what Xen's convert-legacy-stream writes): bare XTAB
 * entries (exactly 0xf0000000) dropped; of every other one, its raw value
 * to kept[k] and (type << 60) | pfn (type: bits 31-28, pfn: bits 27-0; the
 * rest dropped) as 8 little-endian bytes to out + 8k.  *repeats = 1 where a
 * kept raw value occurs twice (sorted in scratch).  kept and scratch hold
 * cap values, out 8 * cap bytes; cap >= n.  Returns the number kept, or
 * XL_E_BAD_ARG.  Needs no numpy: convert of PV page tables and HVM holes.
 */
int64_t xl_v2_entries(const uint8_t *src, size_t n, unsigned width,
                      uint64_t *kept, uint8_t *out, uint64_t *scratch,
                      size_t cap, int32_t *repeats);
/*
 * xl_splice_append: len bytes at in_off of regular file in_fd appended to
 * out_fd at its file position (which moves on), by splice through the
 * caller's empty pipe of pipe_size bytes, without the GIL for the whole
 * range (a Python loop takes it back after every splice: a converter's
 * writing thread then waits for the thread that decodes).  Returns 0, or an
 * errno with the pipe emptied again (through bounce: an output that refuses
 * splice with EINVAL, ENOSYS, EOPNOTSUPP or EBADF gets its bytes by write(),
 * after any other error they are dropped); *done is always the number of
 * bytes that reached the output (fewer than len without an error: the input
 * ended).  XL_E_BAD_ARG for bad arguments.
 */
int64_t xl_splice_append(int in_fd, int64_t in_off, size_t len, int out_fd,
                         int pipe_r, int pipe_w, size_t pipe_size,
                         uint8_t *bounce, size_t bounce_len, int64_t *done);
/* cdef-end */

#endif
