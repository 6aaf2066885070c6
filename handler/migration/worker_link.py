"""What a handler and its stream workers say to each other (stream_worker.py).

A stream worker is a process of its own that carries one channel of a memvm migration
at a time: on the source it gathers the pages the handler assigns to its channel from
its own mapping of the guest's RAM and sends them on its own gRPC connection; on the
target it serves that connection and writes the pages into its own mapping of the
incoming guest's RAM. Both sides hash the pages they move into the migration's digest
tables, which live in a shared-memory file (digest.ChunkDigest.share). The handler
keeps channel 0 (every control frame of the protocol travels there), the decisions and
the accounting.

The link is a Unix socket pair made when the handler starts the worker. Each message
is one of the frozen dataclasses below, pickled, behind a 4-byte big-endian length.
Both ends are this code base and the socket pair is private to the two processes: the
peer on the network never speaks this format.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass

from vmferry import pki

MAX_MESSAGE = 64 << 20  # bytes; a round's indices for 16 GiB of 4 KiB pages is 32 MiB
_LENGTH = struct.Struct(">I")


# -- handler -> worker --------------------------------------------------------------------


@dataclass(frozen=True)
class SourceJob:
    """Open channel ``hello.channel_id`` of a migration to the target's stream worker."""

    address: str  # host:port of the target's worker for this channel
    target_node: str  # the name the target's certificate must carry
    tls: pki.TlsFiles | None  # None: plain text (tests only)
    hello: bytes  # the serialized Hello for this channel
    ram_path: str
    page_size: int
    page_count: int
    digest_path: str  # the source digest's shared tables (digest.ChunkDigest.share)


@dataclass(frozen=True)
class SendPart:
    """Send ``indices`` (int64, ascending) as round ``round_no`` and its RoundEnd;
    ``hash``: into the digest as they are gathered (pre-copy rounds); ``limit``: this
    channel's share of bandwidthPerMigration in bytes/s (0: none)."""

    round_no: int
    indices: bytes
    final: bool
    compress: bool
    limit: int
    hash: bool


@dataclass(frozen=True)
class StopPart:
    """End the part being sent at the next batch boundary (the switch to post-copy)."""


@dataclass(frozen=True)
class TargetJob:
    """Serve channel ``channel_id`` of an incoming migration: listen on ``address`` with
    this node's certificate and admit only the stream the peer checks allow."""

    address: str
    tls: pki.TlsFiles | None
    migration_uid: str
    token: str
    source_node: str
    channel_id: int
    channel_count: int
    memory_bytes: int
    page_size: int
    ram_path: str
    digest_path: str


@dataclass(frozen=True)
class Release:
    """The job is over (its migration ended, or the handler gives up on it): close the
    stream and the mappings, then answer Released."""


# -- worker -> handler --------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The job is set up: the source's stream is open (HelloAck received), or the
    target's worker listens on ``port``."""

    port: int = 0


@dataclass(frozen=True)
class BatchSent:
    wire_bytes: int
    memory_bytes: int  # guest memory the batch covered, zero pages included


@dataclass(frozen=True)
class PartDone:
    round_no: int
    unsent: bytes  # int64 indices a StopPart left unsent


@dataclass(frozen=True)
class Acked:
    """The target acknowledged ``round_no`` on this channel: its pages are in its RAM."""

    round_no: int


@dataclass(frozen=True)
class Applied:
    """Target: a round ended on this channel with every page of it written and hashed."""

    round_no: int
    final: bool
    pages: int  # pages written since the last Applied
    payload_bytes: int


@dataclass(frozen=True)
class Ended:
    """The job's stream ended: ``lost`` when the network (not a refusal) broke it."""

    reason: str
    lost: bool


@dataclass(frozen=True)
class Released:
    pass


ToWorker = SourceJob | SendPart | StopPart | TargetJob | Release
FromWorker = Ready | BatchSent | PartDone | Acked | Applied | Ended | Released
Message = ToWorker | FromWorker
TO_WORKER = (SourceJob, SendPart, StopPart, TargetJob, Release)
FROM_WORKER = (Ready, BatchSent, PartDone, Acked, Applied, Ended, Released)
MESSAGE_TYPES = TO_WORKER + FROM_WORKER


class LinkClosed(Exception):
    """The other process closed the link (or died)."""


class Link:
    """One end of the socket pair: ``send`` a message, ``recv`` the next one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> Link:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        """Queue ``message`` (the transport writes it; nothing blocks the loop)."""
        if self.writer.is_closing():
            raise LinkClosed("the link is closed")
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_LENGTH.pack(len(data)) + data)

    async def recv(self) -> Message:
        """The next message; LinkClosed at the end of the stream."""
        try:
            head = await self.reader.readexactly(_LENGTH.size)
            (size,) = _LENGTH.unpack(head)
            if size > MAX_MESSAGE:
                raise LinkClosed(f"a {size}-byte message exceeds the link's {MAX_MESSAGE}")
            data = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise LinkClosed("the other end closed the link") from e
        message = pickle.loads(data)
        if not isinstance(message, MESSAGE_TYPES):
            raise LinkClosed(f"unexpected message {type(message).__name__} on the link")
        return message

    def close(self) -> None:
        self.writer.close()
