"""Which network carried a migration: per-interface byte counters of this network stack.

Both source engines (memvm and QEMU, through ``SourceEngine``) keep one
:class:`NetworkMeter`: at the start it resolves the interface the migration connections
leave by (the route to ``targetNodeAddress``) and reads every interface's counters
(``/sys/class/net/<if>/statistics/{tx,rx}_bytes``); each later sample gives the delta
per non-loopback interface since the start. They land in ``migrationState.transfer``
as ``networkInterface``, ``networkBytes`` and ``networkSeconds`` (``Stats.as_status``).

The counters are the handler's network namespace's (``ip netns exec`` mounts a
``/sys`` of that namespace). They count everything the interface carried, the
migration's bytes and anything else at the same time: the proof is that the
migration's wire bytes show up on the migration network's interface and not on the
main one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from handler import iproute

log = logging.getLogger(__name__)

SYSFS_NET = Path("/sys/class/net")
ARPHRD_LOOPBACK = 772  # /sys/class/net/<if>/type of a loopback interface
LOOPBACK = "lo"


def read_counters(root: Path = SYSFS_NET) -> dict[str, int]:
    """tx_bytes + rx_bytes of every non-loopback interface under ``root`` (blocking: run
    it in a thread). An interface that vanishes while being read is left out."""
    out: dict[str, int] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            kind = int((entry / "type").read_text().strip() or 0)
        except (OSError, ValueError):
            kind = ARPHRD_LOOPBACK if entry.name == LOOPBACK else 0
        if kind == ARPHRD_LOOPBACK:
            continue
        stats = entry / "statistics"
        try:
            out[entry.name] = int((stats / "tx_bytes").read_text()) + int(
                (stats / "rx_bytes").read_text()
            )
        except (OSError, ValueError):
            continue
    return out


def counter_delta(start: dict[str, int], end: dict[str, int]) -> dict[str, int]:
    """Bytes per interface between two readings, for interfaces present in both (a
    counter that went backwards, an interface re-created, counts 0)."""
    return {name: max(0, end[name] - start[name]) for name in sorted(end) if name in start}


async def local_interface(address: str, ip: iproute.IpRunner = iproute.run_ip) -> str:
    """The interface connections to ``address`` (an IP or a host name) leave by."""
    try:
        ipaddress.ip_address(address)
    except ValueError:  # a name: what it resolves to
        infos = await asyncio.get_running_loop().getaddrinfo(
            address, None, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
        address = str(infos[0][4][0])
    return await iproute.route_interface(address, ip)


@dataclass(frozen=True)
class NetworkFigures:
    """What ``migrationState.transfer`` says about the network that carried it."""

    interface: str  # "" when it could not be resolved
    bytes: dict[str, int]  # non-loopback interface -> bytes (tx + rx) in the window
    seconds: float  # the window's wall time

    def as_status(self) -> dict[str, object]:
        out: dict[str, object] = {
            "networkBytes": dict(self.bytes),
            "networkSeconds": round(self.seconds, 3),
        }
        if self.interface:
            out["networkInterface"] = self.interface
        return out


class NetworkMeter:
    """One migration's window on this node's interface counters: ``start`` once, then
    ``sample`` whenever the figures should be current. Never fails a migration: a
    counter or route that cannot be read is logged and left out."""

    def __init__(
        self,
        root: Path = SYSFS_NET,
        *,
        ip: iproute.IpRunner = iproute.run_ip,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.ip = ip
        self.clock = clock
        self.interface = ""
        self._start: dict[str, int] | None = None
        self._started_at = 0.0
        self.figures: NetworkFigures | None = None
        self._starting: asyncio.Task[None] | None = None

    def begin(self, target_address: str) -> None:
        """``start`` in the background: the migration does not wait for the route lookup
        (a subprocess); ``sample`` does."""
        self._starting = asyncio.create_task(self.start(target_address))

    async def start(self, target_address: str) -> None:
        self._started_at = self.clock()
        self._start = await asyncio.to_thread(read_counters, self.root)
        try:
            self.interface = await local_interface(target_address, self.ip)
        except (iproute.IpError, OSError, ValueError) as e:
            log.warning("cannot tell which interface reaches %s: %s", target_address, e)
        self.figures = NetworkFigures(self.interface, {}, 0.0)

    async def sample(self) -> NetworkFigures | None:
        """The figures since ``start`` (None before it)."""
        if self._starting is not None:
            await asyncio.shield(self._starting)
        if self._start is None:
            return None
        now = await asyncio.to_thread(read_counters, self.root)
        self.figures = NetworkFigures(
            self.interface, counter_delta(self._start, now), self.clock() - self._started_at
        )
        return self.figures
