"""A small asyncio client of etcd's v3 API: KV (range, transactions, compaction), Watch
and Lease, over one gRPC channel to every endpoint of the cluster.

The stubs are generated from etcd's own API protos (``proto/vmferry/etcdpb``, ``make
proto``) with the project's grpcio-tools: the Python etcd clients on PyPI either pin an
old protobuf (etcd3) or ship stubs generated for protobuf 5, which protobuf 7 refuses
(aetcd). What the store and the leader election need is these few calls.

Several endpoints (IP literals, ``host:port``) make one channel that balances requests
over the members (``round_robin``) and skips a dead one; a single endpoint may be a host
name. TLS: the project's mTLS identity (``vmferry.pki.TlsFiles``); ``server_name`` is the
name the members' certificates carry when they are dialled by IP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from vmferry import grpc_options, pki
from vmferry.errors import Unavailable
from vmferry.etcdpb import rpc_pb2, rpc_pb2_grpc
from vmferry.pki import TlsFiles

log = logging.getLogger("vmferry.etcd")

# Watches fail when their member has lost the raft leader (clientv3's WithRequireLeader),
# so a partitioned member's watchers move to a healthy one.
_REQUIRE_LEADER = (("hasleader", "true"),)
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_RETRIES = 5
_RETRY_DELAY = 0.2


class EtcdConfigError(ValueError):
    """Bad etcd settings (endpoints, TLS)."""


class Compacted(Exception):
    """A watch's start revision was compacted away: history before ``revision`` is gone."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {revision}")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """Where etcd is and how to talk to it."""

    endpoints: tuple[str, ...]
    tls: TlsFiles | None = None  # None: plaintext (tests and labs only)
    server_name: str = ""  # the TLS name of the members, when dialled by IP
    timeout: float = 5.0  # per unary call (each retry has its own)

    def target(self) -> str:
        """The gRPC target: the endpoint itself, or ``ipv4:``/``ipv6:`` and every member.
        Raises EtcdConfigError for no endpoint, a malformed one, or host names among
        several."""
        try:
            for endpoint in self.endpoints:
                grpc_options.host_of(endpoint, "etcd_endpoints")
            return grpc_options.multi_target(self.endpoints, "etcd_endpoints")
        except ValueError as exc:
            raise EtcdConfigError(str(exc)) from None


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range or watch cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


RETIRED_CHANNEL_GRACE_S = 60.0  # s a replaced channel's calls and watches may still run


def _tls_stamp(tls: pki.TlsFiles | None) -> pki.FilesStamp:
    """The client certificate and key's stamp; () without them."""
    if tls is None:
        return ()
    try:
        return pki.files_stamp(tls.cert, tls.key)
    except OSError:
        return ()


def _unavailable(exc: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(f"etcd: {exc.code().name}: {exc.details()}")


class EtcdClient:
    """One channel to the etcd cluster. ``await EtcdClient.open(config)``; ``close()``."""

    def __init__(
        self,
        config: EtcdConfig,
        channel: grpc.aio.Channel,
        reopen: Callable[[grpc.ChannelCredentials], grpc.aio.Channel] | None = None,
    ) -> None:
        self.config = config
        self._reopen = reopen  # a new channel with new credentials (a renewed certificate)
        self._stamp = _tls_stamp(config.tls) if reopen is not None else ()
        self._retiring: set[asyncio.Task[None]] = set()
        self._use(channel)

    def _use(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._kv = rpc_pb2_grpc.KVStub(channel)
        self._watcher = rpc_pb2_grpc.WatchStub(channel)
        self._lease = rpc_pb2_grpc.LeaseStub(channel)
        self._maintenance = rpc_pb2_grpc.MaintenanceStub(channel)

    def _fresh(self) -> None:
        """After the TLS files changed (the controller renewed its certificate:
        controller/cert_rotation.py), new calls go on a channel with the new pair; the old
        one is closed after :data:`RETIRED_CHANNEL_GRACE_S` (its watches then reconnect).
        A half-written pair keeps the current channel."""
        if not self._stamp or self._reopen is None or self.config.tls is None:
            return
        stamp = _tls_stamp(self.config.tls)
        if not stamp or stamp == self._stamp:
            return
        try:
            creds = pki.channel_credentials(self.config.tls)
        except (OSError, ValueError):
            return  # mid-renewal: the key and certificate do not match yet
        old = self._channel
        self._use(self._reopen(creds))
        self._stamp = stamp
        log.info("etcd: client certificate %s changed: new calls use it", self.config.tls.cert)
        task = asyncio.get_running_loop().create_task(old.close(grace=RETIRED_CHANNEL_GRACE_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @property
    def kv(self) -> rpc_pb2_grpc.KVStub:
        self._fresh()
        return self._kv

    @property
    def watcher(self) -> rpc_pb2_grpc.WatchStub:
        self._fresh()
        return self._watcher

    @property
    def lease(self) -> rpc_pb2_grpc.LeaseStub:
        self._fresh()
        return self._lease

    @property
    def maintenance(self) -> rpc_pb2_grpc.MaintenanceStub:
        self._fresh()
        return self._maintenance

    @classmethod
    def connect(cls, config: EtcdConfig) -> EtcdClient:
        """A client; the channel connects lazily (the first call waits for a member).
        Raises EtcdConfigError, and OSError/ValueError for unreadable TLS files."""
        target = config.target()
        options: list[tuple[str, Any]] = list(
            grpc_options.channel_options(grpc_options.API_KEEPALIVE_MS)
        )
        options.append(("grpc.max_receive_message_length", -1))
        options.append(("grpc.lb_policy_name", "round_robin"))
        options += grpc_options.multi_target_options(config.endpoints)
        if config.tls is None:
            return cls(config, grpc.aio.insecure_channel(target, options=options))
        if config.server_name:
            options.append(("grpc.ssl_target_name_override", config.server_name))

        def reopen(creds: grpc.ChannelCredentials) -> grpc.aio.Channel:
            return grpc.aio.secure_channel(target, creds, options=options)

        return cls(config, reopen(pki.channel_credentials(config.tls)), reopen)

    async def close(self) -> None:
        retiring, self._retiring = self._retiring, set()
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        """A unary call, retried while no member answers (a member just died, or the
        cluster is electing); then Unavailable."""
        for attempt in range(_RETRIES):
            try:
                return await method(request, timeout=self.config.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE or attempt == _RETRIES - 1:
                    raise _unavailable(exc) from None
                await asyncio.sleep(_RETRY_DELAY * (attempt + 1))
        raise AssertionError("unreachable")

    # --- KV ----------------------------------------------------------------------------

    async def range(
        self, key: bytes, range_end: bytes = b"", *, revision: int = 0, limit: int = 0
    ) -> rpc_pb2.RangeResponse:
        request = rpc_pb2.RangeRequest(key=key, range_end=range_end, revision=revision, limit=limit)
        response: rpc_pb2.RangeResponse = await self._call(self.kv.Range, request)
        return response

    async def txn(
        self,
        compare: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> rpc_pb2.TxnResponse:
        request = rpc_pb2.TxnRequest(compare=compare, success=success, failure=failure)
        response: rpc_pb2.TxnResponse = await self._call(self.kv.Txn, request)
        return response

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (watches from below it get Compacted)."""
        await self._call(self.kv.Compact, rpc_pb2.CompactionRequest(revision=revision))

    async def status(self) -> rpc_pb2.StatusResponse:
        response: rpc_pb2.StatusResponse = await self._call(
            self.maintenance.Status, rpc_pb2.StatusRequest()
        )
        return response

    # --- Watch -------------------------------------------------------------------------

    async def watch(
        self,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        *,
        prev_kv: bool = True,
    ) -> AsyncIterator[rpc_pb2.WatchResponse]:
        """Yield the watch responses with events for keys in [key, range_end) from
        ``start_revision`` on (with each key's previous value when ``prev_kv``). Raises
        Compacted when the start revision was compacted, Unavailable when the stream
        breaks (resume from the last revision seen)."""
        call = self.watcher.Watch(metadata=_REQUIRE_LEADER)
        try:
            create = rpc_pb2.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=start_revision, prev_kv=prev_kv
            )
            await call.write(rpc_pb2.WatchRequest(create_request=create))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise Unavailable("etcd: the watch stream ended")
                assert isinstance(response, rpc_pb2.WatchResponse)
                if response.compact_revision:
                    raise Compacted(response.compact_revision)
                if response.canceled:
                    raise Unavailable(f"etcd cancelled the watch: {response.cancel_reason}")
                if response.events:
                    yield response
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from None
        finally:
            call.cancel()

    # --- Lease -------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        response = await self._call(self.lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=ttl))
        if response.error:
            raise Unavailable(f"etcd refused a lease: {response.error}")
        lease_id: int = response.ID
        return lease_id

    async def revoke(self, lease_id: int) -> None:
        """End a lease now (its keys are deleted)."""
        await self._call(self.lease.LeaseRevoke, rpc_pb2.LeaseRevokeRequest(ID=lease_id))

    async def keepalive(self, lease_id: int) -> int:
        """Renew a lease once; its remaining TTL (0: it had expired)."""
        call = self.lease.LeaseKeepAlive(timeout=self.config.timeout)
        try:
            await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from None
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise Unavailable("etcd: the lease keep-alive stream ended")
        ttl: int = response.TTL
        return ttl
