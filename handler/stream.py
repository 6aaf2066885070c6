"""The migration wire format: building and applying page batches, and its checks.

The message sequence and the target's state machine are specified in the header of
``proto/vmferry/rpc/migration.proto``; this module is the one place that turns guest
memory into frames and frames back into guest memory.

Pages are gathered and scattered with numpy fancy indexing (no per-page Python loop),
in worker threads (``asyncio.to_thread``) so the event loop never copies megabytes.
Every index, length and size from the wire is bounds-checked before it touches memory.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from vmferry.rpc import migration_pb2 as pb

PROTOCOL_VERSION = 1
CHUNK_PAGES = 64  # pages; a page always travels on channel (index // CHUNK_PAGES) % channels
BATCH_PAGES = 1024  # pages per PageBatch (4 MiB of 4 KiB pages; 1 MiB measured slower)
CREDIT_WINDOW = 32 << 20  # bytes of payload a source may have in flight per channel
MAX_CHANNELS = 16
COMPRESS_MIN_GAIN = 0.9  # keep a compressed payload only if it is < 90% of the raw size

IndexArray = npt.NDArray[np.int64]
ZSTD_LEVEL = 1

_codecs = threading.local()  # zstd (de)compressors are not thread-safe: one per worker


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_codecs, "compressor"):
        _codecs.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    c: zstandard.ZstdCompressor = _codecs.compressor
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_codecs, "decompressor"):
        _codecs.decompressor = zstandard.ZstdDecompressor()
    d: zstandard.ZstdDecompressor = _codecs.decompressor
    return d


class ProtocolError(Exception):
    """A frame violated the protocol; the message says which rule."""


def page_view(ram: memoryview, page_size: int) -> npt.NDArray[np.uint8]:
    """Guest RAM as a (pages, page_size) uint8 array sharing the mapping (no copy)."""
    arr = np.frombuffer(ram, dtype=np.uint8)
    return arr.reshape(-1, page_size)


def split_by_channel(indices: IndexArray, channels: int) -> list[IndexArray]:
    """Partition page indices by owning channel, keeping each part in ascending order."""
    if channels == 1:
        return [indices]
    owner = (indices // CHUNK_PAGES) % channels
    return [indices[owner == c] for c in range(channels)]


@dataclass
class Batch:
    frame: pb.PageBatch
    raw_bytes: int  # bytes of guest memory the batch covers (zero pages included)
    wire_bytes: int  # bytes of payload + indices on the wire


def build_batch(
    pages: npt.NDArray[np.uint8], indices: IndexArray, round_no: int, *, compress: bool
) -> Batch:
    """Gather ``indices`` from ``pages`` into one PageBatch (runs in a worker thread).

    All-zero pages travel as indices only; with ``compress`` the payload is zstd-compressed
    when that saves at least 10% (incompressible data costs zstd almost nothing to detect).
    """
    page_size = pages.shape[1]
    data = pages[indices]  # gather (one copy)
    nonzero = data.view(np.uint64).any(axis=1)
    nz_idx = indices[nonzero].astype("<u4")
    zero_idx = indices[~nonzero].astype("<u4")
    payload = data[nonzero].tobytes()
    codec = pb.CODEC_RAW
    raw_size = len(payload)
    if compress and payload:
        packed = _compressor().compress(payload)
        if len(packed) < raw_size * COMPRESS_MIN_GAIN:
            payload, codec = packed, pb.CODEC_ZSTD
    frame = pb.PageBatch(
        round=round_no,
        indices=nz_idx.tobytes(),
        payload=payload,
        codec=codec,
        zero_indices=zero_idx.tobytes(),
        raw_size=raw_size,
    )
    return Batch(frame, len(indices) * page_size, len(payload) + 4 * (len(nz_idx) + len(zero_idx)))


def _indices(blob: bytes, page_count: int, what: str) -> IndexArray:
    if len(blob) % 4:
        raise ProtocolError(f"{what}: length {len(blob)} is not a multiple of 4")
    idx = np.frombuffer(blob, dtype="<u4").astype(np.int64)
    if idx.size and int(idx.max()) >= page_count:
        raise ProtocolError(
            f"{what}: page index {int(idx.max())} out of bounds ({page_count} pages)"
        )
    return idx


def apply_batch(
    pages: npt.NDArray[np.uint8],
    frame: pb.PageBatch,
    present: npt.NDArray[np.uint8] | None = None,
    *,
    fresh_zero: bool = False,
) -> IndexArray:
    """Validate ``frame`` and scatter it into ``pages`` (worker thread).

    Returns the indices written. With ``present`` (post-copy), pages already present are
    skipped: the guest may have written them since, and the source's copy is older. With
    ``fresh_zero`` (round 0 into a new, all-zero RAM file) zero pages are not written at
    all, so untouched guest memory stays sparse on the target."""
    page_count, page_size = pages.shape
    nz_idx = _indices(frame.indices, page_count, "indices")
    zero_idx = _indices(frame.zero_indices, page_count, "zero_indices")
    expected = nz_idx.size * page_size
    if frame.raw_size != expected:
        raise ProtocolError(f"raw_size {frame.raw_size} does not match {nz_idx.size} pages")
    if frame.codec == pb.CODEC_RAW:
        payload = frame.payload
    elif frame.codec == pb.CODEC_ZSTD:
        try:
            payload = _decompressor().decompress(frame.payload, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"corrupt zstd payload: {e}") from None
    elif frame.codec == pb.CODEC_ZLIB:
        try:
            d = zlib.decompressobj()
            payload = d.decompress(frame.payload, expected)
            if d.unconsumed_tail or not d.eof:
                raise ProtocolError("zlib payload larger than raw_size")
        except zlib.error as e:
            raise ProtocolError(f"corrupt zlib payload: {e}") from None
    else:
        raise ProtocolError(f"unknown codec {frame.codec}")
    if len(payload) != expected:
        raise ProtocolError(f"payload is {len(payload)} bytes, {expected} expected")
    data = np.frombuffer(payload, dtype=np.uint8).reshape(-1, page_size)
    if present is not None:
        keep = present[nz_idx] == 0
        nz_idx, data = nz_idx[keep], data[keep]
        zero_idx = zero_idx[present[zero_idx] == 0]
    if nz_idx.size:
        pages[nz_idx] = data
    if fresh_zero:
        zero_idx = zero_idx[:0]  # already zero: nothing to write
    if zero_idx.size:
        pages[zero_idx] = 0
    return np.concatenate((nz_idx, zero_idx))


def pack_indices(indices: IndexArray) -> bytes:
    return indices.astype("<u4").tobytes()


def unpack_indices(blob: bytes, page_count: int, what: str) -> IndexArray:
    """Indices from the wire, bounds-checked (ProtocolError)."""
    return _indices(blob, page_count, what)


def check_hello(hello: pb.Hello, *, memory_bytes: int, page_size: int) -> None:
    """Validate a Hello against the migration the target expects; ProtocolError if not."""
    if hello.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {hello.protocol_version} is not supported (this handler "
            f"speaks {PROTOCOL_VERSION})"
        )
    if not 1 <= hello.channel_count <= MAX_CHANNELS:
        raise ProtocolError(f"channel_count {hello.channel_count} outside 1..{MAX_CHANNELS}")
    if hello.channel_id >= hello.channel_count:
        raise ProtocolError(f"channel_id {hello.channel_id} >= channel_count {hello.channel_count}")
    if hello.memory_bytes != memory_bytes or hello.page_size != page_size:
        raise ProtocolError(
            f"geometry mismatch: source has {hello.memory_bytes} bytes in {hello.page_size}-byte "
            f"pages, target prepared {memory_bytes} bytes in {page_size}-byte pages"
        )
