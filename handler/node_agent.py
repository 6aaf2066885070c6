"""Registers this node's ``Node`` object and keeps it Ready with heartbeats."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
from dataclasses import dataclass
from typing import Any

from vmferry.client import ApiClient
from vmferry.errors import AlreadyExists, ApiError
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
    migration_address: str
    migration_port: int


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
    def __init__(self, api: ApiClient, info: NodeInfo, *, heartbeat_seconds: float) -> None:
        self.api = api
        self.info = info
        self.interval = heartbeat_seconds

    def _status(self) -> Obj:
        i = self.info
        memory = format_quantity(i.memory_bytes)
        status: Obj = {
            "capacity": {"memory": memory, "cpu": str(i.cpus)},
            "allocatable": {"memory": memory, "cpu": str(i.cpus)},
            "addresses": [
                {"type": "InternalIP", "address": i.main_address},
                {"type": "Migration", "address": i.migration_address},
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
            "migrationEndpoint": {"address": i.migration_address, "port": i.migration_port},
        }
        conditions.set_condition(
            status,
            "Ready",
            True,
            "HandlerReady",
            "vmferry-handler is posting ready status",
            lastHeartbeatTime=conditions.now_rfc3339(),
        )
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
