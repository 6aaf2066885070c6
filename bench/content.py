"""Guest RAM content for the peers: the same generator the memvm guest boots with.

A QEMU peer's RAM is a ``memory-backend-file``; :func:`fill_ram_file` writes it with the
memvm guest's own :class:`ContentGenerator` (same kinds, same zero/text/random mix, same
touched prefix), so both sides move memory of the same compressibility and zero ratio.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np

from handler.drivers.memvm_guest import BOOT_CHUNK_PAGES, ContentGenerator, tick_rng

PAGE_SIZE = 4096
SEED = 0xBE7C


def fill_ram_file(
    path: Path, memory_bytes: int, content: str, touched_bytes: int = 0, seed: int = SEED
) -> int:
    """Create ``path`` (sparse, ``memory_bytes``) and fill its first ``touched_bytes``
    (0: all of it) like a memvm guest's boot fill; page 0 (the guest header) stays zero.
    Returns the number of pages written."""
    if memory_bytes % PAGE_SIZE:
        raise ValueError(f"memory_bytes {memory_bytes} is not a multiple of {PAGE_SIZE}")
    page_count = memory_bytes // PAGE_SIZE
    touched = (
        page_count if not touched_bytes else min(page_count, math.ceil(touched_bytes / PAGE_SIZE))
    )
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory_bytes)
        if content == "zero":
            return 0
        with mmap.mmap(fd, memory_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            ram = np.frombuffer(mm, dtype=np.uint8).reshape(page_count, PAGE_SIZE)
            gen = ContentGenerator(content, PAGE_SIZE)
            rng = tick_rng(seed, 0)
            written = 0
            for start in range(1, touched, BOOT_CHUNK_PAGES):
                indices = np.arange(start, min(start + BOOT_CHUNK_PAGES, touched), dtype=np.int64)
                if content == "mixed":
                    indices = indices[gen.kind_of(indices) != 2]
                ram[indices] = gen.pages(rng, indices, 0)
                written += len(indices)
            del ram
            return written
    finally:
        os.close(fd)
