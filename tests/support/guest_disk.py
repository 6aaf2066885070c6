"""The test guest's disk records (guest/memload.c): block ``seq + 1`` of its disk holds
heartbeat ``seq``: magic ``VMFDISK1``, seq, guest monotonic ns, checksum, data."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
MAGIC = 0x314B534944464D56  # "VMFDISK1" little-endian
_MASK = (1 << 64) - 1


def _xorshift(s: int) -> int:
    s ^= (s << 13) & _MASK
    s ^= s >> 7
    s ^= (s << 17) & _MASK
    return s


def _expected_sum(seq: int) -> int:
    s = ((seq + 1) * 0x9E3779B97F4A7C15) & _MASK
    total = 0
    for _ in range(4, BLOCK // 8):
        s = _xorshift(s)
        total = (total + s) & _MASK
    return total


@dataclass(frozen=True)
class DiskRecords:
    """What the image holds: ``count`` records 0..count-1 in place, then the problems."""

    count: int
    problems: tuple[str, ...]


def read_records(image: Path, limit: int = 100_000) -> DiskRecords:
    """Read records from block 1 until the first empty block; every record must carry
    its own block's seq and a valid checksum (a torn or stale write is a problem), and
    no record may follow the first empty block (a gap)."""
    problems: list[str] = []
    count = 0
    with open(image, "rb") as f:
        f.seek(BLOCK)
        for index in range(limit):
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                break
            magic, seq, _ns, checksum = struct.unpack_from("<4Q", block)
            if magic != MAGIC:
                if block.strip(b"\0"):
                    problems.append(f"block {index + 1}: not a record")
                break
            words = struct.unpack_from(f"<{BLOCK // 8 - 4}Q", block, 32)
            if seq != index:
                problems.append(f"block {index + 1}: seq {seq}, expected {index}")
            elif checksum != sum(words) & _MASK or checksum != _expected_sum(seq):
                problems.append(f"block {index + 1}: seq {seq}: bad checksum (torn write)")
            count += 1
        # a record after the first empty block: a heartbeat's write was lost
        for _ in range(16):
            block = f.read(BLOCK)
            if len(block) == BLOCK and struct.unpack_from("<Q", block)[0] == MAGIC:
                problems.append(f"a record after the first empty block {count + 1} (a gap)")
                break
    return DiskRecords(count, tuple(problems))
