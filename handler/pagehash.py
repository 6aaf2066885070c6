"""Page digests: XXH3-128 of each page of guest RAM, the one page hash of both drivers.

The memvm engine's incremental digest (``handler/digest.py``, one chunk = one page) and the
QEMU driver's verified switchover (``handler/qemu_verify.py``) both hash pages here. A page's
digest is ``xxhash.xxh3_128_digest(page)``: 16 bytes, xxhash's canonical big-endian form.
A "page" is ``page_size`` bytes at ``page * page_size``; the last page of a buffer whose
length is not a multiple of ``page_size`` is short and is hashed as it is.

``zero`` (the hash of a zero page, from :func:`zero_digest`): a full-size page that is all
zeros gets it without being hashed -- the same bytes, since it *is* that page's hash; the
zero check costs a fraction of the hash, and guest memory is mostly zeros. The functions
return the bytes that did go through the hash (what the digest's work figures count).

Native: ``handler/native/_pagehash.so`` (``handler/native/pagehash.c``, built by
``make venv``), called through ctypes, which releases the GIL: a large range is cut into
4 MiB pieces that the calling thread and THREADS - 1 threads of the process's hashing pool
(``drivers.base.hash_pool``, one per core) take one at a time, so hashing runs at memory
speed on every core. Without the library (not built: no gcc or no xxhash.h) the same
digests come from a Python loop over ``xxhash`` (one page per call, one thread, several
times slower), and the first use logs why. Callable from any thread, a pool worker too:
a helper that has not started when the caller runs out of pieces is cancelled, not awaited.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt
import xxhash

from handler.drivers.base import DIGEST_THREADS, hash_pool

__all__ = [
    "DIGEST_BYTES",
    "LIBRARY",
    "Digests",
    "digest_indices",
    "digest_range",
    "native_available",
    "nonzero_pages",
    "nonzero_rows",
    "zero_digest",
]

DIGEST_BYTES = 16
LIBRARY = Path(__file__).parent / "native" / "_pagehash.so"
THREADS = DIGEST_THREADS
STEP_PAGES = 1024  # pages per piece a thread takes (4 MiB of 4 KiB pages); two or fewer: one thread
ZERO_CHECK_BLOCK = 4096  # pages checked for all-zero at a time (Python fallback)
MIN_RUN_IN_PLACE = 8  # zero checks read runs of consecutive pages this long in place (numpy)

Digests = npt.NDArray[np.uint8]  # shape (pages, DIGEST_BYTES)
Indices = npt.NDArray[np.int64]
Buffer = memoryview | bytes | bytearray | npt.NDArray[np.uint8]

log = logging.getLogger(__name__)
T = TypeVar("T")

# One thread at a time hashes page by page in this process (the Python fallback only): two
# such loops ping-pong the GIL once a page (measured with SHA-256 per page: 600 scattered
# pages took 2.6-3.5 ms on one thread and 3.5-4.6 ms on two).
_PAGE_HASHING = threading.Lock()

_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_ptr = ctypes.c_void_p


class _Native:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.range = lib.pagehash_range
        self.range.restype = _u64
        self.range.argtypes = [_ptr, _size, _size, _size, _size, _ptr, _ptr]
        self.indices = lib.pagehash_indices
        self.indices.restype = _u64
        self.indices.argtypes = [_ptr, _size, _ptr, _size, _size, _ptr, _ptr, ctypes.c_int]


class NativeLibrary(Generic[T]):
    """The native library (``LIBRARY``) bound through ``bind``, loaded once on first use
    by whichever thread gets there first; None, with one warning naming ``fallback``, when
    it cannot be loaded."""

    def __init__(self, bind: Callable[[ctypes.CDLL], T], fallback: str) -> None:
        self._bind = bind
        self._fallback = fallback
        self._bound: T | None = None
        self._loaded = False
        self._lock = threading.Lock()

    def get(self) -> T | None:
        if self._loaded:
            return self._bound
        with self._lock:
            if not self._loaded:
                try:
                    self._bound = self._bind(ctypes.CDLL(str(LIBRARY)))
                except (OSError, AttributeError) as e:
                    log.warning(
                        "%s: %s not loadable (%s); `make venv` builds it with gcc and xxhash.h",
                        self._fallback,
                        LIBRARY,
                        e,
                    )
                self._loaded = True
        return self._bound

    def force(self, enabled: bool) -> bool:
        """Tests and the bench: force the fallback (False) or the library (True, if it
        loads). Returns whether the library is in use afterwards."""
        with self._lock:
            self._bound, self._loaded = None, not enabled
        return self.get() is not None


_library = NativeLibrary(_Native, "page digests in Python, one thread (several times slower)")


def _lib() -> _Native | None:
    return _library.get()


def native_available() -> bool:
    """Whether the native library is loaded (else the Python fallback hashes)."""
    return _lib() is not None


def _set_native(enabled: bool) -> bool:
    """Tests and the bench: force the Python fallback (False) or the library (True)."""
    return _library.force(enabled)


def zero_digest(page_size: int) -> bytes:
    """The digest of a zero page."""
    return xxhash.xxh3_128_digest(bytes(page_size))


def _as_bytes(buf: Buffer) -> npt.NDArray[np.uint8]:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    view = memoryview(buf)
    return np.frombuffer(view.cast("B") if view.format != "B" else view, dtype=np.uint8)


def _pages(size: int, page_size: int, zero: bytes | None) -> int:
    if page_size <= 0:
        raise ValueError(f"page size must be positive, got {page_size}")
    if zero is not None and len(zero) != DIGEST_BYTES:
        raise ValueError(f"the zero-page digest must be {DIGEST_BYTES} bytes, got {len(zero)}")
    return -(-size // page_size)


def _out(out: Digests | None, rows: int) -> Digests:
    if out is None:
        return np.empty((rows, DIGEST_BYTES), dtype=np.uint8)
    if out.dtype != np.uint8 or out.shape != (rows, DIGEST_BYTES) or not out.flags.c_contiguous:
        raise ValueError(f"digest output must be a contiguous ({rows}, {DIGEST_BYTES}) uint8 array")
    return out


def _parallel(n: int, run: Callable[[int, int], int]) -> int:
    """run(start, stop) over 0..n in STEP_PAGES pieces, taken one at a time by this thread
    and THREADS - 1 of the hashing pool's: on a shared machine a thread that gets no CPU
    for a while leaves its share to the others instead of holding up the whole digest."""
    if THREADS <= 1 or n <= 2 * STEP_PAGES:
        return run(0, n)
    starts = iter(range(0, n, STEP_PAGES))
    taking = threading.Lock()

    def work() -> int:
        done = 0
        while True:
            with taking:
                a = next(starts, None)
            if a is None:
                return done
            done += run(a, min(a + STEP_PAGES, n))

    helpers: list[Future[int]] = [hash_pool().submit(work) for _ in range(THREADS - 1)]
    hashed = work()
    for f in helpers:  # one that never started (its thread busy elsewhere) has nothing to do
        if not f.cancel():
            hashed += f.result()
    return hashed


def digest_range(
    buf: Buffer,
    page_size: int,
    first: int = 0,
    count: int | None = None,
    *,
    zero: bytes | None = None,
    out: Digests | None = None,
) -> tuple[Digests, int]:
    """The digests of pages ``first .. first + count`` (default: to the end) of ``buf``,
    into ``out`` (a contiguous (count, 16) uint8 array) or a new array. Returns the digests
    and the bytes hashed. Blocking."""
    data = _as_bytes(buf)
    total = _pages(data.size, page_size, zero)
    count = total - first if count is None else count
    if first < 0 or count < 0 or first + count > total:
        raise ValueError(f"pages {first}..{first + count} outside the memory ({total} pages)")
    out = _out(out, count)
    if count == 0:
        return out, 0
    lib = _lib()
    if lib is None:
        return out, _py_range(data, page_size, first, count, zero, out)
    base, zp, dst = data.ctypes.data, zero, out.ctypes.data

    def run(a: int, b: int) -> int:
        return int(lib.range(base, data.size, first + a, b - a, page_size, zp, dst + 16 * a))

    return out, _parallel(count, run)


def digest_indices(
    buf: Buffer,
    page_size: int,
    indices: Indices,
    *,
    zero: bytes | None = None,
    out: Digests | None = None,
    by_page: bool = False,
) -> tuple[Digests, int]:
    """The digests of the pages ``indices`` (any order, e.g. dirty pages). Into ``out``
    row k (a contiguous (len(indices), 16) array, or a new one), or with ``by_page`` into
    ``out`` row ``indices[k]`` (a table with a row per page of ``buf``). Returns the
    digests and the bytes hashed. Blocking."""
    data = _as_bytes(buf)
    total = _pages(data.size, page_size, zero)
    idx = np.ascontiguousarray(indices, dtype=np.int64)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= total):
        raise ValueError(f"page index out of bounds ({total} pages)")
    if by_page and out is None:
        raise ValueError("by_page needs the table to write into (out)")
    out = _out(out, total if by_page else idx.size)
    if idx.size == 0:
        return out, 0
    lib = _lib()
    if lib is None:
        return out, _py_indices(data, page_size, idx, zero, out, by_page)
    base, zp, dst, ip = data.ctypes.data, zero, out.ctypes.data, idx.ctypes.data

    def run(a: int, b: int) -> int:
        row = 0 if by_page else 16 * a
        return int(
            lib.indices(base, data.size, ip + 8 * a, b - a, page_size, zp, dst + row, by_page)
        )

    return out, _parallel(idx.size, run)


# -- zero pages in numpy (the fallbacks' check) ---------------------------------------------


def nonzero_rows(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Which rows (pages viewed as 64-bit words) hold a non-zero word. A page whose first
    word is not zero -- nearly every page with data -- is not read further; only the
    others are, in place when they are many (mostly-zero memory), gathered when few."""
    out = np.asarray(words[:, 0] != 0, dtype=np.bool_)
    rest = np.flatnonzero(~out)
    if rest.size * 4 > len(out):
        out |= words.any(axis=1)
    elif rest.size:
        out[rest] = words[rest].any(axis=1)
    return out


def nonzero_pages(
    pages: npt.NDArray[np.uint8], indices: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """Which of ``indices`` hold a non-zero byte. Runs of consecutive pages are checked in
    place (a view, no copy); indices scattered into many runs are gathered first."""
    words = pages.view(np.uint64)
    if not indices.size:
        return np.zeros(0, dtype=np.bool_)
    starts = np.flatnonzero(np.diff(indices) != 1) + 1
    if len(indices) < MIN_RUN_IN_PLACE * (len(starts) + 1):  # short runs: one gather
        return nonzero_rows(words[indices])
    out = np.empty(len(indices), dtype=np.bool_)
    bounds = [0, *starts.tolist(), len(indices)]
    for lo, hi in itertools.pairwise(bounds):
        first = int(indices[lo])
        out[lo:hi] = nonzero_rows(words[first : first + hi - lo])
    return out


# -- the Python fallback (same digests) -------------------------------------------------------


def _py_range(
    data: npt.NDArray[np.uint8],
    page_size: int,
    first: int,
    count: int,
    zero: bytes | None,
    out: Digests,
) -> int:
    """Blocks of whole pages are zero-checked in place (numpy, at memory speed), the rest
    hashed one page per call."""
    whole = data.size // page_size
    hashed = 0
    todo: list[int] = []
    stop = min(first + count, whole)
    if zero is not None and page_size % 8 == 0 and first < stop:
        words = data[: whole * page_size].view(np.uint64).reshape(whole, page_size // 8)
        for at in range(first, stop, ZERO_CHECK_BLOCK):
            end = min(at + ZERO_CHECK_BLOCK, stop)
            nonzero = nonzero_rows(words[at:end])
            out[np.flatnonzero(~nonzero) + (at - first)] = np.frombuffer(zero, np.uint8)
            todo.extend((np.flatnonzero(nonzero) + at).tolist())
        todo.extend(range(stop, first + count))
    else:
        todo = list(range(first, first + count))
    if todo:
        hashed = _py_hash(data, page_size, todo, out, [p - first for p in todo])
    return hashed


def _py_indices(
    data: npt.NDArray[np.uint8],
    page_size: int,
    idx: Indices,
    zero: bytes | None,
    out: Digests,
    by_page: bool,
) -> int:
    """Scattered pages are hashed as they are: a gather for the zero check would cost as
    much as the hash (the digest is the same either way)."""
    pages = idx.tolist()
    return _py_hash(data, page_size, pages, out, pages if by_page else list(range(len(pages))))


def _py_hash(
    data: npt.NDArray[np.uint8], page_size: int, pages: list[int], out: Digests, rows: list[int]
) -> int:
    ram, size, leaf = data.data, data.size, xxhash.xxh3_128_digest
    with _PAGE_HASHING:
        digests = b"".join([leaf(ram[p * page_size : (p + 1) * page_size]) for p in pages])
    out[rows] = np.frombuffer(digests, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return sum(min(page_size, size - p * page_size) for p in pages)
