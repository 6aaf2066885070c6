"""The malloc settings for bulk buffers take on glibc and change nothing elsewhere."""

from __future__ import annotations

import platform

from handler import allocator


def test_glibc_accepts_the_settings() -> None:
    applied = allocator.tune_for_bulk_buffers()
    assert applied == (platform.libc_ver()[0] == "glibc")
    assert allocator.MMAP_THRESHOLD <= 32 << 20  # glibc refuses more on 64-bit
