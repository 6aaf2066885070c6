"""Stream workers (handler/migration/stream_worker.py): real worker processes carry one
channel of a migration from a source RAM file into a target RAM file over gRPC, with
mTLS from a test CA, and hash what they move into the digest tables they share with
their handlers. Their link (worker_link.py) and the shared digest tables apart."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handler import stream
from handler.digest import ChunkDigest
from handler.migration import worker_link as w
from handler.migration.handoff import MigrationFailed
from handler.migration.target_stream import StreamLost
from handler.migration.worker_link import Applied
from handler.migration.worker_pool import RemoteChannel, RemoteReceiver, WorkerPool
from vmferry import pki
from vmferry.rpc import migration_pb2 as pb

PAGE = 4096
PAGES = 4096  # 16 MiB
UID = "mig-1"
TOKEN = "s3cret"

pytestmark = pytest.mark.timeout(90)


def run(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test body run on a loop of its own (the suite's convention)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def with_pools(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """``run``, with a source pool and a target pool of one real worker each."""

    @functools.wraps(test)
    async def body(*args: Any, **kwargs: Any) -> None:
        source, target = WorkerPool(1, name="test-source"), WorkerPool(1, name="test-target")
        await asyncio.gather(source.start(), target.start())
        try:
            await test(*args, pools=(source, target), **kwargs)
        finally:
            await asyncio.gather(source.close(), target.close())

    wrapper = run(body)
    del wrapper.__wrapped__  # type: ignore[attr-defined]
    signature = inspect.signature(test)  # what pytest fills in: all but ``pools``
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "pools"]
    )
    return wrapper


# -- the link ---------------------------------------------------------------------------------


async def _pair() -> tuple[w.Link, w.Link]:
    a, b = socket.socketpair()
    return await w.Link.over(a), await w.Link.over(b)


@run
async def test_link_carries_typed_messages_both_ways() -> None:
    left, right = await _pair()
    part = w.SendPart(3, np.arange(5, dtype=np.int64).tobytes(), False, True, 0, True)
    left.send(part)
    right.send(w.Acked(3))
    assert await right.recv() == part
    assert await left.recv() == w.Acked(3)
    left.close()
    with pytest.raises(w.LinkClosed):
        await right.recv()


@run
async def test_link_refuses_what_is_not_a_message() -> None:
    a, b = socket.socketpair()
    right = await w.Link.over(b)
    import pickle
    import struct

    data = pickle.dumps({"not": "a message"})
    a.sendall(struct.pack(">I", len(data)) + data)
    with pytest.raises(w.LinkClosed, match="unexpected message dict"):
        await right.recv()
    a.sendall(struct.pack(">I", w.MAX_MESSAGE + 1))
    with pytest.raises(w.LinkClosed, match="exceeds"):
        await right.recv()
    a.close()


# -- shared digest tables ---------------------------------------------------------------------


def test_shared_tables_are_one_digest_in_two_places(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ram = bytearray(rng.integers(0, 256, 256 * PAGE, dtype=np.uint8).tobytes())
    owner = ChunkDigest(memoryview(ram), PAGE)
    path = tmp_path / "digest"
    owner.share(path)
    assert owner.shared
    mover = ChunkDigest(memoryview(ram), PAGE, all_zero=True)
    mover.attach(path)
    # what the mover hashes, the owner's digest counts; the owner hashes the rest
    mover.hash_pages(np.arange(0, 100, dtype=np.int64))
    assert not owner.stale[:100].any() and owner.stale[100:].all()
    expected = ChunkDigest(memoryview(bytearray(ram)), PAGE)
    assert owner._digest() == expected._digest()
    mover.release()
    owner.release()
    assert not path.exists()


def test_attach_refuses_tables_of_another_geometry(tmp_path: Path) -> None:
    owner = ChunkDigest(memoryview(bytearray(64 * PAGE)), PAGE)
    owner.share(tmp_path / "d")
    other = ChunkDigest(memoryview(bytearray(128 * PAGE)), PAGE, all_zero=True)
    with pytest.raises(ValueError, match="does not hold this memory's digest tables"):
        other.attach(tmp_path / "d")
    owner.release()


# -- a channel through two workers ------------------------------------------------------------


def _ram_file(path: Path, data: bytes | None) -> Path:
    with open(path, "wb") as f:
        if data is None:
            f.truncate(PAGES * PAGE)
        else:
            f.write(data)
    return path


class Rig:
    """A source RAM file with random and zero pages, a zero target file, both digests
    shared, and the jobs for channel 1 of 2."""

    def __init__(self, tmp: Path, tls: tuple[pki.TlsFiles, pki.TlsFiles] | None) -> None:
        rng = np.random.default_rng(7)
        pages = rng.integers(0, 256, (PAGES, PAGE), dtype=np.uint8)
        pages[::3] = 0
        self.data = pages.tobytes()
        self.src = _ram_file(tmp / "src.ram", self.data)
        self.dst = _ram_file(tmp / "dst.ram", None)
        self.src_digest = ChunkDigest(memoryview(bytearray(self.data)), PAGE)
        self.src_digest.share(tmp / "src.digest")
        self.dst_view = memoryview(bytearray(PAGES * PAGE))  # not the file: tables only
        self.dst_digest = ChunkDigest(self.dst_view, PAGE, all_zero=True)
        self.dst_digest.share(tmp / "dst.digest")
        self.tls = tls
        self.applied: list[Applied] = []
        self.port = 0  # where the target's worker listens, once started
        self.ended: list[RemoteReceiver] = []

    def target_job(self, **changes: object) -> w.TargetJob:
        fields: dict[str, object] = dict(
            address="127.0.0.1",
            tls=None if self.tls is None else self.tls[1],
            migration_uid=UID,
            token=TOKEN,
            source_node="node1",
            channel_id=1,
            channel_count=2,
            memory_bytes=PAGES * PAGE,
            page_size=PAGE,
            ram_path=str(self.dst),
            digest_path=str(self.dst_digest._shared[1]),  # type: ignore[index]
        )
        fields.update(changes)
        return w.TargetJob(**fields)  # type: ignore[arg-type]

    def source_job(self, port: int, token: str = TOKEN) -> w.SourceJob:
        hello = pb.Hello(
            protocol_version=stream.PROTOCOL_VERSION,
            migration_uid=UID,
            token=token,
            channel_id=1,
            channel_count=2,
            memory_bytes=PAGES * PAGE,
            page_size=PAGE,
        )
        return w.SourceJob(
            address=f"127.0.0.1:{port}",
            target_node="node2",
            tls=None if self.tls is None else self.tls[0],
            hello=hello.SerializeToString(),
            ram_path=str(self.src),
            page_size=PAGE,
            page_count=PAGES,
            digest_path=str(self.src_digest._shared[1]),  # type: ignore[index]
        )


def _node_tls(tmp: Path) -> tuple[pki.TlsFiles, pki.TlsFiles]:
    pki.init_ca(tmp / "pki", "workers")
    source = pki.issue_node(tmp / "pki", "node1", ips=["127.0.0.1"], dns=["localhost"])
    target = pki.issue_node(tmp / "pki", "node2", ips=["127.0.0.1"], dns=["localhost"])
    return source, target


async def _channel(
    rig: Rig, source: WorkerPool, target: WorkerPool, batches: list[w.BatchSent]
) -> tuple[RemoteChannel, RemoteReceiver]:
    (tw,) = target.take(1) or []
    receiver = RemoteReceiver(
        tw, 1, on_applied=lambda _, a: rig.applied.append(a), on_end=rig.ended.append
    )
    port = rig.port = await receiver.start(rig.target_job())
    (sw,) = source.take(1) or []
    channel = RemoteChannel(sw, 1, batches.append)
    await channel.open(rig.source_job(port))
    return channel, receiver


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "mtls"])
@with_pools
async def test_a_channel_moves_its_pages_into_the_target_file_and_both_digests(
    tmp_path: Path, pools: tuple[WorkerPool, WorkerPool], secure: bool
) -> None:
    source, target = pools
    rig = Rig(tmp_path, _node_tls(tmp_path) if secure else None)
    batches: list[w.BatchSent] = []
    channel, receiver = await _channel(rig, source, target, batches)
    everything = np.arange(PAGES, dtype=np.int64)
    for round_no, part in enumerate((everything, everything[::7])):
        request = w.SendPart(round_no, part.tobytes(), round_no == 1, False, 0, round_no == 0)
        wire, unsent = await channel.send_part(request, None)
        assert unsent.size == 0 and wire == sum(b.wire_bytes for b in batches)
        ack = await asyncio.wait_for(channel.acks.get(), 10)
        assert ack.round == round_no
        batches.clear()
    assert [(a.round_no, a.final) for a in rig.applied] == [(0, False), (1, True)]
    assert rig.applied[0].pages == PAGES - len(range(0, PAGES, 3))  # zero pages not written
    received = Path(rig.dst).read_bytes()  # noqa: ASYNC240 - a test's check
    assert received == rig.data
    # the source worker hashed round 0 into the shared tables; the target's worker hashed
    # every page it wrote: both digests are the memory's
    expected = ChunkDigest(memoryview(bytearray(rig.data)), PAGE)._digest()
    assert not rig.src_digest.stale.any()
    assert rig.src_digest._digest() == expected
    target_digest = ChunkDigest(memoryview(bytearray(received)), PAGE)
    target_digest.hashes[:] = rig.dst_digest.hashes
    target_digest.stale[:] = False
    assert target_digest._digest() == expected
    channel.close()
    receiver.close()
    for _ in range(100):  # both go back to their pools
        if source.idle and target.idle:
            break
        await asyncio.sleep(0.05)
    assert len(source.idle) == 1 and len(target.idle) == 1


@with_pools
async def test_the_target_worker_refuses_a_wrong_token_and_a_foreign_node(
    tmp_path: Path, pools: tuple[WorkerPool, WorkerPool]
) -> None:
    source, target = pools
    rig = Rig(tmp_path, _node_tls(tmp_path))

    async def refused(target_job: w.TargetJob, token: str, says: str) -> None:
        """A worker pair with these jobs: the source's open fails saying ``says``; both
        workers go back to their pools."""
        (tw,) = target.take(1) or []
        receiver = RemoteReceiver(tw, 1, on_applied=lambda *_: None, on_end=rig.ended.append)
        port = await receiver.start(target_job)
        (sw,) = source.take(1) or []
        channel = RemoteChannel(sw, 1, lambda _: None)
        with pytest.raises(MigrationFailed, match=says):
            await channel.open(rig.source_job(port, token=token))
        channel.close()
        receiver.close()
        for _ in range(100):
            if source.idle and target.idle:
                return
            await asyncio.sleep(0.05)

    await refused(rig.target_job(source_node="node3"), TOKEN, "is not the source node node3")
    await refused(rig.target_job(), "guess", "wrong migration token")


@with_pools
async def test_a_second_stream_to_a_served_channel_is_refused(
    tmp_path: Path, pools: tuple[WorkerPool, WorkerPool]
) -> None:
    source, target = pools
    source.size = 2
    await source._spawn()  # a second source worker to dial with
    rig = Rig(tmp_path, None)
    channel, receiver = await _channel(rig, source, target, [])
    (sw,) = source.take(1) or []
    intruder = RemoteChannel(sw, 1, lambda _: None)
    with pytest.raises(MigrationFailed, match="channel 1 of migration mig-1 is connected already"):
        await intruder.open(rig.source_job(rig.port))
    intruder.close()
    channel.close()
    receiver.close()


@with_pools
async def test_a_killed_worker_fails_its_channel_and_is_replaced(
    tmp_path: Path, pools: tuple[WorkerPool, WorkerPool]
) -> None:
    source, target = pools
    rig = Rig(tmp_path, None)
    channel, receiver = await _channel(rig, source, target, [])
    dead = receiver.worker
    assert dead.proc is not None
    os.kill(dead.proc.pid, 9)
    request = w.SendPart(0, np.arange(PAGES, dtype=np.int64).tobytes(), False, False, 0, False)
    with pytest.raises(StreamLost):
        await channel.send_part(request, None)
        await asyncio.wait_for(channel.acks.get(), 10)
        channel.check()
    for _ in range(200):
        if target.idle:
            break
        await asyncio.sleep(0.05)
    assert target.idle and target.idle[0] is not dead  # a new worker took its place
    channel.close()


def test_a_lost_stream_inside_the_jobs_task_groups_stays_a_lost_stream() -> None:
    """A killed target worker reaches the source worker's round as StreamLost wrapped in
    the round's and the job's task groups: the handler must still see a lost stream (it
    reconnects), not a failed migration."""
    from handler.migration.stream_worker import job_ended

    lost = StreamLost("migration channel 1 to the target failed: closed")
    nested = ExceptionGroup("job", [ExceptionGroup("round", [lost])])
    assert job_ended(nested) == w.Ended(str(lost), True)
    refused = MigrationFailed("the target refused the stream: wrong token")
    assert job_ended(ExceptionGroup("job", [refused, lost])) == w.Ended(str(refused), False)
    ended = job_ended(ExceptionGroup("job", [ValueError("bug")]))
    assert not ended.lost and ended.reason == "the stream worker failed: ValueError('bug')"


# -- the handler's setting --------------------------------------------------------------------


def test_stream_workers_setting_auto_counts_and_refusals() -> None:
    from handler.main import auto_stream_workers, stream_workers_setting
    from vmferry.config import ConfigError

    assert [auto_stream_workers(n) for n in (None, 1, 2, 3, 4, 6, 8, 64)] == [
        0,
        0,
        0,
        0,
        1,
        2,
        3,
        3,
    ]
    assert stream_workers_setting("auto") == auto_stream_workers(os.cpu_count())
    assert stream_workers_setting(0) == 0 and stream_workers_setting("2") == 2
    for bad, says in (
        (-1, "expected a count >= 0"),
        ("many", "expected a count >= 0"),
        (True, "expected a count >= 0"),
        (16, "more than a migration's 15 streams"),
    ):
        with pytest.raises(ConfigError, match=says):
            stream_workers_setting(bad)
