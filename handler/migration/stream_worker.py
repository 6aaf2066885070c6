"""A stream worker: one channel of a memvm migration in a process of its own
(``python -m handler.migration.stream_worker --fd N``, started by worker_pool.py).

Why: a handler moves every page through Python on one event loop and one GIL; the
streams of a migration in one process share that, so they cannot use more than about
one core whatever ``parallelStreams`` says. In a worker, a channel's gathering, hashing,
TLS and gRPC run on a core of their own, as QEMU's multifd threads do.

A worker does one job at a time (worker_link.py says what the messages mean):

- ``SourceJob``: map the guest's RAM and the digest's shared tables, dial the target's
  worker for this channel, Hello/HelloAck; then every ``SendPart`` is sent with the
  handler's own sender (sender.RoundSender on this one channel: the same batches,
  credit, pacing and compression break-even), each batch reported (``BatchSent``), the
  part's end (``PartDone``) and the target's acknowledgements (``Acked``).
- ``TargetJob``: listen for the source's worker on an ephemeral port (``Ready(port)``);
  admit only the stream of that migration and channel (peer.PeerGate: the source node's
  certificate of this cluster's CA, the migration's token), write its pages into the
  incoming guest's RAM and hash them into the digest tables, credit and acknowledge the
  source, and report every round's end (``Applied``): the handler decides when the final
  round is in, verifies and commits on channel 0.

``Release`` ends a job; the link closing (the handler exited) ends the worker, and so
does the handler's death (PR_SET_PDEATHSIG). A worker that fails a job reports ``Ended``
and waits for the Release, so the handler always knows the state of its channels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import mmap
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import GuestSpec
from handler.migration import channels
from handler.migration import worker_link as w
from handler.migration.channels import Channel
from handler.migration.handoff import MigrationFailed, first_leaf
from handler.migration.peer import PeerGate, Refused, peer_certificate
from handler.migration.sender import RoundSender
from handler.migration.stats import Stats
from handler.migration.target_stream import StreamLost
from handler.peers import MigrationTrust, PeerRegistry
from vmferry import grpc_options, logs, pki
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger("handler.stream_worker")

PR_SET_PDEATHSIG = 1
ACCEPT_TIMEOUT = 30.0  # s for the source's worker to connect once the target's listens


def _map(path: str, size: int, *, writable: bool) -> mmap.mmap:
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != size:
            raise MigrationFailed(f"{path} is not {size} bytes")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)


@dataclass
class _Memory:
    """The guest RAM as the sender reads it (sender.GuestMemory)."""

    spec: GuestSpec
    mm: mmap.mmap

    def ram(self) -> memoryview:
        return memoryview(self.mm)


class _ReportingStats(Stats):
    """Every batch the sender accounts is reported to the handler, which keeps the
    migration's figures."""

    def __init__(self, link: w.Link) -> None:
        super().__init__()
        self._link = link

    def record_batch(self, now: float, wire_bytes: int, memory_bytes: int) -> None:
        self._link.send(w.BatchSent(wire_bytes, memory_bytes))


# -- the source's side ----------------------------------------------------------------------


class SourceSide:
    def __init__(self, link: w.Link, job: w.SourceJob) -> None:
        self.link = link
        self.job = job
        spec = GuestSpec(memory_bytes=job.page_count * job.page_size, page_size=job.page_size)
        self.mm = _map(job.ram_path, spec.memory_bytes, writable=False)
        # attached at the first part that hashes: the engine makes the digest after the
        # channels are open
        self.digest: ChunkDigest | None = None
        self.sender = RoundSender(
            _Memory(spec, self.mm),
            _ReportingStats(link),
            compress=True,  # each SendPart says whether it may
            bandwidth=0,
            clock=time.monotonic,
            check_abort=lambda: None,
            report=lambda: None,
        )
        self.stop = asyncio.Event()

    async def run(self) -> None:
        """Until Release (or the link closes)."""
        job = self.job
        creds = None if job.tls is None else pki.channel_credentials(job.tls)
        options: list[tuple[str, int | str]] = [
            *grpc_options.channel_options(grpc_options.MIGRATION_KEEPALIVE_MS),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        conn = channels.dial(job.address, job.target_node, creds, options)
        part: asyncio.Task[None] | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                ch = await self._open(conn, tg)
                if ch is not None:
                    tg.create_task(self._forward_acks(ch))
                while True:
                    message = await self.link.recv()
                    if isinstance(message, w.Release):
                        break
                    if isinstance(message, w.StopPart):
                        self.stop.set()
                    elif isinstance(message, w.SendPart) and ch is not None:
                        if part is not None and not part.done():
                            raise MigrationFailed("SendPart while a part is being sent")
                        self.stop.clear()
                        part = tg.create_task(self._send(message))
                if part is not None:
                    part.cancel()
                if ch is not None:
                    ch.call.cancel()
        finally:
            await conn.close()
            self.sender.channels = []
            if self.digest is not None:
                self.digest.release()
            with contextlib.suppress(BufferError):
                self.mm.close()

    async def _open(self, conn: grpc.aio.Channel, tg: asyncio.TaskGroup) -> Channel | None:
        hello = pb.Hello.FromString(self.job.hello)
        try:
            (ch,) = await channels.open_channels(
                [conn], tg, hello, self.job.address, ids=[hello.channel_id]
            )
        except MigrationFailed as e:
            self.link.send(w.Ended(str(e), isinstance(e, StreamLost)))
            return None
        self.sender.channels = [ch]
        self.link.send(w.Ready())
        return ch

    async def _forward_acks(self, ch: Channel) -> None:
        while True:
            ack = await ch.acks.get()
            if ack.round == channels.LAST_ROUND and ch.error is None:
                return  # closed by the Release
            if ch.error is not None:
                lost = isinstance(ch.error, StreamLost)
                self.link.send(w.Ended(str(ch.error), lost))
                return
            self.link.send(w.Acked(ack.round))

    async def _send(self, part: w.SendPart) -> None:
        sender = self.sender
        sender.compress = part.compress
        sender.gate.enabled = part.compress
        sender.bandwidth = sender.gate.cap = part.limit
        if part.hash and self.digest is None:
            self.digest = ChunkDigest(memoryview(self.mm), self.job.page_size, all_zero=True)
            self.digest.attach(Path(self.job.digest_path))
        sender.digest = self.digest if part.hash else None
        indices = np.frombuffer(part.indices, dtype=np.int64)
        try:
            result = await sender.send_round(
                indices, part.round_no, part.final, stop=self.stop, wait_acks=False
            )
        except (MigrationFailed, ExceptionGroup) as e:  # a group from the round's tasks
            self.link.send(job_ended(e))
            return
        self.link.send(w.PartDone(part.round_no, result.unsent.astype(np.int64).tobytes()))


# -- the target's side ----------------------------------------------------------------------


@dataclass
class _Expected:
    """The one stream this job admits, as peer.PeerGate checks it."""

    migration_uid: str
    token: str
    source_node: str
    peer_cluster: str = ""


class TargetSide:
    def __init__(self, link: w.Link, job: w.TargetJob) -> None:
        self.link = link
        self.job = job
        self.mm = _map(job.ram_path, job.memory_bytes, writable=True)
        self.pages = stream.page_view(memoryview(self.mm), job.page_size)
        self.digest = ChunkDigest(memoryview(self.mm), job.page_size, all_zero=True)
        self.digest.attach(Path(job.digest_path))
        expected = _Expected(job.migration_uid, job.token, job.source_node)
        trust = None if job.tls is None else MigrationTrust(job.tls, PeerRegistry())
        self.gate = PeerGate(
            {job.migration_uid: expected},
            require_peer_identity=job.tls is not None,
            trust=trust,
        )
        self.trust = trust
        self.served = False
        self.pages_since = 0
        self.bytes_since = 0

    async def run(self) -> None:
        job = self.job
        server = grpc.aio.server(options=grpc_options.server_options())
        server.add_generic_rpc_handlers((stream.transfer_handler(self.Transfer),))
        address = grpc_options.host_port(job.address, 0)
        if self.trust is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self.trust.server_credentials())
        await server.start()
        try:
            self.link.send(w.Ready(port))
            while not isinstance(await self.link.recv(), w.Release):
                pass
        finally:
            await server.stop(grace=None)
            self.pages = np.zeros((0, job.page_size), dtype=np.uint8)
            self.digest.release()
            with contextlib.suppress(BufferError):
                self.mm.close()

    async def Transfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TargetFrame]:
        job = self.job
        frames = aiter(request_iterator)
        try:
            first = stream.parse_frame(await anext(frames))
        except (StopAsyncIteration, stream.ProtocolError):
            return
        if first.WhichOneof("frame") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be Hello")
        hello = first.hello
        if self.served:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"channel {job.channel_id} of migration {job.migration_uid} is connected "
                "already (a reconnect goes to the handler's migration service)",
            )
        try:
            self.gate.check(
                pki.peer_identity(context),
                hello.migration_uid,
                hello.token,
                acceptable=lambda _: True,
                cert_pem=peer_certificate(context),
            )
            stream.check_hello(hello, memory_bytes=job.memory_bytes, page_size=job.page_size)
            if hello.channel_id != job.channel_id or hello.channel_count != job.channel_count:
                raise stream.ProtocolError(
                    f"this stream worker serves channel {job.channel_id} of "
                    f"{job.channel_count}, not {hello.channel_id} of {hello.channel_count}"
                )
        except Refused as e:
            await context.abort(e.code, str(e))
        except stream.ProtocolError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.served = True
        yield pb.TargetFrame(hello_ack=pb.HelloAck(channel_id=job.channel_id))
        yield pb.TargetFrame(credit=pb.Credit(bytes=stream.CREDIT_WINDOW))
        try:
            async for raw in frames:
                yield await self._apply(raw)
        except stream.ProtocolError as e:
            self.link.send(w.Ended(f"protocol error on channel {job.channel_id}: {e}", False))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            self.link.send(w.Ended(f"channel {job.channel_id} closed: {e!r}", True))
            return
        self.link.send(w.Ended(f"the source closed channel {job.channel_id}", True))

    async def _apply(self, raw: bytes) -> pb.TargetFrame:
        if not stream.is_pages_frame(raw):
            frame = stream.parse_frame(raw)
            if frame.WhichOneof("frame") != "round_end":
                raise stream.ProtocolError(
                    f"frame {frame.WhichOneof('frame')!r} on data channel {self.job.channel_id}"
                )
            end = frame.round_end
            self.link.send(w.Applied(end.round, end.final, self.pages_since, self.bytes_since))
            self.pages_since = self.bytes_since = 0
            return pb.TargetFrame(round_ack=pb.RoundAck(round=end.round))
        ram_file = Path(self.job.ram_path)
        if stream.is_small_batch(raw, stream.INLINE_BATCH_PAGES, self.job.page_size):
            written, _, payload = stream.receive_batch(
                self.pages, raw, fresh_zero=True, ram_file=ram_file, digest=self.digest
            )
        else:
            written, _, payload = await asyncio.to_thread(
                stream.receive_batch,
                self.pages,
                raw,
                fresh_zero=True,
                ram_file=ram_file,
                digest=self.digest,
            )
        self.pages_since += len(written)
        self.bytes_since += payload
        return pb.TargetFrame(credit=pb.Credit(bytes=payload))


# -- the process ----------------------------------------------------------------------------


async def serve(sock: socket.socket) -> int:
    link = await w.Link.over(sock)
    while True:
        try:
            job = await link.recv()
        except w.LinkClosed:
            return 0
        side: SourceSide | TargetSide
        try:
            if isinstance(job, w.SourceJob):
                side = SourceSide(link, job)
            elif isinstance(job, w.TargetJob):
                side = TargetSide(link, job)
            else:
                continue  # a message of a job that ended already
        except (OSError, ValueError, MigrationFailed) as e:
            link.send(w.Ended(f"the stream worker cannot take the job: {e}", False))
            await _until_release(link)
            continue
        try:
            await side.run()
        except w.LinkClosed:
            return 0
        except Exception as e:  # the job fails, the worker goes on
            log.warning("stream job failed: %r", e)
            with contextlib.suppress(w.LinkClosed):
                link.send(job_ended(e))
                await _until_release(link)
        with contextlib.suppress(w.LinkClosed):
            link.send(w.Released())


def job_ended(error: Exception) -> w.Ended:
    """What a job that raised tells the handler. A lost stream stays a lost stream when it
    comes out of the job's task groups (the source reconnects, as for a channel of its
    own); a migration failure keeps its message; anything else is the worker's failure."""
    lost = channels.all_lost(error)
    if lost is not None:
        return w.Ended(str(lost), True)
    leaf = first_leaf(error)
    if isinstance(leaf, MigrationFailed):
        return w.Ended(str(leaf), False)
    return w.Ended(f"the stream worker failed: {leaf!r}", False)


async def _until_release(link: w.Link) -> None:
    while not isinstance(await link.recv(), w.Release):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m handler.migration.stream_worker")
    p.add_argument("--fd", type=int, required=True, help="the link's socket (inherited)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--name", default="stream-worker", help="how its log lines are tagged")
    args = p.parse_args(argv)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return 0  # the handler is gone already
    logs.setup(args.name, args.log_level)
    sock = socket.socket(fileno=args.fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the handler decides when workers end
    return asyncio.run(serve(sock))


if __name__ == "__main__":
    sys.exit(main())
