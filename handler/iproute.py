"""The ``ip`` command (iproute2) of the handler's network stack, asynchronously.

The one place the handler runs ``ip``: the migration network's bring-up
(handler/migration_network.py) and the source's "which NIC do the migration connections
leave by" (handler/net_counters.py). Everything goes through an :data:`IpRunner` so tests
can answer with a fake.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

IP_BINARY = "ip"

IpRunner = Callable[[Sequence[str]], Awaitable[str]]
"""Runs ``ip ARGS...``; returns its stdout or raises IpError (its stderr)."""


class IpError(RuntimeError):
    """``ip`` failed; the message is what it said (e.g. "RTNETLINK answers: Operation not
    permitted")."""


async def run_ip(args: Sequence[str]) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            IP_BINARY,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise IpError("the ip command (iproute2) is not installed on this node") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        said = err.decode(errors="replace").strip()
        raise IpError(said or f"ip {' '.join(args)} exited with status {proc.returncode}")
    return out.decode(errors="replace")


@dataclass(frozen=True)
class Link:
    """One network interface and its IPv4 addresses (``ip -j addr show``)."""

    name: str
    up: bool  # administratively up (the UP flag)
    addresses: tuple[ipaddress.IPv4Interface, ...]

    def has(self, address: ipaddress.IPv4Address) -> bool:
        return any(a.ip == address for a in self.addresses)


def parse_links(text: str) -> dict[str, Link]:
    """``ip -j addr show`` output → name → Link (IPv4 addresses only)."""
    out: dict[str, Link] = {}
    for item in json.loads(text or "[]"):
        if not isinstance(item, dict) or "ifname" not in item:
            continue
        addrs = tuple(
            ipaddress.IPv4Interface(f"{a['local']}/{a.get('prefixlen', 32)}")
            for a in item.get("addr_info") or []
            if a.get("family") == "inet" and a.get("local")
        )
        out[str(item["ifname"])] = Link(
            name=str(item["ifname"]), up="UP" in (item.get("flags") or []), addresses=addrs
        )
    return out


async def links(ip: IpRunner = run_ip) -> dict[str, Link]:
    """Every interface of this network stack."""
    return parse_links(await ip(["-j", "addr", "show"]))


async def route_interface(address: str, ip: IpRunner = run_ip) -> str:
    """The interface packets to ``address`` leave by (``ip -j route get``): ``lo`` for
    an address of this network stack."""
    routes: list[Any] = json.loads(await ip(["-j", "route", "get", address]) or "[]")
    for route in routes:
        if isinstance(route, dict) and route.get("dev"):
            return str(route["dev"])
    raise IpError(f"no route to {address}")
