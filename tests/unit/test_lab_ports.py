"""The lab's ports: never the same port twice in one process (two components of one lab
on one port made the second fail with "address already in use"), and outside the
kernel's ephemeral range."""

from __future__ import annotations

from vmferry.lab.ports import _lab_port_range, free_port


def test_ports_handed_out_are_distinct_and_in_the_lab_range() -> None:
    low, high = _lab_port_range()
    ports = [free_port("127.0.0.1") for _ in range(1000)]  # random picks: ~20 repeats
    assert len(set(ports)) == len(ports)
    assert all(low <= port <= high for port in ports)
