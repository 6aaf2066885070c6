"""One pass per page batch: zero-page check, page hash and copy (``native/pagebatch.c``).

The memvm engine moves every page through these three steps on each side, and each used
to read the page on its own (a gather into a batch, a zero check of the copy, a copy
into the serialized frame; the digest's hash of the page later from guest RAM; on the
target a write into the RAM file, then a hash read back through the mapping).

Source (``handler/stream.build_batch``): :func:`scan` splits a batch's indices into data
pages and zero pages, in the wire's form (uint32), stopping at the page that would make
the batch too large; :func:`gather` then hashes each data page into the digest's table
and copies it into the frame gRPC sends, the only copy of that page on the source.
:func:`new_frame` makes that frame: a ``bytes`` object written once, in place, before
anyone else sees it (gRPC sends ``bytes`` only; a bytearray would cost one more copy).

Target (``handler/stream.receive_batch``): :func:`apply` writes each run of ``min_run``
or more consecutive pages into the RAM file with one pwrite() and the rest through the
mapping, and hashes every page it wrote (digest.py's contract: the target hashes what it
writes, while hot): a pwritten page from the received buffer (reading it back through
the mapping costs a page fault a page), a copied one from the mapping.

Native: ``native/pagebatch.c``, built into ``native/_pagehash.so`` with the page digests
(Makefile), called through ctypes with the GIL released. Without it the same results --
identical indices, bytes and hashes (tests/unit/test_pagebatch.py) -- come from numpy
and ``handler/pagehash.py``, slower. Indices are checked here before any native call.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from handler import pagehash
from handler.pagehash import nonzero_pages

__all__ = [
    "Scan",
    "apply",
    "gather",
    "native_available",
    "new_frame",
    "scan",
]

log = logging.getLogger(__name__)

Pages = npt.NDArray[np.uint8]  # guest RAM as (pages, page_size)
Wire = npt.NDArray[np.uint32]  # page indices as the wire carries them (little-endian uint32)
Digests = pagehash.Digests

_size = ctypes.c_size_t
_ptr = ctypes.c_void_p


class _Native:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.scan = lib.pagebatch_scan
        self.scan.restype = _size
        self.scan.argtypes = [_ptr, _size, _ptr, _size, _size, _ptr, _ptr, _ptr]
        self.gather = lib.pagebatch_gather
        self.gather.restype = None
        self.gather.argtypes = [_ptr, _size, _ptr, _size, _ptr, _ptr]
        self.apply = lib.pagebatch_apply
        self.apply.restype = ctypes.c_int
        self.apply.argtypes = [ctypes.c_int, _ptr, _size, _ptr, _size, _ptr, _size, _ptr]


_library = pagehash.NativeLibrary(_Native, "page batches in numpy (slower)")


def _lib() -> _Native | None:
    return _library.get()


def native_available() -> bool:
    """Whether the native pass is loaded (else numpy does the same)."""
    return _lib() is not None


def _set_native(enabled: bool) -> bool:
    """Tests and the bench: force the fallback (False) or the library (True, if it loads)."""
    return _library.force(enabled)


# -- the source: scan, then gather into the frame -----------------------------------------------


@dataclass(frozen=True)
class Scan:
    """What a batch covers: ``covered`` leading indices, split into data and zero pages."""

    covered: int
    nonzero: Wire
    zero: Wire


def _check_pages(pages: Pages) -> None:
    if pages.ndim != 2 or pages.dtype != np.uint8 or not pages.flags.c_contiguous:
        raise ValueError("pages must be a contiguous (pages, page_size) uint8 array")


def _check_indices(indices: npt.NDArray[np.integer], page_count: int, what: str) -> None:
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= page_count):
        raise ValueError(f"{what}: page index out of bounds ({page_count} pages)")


def scan(pages: Pages, indices: npt.NDArray[np.int64], max_nonzero: int) -> Scan:
    """The longest prefix of ``indices`` with at most ``max_nonzero`` data pages (up to,
    not including, the data page one too many), split into data and zero pages."""
    _check_pages(pages)
    idx = np.ascontiguousarray(indices, dtype=np.int64)
    _check_indices(idx, len(pages), "indices")
    if max_nonzero < 0:
        raise ValueError(f"max_nonzero must not be negative, got {max_nonzero}")
    lib = _lib()
    if lib is None:
        nonzero = nonzero_pages(pages, idx)
        nz_pos = np.flatnonzero(nonzero)
        covered = int(nz_pos[max_nonzero]) if len(nz_pos) > max_nonzero else len(idx)
        head, mask = idx[:covered], nonzero[:covered]
        return Scan(covered, head[mask].astype("<u4"), head[~mask].astype("<u4"))
    nz = np.empty(len(idx), dtype="<u4")
    zero = np.empty(len(idx), dtype="<u4")
    counts = np.zeros(2, dtype=np.uint64)
    covered = lib.scan(
        pages.ctypes.data,
        pages.shape[1],
        idx.ctypes.data,
        len(idx),
        max_nonzero,
        nz.ctypes.data,
        zero.ctypes.data,
        counts.ctypes.data,
    )
    return Scan(int(covered), nz[: int(counts[0])], zero[: int(counts[1])])


def _table(hashes: Digests | None, page_count: int) -> int | None:
    """The address of a digest table with a row per page (None: no hashing)."""
    if hashes is None:
        return None
    if hashes.shape != (page_count, pagehash.DIGEST_BYTES) or not hashes.flags.c_contiguous:
        raise ValueError(f"hashes must be a contiguous ({page_count}, 16) table")
    return int(hashes.ctypes.data)


def gather(pages: Pages, nonzero: Wire, out: Pages, hashes: Digests | None = None) -> None:
    """Copy pages ``nonzero`` into ``out`` row by row (out: (len(nonzero), page_size),
    writable, contiguous) and, with ``hashes`` (a row per page of ``pages``), put each
    page's digest in its row."""
    _check_pages(pages)
    nz = np.ascontiguousarray(nonzero, dtype="<u4")
    _check_indices(nz, len(pages), "nonzero")
    if out.shape != (len(nz), pages.shape[1]) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous ({len(nz)}, {pages.shape[1]}) array")
    table = _table(hashes, len(pages))
    lib = _lib()
    if lib is None:
        rows = nz.astype(np.int64)
        np.take(pages, rows, axis=0, out=out)
        if hashes is not None:
            pagehash.digest_indices(pages, pages.shape[1], rows, out=hashes, by_page=True)
        return
    if len(nz):
        lib.gather(
            pages.ctypes.data, pages.shape[1], nz.ctypes.data, len(nz), out.ctypes.data, table
        )


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def new_frame(prefix: bytes, payload_bytes: int) -> tuple[bytes, Pages]:
    """A ``bytes`` object of ``prefix`` followed by ``payload_bytes`` bytes still to write,
    and a writable uint8 view of that tail. Nothing else may hold the object until the
    tail is written (it is fresh: only the caller has it)."""
    frame: bytes = _new_bytes(None, len(prefix) + payload_bytes)
    address = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p).value
    assert address is not None
    ctypes.memmove(address, prefix, len(prefix))
    tail = (ctypes.c_char * payload_bytes).from_address(address + len(prefix))
    return frame, np.frombuffer(memoryview(tail).cast("B"), dtype=np.uint8)


# -- the target: write and hash --------------------------------------------------------------


def apply(
    pages: Pages,
    nonzero: Wire,
    payload: npt.NDArray[np.uint8],
    *,
    fd: int | None,
    min_run: int,
    hashes: Digests | None = None,
) -> None:
    """pages[nonzero] = payload (one row per page), where ``pages`` maps the file ``fd``
    (None: all through the mapping): runs of ``min_run`` or more consecutive pages with
    one pwrite() each, the rest through the mapping; with ``hashes`` each written page's
    digest goes to its row. OSError when a pwrite() fails."""
    _check_pages(pages)
    nz = np.ascontiguousarray(nonzero, dtype="<u4")
    _check_indices(nz, len(pages), "nonzero")
    page_size = pages.shape[1]
    data = np.ascontiguousarray(payload).reshape(-1, page_size)
    if len(data) != len(nz):
        raise ValueError(f"payload has {len(data)} pages for {len(nz)} indices")
    table = _table(hashes, len(pages))
    if not len(nz):
        return
    lib = _lib()
    if lib is None:
        _py_apply(pages, nz.astype(np.int64), data, fd, min_run, hashes)
        return
    rc = lib.apply(
        -1 if fd is None else fd,
        pages.ctypes.data,
        page_size,
        nz.ctypes.data,
        len(nz),
        data.ctypes.data,
        max(1, min_run),
        table,
    )
    if rc:
        raise OSError(-rc, f"writing pages into the guest's RAM file: {os.strerror(-rc)}")


def _py_apply(
    pages: Pages,
    idx: npt.NDArray[np.int64],
    data: npt.NDArray[np.uint8],
    fd: int | None,
    min_run: int,
    hashes: Digests | None,
) -> None:
    page_size = pages.shape[1]
    starts = np.flatnonzero(np.diff(idx, prepend=idx[0] - 2) != 1)
    ends = np.append(starts[1:], len(idx))
    through_mapping = np.ones(len(idx), dtype=np.bool_)
    payload = data.reshape(-1).data
    if fd is not None:
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if end - start < min_run:
                continue
            through_mapping[start:end] = False
            view = payload[start * page_size : end * page_size]
            offset = int(idx[start]) * page_size
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
    if through_mapping.any():
        pages[idx[through_mapping]] = data[through_mapping]
    if hashes is not None:
        pagehash.digest_indices(pages, page_size, idx, out=hashes, by_page=True)
