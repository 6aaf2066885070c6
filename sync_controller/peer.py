"""The seam between the sync controller's transport (:mod:`sync_controller.link`: mTLS gRPC
to the peer clusters' sync controllers) and its reconcilers (:mod:`sync_controller.sender`,
:mod:`sync_controller.receiver`), so that the reconcilers are unit-tested with a fake link.

Level-triggered: a reconciler ``publish``es the whole state of its half of a migration
whenever it may have changed; the link delivers the latest one (again after a reconnect,
and every few seconds) and keeps the peer's latest half for ``latest``. ``on_peer_update``
is called (on the event loop) whenever the peer's half of a migration arrives changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vmferry.decentralized import SyncState


class PeerError(Exception):
    """A peer cannot be reached or trusted; the message says which rule failed."""


class PeerLink(Protocol):
    on_peer_update: Callable[[SyncState], None]

    def connect(self, migration_id: str, connect_url: str) -> None:
        """Sender side: keep a connection to the sync controller at ``connect_url`` for
        ``migration_id`` (idempotent; reconnects with backoff until ``forget``)."""

    def publish(self, state: SyncState) -> None:
        """Our half of ``state.migration_id``, to deliver to the peer (latest wins)."""

    def latest(self, migration_id: str) -> SyncState | None:
        """The peer's latest half of ``migration_id``, or None when nothing came yet."""

    def peer_cluster(self, migration_id: str) -> str | None:
        """The registered name of the peer cluster of ``migration_id`` (the name its CA
        is registered under in this cluster's peers ConfigMap), once connected."""

    def connection_error(self, migration_id: str) -> str | None:
        """Why the link to the peer of ``migration_id`` is down now (None: it is up or
        was never asked for), e.g. "peer at 198.51.100.5:7445 presented a certificate
        of no registered peer CA"."""

    def forget(self, migration_id: str) -> None:
        """The migration ended on both sides: stop delivering its state."""
