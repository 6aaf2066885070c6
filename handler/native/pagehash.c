/* Page digests for handler/pagehash.py: XXH3-128 of each page of guest RAM, written as
 * xxhash's canonical (big-endian) 16 bytes -- byte for byte what the Python package's
 * xxhash.xxh3_128_digest(page) returns.
 *
 * A page is page_size bytes at page * page_size; the last page of a buffer whose length is
 * not a multiple of page_size is short (hashed as it is). When zero16 is not NULL, a
 * full-size page that is all zeros gets zero16 (the caller's hash of a zero page) without
 * being hashed: the check stops at the first non-zero word, so a data page costs almost
 * nothing more, and guest memory is mostly zeros.
 *
 * Both functions return the bytes that went through the hash (zero pages excluded). They
 * hold no state and no lock: ctypes calls them with the GIL released, so each thread of the
 * caller's pool hashes its own part of the memory on its own core.
 *
 * Built by the Makefile (header-only xxhash, Debian's libxxhash-dev); nothing to link. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "zero_page.h"

static size_t one(const uint8_t *ram, size_t ram_len, size_t page, size_t page_size,
                  const uint8_t *zero16, uint8_t *out)
{
    size_t start = page * page_size;
    size_t len = ram_len - start < page_size ? ram_len - start : page_size;
    if (zero16 != NULL && len == page_size && page_all_zero(ram + start, len)) {
        memcpy(out, zero16, 16);
        return 0;
    }
    XXH128_canonicalFromHash((XXH128_canonical_t *)out, XXH3_128bits(ram + start, len));
    return len;
}

/* Pages first .. first + n_pages - 1 into out16[0 .. n_pages * 16). The caller checks that
 * they lie inside ram (page * page_size < ram_len). */
uint64_t pagehash_range(const uint8_t *ram, size_t ram_len, size_t first, size_t n_pages,
                        size_t page_size, const uint8_t *zero16, uint8_t *out16)
{
    uint64_t hashed = 0;
    for (size_t k = 0; k < n_pages; k++)
        hashed += one(ram, ram_len, first + k, page_size, zero16, out16 + 16 * k);
    return hashed;
}

/* Pages indices[0 .. n) (scattered: dirty or repaired pages). Their hashes go to
 * out16 + 16 * k, or, when out_by_page, to out16 + 16 * indices[k] (a table with a row
 * per page). The caller checks the indices (0 <= i, i * page_size < ram_len). */
uint64_t pagehash_indices(const uint8_t *ram, size_t ram_len, const int64_t *indices, size_t n,
                          size_t page_size, const uint8_t *zero16, uint8_t *out16,
                          int out_by_page)
{
    uint64_t hashed = 0;
    for (size_t k = 0; k < n; k++) {
        size_t page = (size_t)indices[k];
        uint8_t *out = out16 + 16 * (out_by_page ? page : k);
        hashed += one(ram, ram_len, page, page_size, zero16, out);
    }
    return hashed;
}
