"""The QEMU tunnel protocol's constants, its error and its data-frame codec
(proto/vmferry/rpc/tunnel.proto).

Both ends of a QEMU migration (``qemu_source`` and ``qemu_target``) take the protocol's
numbers from here; the message sequence is specified in the header of tunnel.proto.

The data path: QEMU's stream is read in large pieces (``READ_LIMIT`` lets the reader
buffer up to twice that while a frame is on its way, so one read takes every QEMU write
that arrived meanwhile: up to ``DATA_FRAME_BYTES``), and a Data frame is encoded by hand
(``encode_data``: the payload copied once, where building the nested messages and
serializing them copied it three times). The target decodes a Data frame into a
``DataChunk``, a view of the received message (``decode_source_frame``: parsing it and
reading the field copied the payload twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

import grpc

from vmferry.rpc import tunnel_pb2 as pb

# 2: page digests are XXH3-128 (handler/pagehash.py; 1: a numpy mix of two uint64 lanes)
TUNNEL_PROTOCOL_VERSION = 2
PAGE_SIZE = 4096
DATA_FRAME_BYTES = 1 << 20  # QEMU's stream is cut into frames of at most this size
# The limit of the StreamReader on QEMU's connection: it reads ahead up to twice this
# while a frame is on its way (the default, 64 KiB, kept frames at ~128 KiB). Every byte
# buffered in the tunnel is drained after QEMU's stop-and-copy, in the guest's downtime:
# the buffers are about a frame deep, enough to keep the pipe full, no deeper.
READ_LIMIT = 1 << 20
# The write buffer toward QEMU may hold this much before a writer waits (the default,
# 64 KiB, made every 256 KiB frame wait until QEMU had read most of the previous one).
WRITE_HIGH_WATER = 2 << 20
# The kernel's send buffer of the socket toward QEMU (capped by net.core.wmem_max): with
# the default (~208 KiB) a 1 MiB frame took five sends and four event-loop turns.
SOCKET_SEND_BUFFER = 1 << 20
MAX_CHANNELS = 9  # main + up to 8 multifd channels
DIGEST_FRAME_PAGES = 1 << 16  # 1 MiB of digests per frame
REPAIR_FRAME_PAGES = 256
VERIFY_MODES = {
    "off": pb.VERIFY_MODE_OFF,
    "detect": pb.VERIFY_MODE_DETECT,
    "repair": pb.VERIFY_MODE_REPAIR,
}
TUNNEL_SERVICE = "vmferry.tunnel.v1.Tunnel"
MIGRATE_METHOD = f"/{TUNNEL_SERVICE}/Migrate"
_DATA_FIELD = 2  # TunnelSourceFrame.data
_PAYLOAD_FIELD = 1  # Data.data
_LENGTH_DELIMITED = 2


class ProtocolError(Exception):
    """A tunnel frame violated the protocol; the message says which rule."""


def widen_writer(writer: asyncio.StreamWriter) -> None:
    """Let ``writer`` (toward a QEMU) take whole frames: a deep kernel send buffer (best
    effort) and WRITE_HIGH_WATER before its writer waits."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_DATA_TAG = bytes([_DATA_FIELD << 3 | _LENGTH_DELIMITED])
_PAYLOAD_TAG = bytes([_PAYLOAD_FIELD << 3 | _LENGTH_DELIMITED])


def encode_data(payload: bytes | bytearray | memoryview) -> bytes:
    """``TunnelSourceFrame(data=Data(data=payload)).SerializeToString()``, byte for byte,
    with one copy of ``payload``."""
    inner = _PAYLOAD_TAG + _varint(len(payload))
    return b"".join((_DATA_TAG, _varint(len(inner) + len(payload)), inner, payload))


def serialize_source_frame(frame: pb.TunnelSourceFrame | bytes) -> bytes:
    """The request serializer of a tunnel call: messages are serialized, bytes (an
    ``encode_data`` frame) pass as they are."""
    if isinstance(frame, bytes):
        return frame
    return frame.SerializeToString()


def open_call(conn: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """A Tunnel.Migrate call on ``conn`` that takes TunnelSourceFrames or encoded frames."""
    method = conn.stream_stream(
        MIGRATE_METHOD,
        request_serializer=serialize_source_frame,
        response_deserializer=pb.TunnelTargetFrame.FromString,
    )
    return method()


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A decoded Data frame: its payload, a view of the received message (no copy)."""

    payload: memoryview


SourceFrame = pb.TunnelSourceFrame | DataChunk  # what the target's Migrate receives


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """(value, offset after it); (-1, at) when the varint is malformed or cut short."""
    value = shift = 0
    for i in range(at, min(at + 10, len(raw))):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, at


def decode_source_frame(raw: bytes) -> SourceFrame:
    """The request deserializer of the target's Migrate: a Data frame as a DataChunk
    (``encode_data``'s layout is read in place; any other layout of a Data frame is
    parsed and wrapped), every other frame as the parsed message. DecodeError for bytes
    that are no TunnelSourceFrame."""
    if raw[:1] == _DATA_TAG:
        size, at = _read_varint(raw, 1)
        if at + size == len(raw) and raw[at : at + 1] == _PAYLOAD_TAG:
            payload_size, start = _read_varint(raw, at + 1)
            if start + payload_size == len(raw):
                return DataChunk(memoryview(raw)[start:])
    frame = pb.TunnelSourceFrame.FromString(raw)
    if frame.WhichOneof("frame") == "data":
        return DataChunk(memoryview(frame.data.data))
    return frame


def frame_kind(frame: SourceFrame) -> str | None:
    """The frame's oneof name ("data" for a DataChunk); None for an empty frame."""
    return "data" if isinstance(frame, DataChunk) else frame.WhichOneof("frame")
