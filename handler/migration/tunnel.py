"""The QEMU tunnel protocol's constants and its error (proto/vmferry/rpc/tunnel.proto).

Both ends of a QEMU migration (``qemu_source`` and ``qemu_target``) take the protocol's
numbers from here; the message sequence is specified in the header of tunnel.proto.
"""

from __future__ import annotations

from vmferry.rpc import tunnel_pb2 as pb

# 2: page digests are XXH3-128 (handler/pagehash.py; 1: a numpy mix of two uint64 lanes)
TUNNEL_PROTOCOL_VERSION = 2
PAGE_SIZE = 4096
DATA_FRAME_BYTES = 256 << 10  # QEMU's stream is cut into frames of at most this size
MAX_CHANNELS = 9  # main + up to 8 multifd channels
DIGEST_FRAME_PAGES = 1 << 16  # 1 MiB of digests per frame
REPAIR_FRAME_PAGES = 256
VERIFY_MODES = {
    "off": pb.VERIFY_MODE_OFF,
    "detect": pb.VERIFY_MODE_DETECT,
    "repair": pb.VERIFY_MODE_REPAIR,
}


class ProtocolError(Exception):
    """A tunnel frame violated the protocol; the message says which rule."""
