"""Registers this node's ``Node`` object and keeps it Ready with heartbeats.

The migration endpoint (address, port and the migration network's state) is read from
the shared :class:`MigrationEndpoint` at every heartbeat: ``status.migrationEndpoint``,
the ``MigrationIP`` address, ``status.migrationNetwork`` and the ``MigrationNetworkReady``
condition (only while a migration network is assigned)."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
from dataclasses import dataclass
from typing import Any

from handler.endpoint import MigrationEndpoint
from vmferry.client import ApiClient
from vmferry.errors import AlreadyExists, ApiError
from vmferry.migration_network import MIGRATION_IP, NODE_CONDITION, STATUS_FIELD
from vmferry.objects import conditions
from vmferry.objects.quantity import format_quantity

log = logging.getLogger(__name__)
Obj = dict[str, Any]

HANDLER_VERSION = "v0.1.0"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    memory_bytes: int
    cpu_model: str
    cpus: int
    main_address: str


def host_cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), or the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


class NodeAgent:
    def __init__(
        self,
        api: ApiClient,
        info: NodeInfo,
        endpoint: MigrationEndpoint,
        *,
        heartbeat_seconds: float,
    ) -> None:
        self.api = api
        self.info = info
        self.endpoint = endpoint
        self.interval = heartbeat_seconds
        # the migration network's condition, kept so its lastTransitionTime moves only
        # when it flips
        self._network_condition: Obj = {}
        self._lock = asyncio.Lock()  # one status write at a time: the newest lands last

    def _status(self) -> Obj:
        i = self.info
        memory = format_quantity(i.memory_bytes)
        address, port = self.endpoint.published()
        status: Obj = {
            "capacity": {"memory": memory, "cpu": str(i.cpus)},
            "allocatable": {"memory": memory, "cpu": str(i.cpus)},
            "addresses": [
                {"type": "InternalIP", "address": i.main_address},
                {"type": MIGRATION_IP, "address": address},
                {"type": "Hostname", "address": socket.gethostname()},
            ],
            "nodeInfo": {
                "cpuModel": i.cpu_model,
                "hostname": socket.gethostname(),
                "handlerVersion": HANDLER_VERSION,
                "kernelVersion": platform.release(),
                "operatingSystem": "linux",
                "architecture": platform.machine(),
            },
            "migrationEndpoint": {"address": address, "port": port},
        }
        if self.endpoint.settled:  # a merge patch: None removes it (no network assigned)
            status[STATUS_FIELD] = None
        conditions.set_condition(
            status,
            "Ready",
            True,
            "HandlerReady",
            "vmferry-handler is posting ready status",
            lastHeartbeatTime=conditions.now_rfc3339(),
        )
        network = self.endpoint.network
        if network is not None:
            status[STATUS_FIELD] = network.as_dict()
            conditions.set_condition(
                self._network_condition,
                NODE_CONDITION,
                network.ready,
                "InterfaceReady" if network.ready else "InterfaceNotReady",
                (
                    f"serving migrations on {network.address} ({network.interface}) of "
                    f"{network.network}"
                    if network.ready
                    else network.message
                ),
            )
            status["conditions"].extend(self._network_condition["conditions"])
        else:
            self._network_condition = {}
        return status

    async def register(self) -> None:
        """Create or refresh the Node (labels, capacity, addresses); retries until it works."""
        while True:
            try:
                await self._register_once()
                log.info("node %s registered (pid %d)", self.info.name, os.getpid())
                return
            except ApiError as e:
                log.warning("cannot register node %s yet: %s", self.info.name, e)
                await asyncio.sleep(1.0)

    async def _register_once(self) -> None:
        node: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.info.name, "labels": self._labels()},
            "spec": {},
        }
        try:
            await self.api.create(node)
        except AlreadyExists:
            current = await self.api.get("Node", None, self.info.name)
            current["metadata"]["labels"] = {
                **(current["metadata"].get("labels") or {}),
                **self._labels(),
            }
            await self.api.update(current)
        await self.heartbeat()

    def _labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": self.info.name,
            "kubernetes.io/arch": "amd64" if platform.machine() == "x86_64" else platform.machine(),
            **self.info.labels,
        }

    async def heartbeat(self) -> None:
        async with self._lock:
            await self.api.patch(
                "Node", None, self.info.name, {"status": self._status()}, subresource="status"
            )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.heartbeat()
            except ApiError as e:
                log.warning("heartbeat failed: %s", e)
