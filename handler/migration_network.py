"""The handler's half of the dedicated migration network (vmferry/migration_network.py
is the contract).

``NetworkAgent`` watches this node's Node for the controller's
:class:`NetworkAssignment` (annotation ``ASSIGNMENT_ANNOTATION``) and brings it up:

- with an address (whereabouts): ``ip addr replace <address> dev <interface>`` and
  ``ip link set <interface> up`` in this handler's network stack, then checks that the
  address is on the NIC;
- without (static): the NIC's own IPv4 address inside the NAD's range.

It then moves the migration service there (``MigrationServer.rebind``: a new server on
the new address first, the old one drained in the background, so a migration in flight
finishes where it started and guests never notice), updates the shared
:class:`MigrationEndpoint` (which the Node status and ``targetNodeAddress`` read) and
pushes a heartbeat. A NIC that is missing, an address that cannot be configured or
found is reported (``NodeNetworkStatus(ready=False, message=...)``) and migrations go on
being served on the configured ``migration_address``; migrations over the network are
refused (the controller, and the target's prepare check) rather than silently taking
another network. When the assignment is removed, the service goes back to
``migration_address`` and an address this handler added is removed once nothing uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import grpc

from handler import iproute
from handler.endpoint import MigrationEndpoint
from vmferry import grpc_options
from vmferry.migration_network import NetworkAssignment, NodeNetworkStatus

log = logging.getLogger(__name__)
Obj = dict[str, Any]

RECHECK_SECONDS = 10.0  # s between checks of an assignment (a NIC that appears, an address gone)
DRAIN_POLL_SECONDS = 1.0  # s between checks whether the old server's migrations ended
DRAIN_GRACE_SECONDS = 300.0  # s streams still open on a drained server get to finish


class ListenError(RuntimeError):
    """The migration service cannot listen on an address."""


# -- the bring-up ------------------------------------------------------------------------


def _not_ready(a: NetworkAssignment, message: str) -> NodeNetworkStatus:
    return NodeNetworkStatus(a.network, a.interface, "", ready=False, message=message)


async def bring_up(
    a: NetworkAssignment, ip: iproute.IpRunner = iproute.run_ip, *, configure: bool = True
) -> NodeNetworkStatus:
    """Configure (or find) this node's address on the assigned network; never raises.
    ``configure=False`` never changes the network stack: an assigned address must be on
    the NIC already (a handler sharing its host's network stack in a test lab)."""
    try:
        network = ipaddress.IPv4Network(a.range, strict=False)
        wanted = ipaddress.IPv4Interface(a.address) if a.address else None
    except ValueError as e:
        return _not_ready(a, f"the assignment is not usable: {e}")
    try:
        link = (await iproute.links(ip)).get(a.interface)
    except (iproute.IpError, ValueError) as e:
        return _not_ready(a, f"cannot list the network interfaces: {e}")
    if link is None:
        return _not_ready(a, f"no network interface {a.interface} on this node")
    if wanted is None:
        if not link.up:
            return _not_ready(a, f"network interface {a.interface} is down")
        own = [i.ip for i in link.addresses if i.ip in network]
        if not own:
            return _not_ready(a, f"network interface {a.interface} has no address in {network}")
        return NodeNetworkStatus(a.network, a.interface, str(own[0]), ready=True)
    if not (link.up and wanted in link.addresses):
        if not configure:
            return _not_ready(
                a,
                f"{wanted} is not on network interface {a.interface} (or it is down) and "
                "this handler does not configure addresses (configure_migration_network "
                "= false)",
            )
        try:
            await ip(["addr", "replace", str(wanted), "dev", a.interface])
            await ip(["link", "set", a.interface, "up"])
            link = (await iproute.links(ip)).get(a.interface)
        except (iproute.IpError, ValueError) as e:
            return _not_ready(a, f"cannot configure {wanted} on {a.interface}: {e}")
        if link is None or not link.has(wanted.ip):
            return _not_ready(
                a, f"{wanted} is not on network interface {a.interface} after 'ip addr replace'"
            )
    return NodeNetworkStatus(a.network, a.interface, str(wanted.ip), ready=True)


async def release(interface: str, address: str, ip: iproute.IpRunner = iproute.run_ip) -> None:
    """Remove an address this handler added (logged, never raised, when it fails)."""
    try:
        await ip(["addr", "del", address, "dev", interface])
        log.info("removed %s from %s", address, interface)
    except iproute.IpError as e:
        log.warning("cannot remove %s from %s: %s", address, interface, e)


# -- the migration service's listener ------------------------------------------------------


class Server(Protocol):
    """What MigrationServer uses of a grpc.aio.Server."""

    def add_insecure_port(self, address: str) -> int: ...

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int: ...

    async def start(self) -> None: ...

    async def stop(self, grace: float | None) -> None: ...


def new_grpc_server() -> Server:
    server: Server = grpc.aio.server(options=grpc_options.server_options())
    return server


class MigrationServer:
    """The migration service (every target service, ``register``) listening on one
    address at a time, at ``port``; ``rebind`` moves it without dropping a migration.

    ``credentials`` makes the TLS credentials of each new server (None: plain text);
    ``pending`` lists the incoming migrations this node expects now (their uids): a
    server left behind keeps serving until every migration it was expecting at the
    switch has ended, then stops with a long grace for streams still open."""

    def __init__(
        self,
        register: Callable[[Any], None],
        port: int,
        credentials: Callable[[], grpc.ServerCredentials] | None,
        *,
        pending: Callable[[], Collection[str]] = tuple,
        make_server: Callable[[], Server] = new_grpc_server,
        drain_poll: float = DRAIN_POLL_SECONDS,
        drain_grace: float = DRAIN_GRACE_SECONDS,
    ) -> None:
        self.register = register
        self.port = port
        self.credentials = credentials
        self.pending = pending
        self.make_server = make_server
        self.drain_poll = drain_poll
        self.drain_grace = drain_grace
        self.address = ""
        self.server: Server | None = None
        self.draining: dict[asyncio.Task[None], tuple[Server, str]] = {}  # -> (server, address)

    async def _open(self, address: str) -> Server:
        server = self.make_server()
        self.register(server)
        listen = f"{address}:{self.port}"
        try:
            if self.credentials is None:
                port = server.add_insecure_port(listen)
            else:
                credentials = await asyncio.to_thread(self.credentials)
                port = server.add_secure_port(listen, credentials)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            raise ListenError(f"cannot listen on {listen} for migrations: {e}") from None
        if port == 0:
            raise ListenError(f"cannot listen on {listen} for migrations")
        await server.start()
        return server

    async def start(self, address: str) -> None:
        self.server = await self._open(address)
        self.address = address
        log.info("migration service on %s:%d", address, self.port)

    async def rebind(
        self, address: str, *, after: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Serve on ``address`` from now on: the new server listens before the old one is
        told to stop (ListenError, the old one untouched, when it cannot). ``after`` runs
        once the old server has stopped (releasing its address)."""
        new = await self._open(address)
        old, old_address = self.server, self.address
        self.server, self.address = new, address
        log.info("migration service moved from %s to %s:%d", old_address, address, self.port)
        if old is not None:
            expected = set(self.pending())
            task = asyncio.create_task(self._drain(old, old_address, expected, after))
            self.draining[task] = (old, old_address)
            task.add_done_callback(lambda t: self.draining.pop(t, None))

    async def _drain(
        self,
        old: Server,
        address: str,
        expected: set[str],
        after: Callable[[], Awaitable[None]] | None,
    ) -> None:
        while expected & set(self.pending()):  # noqa: ASYNC110 - a poll a second is plenty
            await asyncio.sleep(self.drain_poll)
        log.info("migration service on %s:%d: stopping (its migrations ended)", address, self.port)
        await old.stop(grace=self.drain_grace)  # refuses new calls, lets open ones finish
        self.draining.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if after is not None:
            await after()

    def serves_on(self, address: str) -> bool:
        """A server (the current one, or one draining) listens on ``address``."""
        return address in {self.address, *(a for _, a in self.draining.values())}

    async def close(self, grace: float = 1.0) -> None:
        """Stop every server (shutdown)."""
        for task in list(self.draining):
            task.cancel()
        servers = [s for s, _ in self.draining.values()] + ([self.server] if self.server else [])
        self.draining.clear()
        self.server = None
        await asyncio.gather(*(s.stop(grace=grace) for s in servers), return_exceptions=True)


# -- the agent ---------------------------------------------------------------------------


class NodeSource(Protocol):
    """What the agent uses of an Informer on Node."""

    synced: asyncio.Event

    def add_handler(self, fn: Callable[[Any, Obj | None, Obj | None], None]) -> None: ...

    def get(self, namespace: str, name: str) -> Obj | None: ...


class NetworkAgent:
    """Brings this node's assignment up and keeps the endpoint and the server on it."""

    def __init__(
        self,
        node: str,
        nodes: NodeSource,
        endpoint: MigrationEndpoint,
        server: MigrationServer,
        *,
        main_address: str,
        on_change: Callable[[], Awaitable[None]],
        ip: iproute.IpRunner = iproute.run_ip,
        configure: bool = True,
        recheck: float = RECHECK_SECONDS,
    ) -> None:
        self.node = node
        self.nodes = nodes
        self.endpoint = endpoint
        self.server = server
        self.main_address = main_address  # the configured migration_address
        self.on_change = on_change
        self.ip = ip
        self.configure = configure  # False: never run ip addr/link changes (bring_up)
        self.recheck = recheck
        self.added: set[tuple[str, str]] = set()  # (interface, address/prefix) added here
        self._wake = asyncio.Event()
        nodes.add_handler(self._on_node)

    def _on_node(self, key: Any, old: Obj | None, new: Obj | None) -> None:
        """Wake on a change of this node's assignment (not on every heartbeat)."""
        if key[1] == self.node and self._of(old) != self._of(new):
            self._wake.set()

    @staticmethod
    def _of(node: Obj | None) -> NetworkAssignment | None:
        return NetworkAssignment.of_node(node) if node is not None else None

    def assignment(self) -> NetworkAssignment | None:
        return self._of(self.nodes.get("", self.node))

    async def run(self) -> None:
        await self.nodes.synced.wait()
        while True:
            self._wake.clear()
            try:
                await self.apply(self.assignment())
            except Exception:  # the next pass tries again; the handler goes on serving
                log.exception("migration network: the pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.recheck)

    async def apply(self, assignment: NetworkAssignment | None) -> None:
        """One pass: the assignment up, the server on its address, the endpoint current."""
        status = (
            await bring_up(assignment, self.ip, configure=self.configure)
            if assignment is not None
            else None
        )
        if assignment is not None and assignment.address and status is not None and status.ready:
            self.added.add((assignment.interface, assignment.address))
        address = status.address if status is not None and status.ready else self.main_address
        if address != self.server.address:
            try:
                await self.server.rebind(address, after=self._release_unused)
            except ListenError as e:
                log.error("%s", e)
                if status is not None:
                    status = dataclasses.replace(status, address="", ready=False, message=str(e))
                address = self.server.address
        else:
            await self._release_unused()
        ep = self.endpoint
        before = (ep.address, ep.network, ep.settled)
        ep.address, ep.network, ep.settled = address, status, True
        if (address, status, True) != before:
            if status is None:
                what = "none assigned"
            elif status.ready:
                what = f"{status.network} ready on {status.interface}"
            else:
                what = f"{status.network} not ready: {status.message}"
            log.info("migration network: %s; migrations served on %s", what, address)
            try:
                await self.on_change()
            except Exception as e:  # the periodic heartbeat carries it later
                log.warning("cannot publish the migration endpoint yet: %s", e)

    async def _release_unused(self) -> None:
        """Remove the addresses this handler added that the assignment no longer names
        and no server listens on any more."""
        a = self.assignment()
        for interface, address in sorted(self.added):
            if a is not None and (a.interface, a.address) == (interface, address):
                continue
            if self.server.serves_on(str(ipaddress.IPv4Interface(address).ip)):
                continue
            self.added.discard((interface, address))
            await release(interface, address, self.ip)
