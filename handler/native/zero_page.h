/* Whether a page is all zero: the one check both native files use (pagehash.c's digests
 * of zero pages, pagebatch.c's scan). 64-byte blocks OR-reduced (the compiler vectorises
 * the inner loop), early exit at the first non-zero block. */
#ifndef VMFERRY_ZERO_PAGE_H
#define VMFERRY_ZERO_PAGE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline int page_all_zero(const uint8_t *p, size_t len)
{
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        uint64_t w[8], acc = 0;
        memcpy(w, p + i, 64);
        for (int k = 0; k < 8; k++)
            acc |= w[k];
        if (acc)
            return 0;
    }
    for (; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

#endif
