"""Who may stream a migration to this node: the security checks of both target services.

The memvm Transfer service and the QEMU Tunnel service admit a stream only through
:meth:`PeerGate.admit`, in this order:

0. the first frame is the protocol's Hello (memvm) or Open (QEMU);
1. it names a migration registered here (the hand-off names this node as
   the target) that accepts a stream now (NOT_FOUND otherwise: nothing is revealed about
   other migrations);
2. the peer's client certificate was issued by the right CA (``peers.MigrationTrust.
   issuer_refusal``: this cluster's own CA in-cluster; the registered CA of the hand-off's
   ``peerCluster`` across clusters) and names the hand-off's source node
   (PERMISSION_DENIED; skipped only when the handler runs without TLS, in tests);
3. the stream token equals the migration's, compared in constant time
   (``secrets.compare_digest``; PERMISSION_DENIED);
4. the service's own rules for the first frame (version, geometry, channels;
   INVALID_ARGUMENT).

A reconnect (memvm ``Hello.resume``) passes the same checks -- the same source node's
certificate and the same token -- and is taken only where ``accepts_resume`` says: while
pre-copy receives (a short drop of the migration network, ridden out by the source) or
while the guest runs here in post-copy.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import grpc

from handler import stream
from handler.migration import tunnel
from handler.migration.target_state import TargetState
from handler.peers import MigrationTrust
from vmferry import pki
from vmferry.pki.identity import _AUTH_CONTEXT_CERT_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")


class Expected(Protocol):
    """What the checks read of a migration expected here (an IncomingMigration; a stream
    worker's one channel)."""

    @property
    def migration_uid(self) -> str: ...

    @property
    def token(self) -> str: ...

    @property
    def source_node(self) -> str: ...

    @property
    def peer_cluster(self) -> str: ...


M = TypeVar("M", bound=Expected)


def accepts_resume(state: TargetState) -> bool:
    """A migration in ``state`` takes a reconnecting source's channels: pre-copy
    receiving (nothing decided, no final round begun) or post-copy with the guest
    running here."""
    return state is TargetState.RECEIVING or state.guest_runs_here


def accepts_hello(state: TargetState, resume: bool) -> bool:
    """A migration in ``state`` takes this Hello: a first connection before the
    decision; a reconnect where ``accepts_resume`` says."""
    return accepts_resume(state) if resume else not state.decided


class Refused(Exception):
    """A stream is not admitted; ``code`` and the message are its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerGate(Generic[M]):
    """The admission checks over a registry of expected migrations."""

    def __init__(
        self,
        registry: Mapping[str, M],
        *,
        require_peer_identity: bool,
        trust: MigrationTrust | None = None,
    ) -> None:
        self.registry = registry
        self.require_peer_identity = require_peer_identity
        # Which CA must have issued a stream's certificate (None: whatever the TLS
        # handshake accepted, which then trusts this cluster's CA only).
        self.trust = trust

    def check(
        self,
        peer: pki.Identity | None,
        migration_uid: str,
        token: str,
        *,
        acceptable: Callable[[M], bool],
        what: str = "migration",
        cert_pem: bytes | None = None,
    ) -> M:
        """The registered migration the stream is for; Refused when it may not stream.
        ``acceptable`` says whether the migration takes a stream in its current state
        (and of this kind); ``what`` names the kind in the NOT_FOUND message;
        ``cert_pem`` is the peer's verified certificate (``peer`` its identity)."""
        inc = self.registry.get(migration_uid)
        if inc is None or not acceptable(inc):
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"no {what} {migration_uid!r} is expected on this node",
            )
        if self.require_peer_identity:
            refusal = self._peer_refusal(peer, cert_pem, inc)
            if refusal is not None:
                log.warning(
                    "migration %s: refused stream from %s: %s",
                    inc.migration_uid,
                    peer.user if peer else "an unauthenticated peer",
                    refusal,
                )
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, refusal)
        if not secrets.compare_digest(token.encode(), inc.token.encode()):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "wrong migration token")
        return inc

    def _peer_refusal(
        self, peer: pki.Identity | None, cert_pem: bytes | None, inc: M
    ) -> str | None:
        """Why this peer may not stream ``inc`` (None: it may): the CA that issued its
        certificate, then its CN."""
        if self.trust is not None:
            refusal = self.trust.issuer_refusal(cert_pem, inc.migration_uid, inc.peer_cluster)
            if refusal is not None:
                return refusal
        elif inc.peer_cluster:
            return (
                f"migration {inc.migration_uid} comes from peer cluster {inc.peer_cluster}, "
                "but this node has no peer trust configured"
            )
        if peer is None or peer.node_name != inc.source_node:
            who = f"CN {peer.user}" if peer else "an unauthenticated peer"
            return (
                f"{who} is not the source node {inc.source_node} of migration {inc.migration_uid}"
            )
        return None

    async def admit(
        self,
        context: grpc.aio.ServicerContext,
        first: Any,
        kind: str,
        *,
        acceptable: Callable[[M], bool],
        check: Callable[[M, Any], T],
        what: str = "migration",
    ) -> tuple[M, T]:
        """Admit a stream whose first frame is ``first`` (a SourceFrame or a
        TunnelSourceFrame): it must be a ``kind`` frame (the Hello or the Open, which both
        carry migration_uid and token), pass check() (a refusal ends the call with its
        status), then ``check(inc, hello)``, the service's own rules for the frame (a
        protocol error ends the call with INVALID_ARGUMENT). Returns the migration and
        what ``check`` returned."""
        if first.WhichOneof("frame") != kind:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first frame must be {kind.capitalize()}",
            )
        hello = getattr(first, kind)
        try:
            inc = self.check(
                pki.peer_identity(context),
                hello.migration_uid,
                hello.token,
                acceptable=acceptable,
                what=what,
                cert_pem=peer_certificate(context),
            )
        except Refused as e:
            await abort(context, e.code, str(e))
        try:
            return inc, check(inc, hello)
        except (stream.ProtocolError, tunnel.ProtocolError) as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))


def peer_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    """The PEM of the caller's verified client certificate (None without one)."""
    pems = (context.auth_context() or {}).get(_AUTH_CONTEXT_CERT_KEY) or []
    return bytes(pems[0]) if pems else None


async def abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort`` (which raises) for the type checker."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")
