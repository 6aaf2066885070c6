"""Disk image files: a raw, sparse file of a claim's size, blank or copied from another
image (holes stay holes). Blocking file I/O: callers on an event loop run these in a
thread (``asyncio.to_thread``). The image appears atomically (written to a temporary
name, then renamed), so a crash mid-copy never leaves a half image under the real name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # copy granularity: an all-zero MiB of the source stays a hole


class ImageError(Exception):
    """An image cannot be created (the message names the file and why)."""


def create_image(path: Path, size: int, source: Path | None = None) -> bool:
    """Create ``path`` (``size`` bytes, sparse) unless it exists; True when created.

    With ``source``, its content is copied first; a source larger than ``size`` is refused.
    """
    if path.exists():
        return False
    if source is not None:
        try:
            source_size = source.stat().st_size
        except OSError as e:
            raise ImageError(f"cannot read the source image {source}: {e.strerror}") from None
        if source_size > size:
            raise ImageError(
                f"the source image {source} ({source_size} bytes) is larger than the "
                f"requested size ({size} bytes)"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as out:
            if source is not None:
                _copy_sparse(source, out)
            out.truncate(size)
            out.flush()
            os.fsync(out.fileno())
        tmp.rename(path)
    except OSError as e:
        raise ImageError(f"cannot create the image {path}: {e.strerror}") from None
    return True


def _copy_sparse(source: Path, out: BinaryIO) -> None:
    """Copy the source's data extents (SEEK_DATA/SEEK_HOLE: its holes are never read);
    an all-zero chunk inside an extent stays a hole too."""
    zero = bytes(CHUNK)
    with open(source, "rb") as src:
        fd = src.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            src.seek(start)
            while start < end:
                chunk = src.read(min(CHUNK, end - start))
                if not chunk:
                    break
                if chunk != zero[: len(chunk)]:
                    out.seek(start)
                    out.write(chunk)
                start += len(chunk)
            offset = end


def remove_image(path: Path) -> bool:
    """Remove an image; True when it existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
