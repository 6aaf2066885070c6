"""The sync controller's transport: :class:`SyncLink`, the :class:`~sync_controller.peer.
PeerLink` over mTLS gRPC (``proto/vmferry/rpc/sync.proto``) to the peer clusters' sync
controllers.

Trust (issue 18, "Trust across two CAs"): this cluster's registered peers are the CAs in
the ConfigMap ``openshift-cnv/vmferry-peer-clusters`` (:class:`~sync_controller.peer_cas.PeerCAs`, fed by the
daemon's informer; a change counts for the next connection).

- Server (the receiving side, dialled at ``connectURL``): it presents this sync
  controller's certificate (its own cluster's CA) and requires a client certificate that
  chains to a registered peer CA (gRPC dynamic server credentials: the roots are rebuilt
  on the first handshake after the peers change). Per stream it finds which registered CA
  issued the client certificate (``verify_directly_issued_by``): that CA's key in the
  ConfigMap is the peer cluster's name; the certificate must name CN
  :data:`~vmferry.decentralized.SYNC_IDENTITY`.
- Client (the sending side, :meth:`SyncLink.connect`): it trusts ONLY the registered peer
  CAs. A TLS probe first reads the server's certificate: a certificate of no registered
  CA, for another host or not a sync controller's is refused with that reason; the peer
  cluster is the CA that issued it, and the gRPC channel then trusts that one CA only.

Delivery is level-triggered: the latest state of each migration is sent on every change,
again on every (re)connection and every :data:`RESEND_SECONDS`; a stream silent for
:data:`SILENCE_SECONDS` is dead. A migrationID is bound to the peer cluster it first came
from (or went to): the same migrationID from another peer cluster is refused (reused
migrationID). A malformed frame ends the stream with a status saying what was wrong.
Everything is bounded: frame size, field lengths, migrations, streams, remembered ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from sync_controller.peer import PeerError, PeerLink
from sync_controller.peer_cas import PeerCAs, common_name, no_peer_ca_rule
from vmferry import grpc_options
from vmferry.decentralized import (
    PEERS_CONFIGMAP,
    PEERS_NAMESPACE,
    SYNC_IDENTITY,
    Role,
    SyncState,
)
from vmferry.pki import TlsFiles
from vmferry.pki.credentials import _read_pair, registry_server_credentials
from vmferry.rpc import sync_pb2, sync_pb2_grpc

log = logging.getLogger("vmferry.sync.link")

SYNC_PROTOCOL_VERSION = 1
RESEND_SECONDS = 3.0  # every state again (or a heartbeat) this often
SILENCE_SECONDS = 10.0  # nothing received this long: the stream is dead
CONNECT_TIMEOUT_SECONDS = 5.0
PROBE_VERDICT_SECONDS = 2.0  # TLS 1.3: the server's verdict on our certificate comes after
BACKOFF_MIN_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
MAX_FRAME_BYTES = 64 << 10
MAX_MIGRATIONS = 1024  # states kept per direction
MAX_STREAMS = 128  # concurrent inbound streams
MAX_REMEMBERED_IDS = 4096  # migrationID -> peer cluster, kept after forget (reuse check)
MAX_NAME_CHARS = 253
# Longest accepted text per SyncState field (the rest: MAX_NAME_CHARS).
_TEXT_LIMITS = {"token": 512, "failure_reason": 4096, "phase": 64, "switchover": 64}
_MAX_PORT = 65535

_AUTH_CONTEXT_CERT_KEY = "x509_pem_cert"
_X509_HOSTNAME_MISMATCH = 62
_X509_CERT_HAS_EXPIRED = 10

_ROLE_TO_PROTO = {
    Role.SENDER: sync_pb2.SYNC_ROLE_SENDER,
    Role.RECEIVER: sync_pb2.SYNC_ROLE_RECEIVER,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}


class Refused(Exception):
    """A frame or a peer breaks a rule: the stream ends with ``code`` and this message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _malformed(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed sync frame: {message}")


# -- SyncState <-> the wire ---------------------------------------------------------------


def state_to_proto(state: SyncState) -> sync_pb2.SyncState:
    msg = sync_pb2.SyncState()
    for f in fields(SyncState):
        value = getattr(state, f.name)
        setattr(msg, f.name, _ROLE_TO_PROTO[value] if f.name == "role" else value)
    return msg


def state_from_proto(msg: sync_pb2.SyncState) -> SyncState:
    """The SyncState of a frame; :class:`Refused` (malformed) saying which field is wrong."""
    values: dict[str, Any] = {}
    for f in fields(SyncState):
        value = getattr(msg, f.name)
        if isinstance(value, str):
            limit = _TEXT_LIMITS.get(f.name, MAX_NAME_CHARS)
            if len(value) > limit:
                raise _malformed(f"{f.name} is {len(value)} characters (at most {limit})")
        values[f.name] = value
    if not msg.migration_id:
        raise _malformed("a state without a migration_id")
    if msg.role not in _ROLE_FROM_PROTO:
        raise _malformed(f"state of migrationID {msg.migration_id!r} has no role (sender/receiver)")
    if msg.target_port > _MAX_PORT:
        raise _malformed(f"target_port {msg.target_port} is not a port")
    values["role"] = _ROLE_FROM_PROTO[msg.role]
    return SyncState(**values)


# -- streams --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Stream:
    """One Exchange stream (either direction) and the migrations it carries."""

    peer: str  # the peer cluster's registered name ("" until known: plaintext, before hello)
    describe: str  # for messages: "peer at HOST:PORT" / "peer cluster NAME (addr)"
    client_for: str = ""  # the migration a client stream was opened for
    migrations: set[str] = field(default_factory=set)
    sent: dict[str, SyncState] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _split_host_port(url: str) -> tuple[str, int]:
    text = url.removeprefix("https://").removeprefix("grpcs://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise PeerError(f"connectURL {url!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class SyncLink:
    """:class:`~sync_controller.peer.PeerLink` over mTLS gRPC; see the module docstring.

    ``tls`` is this sync controller's identity (``vmferry pki issue sync``); None =
    plaintext (tests only): the peer cluster is then the name its hello announces."""

    def __init__(
        self,
        cluster_name: str,
        tls: TlsFiles | None,
        peers: PeerCAs,
        *,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.cluster_name = cluster_name
        self.on_peer_update: Callable[[SyncState], None] = lambda state: None
        self._tls = tls
        self._peers = peers
        self._listen = listen
        self._ours: dict[str, SyncState] = {}
        self._theirs: dict[str, SyncState] = {}
        self._peer_of: OrderedDict[str, str] = OrderedDict()  # migrationID -> peer cluster
        self._errors: dict[str, str] = {}
        self._clients: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._streams: set[_Stream] = set()
        self._server: grpc.aio.Server | None = None
        self._views: dict[Role, RoleView] = {}
        self.port = 0

    def view(self, role: Role) -> RoleView:
        """The link as the reconciler of ``role`` sees it (a PeerLink of its own): its
        ``on_peer_update`` gets only the peer halves of migrations where this cluster holds
        ``role`` (so the sending and receiving reconcilers each set their own callback)."""
        if role not in self._views:
            self._views[role] = RoleView(self, role)
        return self._views[role]

    # -- PeerLink ------------------------------------------------------------------------

    def connect(self, migration_id: str, connect_url: str) -> None:
        current = self._clients.get(migration_id)
        if current is not None and current[0] == connect_url and not current[1].done():
            return
        if current is not None:
            current[1].cancel()
        elif len(self._clients) >= MAX_MIGRATIONS:
            self._set_error(
                migration_id,
                f"not connecting to {connect_url}: {MAX_MIGRATIONS} migrations are "
                "synchronized already",
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._dial_loop(migration_id, connect_url), name=f"sync-dial-{migration_id}"
        )
        self._clients[migration_id] = (connect_url, task)

    def publish(self, state: SyncState) -> None:
        mid = state.migration_id
        if mid not in self._ours and len(self._ours) >= MAX_MIGRATIONS:
            log.error(
                "not publishing migrationID %s: %d migrations are synchronized already "
                "(at most %d)",
                mid,
                len(self._ours),
                MAX_MIGRATIONS,
            )
            return
        if self._ours.get(mid) == state:
            return
        self._ours[mid] = state
        for stream in self._streams:
            if mid in stream.migrations:
                stream.wake.set()

    def latest(self, migration_id: str) -> SyncState | None:
        return self._theirs.get(migration_id)

    def peer_cluster(self, migration_id: str) -> str | None:
        return self._peer_of.get(migration_id)

    def connection_error(self, migration_id: str) -> str | None:
        if any(migration_id in s.migrations for s in self._streams):
            return None
        return self._errors.get(migration_id)

    def forget(self, migration_id: str) -> None:
        client = self._clients.pop(migration_id, None)
        if client is not None:
            client[1].cancel()
        self._ours.pop(migration_id, None)
        self._theirs.pop(migration_id, None)
        self._errors.pop(migration_id, None)
        for stream in self._streams:
            stream.migrations.discard(migration_id)
            stream.sent.pop(migration_id, None)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> int:
        """Listen (mTLS unless plaintext); returns the port (``listen`` may say port 0)."""
        options = dict(grpc_options.server_options())
        options["grpc.max_receive_message_length"] = MAX_FRAME_BYTES
        options["grpc.max_send_message_length"] = MAX_FRAME_BYTES
        server = grpc.aio.server(options=list(options.items()), maximum_concurrent_rpcs=MAX_STREAMS)
        sync_pb2_grpc.add_SyncServicer_to_server(_Servicer(self), server)
        try:
            if self._tls is None:
                port = server.add_insecure_port(self._listen)
            else:
                # Client roots: the registered peer CAs (with none registered, this
                # cluster's own CA: a handshake may pass, the per-stream check refuses it).
                peers = self._peers
                creds = await asyncio.to_thread(
                    registry_server_credentials,
                    self._tls,
                    lambda: peers.version,
                    lambda ca_pem: peers.bundle() or ca_pem,
                    "the sync server",
                )
                port = server.add_secure_port(self._listen, creds)
        except RuntimeError:
            port = 0
        if not port:
            await server.stop(None)
            raise PeerError(
                f"sync controller cannot listen on {self._listen} (address in use or not "
                "on this host)"
            )
        await server.start()
        self._server, self.port = server, port
        log.info("sync controller %s listening on %s", self.cluster_name, self._listen)
        return port

    async def close(self) -> None:
        tasks = [task for _, task in self._clients.values()]
        self._clients.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.stop(grace=1)
            self._server = None

    async def run(self) -> None:
        """Serve until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    # -- frames ----------------------------------------------------------------------------

    def _hello(self) -> sync_pb2.SyncFrame:
        return sync_pb2.SyncFrame(
            hello=sync_pb2.SyncHello(
                protocol_version=SYNC_PROTOCOL_VERSION, cluster_name=self.cluster_name
            )
        )

    @staticmethod
    def _check_hello(frame: sync_pb2.SyncFrame | None, describe: str) -> str:
        """The cluster name of a hello frame, or Refused."""
        if frame is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"{describe} closed the stream")
        if frame.WhichOneof("frame") != "hello":
            raise _malformed(
                f"the first frame must be a hello, got {frame.WhichOneof('frame') or 'an empty frame'}"
            )
        if frame.hello.protocol_version != SYNC_PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"sync protocol version {frame.hello.protocol_version} not supported "
                f"(this sync controller speaks {SYNC_PROTOCOL_VERSION})",
            )
        name = frame.hello.cluster_name
        if not name or len(name) > MAX_NAME_CHARS:
            raise _malformed("the hello names no cluster (or a name over 253 characters)")
        return name

    def _receive(self, stream: _Stream, frame: sync_pb2.SyncFrame) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "heartbeat":
            return
        if kind != "state":
            raise _malformed(f"unexpected {kind or 'empty'} frame after the hello")
        state = state_from_proto(frame.state)
        mid = state.migration_id
        if stream.client_for and mid != stream.client_for:
            raise _malformed(
                f"a state of migrationID {mid!r} on the stream of migrationID {stream.client_for!r}"
            )
        first = self._peer_of.get(mid)
        if first is not None and first != stream.peer:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"migrationID {mid!r} belongs to a migration with peer cluster {first}: "
                f"refused from peer cluster {stream.peer} (reused migrationID)",
            )
        ours = self._ours.get(mid)
        if ours is not None and ours.role == state.role:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer cluster {stream.peer} also holds the {state.role} half of migrationID "
                f"{mid!r} (each side must hold the other half)",
            )
        if mid not in self._theirs and len(self._theirs) >= MAX_MIGRATIONS:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"migrationID {mid!r} refused: {MAX_MIGRATIONS} migrations are synchronized "
                "already",
            )
        self._bind(mid, stream.peer)
        if mid not in stream.migrations:
            stream.migrations.add(mid)
            stream.wake.set()  # our half goes out on this stream now
        self._errors.pop(mid, None)
        if self._theirs.get(mid) != state:
            self._theirs[mid] = state
            listeners = [self.on_peer_update] + [
                view.on_peer_update for role, view in self._views.items() if role != state.role
            ]
            for listener in listeners:
                try:
                    listener(state)
                except Exception:
                    log.exception("on_peer_update failed for migrationID %s", mid)

    def _bind(self, mid: str, peer: str) -> None:
        self._peer_of[mid] = peer
        self._peer_of.move_to_end(mid)
        while len(self._peer_of) > MAX_REMEMBERED_IDS:
            old, _ = self._peer_of.popitem(last=False)
            if old in self._ours or old in self._theirs:  # never drop a live one
                self._peer_of[old] = _
                break

    async def _exchange(
        self,
        stream: _Stream,
        read: Callable[[], Awaitable[sync_pb2.SyncFrame | None]],
        write: Callable[[sync_pb2.SyncFrame], Awaitable[None]],
    ) -> None:
        """Run one stream after the hellos until it ends: Refused (a rule broken) or
        PeerError (the peer went away or fell silent)."""

        async def reader() -> None:
            while True:
                try:
                    frame = await asyncio.wait_for(read(), SILENCE_SECONDS)
                except TimeoutError:
                    raise PeerError(
                        f"{stream.describe} sent nothing for {SILENCE_SECONDS:.0f} s"
                    ) from None
                if frame is None:
                    raise PeerError(f"{stream.describe} closed the stream")
                self._receive(stream, frame)

        async def writer() -> None:
            last_full = -RESEND_SECONDS
            while True:
                now = time.monotonic()
                full = now - last_full >= RESEND_SECONDS
                sent = 0
                stream.wake.clear()
                for mid in list(stream.migrations):
                    state = self._ours.get(mid)
                    if state is not None and (full or stream.sent.get(mid) != state):
                        await write(sync_pb2.SyncFrame(state=state_to_proto(state)))
                        stream.sent[mid] = state
                        sent += 1
                if full:
                    if not sent:
                        await write(sync_pb2.SyncFrame(heartbeat=sync_pb2.SyncHeartbeat()))
                    last_full = now
                with contextlib.suppress(TimeoutError):
                    wait = max(0.0, RESEND_SECONDS - (time.monotonic() - last_full))
                    await asyncio.wait_for(stream.wake.wait(), wait)

        self._streams.add(stream)
        for mid in stream.migrations:
            self._errors.pop(mid, None)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(reader())
                tg.create_task(writer())
        except BaseExceptionGroup as group:
            for exc in group.exceptions:
                if isinstance(exc, Refused | PeerError | grpc.aio.AioRpcError):
                    raise exc from None
            raise
        finally:
            self._streams.discard(stream)

    def _stream_ended(self, stream: _Stream, reason: str) -> None:
        for mid in stream.migrations:
            if (mid in self._ours or mid in self._theirs) and not any(
                mid in s.migrations for s in self._streams
            ):
                self._errors[mid] = reason

    # -- server side -------------------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        """The registered name of the peer cluster calling, or Refused saying why not."""
        pems = (context.auth_context() or {}).get(_AUTH_CONTEXT_CERT_KEY) or []
        if not pems:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate: a peer cluster's sync controller must present its "
                "certificate",
            )
        cert = x509.load_pem_x509_certificate(bytes(pems[0]))
        peer = self._peers.issuer_of(cert)
        if peer is None:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {cert.subject.rfc4514_string()} was issued by "
                f"{cert.issuer.rfc4514_string()}, no registered peer CA of cluster "
                f"{self.cluster_name} ({no_peer_ca_rule()})",
            )
        cn = common_name(cert)
        if cn != SYNC_IDENTITY:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate of peer cluster {peer} names CN={cn!r}: only a sync "
                f"controller (CN={SYNC_IDENTITY}) may synchronize migrations",
            )
        return peer

    async def serve_stream(self, context: grpc.aio.ServicerContext) -> None:
        addr = context.peer()
        stream: _Stream | None = None
        try:
            # The hello is read first, also from a peer about to be refused: the refusal
            # then reaches the client as the status of its first read, never as a failed
            # write that would hide the reason.
            read = _reader(context.read)
            first = await asyncio.wait_for(read(), SILENCE_SECONDS)
            peer = "" if self._tls is None else self._authenticate(context)
            describe = f"peer cluster {peer} ({addr})" if peer else f"peer at {addr}"
            hello_name = self._check_hello(first, describe)
            if not peer:
                peer = hello_name  # plaintext (tests): the hello is all there is
                describe = f"peer cluster {peer} ({addr})"
            elif hello_name != peer:
                log.info("peer cluster %s (registered name) calls itself %s", peer, hello_name)
            await context.write(self._hello())
            stream = _Stream(peer=peer, describe=describe)
            await self._exchange(stream, read, context.write)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello frame in time")
        except Refused as e:
            log.warning("sync stream from %s refused: %s", addr, e)
            if stream is not None:
                self._stream_ended(stream, f"stream from {stream.describe} refused: {e}")
            await context.abort(e.code, str(e))
        except PeerError as e:
            log.info("sync stream from %s ended: %s", addr, e)
            if stream is not None:
                self._stream_ended(stream, str(e))
        except asyncio.CancelledError:
            if stream is not None:
                self._stream_ended(stream, f"{stream.describe} disconnected")
            raise

    # -- client side -------------------------------------------------------------------------

    async def _dial_loop(self, mid: str, url: str) -> None:
        backoff = BACKOFF_MIN_SECONDS
        while True:
            established = asyncio.Event()
            try:
                await self._dial_once(mid, url, established)
            except (PeerError, Refused) as e:
                self._set_error(mid, str(e))
            except grpc.aio.AioRpcError as e:
                self._set_error(mid, _rpc_error(url, e))
            except Exception as e:  # never let the loop die: say what happened
                log.exception("sync stream to %s for migrationID %s", url, mid)
                self._set_error(mid, f"sync stream to {url} failed: {e}")
            if established.is_set():  # it worked: the first retry is quick
                backoff = BACKOFF_MIN_SECONDS
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    def _set_error(self, mid: str, message: str) -> None:
        if self._errors.get(mid) != message:
            log.warning("migrationID %s: %s", mid, message)
        self._errors[mid] = message

    async def _dial_once(self, mid: str, url: str, established: asyncio.Event) -> None:
        host, port = _split_host_port(url)
        target = grpc_options.host_port(host, port)
        options = dict(grpc_options.channel_options(grpc_options.MIGRATION_KEEPALIVE_MS))
        options["grpc.max_receive_message_length"] = MAX_FRAME_BYTES
        options["grpc.max_send_message_length"] = MAX_FRAME_BYTES
        peer = ""
        if self._tls is None:
            channel = grpc.aio.insecure_channel(target, options=list(options.items()))
        else:
            peer, ca_pem = await self._probe(url, host, port)
            first = self._peer_of.get(mid)
            if first is not None and first != peer:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"migrationID {mid!r} belongs to a migration with peer cluster {first}, "
                    f"but {url} is peer cluster {peer} (reused migrationID)",
                )
            _, cert_pem, key_pem = await asyncio.to_thread(_read_pair, self._tls)
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
            )
            channel = grpc.aio.secure_channel(target, creds, options=list(options.items()))
        describe = f"peer cluster {peer} at {url}" if peer else f"peer at {url}"
        stream: _Stream | None = None
        async with channel:
            call = sync_pb2_grpc.SyncStub(channel).Exchange()
            read = _reader(call.read)
            try:
                await asyncio.wait_for(call.write(self._hello()), CONNECT_TIMEOUT_SECONDS)
                hello_name = self._check_hello(
                    await asyncio.wait_for(read(), CONNECT_TIMEOUT_SECONDS), describe
                )
                if not peer:
                    peer, describe = hello_name, f"peer cluster {hello_name} at {url}"
                stream = _Stream(peer=peer, describe=describe, client_for=mid, migrations={mid})
                self._bind(mid, peer)  # connected: the migrationID is this peer's now
                established.set()
                await self._exchange(stream, read, call.write)
            except TimeoutError:
                call.cancel()
                raise PeerError(
                    f"{describe}: no hello within {CONNECT_TIMEOUT_SECONDS:.0f} s"
                ) from None
            except Refused as e:
                call.cancel()
                raise Refused(e.code, f"{describe}: {e}") from None
            except PeerError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED:
                    raise
                raise PeerError(_rpc_error(url, e)) from None
            except asyncio.CancelledError:
                call.cancel()
                raise
            finally:
                if stream is not None:
                    self._stream_ended(stream, f"{describe} disconnected")

    async def _probe(self, url: str, host: str, port: int) -> tuple[str, bytes]:
        """TLS-handshake with ``url`` trusting only the registered peer CAs; return the peer
        cluster (the registered name of the CA that issued the server's certificate) and
        that CA's PEM, or PeerError saying which rule failed."""
        assert self._tls is not None
        bundle = self._peers.bundle()
        if not bundle:
            raise PeerError(
                f"peer at {url} cannot be trusted: no registered peer CA "
                f"(ConfigMap {PEERS_NAMESPACE}/{PEERS_CONFIGMAP} is missing or empty)"
            )
        ctx = await asyncio.to_thread(_client_context, bundle, self._tls)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host),
                CONNECT_TIMEOUT_SECONDS,
            )
        except ssl.SSLCertVerificationError as e:
            if e.verify_code == _X509_HOSTNAME_MISMATCH:
                raise PeerError(
                    f"peer at {url} presented a certificate not valid for {host} "
                    f"({e.verify_message})"
                ) from None
            if e.verify_code == _X509_CERT_HAS_EXPIRED:
                raise PeerError(f"peer at {url} presented an expired certificate") from None
            raise PeerError(
                f"peer at {url} presented a certificate of no registered peer CA "
                f"({e.verify_message}; {no_peer_ca_rule()})"
            ) from None
        except ssl.SSLError as e:
            raise PeerError(f"TLS handshake with peer at {url} failed: {e.reason or e}") from None
        except TimeoutError:
            raise PeerError(
                f"peer at {url} did not complete a TLS handshake within "
                f"{CONNECT_TIMEOUT_SECONDS:.0f} s"
            ) from None
        except OSError as e:
            raise PeerError(f"cannot connect to peer at {url}: {e.strerror or e}") from None
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            # TLS 1.3: the server judges our certificate after our side of the handshake;
            # its verdict (an alert) or its HTTP/2 preface comes next.
            try:
                data = await asyncio.wait_for(reader.read(1), PROBE_VERDICT_SECONDS)
            except ssl.SSLError as e:
                raise PeerError(
                    f"peer at {url} refused our certificate ({e.reason or e}): this cluster's "
                    f"CA must be registered in its ConfigMap {PEERS_NAMESPACE}/{PEERS_CONFIGMAP}"
                ) from None
            except TimeoutError:
                data = b"?"
            except OSError as e:
                raise PeerError(f"peer at {url} closed the connection: {e}") from None
            if not data:  # gRPC closes the connection without an alert
                raise PeerError(
                    f"peer at {url} refused our certificate (it closed the connection after "
                    "the TLS handshake): this cluster's CA must be registered in its ConfigMap "
                    f"{PEERS_NAMESPACE}/{PEERS_CONFIGMAP}"
                )
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        if not der:
            raise PeerError(f"peer at {url} presented no certificate")
        cert = x509.load_der_x509_certificate(der)
        peer = self._peers.issuer_of(cert)
        if peer is None:  # the peers changed in between
            raise PeerError(
                f"peer at {url} presented a certificate of no registered peer CA "
                f"({no_peer_ca_rule()})"
            )
        cn = common_name(cert)
        if cn != SYNC_IDENTITY:
            raise PeerError(
                f"peer at {url} (peer cluster {peer}) is not a sync controller: its "
                f"certificate names CN={cn!r}, expected CN={SYNC_IDENTITY}"
            )
        pem = self._peers.pem(peer)
        if pem is None:
            raise PeerError(f"peer cluster {peer} was unregistered meanwhile")
        return peer, pem


def _client_context(bundle: bytes, tls: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.load_verify_locations(cadata=bundle.decode())
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _reader(
    read: Callable[[], Awaitable[Any]],
) -> Callable[[], Awaitable[sync_pb2.SyncFrame | None]]:
    """A read of a gRPC stream returning None at its end (instead of grpc.aio.EOF)."""

    async def next_frame() -> sync_pb2.SyncFrame | None:
        try:
            frame = await read()
        except DecodeError as e:
            raise _malformed(f"not a SyncFrame ({e})") from None
        if frame is grpc.aio.EOF:
            return None
        assert isinstance(frame, sync_pb2.SyncFrame)
        return frame

    return next_frame


def _rpc_error(url: str, e: grpc.aio.AioRpcError) -> str:
    code = e.code()
    if code in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        return f"peer at {url} refused the stream: {e.details()}"
    return f"sync stream to {url} failed: {code.name}: {e.details()}"


class RoleView:
    """:meth:`SyncLink.view`: a PeerLink sharing one SyncLink, with its own callback."""

    def __init__(self, link: SyncLink, role: Role) -> None:
        self.role = role
        self.on_peer_update: Callable[[SyncState], None] = lambda state: None
        self._link = link

    def connect(self, migration_id: str, connect_url: str) -> None:
        self._link.connect(migration_id, connect_url)

    def publish(self, state: SyncState) -> None:
        self._link.publish(state)

    def latest(self, migration_id: str) -> SyncState | None:
        return self._link.latest(migration_id)

    def peer_cluster(self, migration_id: str) -> str | None:
        return self._link.peer_cluster(migration_id)

    def connection_error(self, migration_id: str) -> str | None:
        return self._link.connection_error(migration_id)

    def forget(self, migration_id: str) -> None:
        self._link.forget(migration_id)


class _Servicer(sync_pb2_grpc.SyncServicer):
    def __init__(self, link: SyncLink) -> None:
        self._link = link

    async def Exchange(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self._link.serve_stream(context)


if TYPE_CHECKING:  # both are PeerLinks (mypy checks it here)
    _LINK: PeerLink = SyncLink("", None, PeerCAs())
    _VIEW: PeerLink = SyncLink("", None, PeerCAs()).view(Role.SENDER)
