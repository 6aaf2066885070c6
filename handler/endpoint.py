"""This node's migration endpoint as it is now: one mutable object that everything
publishing it reads (the Node status in node_agent.py, ``targetNodeAddress`` in
vm_incoming.py) and only the migration network (migration_network.py) changes."""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.migration_network import NodeNetworkStatus


@dataclass
class MigrationEndpoint:
    address: str  # where the migration service listens now
    port: int
    # migration_advertise: what sources dial when it differs (NAT, a test's relay)
    advertise: tuple[str, int] | None = None
    # the assignment's state (Node.status.migrationNetwork); None: no migration network
    # is assigned, migrations use the configured migration_address
    network: NodeNetworkStatus | None = None
    # the network agent has looked at the assignment once: until then ``network`` says
    # nothing (a restarted handler must not report "no network" for a moment)
    settled: bool = False

    def published(self) -> tuple[str, int]:
        """Where sources reach the migration service (``targetNodeAddress``/``Port``,
        ``Node.status.migrationEndpoint``)."""
        return self.advertise if self.advertise is not None else (self.address, self.port)
