"""The handler's stream workers (stream_worker.py): started with the handler, lent to
one migration channel at a time, and the channel objects that stand for them.

- ``WorkerPool`` starts ``size`` worker processes, each with a socket pair for its link
  (worker_link.py), lends idle ones (``take``) and gets them back when their job is
  released. A worker that dies is replaced; its job fails with the reason.
- ``open_with_workers`` opens a migration's channels at the source: channel 0 here,
  asking the target for its workers, and channels 1.. in this handler's (or, when the
  target has none idle, here too).
- ``RemoteChannel`` is a source channel whose stream runs in a worker: the round sender
  (sender.py) hands it a part of a round (``send_part``) and reads its acknowledgements
  from ``acks``, as it does a local Channel's.
- ``RemoteReceiver`` is a target channel served by a worker: memvm_target.py starts it on
  channel 0's Hello and hears of every round the worker applied (``on_applied``).

Ownership: all of it runs on the handler's event loop; a worker's messages are read by
its reader task and go to the job it is lent to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import numpy as np

from handler import stream
from handler.migration import channels
from handler.migration import worker_link as w
from handler.migration.channels import LAST_ROUND
from handler.migration.handoff import MigrationFailed
from handler.migration.target_stream import StreamLost
from vmferry import grpc_options
from vmferry.rpc import migration_pb2 as pb

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # s for a job's Ready (the source's connect, the target's listen)


class Job(Protocol):
    def on_message(self, message: w.FromWorker) -> None: ...

    def on_worker_lost(self, reason: str) -> None: ...


class StreamWorker:
    """One worker process and its link."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.link: w.Link | None = None
        self.job: Job | None = None
        self.alive = False
        self.reader: asyncio.Task[None] | None = None

    async def start(self, log_level: str, name: str) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "handler.migration.stream_worker",
                "--fd",
                str(theirs.fileno()),
                "--log-level",
                log_level,
                "--name",
                name,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.link = await w.Link.over(mine)
        self.alive = True
        self.reader = asyncio.create_task(self._read())

    def send(self, message: w.ToWorker) -> None:
        if not self.alive or self.link is None:
            raise MigrationFailed(f"stream worker {self.index} is not running")
        self.link.send(message)

    async def _read(self) -> None:
        assert self.link is not None
        reason = "its link closed"
        try:
            while True:
                message = await self.link.recv()
                if isinstance(message, w.Released):
                    self.job = None
                    self.pool.give_back(self)
                elif self.job is not None and isinstance(message, w.FROM_WORKER):
                    self.job.on_message(message)
        except w.LinkClosed as e:
            reason = str(e)
        finally:
            self.alive = False
            code = None
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                code = await self.proc.wait()
            why = f"stream worker {self.index} exited (code {code}): {reason}"
            if self.job is not None:
                self.job.on_worker_lost(why)
                self.job = None
            self.pool.lost(self, why)


class WorkerPool:
    """``size`` stream workers of this handler (0: none; every stream stays in the
    handler's process)."""

    def __init__(self, size: int, *, log_level: str = "info", name: str = "stream-worker") -> None:
        self.size = size
        self.log_level = log_level
        self.name = name
        self.idle: list[StreamWorker] = []
        self.workers: list[StreamWorker] = []
        self._closing = False
        self._next = 0
        self._restarts: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for _ in range(self.size):
            await self._spawn()

    async def _spawn(self) -> None:
        worker = StreamWorker(self, self._next)
        self._next += 1
        await worker.start(self.log_level, f"{self.name}-{worker.index}")
        self.workers.append(worker)
        self.idle.append(worker)

    def take(self, count: int) -> list[StreamWorker] | None:
        """``count`` idle workers, or None when fewer are idle (then none is taken)."""
        if count <= 0 or len(self.idle) < count or self._closing:
            return None
        taken, self.idle = self.idle[:count], self.idle[count:]
        return taken

    def give_back(self, worker: StreamWorker) -> None:
        if worker.alive and worker not in self.idle and not self._closing:
            self.idle.append(worker)

    def lost(self, worker: StreamWorker, why: str) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        if self._closing:
            return
        log.warning("%s; starting another", why)
        task = asyncio.get_running_loop().create_task(self._spawn())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def close(self) -> None:
        self._closing = True
        for worker in list(self.workers):
            if worker.link is not None:
                worker.link.close()
        for worker in list(self.workers):
            if worker.reader is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker.reader


def reason_error(reason: str, lost: bool) -> MigrationFailed:
    return StreamLost(reason) if lost else MigrationFailed(reason)


class _Lent:
    """What both kinds of job share: the worker, Ready, the end, the release."""

    def __init__(self, worker: StreamWorker, channel_id: int) -> None:
        self.worker = worker
        self.id = channel_id
        self.error: MigrationFailed | None = None
        self._ready: asyncio.Future[w.Ready] = asyncio.get_running_loop().create_future()
        self._released = False
        worker.job = self

    async def _start(self, job: w.SourceJob | w.TargetJob) -> w.Ready:
        self.worker.send(job)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                return await self._ready
        except TimeoutError:
            raise StreamLost(
                f"stream worker {self.worker.index} did not set up channel {self.id} "
                f"within {START_TIMEOUT:.0f} s"
            ) from None

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Release the worker (it answers Released and goes back to the pool)."""
        if self._released:
            return
        self._released = True
        with contextlib.suppress(MigrationFailed, w.LinkClosed):
            self.worker.send(w.Release())

    def on_message(self, message: w.FromWorker) -> None:
        if isinstance(message, w.Ready):
            if not self._ready.done():
                self._ready.set_result(message)
        elif isinstance(message, w.Ended):
            self._end(reason_error(message.reason, message.lost))
        else:
            self._event(message)

    def on_worker_lost(self, reason: str) -> None:
        self._released = True
        self._end(StreamLost(reason))

    def _end(self, error: MigrationFailed) -> None:
        if self.error is None:
            self.error = error
        if not self._ready.done():
            self._ready.set_exception(error)
        self._ended()

    def _event(self, message: w.FromWorker) -> None:
        raise MigrationFailed(f"unexpected {type(message).__name__} from a stream worker")

    def _ended(self) -> None:
        return None


class RemoteChannel(_Lent):
    """A source channel whose stream runs in a stream worker."""

    what = "migration channel"

    def __init__(
        self, worker: StreamWorker, channel_id: int, on_batch: Callable[[w.BatchSent], None]
    ) -> None:
        super().__init__(worker, channel_id)
        self.on_batch = on_batch
        self.acks: asyncio.Queue[pb.RoundAck] = asyncio.Queue()
        self._part: asyncio.Future[w.PartDone] | None = None
        self.part_wire_bytes = 0

    async def open(self, job: w.SourceJob) -> None:
        await self._start(job)

    async def send_part(
        self,
        part: w.SendPart,
        stop: asyncio.Event | None,
    ) -> tuple[int, stream.IndexArray]:
        """Send one channel's part of a round (its RoundEnd included); returns the wire
        bytes sent and what a ``stop`` left unsent."""
        self.check()
        self._part = asyncio.get_running_loop().create_future()
        self.part_wire_bytes = 0
        self.worker.send(part)
        stopper = None
        if stop is not None:

            async def stop_when_set(event: asyncio.Event) -> None:
                await event.wait()
                with contextlib.suppress(MigrationFailed, w.LinkClosed):
                    self.worker.send(w.StopPart())

            stopper = asyncio.create_task(stop_when_set(stop))
        try:
            done = await self._part
        finally:
            if stopper is not None:
                stopper.cancel()
            self._part = None
        return self.part_wire_bytes, np.frombuffer(done.unsent, dtype=np.int64)

    def _event(self, message: w.FromWorker) -> None:
        if isinstance(message, w.BatchSent):
            self.part_wire_bytes += message.wire_bytes
            self.on_batch(message)
        elif isinstance(message, w.PartDone):
            if self._part is not None and not self._part.done():
                self._part.set_result(message)
        elif isinstance(message, w.Acked):
            self.acks.put_nowait(pb.RoundAck(round=message.round_no))
        else:
            super()._event(message)

    def _ended(self) -> None:
        self.acks.put_nowait(pb.RoundAck(round=LAST_ROUND))
        if self._part is not None and not self._part.done() and self.error is not None:
            self._part.set_exception(self.error)


async def open_with_workers(
    tg: asyncio.TaskGroup,
    hello: pb.Hello,
    workers: list[StreamWorker],
    address: str,
    credentials: grpc.ChannelCredentials | None,
    job: w.SourceJob,
    on_batch: Callable[[w.BatchSent], None],
    *,
    connections: list[grpc.aio.Channel],
    into: list[Any],
) -> bool:
    """A migration's channels, channel 0 in this process with Hello.stream_workers: when
    the target answers with its workers' ports, channels 1.. run in ``workers`` (each
    dials its port on ``address``'s host; ``job`` is their SourceJob but for the address
    and the Hello) and it returns True; else they open in this process too (False).
    ``connections`` and ``into`` get every connection and channel as it opens, so that a
    failure closes what opened."""
    target_node = job.target_node
    connections += channels.connect(address, target_node, credentials, 1)
    first = pb.Hello()
    first.CopyFrom(hello)
    first.stream_workers = True
    acks: list[pb.HelloAck] = []
    into += await channels.open_channels(connections, tg, first, address, acks=acks)
    ports = list(acks[0].worker_ports)
    rest = list(range(1, hello.channel_count))
    if len(ports) != len(rest):  # the target runs every channel in its handler
        more = channels.connect(address, target_node, credentials, len(rest))
        connections += more
        into += await channels.open_channels(more, tg, hello, address, ids=rest)
        return False
    host = grpc_options.host_of(address, "the target's migration endpoint")
    for cid, worker, port in zip(rest, workers, ports, strict=True):
        ch = RemoteChannel(worker, cid, on_batch)
        into.append(ch)
        mine = channels.hello_for(hello, cid).SerializeToString()
        await ch.open(
            dataclasses.replace(job, address=grpc_options.host_port(host, port), hello=mine)
        )
    return True


class RemoteReceiver(_Lent):
    """A target channel served by a stream worker."""

    def __init__(
        self,
        worker: StreamWorker,
        channel_id: int,
        on_applied: Callable[[RemoteReceiver, w.Applied], None],
        on_end: Callable[[RemoteReceiver], None],
    ) -> None:
        super().__init__(worker, channel_id)
        self.on_applied = on_applied
        self.on_end = on_end

    async def start(self, job: w.TargetJob) -> int:
        """The port the worker listens on for this channel."""
        return (await self._start(job)).port

    def _event(self, message: w.FromWorker) -> None:
        if isinstance(message, w.Applied):
            self.on_applied(self, message)
        else:
            super()._event(message)

    def _ended(self) -> None:
        self.on_end(self)


def digest_path(ram_path: os.PathLike[str], migration_uid: str, side: str) -> str:
    """Where a migration's shared digest tables live: beside the guest's RAM file (the
    same tmpfs), named by the migration and the side."""
    return f"{os.fspath(ram_path)}.{migration_uid}.{side}-digest"
