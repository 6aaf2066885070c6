/* One pass per page batch for handler/pagebatch.py: the zero-page check, the page hash
 * (XXH3-128, canonical big-endian: what handler/native/pagehash.c and xxhash's
 * xxh3_128_digest give) and the copy, each page read once while it is in the cache.
 *
 * Source: pagebatch_scan tells zero pages from data pages (the check stops at the first
 * non-zero 64-byte block: a data page costs one cache line) and writes their indices in
 * the wire's form (uint32); pagebatch_gather then hashes every data page and copies it
 * straight into the serialized frame (its payload field): one copy from guest RAM to the
 * bytes gRPC sends.
 *
 * Target: pagebatch_apply writes a batch's pages into the guest's RAM file -- each run of
 * min_run or more consecutive pages with one pwrite() (a fresh page of a shared-memory
 * file costs a page fault and its zeroing through a mapping, not through write()), the
 * rest with memcpy through the mapping -- and hashes each page it wrote: a pwritten page
 * from the received buffer once pwrite() put its full length at that page's offset
 * (reading it back through the mapping would cost a page fault per page), a copied page
 * from the mapping.
 *
 * Hashes go to hashes + 16 * page (a table with a row per page: the digest's) when
 * hashes is not NULL. No state, no lock: ctypes calls these with the GIL released. The
 * caller checks every index (page * page_size + page_size <= the RAM's length). */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "zero_page.h"

static void hash_to(uint8_t *hashes, size_t page, const uint8_t *data, size_t len)
{
    XXH128_canonicalFromHash((XXH128_canonical_t *)(hashes + 16 * page), XXH3_128bits(data, len));
}

/* indices[0 .. n) split into data pages (nz_out) and zero pages (zero_out), in order,
 * stopping before the data page that would be max_nonzero + 1. counts[0], counts[1]:
 * how many of each. Returns how many indices the batch covers. */
size_t pagebatch_scan(const uint8_t *ram, size_t page_size, const int64_t *indices, size_t n,
                      size_t max_nonzero, uint32_t *nz_out, uint32_t *zero_out, uint64_t *counts)
{
    size_t nz = 0, zero = 0, k = 0;
    for (; k < n; k++) {
        size_t page = (size_t)indices[k];
        if (page_all_zero(ram + page * page_size, page_size)) {
            zero_out[zero++] = (uint32_t)page;
            continue;
        }
        if (nz == max_nonzero)
            break;
        nz_out[nz++] = (uint32_t)page;
    }
    counts[0] = nz;
    counts[1] = zero;
    return k;
}

/* Page nz[k] hashed (when hashes) and copied to dst + k * page_size. */
void pagebatch_gather(const uint8_t *ram, size_t page_size, const uint32_t *nz, size_t n,
                      uint8_t *dst, uint8_t *hashes)
{
    for (size_t k = 0; k < n; k++) {
        const uint8_t *src = ram + (size_t)nz[k] * page_size;
        if (hashes != NULL)
            hash_to(hashes, nz[k], src, page_size);
        memcpy(dst + k * page_size, src, page_size);
    }
}

static int pwrite_all(int fd, const uint8_t *buf, size_t len, off_t offset)
{
    while (len) {
        ssize_t w = pwrite(fd, buf, len, offset);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        buf += w;
        len -= (size_t)w;
        offset += w;
    }
    return 0;
}

/* Payload page k -> page nz[k] of the RAM (fd: the file ram maps; -1: everything through
 * the mapping). Returns 0, or -errno of the pwrite() that failed. */
int pagebatch_apply(int fd, uint8_t *ram, size_t page_size, const uint32_t *nz, size_t n,
                    const uint8_t *payload, size_t min_run, uint8_t *hashes)
{
    size_t k = 0;
    while (k < n) {
        size_t run = 1;
        while (k + run < n && nz[k + run] == nz[k] + run)
            run++;
        const uint8_t *src = payload + k * page_size;
        if (fd >= 0 && run >= min_run) {
            int rc = pwrite_all(fd, src, run * page_size, (off_t)((size_t)nz[k] * page_size));
            if (rc)
                return rc;
            if (hashes != NULL)
                for (size_t p = 0; p < run; p++)
                    hash_to(hashes, nz[k + p], src + p * page_size, page_size);
        } else {
            for (size_t p = 0; p < run; p++) {
                uint8_t *dst = ram + (size_t)nz[k + p] * page_size;
                memcpy(dst, src + p * page_size, page_size);
                if (hashes != NULL)
                    hash_to(hashes, nz[k + p], dst, page_size);
            }
        }
        k += run;
    }
    return 0;
}
