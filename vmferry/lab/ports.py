"""Ports for the lab's components: free now, outside the kernel's ephemeral range, and
never the same twice in one process (``free_port``)."""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LAB_PORTS = (10000, 32767)  # below Linux's default ephemeral range (32768-60999)


@functools.cache
def _lab_port_range() -> tuple[int, int]:
    """LAB_PORTS, or a range clear of this machine's ephemeral range if that differs."""
    low, high = LAB_PORTS
    try:
        eph_low, eph_high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return low, high
    if low <= eph_high and eph_low <= high:  # overlapping: stay below or above it
        return (1024, eph_low - 1) if eph_low - 1024 > 4096 else (eph_high + 1, 65535)
    return low, high


_next_port: list[int] = []  # this process's cursor in the lab range (set on first use)


def free_port(address: str) -> int:
    """A TCP port on ``address`` that nothing holds now, for a component to listen on later.

    Chosen outside the kernel's ephemeral range: a port from that range (what bind to
    port 0 hands out) can become the local port of any outgoing connection between now
    and the moment the component binds it -- seen here: a handler's metrics port taken
    that way, and the handler failing to start. Consecutive ports from a random start per
    process: one lab never gets the same port twice (independent random picks did: two
    components on one port, one failing with "address already in use"), and two labs
    started at once by two processes rarely overlap."""
    low, high = _lab_port_range()
    if not _next_port:
        _next_port.append(random.SystemRandom().randint(low, high))
    for _ in range(high - low + 1):
        port = _next_port[0]
        _next_port[0] = port + 1 if port < high else low
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried is taken: let the kernel choose
        s.bind((address, 0))
        chosen: int = s.getsockname()[1]
        return chosen
