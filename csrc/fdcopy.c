/*
 * Page data moved file-to-memory or file-to-file by the kernel.
 *
 * A format A batch stores its pages back to back; the image wants them at
 * pfn*4096.  Runs of consecutive pfns are moved with one system call each:
 * pread straight into the image, or between the files by splice through
 * the caller's pipe (else copy_file_range; no user-space copy either way).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include "fileio.h"

int64_t xl_pread_pages(int in_fd, int64_t in_off, size_t npages,
                       const uint64_t *pfns, uint8_t *image,
                       uint64_t image_pages, xl_fault *fault)
{
    int64_t rc = xl_check_file_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    size_t i = 0;
    while (i < npages) {
        size_t k = xl_run_length(pfns, i, npages), got;
        int err = xl_pread_all(in_fd, image + pfns[i] * XL_PAGE_SIZE,
                            k * XL_PAGE_SIZE,
                            (off_t)(in_off + (int64_t)(i * XL_PAGE_SIZE)), &got);
        if (err)
            return xl_run_fault(fault, err, i, got, npages);
        i += k;
    }
    return (int64_t)npages;
}

/* Move len bytes in -> out with copy_file_range; returns 0, an errno, -1 on
   end of input, or -2 when the kernel cannot copy between these files. */
static int kernel_copy(int in_fd, off_t in_off, int out_fd, off_t out_off,
                       size_t len, size_t *done)
{
    *done = 0;
    while (*done < len) {
        off_t io = in_off + (off_t)*done, oo = out_off + (off_t)*done;
        ssize_t r = copy_file_range(in_fd, &io, out_fd, &oo, len - *done, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (*done == 0 && (errno == EXDEV || errno == EINVAL ||
                               errno == ENOSYS || errno == EOPNOTSUPP ||
                               errno == EBADF))
                return -2;
            return errno;
        }
        if (r == 0)
            return -1;
        *done += (size_t)r;
    }
    return 0;
}

/* Whether a splice error means these files cannot be spliced (the caller
   goes on with another method), not a failure of the copy. */
static int splice_refused(int err)
{
    return err == EINVAL || err == ENOSYS || err == EOPNOTSUPP || err == EBADF;
}

/* Empty the `left` bytes the pipe holds, through bounce: written to out_fd
   when out_fd >= 0 (counted in *put), else dropped.  Returns 0, EIO if the
   pipe holds fewer, or write()'s errno (the pipe still emptied). */
static int drain_pipe(int pipe_r, size_t left, uint8_t *bounce,
                      size_t bounce_len, int out_fd, size_t *put)
{
    int err = 0;
    while (left) {
        ssize_t r = read(pipe_r, bounce, left < bounce_len ? left : bounce_len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return EIO;              /* cannot happen: the bytes are there */
        left -= (size_t)r;
        size_t off = 0;
        while (out_fd >= 0 && !err && off < (size_t)r) {
            ssize_t k = write(out_fd, bounce + off, (size_t)r - off);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                err = k < 0 ? errno : EIO;
                break;
            }
            off += (size_t)k;
            *put += (size_t)k;
        }
    }
    return err;
}

/* Move len bytes in -> out by splice through the caller's pipe (empty on
   entry, left empty on return): each splice into the output moves up to
   pipe_size bytes, where copy_file_range's internal pipe moves 64 KiB --
   with input and output offsets that disagree modulo the page size (a
   batch's pages always do), ext4 then spends ~60% more time than cp's
   aligned copy.  Returns as kernel_copy; -2 (refused) only before any byte
   reached the output, with the pipe drained into the bounce buffer and
   *done 0. */
static int pipe_copy(int in_fd, off_t in_off, int out_fd, off_t out_off,
                     size_t len, int pipe_r, int pipe_w, size_t pipe_size,
                     uint8_t *bounce, size_t bounce_len, size_t *done)
{
    *done = 0;
    while (*done < len) {
        size_t want = len - *done < pipe_size ? len - *done : pipe_size;
        off_t io = in_off + (off_t)*done;
        ssize_t got = splice(in_fd, &io, pipe_w, NULL, want, SPLICE_F_MOVE);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (*done == 0 && splice_refused(errno))
                return -2;
            return errno;
        }
        if (got == 0)
            return -1;
        size_t left = (size_t)got;
        while (left) {
            off_t oo = out_off + (off_t)(*done + (size_t)got - left);
            ssize_t w = splice(pipe_r, NULL, out_fd, &oo, left, SPLICE_F_MOVE);
            if (w > 0) {
                left -= (size_t)w;
                continue;
            }
            int err = w < 0 ? errno : EIO;
            if (err == EINTR)
                continue;
            int nothing_out = *done == 0 && left == (size_t)got;
            /* Empty the pipe: it is used again by the fallback, or by the
               next call. */
            size_t dropped = 0;
            if (drain_pipe(pipe_r, left, bounce, bounce_len, -1, &dropped))
                return EIO;
            if (nothing_out && splice_refused(err))
                return -2;
            return err;
        }
        *done += (size_t)got;
    }
    return 0;
}

static int bounce_copy(int in_fd, off_t in_off, int out_fd, off_t out_off,
                       size_t len, uint8_t *bounce, size_t bounce_len,
                       size_t *done)
{
    *done = 0;
    while (*done < len) {
        size_t want = len - *done < bounce_len ? len - *done : bounce_len, got;
        int err = xl_pread_all(in_fd, bounce, want, in_off + (off_t)*done, &got);
        if (got) {
            int werr = xl_pwrite_all(out_fd, bounce, got, out_off + (off_t)*done);
            if (werr)
                return werr;
            *done += got;
        }
        if (err)
            return err;
    }
    return 0;
}

/* How a call moves its runs: the first way the kernel accepts for these
   files, kept for the rest of the call. */
typedef struct {
    int mode;                   /* 2: pipe, 1: copy_file_range, 0: bounce */
    int pipe_r, pipe_w;
    size_t pipe_size;
    uint8_t *bounce;
    size_t bounce_len;
} copy_way;

static copy_way copy_way_for(int pipe_r, int pipe_w, size_t pipe_size,
                             uint8_t *bounce, size_t bounce_len)
{
    copy_way w = {pipe_r >= 0 && pipe_w >= 0 && pipe_size >= XL_PAGE_SIZE ? 2 : 1,
                  pipe_r, pipe_w, pipe_size, bounce, bounce_len};
    return w;
}

/* Copy the k pages that start at page i of the input range (at in_off) to
   the image file at pfn. */
static int64_t copy_run(int in_fd, int64_t in_off, size_t i, size_t k,
                        int out_fd, uint64_t pfn, copy_way *way, size_t npages,
                        xl_fault *fault)
{
    size_t len = k * XL_PAGE_SIZE, done = 0;
    off_t src = (off_t)(in_off + (int64_t)(i * XL_PAGE_SIZE));
    off_t dst = (off_t)(pfn * XL_PAGE_SIZE);
    int err = -2;
    if (way->mode == 2) {
        err = pipe_copy(in_fd, src, out_fd, dst, len, way->pipe_r, way->pipe_w,
                        way->pipe_size, way->bounce, way->bounce_len, &done);
        if (err == -2)
            way->mode = 1;
    }
    if (err == -2 && way->mode == 1) {
        err = kernel_copy(in_fd, src, out_fd, dst, len, &done);
        if (err == -2)
            way->mode = 0;
    }
    if (err == -2)
        err = bounce_copy(in_fd, src, out_fd, dst, len, way->bounce,
                          way->bounce_len, &done);
    if (err)
        return xl_run_fault(fault, err, i, done, npages);
    return 0;
}

int64_t xl_copy_pages(int in_fd, int64_t in_off, size_t npages,
                      const uint64_t *pfns, int out_fd, uint64_t image_pages,
                      int pipe_r, int pipe_w, size_t pipe_size,
                      uint8_t *bounce, size_t bounce_len, xl_fault *fault)
{
    int64_t rc = xl_check_file_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    if (bounce_len < XL_PAGE_SIZE)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, bounce_len, XL_PAGE_SIZE);
    copy_way way = copy_way_for(pipe_r, pipe_w, pipe_size, bounce, bounce_len);
    size_t i = 0;
    while (i < npages) {
        size_t k = xl_run_length(pfns, i, npages);
        int64_t rc = copy_run(in_fd, in_off, i, k, out_fd, pfns[i], &way,
                              npages, fault);
        if (rc < 0)
            return rc;
        i += k;
    }
    return (int64_t)npages;
}

/* Which type nibbles carry a page (0..4, 8..c), as in pfn.c. */
static inline int carries_data(uint64_t raw)
{
    uint32_t type = (uint32_t)(raw >> 28) & 0xfu;
    return type <= 4 || (type >= 8 && type <= 12);
}

static inline uint64_t entry_at(const uint8_t *src, size_t i, int wide)
{
    return wide ? xl_le64(src + 8 * i) : xl_le32(src + 4 * i);
}

int64_t xl_copy_raw_pages(const uint8_t *src, size_t n, unsigned width,
                          uint64_t p2m_size, int in_fd, int64_t in_off,
                          int out_fd, uint64_t image_pages, int pipe_r,
                          int pipe_w, size_t pipe_size, uint8_t *bounce,
                          size_t bounce_len, const uint8_t *skip,
                          size_t skip_len, xl_fault *fault)
{
    if (width != 4 && width != 8)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, width, 8);
    if (image_pages > XL_MAX_FILE_PAGES)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, image_pages,
                       XL_MAX_FILE_PAGES);
    /* Every entry that passes the checks has a pfn below p2m_size. */
    if (p2m_size > image_pages)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, p2m_size, image_pages);
    if (bounce_len < XL_PAGE_SIZE)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, bounce_len, XL_PAGE_SIZE);
    /* skip[pfn] is read for pfns below p2m_size only. */
    if (skip && skip_len < p2m_size)
        return xl_fail(fault, XL_E_BAD_ARG, -1, 0, skip_len, p2m_size);
    int64_t nd = xl_count_data(src, n, width, p2m_size, fault);
    if (nd < 0)
        return nd;
    int wide = width == 8;
    copy_way way = copy_way_for(pipe_r, pipe_w, pipe_size, bounce, bounce_len);
    const uint64_t mask = 0x0fffffffu;
    size_t i = 0, d = 0;        /* entry, data page */
    while (i < n) {
        uint64_t raw = entry_at(src, i++, wide);
        if (!carries_data(raw))
            continue;
        /* The run: the data entries that follow with the next pfns (entries
           without a page between them have no bytes in the stream), up to a
           pfn the caller writes itself (skip), whose page is passed over. */
        uint64_t first = raw & mask;
        if (skip && skip[first]) {
            d++;
            continue;
        }
        size_t k = 1;
        while (i < n) {
            uint64_t next = entry_at(src, i, wide);
            if (carries_data(next)) {
                if ((next & mask) != first + k || (skip && skip[first + k]))
                    break;
                k++;
            }
            i++;
        }
        int64_t rc = copy_run(in_fd, in_off, d, k, out_fd, first, &way,
                              (size_t)nd, fault);
        if (rc < 0)
            return rc;
        d += k;
    }
    return nd;
}

int64_t xl_gather_pages(int fd, const uint64_t *pfns, size_t npages,
                        uint8_t *out, uint64_t image_pages, xl_fault *fault)
{
    int64_t rc = xl_check_file_pfns(pfns, npages, image_pages, fault);
    if (rc < 0)
        return rc;
    size_t i = 0;
    while (i < npages) {
        size_t k = xl_run_length(pfns, i, npages), got;
        int err = xl_pread_all(fd, out + i * XL_PAGE_SIZE, k * XL_PAGE_SIZE,
                               (off_t)(pfns[i] * XL_PAGE_SIZE), &got);
        if (err)
            return xl_run_fault(fault, err, i, got, npages);
        i += k;
    }
    return (int64_t)npages;
}

int64_t xl_splice_append(int in_fd, int64_t in_off, size_t len, int out_fd,
                         int pipe_r, int pipe_w, size_t pipe_size,
                         uint8_t *bounce, size_t bounce_len, int64_t *done)
{
    *done = 0;
    if (in_off < 0 || pipe_size == 0 || bounce_len == 0)
        return XL_E_BAD_ARG;
    size_t out = 0;
    while (out < len) {
        size_t want = len - out < pipe_size ? len - out : pipe_size;
        off_t io = (off_t)in_off + (off_t)out;
        ssize_t got = splice(in_fd, &io, pipe_w, NULL, want, SPLICE_F_MOVE);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            *done = (int64_t)out;
            return errno;
        }
        if (got == 0)
            break;                          /* the input ended */
        size_t left = (size_t)got;
        while (left) {
            /* NULL: at the output's file position, which moves on. */
            ssize_t w = splice(pipe_r, NULL, out_fd, NULL, left, SPLICE_F_MOVE);
            if (w > 0) {
                left -= (size_t)w;
                out += (size_t)w;
                continue;
            }
            int err = w < 0 ? errno : EIO;
            if (err == EINTR)
                continue;
            /* Empty the pipe, so that it can be used again.  An output that
               refuses splice (O_APPEND, an odd file system) takes what the
               pipe holds by write(), so every byte taken from the input is
               out and the caller goes on from *done with another method;
               after any other error the bytes are dropped, uncounted. */
            int refused = splice_refused(err);
            size_t put = 0;
            int failed = drain_pipe(pipe_r, left, bounce, bounce_len,
                                    refused ? out_fd : -1, &put);
            if (failed && refused)
                err = failed;          /* a failed write() is no refusal */
            *done = (int64_t)(out + put);
            return err;
        }
    }
    *done = (int64_t)out;
    return 0;
}
