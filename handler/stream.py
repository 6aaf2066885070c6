"""The migration wire format: building and applying page batches, and its checks.

The message sequence and the target's state machine are specified in the header of
``proto/vmferry/rpc/migration.proto``; this module is the one place that turns guest
memory into frames and frames back into guest memory.

Pages are gathered and scattered with numpy fancy indexing (no per-page Python loop),
in worker threads (``asyncio.to_thread``) so the event loop never copies megabytes.
Every index, length and size from the wire is bounds-checked before it touches memory.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import zstandard
from google.protobuf.message import DecodeError

from handler import pagebatch
from handler.digest import ChunkDigest
from vmferry.rpc import migration_pb2 as pb

# 4: the digest tree's groups are XXH3-128 too (handler/digest.py; 3: SHA-256 groups of 64
# XXH3-128 page hashes; 2: SHA-256 leaves in groups of 64; 1: in groups of 1024): handlers
# that would compute different digests refuse each other at Hello instead of failing
# verification.
PROTOCOL_VERSION = 5
TRANSFER_SERVICE = "vmferry.v1.Migration"
TRANSFER_METHOD = f"/{TRANSFER_SERVICE}/Transfer"
CHUNK_PAGES = 64  # pages; a page always travels on channel (index // CHUNK_PAGES) % channels
BATCH_PAGES = 1024  # non-zero pages per PageBatch (4 MiB of 4 KiB pages; 1 MiB was slower)
MAX_SPAN = 32 * BATCH_PAGES  # indices one batch may cover when most of them are zero pages
# A batch this small is gathered (source) and applied (target) on the event loop: up to
# ~1 ms of CPU, less than handing it to a worker thread and back costs while both cores
# are busy (the converging rounds and the stop-and-copy round, measured: ~1.5 ms each).
INLINE_BATCH_PAGES = 256
# Consecutive pages this many or more are written into the target's RAM file with one
# pwrite(): a fresh page of a shared-memory file costs a page fault and zeroing through a
# mapping, not through write() (256 MiB of fresh pages here: 0.42 s of CPU by the
# mapping, 0.19 s by pwrite, which also leaves the GIL to the other threads meanwhile).
PWRITE_MIN_RUN = 16
CREDIT_WINDOW = 32 << 20  # bytes of payload a source may have in flight per channel
MAX_CHANNELS = 16
COMPRESS_MIN_GAIN = 0.9  # keep a compressed payload only if it is < 90% of the raw size

IndexArray = npt.NDArray[np.int64]
Buffer = bytes | memoryview
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


# Field tags of the frames the source pre-serializes (proto/vmferry/rpc/migration.proto):
# SourceFrame.pages = 2; PageBatch round = 1, indices = 2, payload = 3, codec = 4,
# zero_indices = 5, raw_size = 6. Varints are wire type 0, bytes and messages type 2.
_PAGES_TAG = b"\x12"
PROBE_PAGES = 8  # pages zstd tries first; the whole batch only when they compress


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, size: int) -> bytes:
    return _varint(field << 3 | 2) + _varint(size)


@dataclass(frozen=True)
class CompressProbe:
    """zstd on a sample of a batch's pages: how well and how fast it compresses."""

    raw_bytes: int
    packed_bytes: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.packed_bytes / self.raw_bytes if self.raw_bytes else 1.0


@dataclass
class Batch:
    """One PageBatch, already serialized as the SourceFrame that carries it."""

    frame: bytes  # a serialized SourceFrame{pages: PageBatch}
    payload_bytes: int  # len(PageBatch.payload): what the target's credit accounts
    pages: int  # how many of the given indices the batch covers (a prefix)
    nonzero: int  # of which non-zero (sent with their contents)
    probe: CompressProbe | None = None  # when compression was considered
    compressed: bool = False

    @property
    def wire_bytes(self) -> int:
        """Payload plus the 4-byte index of every page."""
        return self.payload_bytes + 4 * self.pages

    def page_batch(self) -> pb.PageBatch:
        """The batch parsed back (tests and diagnostics)."""
        return pb.SourceFrame.FromString(self.frame).pages


def _frame_prefix(
    round_no: int, nz_idx: bytes, zero_idx: bytes, codec: int, raw_size: int, payload_bytes: int
) -> bytes:
    """SourceFrame{pages} in protobuf wire format up to its payload's bytes (which go
    last: any field order is valid protobuf). Fields holding their proto3 default are
    left out, as protobuf does."""
    head = bytearray()
    if round_no:
        head += b"\x08" + _varint(round_no)
    if nz_idx:
        head += _len_field(2, len(nz_idx)) + nz_idx
    if codec:
        head += b"\x20" + _varint(codec)
    if zero_idx:
        head += _len_field(5, len(zero_idx)) + zero_idx
    if raw_size:
        head += b"\x30" + _varint(raw_size)
    if payload_bytes:
        head += _len_field(3, payload_bytes)
    return _PAGES_TAG + _varint(len(head) + payload_bytes) + bytes(head)


def _encode_pages_frame(
    round_no: int, nz_idx: bytes, zero_idx: bytes, codec: int, raw_size: int, payload: Buffer
) -> bytes:
    """The whole frame around a payload that exists already (a compressed one), copied
    once (``bytes.join`` drops the GIL for large buffers)."""
    view = memoryview(payload).cast("B")
    prefix = _frame_prefix(round_no, nz_idx, zero_idx, codec, raw_size, view.nbytes)
    return b"".join((prefix, view))


def build_batch(
    pages: npt.NDArray[np.uint8],
    indices: IndexArray,
    round_no: int,
    *,
    compress: bool,
    probe: bool = False,
    max_pages: int = BATCH_PAGES,
    digest: ChunkDigest | None = None,
) -> Batch:
    """Gather ``indices`` (or the longest prefix of them with at most ``max_pages``
    non-zero pages) from ``pages`` into one serialized PageBatch frame; runs in a worker
    thread. ``Batch.pages`` says how many indices it covers.

    One pass per page (handler/pagebatch.py): all-zero pages travel as indices only and
    are never copied; a data page is read once, hashed into ``digest`` (the source's
    pre-copy digest, when given: no refresh reads it again) and copied straight into
    the frame, its only copy. With ``compress`` (or only ``probe``) zstd first tries a
    few of the batch's pages (``Batch.probe``: what the sender's break-even decision,
    handler/migration/compress_gate.py, measures with); with ``compress``, when they
    compress, the whole payload is compressed (gathered into a buffer for zstd) and
    kept when that saves at least 10%.
    """
    # the stale flags cleared before the pages are read (clear-then-hash, digest.py)
    hashes = digest.begin_hashing(indices) if digest is not None else None
    found = pagebatch.scan(pages, indices, max_pages)
    page_size = pages.shape[1]
    raw_size = len(found.nonzero) * page_size
    nz_blob, zero_blob = found.nonzero.tobytes(), found.zero.tobytes()
    tried = _probe(pages, found.nonzero) if (compress or probe) and raw_size else None
    if compress and tried is not None and tried.ratio < COMPRESS_MIN_GAIN:
        data = np.empty((len(found.nonzero), page_size), dtype=np.uint8)
        pagebatch.gather(pages, found.nonzero, data, hashes)
        packed = _compressor().compress(data.data)
        keep = len(packed) < raw_size * COMPRESS_MIN_GAIN
        payload: Buffer = packed if keep else data.data  # not kept: copied once more
        codec = pb.CODEC_ZSTD if keep else pb.CODEC_RAW
        frame = _encode_pages_frame(round_no, nz_blob, zero_blob, codec, raw_size, payload)
        payload_bytes = len(payload)
    else:
        prefix = _frame_prefix(round_no, nz_blob, zero_blob, pb.CODEC_RAW, raw_size, raw_size)
        frame, tail = pagebatch.new_frame(prefix, raw_size)
        pagebatch.gather(pages, found.nonzero, tail.reshape(-1, page_size), hashes)
        keep, payload_bytes = False, raw_size
    if digest is not None:
        digest.end_hashing(
            found.zero,
            found.nonzero if hashes is not None else found.nonzero[:0],
            indices[found.covered :],
        )
        if hashes is None:  # chunks of several pages: hashed the usual way
            digest.hash_pages(np.concatenate((found.nonzero, found.zero)).astype(np.int64))
    return Batch(
        frame,
        payload_bytes,
        pages=found.covered,
        nonzero=len(found.nonzero),
        probe=tried,
        compressed=keep,
    )


def _probe(pages: npt.NDArray[np.uint8], nonzero: npt.NDArray[np.uint32]) -> CompressProbe:
    """zstd on PROBE_PAGES of the batch's data pages, spread over it (all when fewer)."""
    step = max(1, len(nonzero) // PROBE_PAGES)
    sample = np.take(pages, nonzero[::step][:PROBE_PAGES].astype(np.int64), axis=0)
    started = time.perf_counter()
    packed = len(_compressor().compress(sample.data))
    return CompressProbe(sample.nbytes, packed, time.perf_counter() - started)


def is_small_batch(raw: bytes, max_pages: int, page_size: int) -> bool:
    """Whether a pages frame is uncompressed and covers at most ``max_pages`` pages, zero
    pages included: applying it is at most that many page copies (no decompression)."""
    if len(raw) > max_pages * (page_size + 8) + 64:
        return False  # too long to qualify: not parsed here (an odd frame would be copied)
    try:
        frame = read_pages_frame(raw)
    except ProtocolError:
        return False  # refused where it is applied, with the message
    pages = (len(frame.indices) + len(frame.zero_indices)) // 4
    return frame.codec == pb.CODEC_RAW and pages <= max_pages


def is_pages_frame(raw: bytes) -> bool:
    """Whether a serialized SourceFrame is a PageBatch (parsed and applied off the loop)."""
    return raw[:1] == _PAGES_TAG


def parse_frame(raw: bytes) -> pb.SourceFrame:
    """A SourceFrame from the wire; ProtocolError if it is not valid protobuf."""
    try:
        return pb.SourceFrame.FromString(raw)
    except DecodeError:
        raise ProtocolError(f"malformed frame ({len(raw)} bytes): not a SourceFrame") from None


@dataclass(frozen=True)
class PagesView:
    """A PageBatch read in place: its bytes fields are views of the received frame."""

    round: int = 0
    indices: Buffer = b""
    payload: Buffer = b""
    codec: int = pb.CODEC_UNSPECIFIED  # absent from the wire: refused, as protobuf reads it
    zero_indices: Buffer = b""
    raw_size: int = 0


_VARINT_FIELDS = {1: "round", 4: "codec", 6: "raw_size"}
_BYTES_FIELDS = {2: "indices", 3: "payload", 5: "zero_indices"}


class _Unusual(Exception):
    """Not the layout build_batch writes: protobuf's own parser decides."""


def _varint_at(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Unusual


def _pages_in_place(buf: memoryview) -> PagesView:
    end = len(buf)
    tag, pos = _varint_at(buf, 0, end)
    size, pos = _varint_at(buf, pos, end) if tag == _PAGES_TAG[0] else (0, -1)
    if pos < 0 or pos + size != end:
        raise _Unusual  # another frame, or fields after the batch
    fields: dict[str, int | memoryview] = {}
    while pos < end:
        key, pos = _varint_at(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0 and number in _VARINT_FIELDS:
            value, pos = _varint_at(buf, pos, end)
            if value >= 1 << 31:  # uint32 fields and an int32 enum: protobuf's rules
                raise _Unusual
            fields[_VARINT_FIELDS[number]] = value
        elif wire_type == 2 and number in _BYTES_FIELDS:
            size, pos = _varint_at(buf, pos, end)
            if pos + size > end:
                raise _Unusual
            fields[_BYTES_FIELDS[number]] = buf[pos : pos + size]
            pos += size
        else:
            raise _Unusual  # unknown field or wire type
    return PagesView(**fields)  # type: ignore[arg-type]


def read_pages_frame(raw: bytes) -> PagesView:
    """The PageBatch of a pages frame without copying its payload (worker thread).

    Frames as build_batch writes them are read in place; any other encoding (unknown
    fields, other field types, anything malformed) goes through protobuf's parser, so
    the result is always what protobuf would read, or a ProtocolError."""
    try:
        return _pages_in_place(memoryview(raw))
    except _Unusual:
        frame = parse_frame(raw)
        if frame.WhichOneof("frame") != "pages":
            raise ProtocolError("not a pages frame") from None
        p = frame.pages
        return PagesView(p.round, p.indices, p.payload, p.codec, p.zero_indices, p.raw_size)


def receive_batch(
    pages: npt.NDArray[np.uint8],
    raw: bytes,
    present: npt.NDArray[np.uint8] | None = None,
    *,
    fresh_zero: bool = False,
    ram_file: Path | None = None,
    digest: ChunkDigest | None = None,
) -> tuple[IndexArray, int, int]:
    """Read a serialized pages frame and apply it (worker thread): (indices written, its
    round, payload bytes for the credit). The payload goes from the received bytes
    straight into guest memory: ``pages``, or for runs of PWRITE_MIN_RUN consecutive
    pages ``ram_file`` (the file ``pages`` maps) when given. With ``digest`` every page
    written is hashed into it in the same pass (the target's, before post-copy)."""
    frame = read_pages_frame(raw)
    fresh = fresh_zero and frame.round == 0
    written = _apply(
        pages, frame, frame.payload, present, fresh_zero=fresh, ram_file=ram_file, digest=digest
    )
    return written, frame.round, len(frame.payload)


def _indices(blob: Buffer, page_count: int, what: str) -> IndexArray:
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
    return _apply(pages, frame, frame.payload, present, fresh_zero=fresh_zero)


def _apply(
    pages: npt.NDArray[np.uint8],
    frame: pb.PageBatch | PagesView,
    payload: Buffer,
    present: npt.NDArray[np.uint8] | None,
    *,
    fresh_zero: bool,
    ram_file: Path | None = None,
    digest: ChunkDigest | None = None,
) -> IndexArray:
    page_count, page_size = pages.shape
    nz_idx = _indices(frame.indices, page_count, "indices")
    zero_idx = _indices(frame.zero_indices, page_count, "zero_indices")
    expected = nz_idx.size * page_size
    if frame.raw_size != expected:
        raise ProtocolError(f"raw_size {frame.raw_size} does not match {nz_idx.size} pages")
    if frame.codec == pb.CODEC_ZSTD:
        try:
            payload = _decompressor().decompress(payload, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"corrupt zstd payload: {e}") from None
    elif frame.codec == pb.CODEC_ZLIB:
        try:
            d = zlib.decompressobj()
            payload = d.decompress(payload, expected)
            if d.unconsumed_tail or not d.eof:
                raise ProtocolError("zlib payload larger than raw_size")
        except zlib.error as e:
            raise ProtocolError(f"corrupt zlib payload: {e}") from None
    elif frame.codec != pb.CODEC_RAW:
        raise ProtocolError(f"unknown codec {frame.codec}")
    if len(payload) != expected:
        raise ProtocolError(f"payload is {len(payload)} bytes, {expected} expected")
    data = np.frombuffer(payload, dtype=np.uint8).reshape(-1, page_size)
    if present is not None:
        keep = present[nz_idx] == 0
        nz_idx, data = nz_idx[keep], data[keep]
        zero_idx = zero_idx[present[zero_idx] == 0]
    if fresh_zero:
        zero_idx = zero_idx[:0]  # already zero: nothing to write
    written = np.concatenate((nz_idx, zero_idx))
    if present is not None:  # post-copy: through the mapping, page by page
        pages[nz_idx] = data
        pages[zero_idx] = 0
        if digest is not None:
            digest.hash_pages(written)
        return written
    hashes = digest.begin_hashing(written) if digest is not None else None
    if nz_idx.size:
        fd = None if ram_file is None else os.open(ram_file, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pagebatch.apply(
                pages, nz_idx.astype("<u4"), data, fd=fd, min_run=PWRITE_MIN_RUN, hashes=hashes
            )
        finally:
            if fd is not None:
                os.close(fd)
    if zero_idx.size:
        pages[zero_idx] = 0
    if digest is not None:
        if hashes is None:  # chunks of several pages: hashed the usual way
            digest.hash_pages(written)
        else:
            digest.end_hashing(zero_idx, nz_idx)
    return written


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


# -- the Transfer RPC with pre-serialized source frames ---------------------------------------
# The source serializes page batches in worker threads (build_batch) and the target parses
# them in worker threads (receive_batch), so both ends of the stream carry bytes: gRPC's
# own (de)serialization would copy every batch again on the event loop.


def open_transfer(conn: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """Start a Transfer stream whose requests are serialized SourceFrames (bytes)."""
    method = conn.stream_stream(
        TRANSFER_METHOD,
        request_serializer=None,
        response_deserializer=pb.TargetFrame.FromString,
    )
    return method()


def transfer_handler(
    transfer: grpc.aio.StreamStreamMultiCallable,
) -> grpc.GenericRpcHandler:
    """Serve ``transfer`` (an async generator method taking raw SourceFrame bytes)."""
    return grpc.method_handlers_generic_handler(
        TRANSFER_SERVICE,
        {
            "Transfer": grpc.stream_stream_rpc_method_handler(
                transfer,
                request_deserializer=None,
                response_serializer=pb.TargetFrame.SerializeToString,
            )
        },
    )
