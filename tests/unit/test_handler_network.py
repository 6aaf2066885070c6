"""The handler's half of the migration network with fakes: the bring-up of an assignment
(``ip`` answered by a fake network stack), the migration service moving to the new
address (a new server listening before the old one is told to stop, the old one
stopped with a grace once its migrations ended), the shared endpoint and the Node
status built from it, and the per-interface byte counters the source records."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from handler import iproute, net_counters
from handler.endpoint import MigrationEndpoint
from handler.migration.stats import Stats
from handler.migration_network import (
    ListenError,
    MigrationServer,
    NetworkAgent,
    bring_up,
)
from handler.node_agent import NodeAgent, NodeInfo
from vmferry.migration_network import (
    ASSIGNMENT_ANNOTATION,
    MIGRATION_IP,
    NODE_CONDITION,
    STATUS_FIELD,
    NetworkAssignment,
    NodeNetworkStatus,
    nad_key,
)

Obj = dict[str, Any]
NAD = nad_key("migration-net")
RANGE = "198.51.100.0/24"
MAIN = "192.0.2.11"
PORT = 7444
WHEREABOUTS = NetworkAssignment(NAD, "eth1", RANGE, "198.51.100.11/24")
STATIC = NetworkAssignment(NAD, "eth1", RANGE)
EPERM = "RTNETLINK answers: Operation not permitted"


class FakeIp:
    """A network stack answering ``ip`` as iproute2 does (the parts the handler uses)."""

    def __init__(self, **links: list[str]) -> None:
        self.links: dict[str, Obj] = {
            name: {"up": name == "lo", "addrs": [ipaddress.IPv4Interface(a) for a in addrs]}
            for name, addrs in links.items()
        }
        self.calls: list[list[str]] = []
        self.refuse = ""  # stderr of every change (an unprivileged handler)
        self.routes: dict[str, str] = {}

    async def __call__(self, args: Sequence[str]) -> str:
        args = list(args)
        self.calls.append(args)
        if args[:3] == ["-j", "addr", "show"]:
            return json.dumps(
                [
                    {
                        "ifname": name,
                        "flags": ["UP"] if link["up"] else [],
                        "addr_info": [
                            {"family": "inet", "local": str(a.ip), "prefixlen": a.network.prefixlen}
                            for a in link["addrs"]
                        ]
                        + [{"family": "inet6", "local": "fe80::1", "prefixlen": 64}],
                    }
                    for name, link in self.links.items()
                ]
            )
        if args[:3] == ["-j", "route", "get"]:
            return json.dumps([{"dst": args[3], "dev": self.routes.get(args[3], "eth0")}])
        if self.refuse:
            raise iproute.IpError(self.refuse)
        if args[:2] == ["addr", "replace"]:
            link = self.link(args[4])
            address = ipaddress.IPv4Interface(args[2])
            link["addrs"] = [a for a in link["addrs"] if a.ip != address.ip] + [address]
            return ""
        if args[:2] == ["addr", "del"]:
            link = self.link(args[4])
            link["addrs"] = [a for a in link["addrs"] if a != ipaddress.IPv4Interface(args[2])]
            return ""
        if args[:2] == ["link", "set"] and args[3] == "up":
            self.link(args[2])["up"] = True
            return ""
        raise AssertionError(f"unexpected ip {args}")

    def link(self, name: str) -> Obj:
        if name not in self.links:
            raise iproute.IpError(f'Cannot find device "{name}"')
        return self.links[name]

    def changes(self) -> list[list[str]]:
        return [c for c in self.calls if c[0] != "-j"]


# -- bring-up ----------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_parse_links_keeps_ipv4_addresses_and_the_up_flag() -> None:
    text = json.dumps(
        [
            {
                "ifname": "eth1",
                "flags": ["BROADCAST", "UP", "LOWER_UP"],
                "addr_info": [
                    {"family": "inet", "local": "198.51.100.11", "prefixlen": 24},
                    {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
                ],
            },
            {"ifname": "eth2", "flags": ["BROADCAST"], "addr_info": []},
        ]
    )
    links = iproute.parse_links(text)
    assert links["eth1"].up and links["eth1"].addresses == (
        ipaddress.IPv4Interface("198.51.100.11/24"),
    )
    assert links["eth1"].has(ipaddress.IPv4Address("198.51.100.11"))
    assert not links["eth2"].up and links["eth2"].addresses == ()


@pytest.mark.timeout(10)
def test_whereabouts_address_is_configured_and_confirmed() -> None:
    ip = FakeIp(lo=["127.0.0.1/8"], eth0=[f"{MAIN}/24"], eth1=[])
    status = asyncio.run(bring_up(WHEREABOUTS, ip))
    assert status == NodeNetworkStatus(NAD, "eth1", "198.51.100.11", ready=True)
    assert ip.changes() == [
        ["addr", "replace", "198.51.100.11/24", "dev", "eth1"],
        ["link", "set", "eth1", "up"],
    ]
    # Already there and up: nothing to change (an unprivileged handler stays ready).
    ip.calls.clear()
    ip.refuse = EPERM
    assert asyncio.run(bring_up(WHEREABOUTS, ip)).ready and ip.changes() == []


@pytest.mark.timeout(10)
def test_a_handler_told_not_to_configure_never_changes_the_network_stack() -> None:
    ip = FakeIp(eth1=[])
    status = asyncio.run(bring_up(WHEREABOUTS, ip, configure=False))
    assert not status.ready and "configure_migration_network = false" in status.message
    assert ip.changes() == []
    ip.links["eth1"] = {"up": True, "addrs": [ipaddress.IPv4Interface("198.51.100.11/24")]}
    assert asyncio.run(bring_up(WHEREABOUTS, ip, configure=False)).ready


@pytest.mark.parametrize(
    ("assignment", "links", "refuse", "message"),
    [
        (WHEREABOUTS, {"eth0": [f"{MAIN}/24"]}, "", "no network interface eth1 on this node"),
        (STATIC, {"eth0": [f"{MAIN}/24"]}, "", "no network interface eth1 on this node"),
        (
            WHEREABOUTS,
            {"eth1": []},
            EPERM,
            f"cannot configure 198.51.100.11/24 on eth1: {EPERM}",
        ),
        (
            STATIC,
            {"eth1": ["203.0.113.5/24"]},
            "",
            f"network interface eth1 has no address in {RANGE}",
        ),
        (
            NetworkAssignment(NAD, "eth1", "not-a-cidr"),
            {"eth1": []},
            "",
            "the assignment is not usable",
        ),
    ],
)
@pytest.mark.timeout(10)
def test_bring_up_says_what_is_missing(
    assignment: NetworkAssignment, links: dict[str, list[str]], refuse: str, message: str
) -> None:
    ip = FakeIp(**links)
    for link in ip.links.values():
        link["up"] = True
    ip.refuse = refuse
    status = asyncio.run(bring_up(assignment, ip))
    assert not status.ready and status.address == "" and status.message.startswith(message)
    assert (status.network, status.interface) == (NAD, "eth1")


@pytest.mark.timeout(10)
def test_static_uses_the_nics_own_address_in_the_range() -> None:
    ip = FakeIp(eth1=["203.0.113.5/24", "198.51.100.40/24"])
    ip.links["eth1"]["up"] = True
    status = asyncio.run(bring_up(STATIC, ip))
    assert status == NodeNetworkStatus(NAD, "eth1", "198.51.100.40", ready=True)
    assert ip.changes() == []
    ip.links["eth1"]["up"] = False
    assert asyncio.run(bring_up(STATIC, ip)).message == "network interface eth1 is down"


# -- the server moving -------------------------------------------------------------------


class FakeServer:
    """A grpc.aio.Server's lifecycle, recorded in a shared event log."""

    def __init__(self, events: list[str], bind_ok: bool = True) -> None:
        self.events = events
        self.bind_ok = bind_ok
        self.address = ""
        self.stopped = asyncio.Event()

    def add_insecure_port(self, address: str) -> int:
        self.address = address
        return PORT if self.bind_ok else 0

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        raise AssertionError("plain text in these tests")

    async def start(self) -> None:
        self.events.append(f"start {self.address}")

    async def stop(self, grace: float | None) -> None:
        self.events.append(f"stop {self.address} grace={grace}")
        self.stopped.set()


class Servers:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.made: list[FakeServer] = []
        self.registered: list[FakeServer] = []
        self.pending: set[str] = set()
        self.fail_next = False

    def make(self) -> FakeServer:
        server = FakeServer(self.events, bind_ok=not self.fail_next)
        self.fail_next = False
        self.made.append(server)
        return server

    def server(self) -> MigrationServer:
        return MigrationServer(
            self.registered.append,
            PORT,
            None,
            pending=lambda: self.pending,
            make_server=self.make,
            drain_poll=0.01,
            drain_grace=300.0,
        )


@pytest.mark.timeout(10)
def test_rebind_listens_on_the_new_address_before_the_old_server_drains() -> None:
    async def main() -> None:
        s = Servers()
        server = s.server()
        await server.start(MAIN)
        s.pending = {"mig-1"}  # a migration in flight on the old address
        await server.rebind("198.51.100.11")
        assert server.address == "198.51.100.11" and server.serves_on(MAIN)
        assert s.registered == s.made  # every server serves the same services
        await asyncio.sleep(0.05)
        assert s.events == [f"start {MAIN}:{PORT}", f"start 198.51.100.11:{PORT}"]
        # A migration prepared after the switch does not hold the old server.
        s.pending = {"mig-2"}
        await asyncio.wait_for(s.made[0].stopped.wait(), 5)
        assert s.events[-1] == f"stop {MAIN}:{PORT} grace=300.0"
        assert not server.serves_on(MAIN)
        await server.close(grace=1)
        assert s.events[-1] == f"stop 198.51.100.11:{PORT} grace=1"

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_a_failed_bind_keeps_the_old_server() -> None:
    async def main() -> None:
        s = Servers()
        server = s.server()
        await server.start(MAIN)
        s.fail_next = True
        with pytest.raises(ListenError, match=f"cannot listen on 198.51.100.11:{PORT}"):
            await server.rebind("198.51.100.11")
        assert server.address == MAIN and server.server is s.made[0]
        assert s.events == [f"start {MAIN}:{PORT}"]
        await server.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_a_real_stream_in_flight_survives_the_move() -> None:
    """Real gRPC servers on loopback: a stream opened on the old address goes on after
    the move; new calls reach the new address and the old one refuses them."""
    method = "/vmferry.test.Echo/Stream"

    async def echo(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield request

    def register(server: Any) -> None:
        handler = grpc.stream_stream_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("vmferry.test.Echo", {"Stream": handler}),)
        )

    def open_stream(channel: grpc.aio.Channel) -> Any:
        return channel.stream_stream(method)()

    async def main() -> None:
        pending = {"mig-1"}
        server = MigrationServer(register, 0, None, pending=lambda: pending, drain_poll=0.01)
        # port 0 would differ per server: take a free one and use it for both.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server.port = port
        await server.start("127.0.0.1")
        old = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = open_stream(old)
        await call.write(b"before")
        assert await call.read() == b"before"
        await server.rebind("127.0.0.2")
        await call.write(b"after the move")
        assert await call.read() == b"after the move"
        new = grpc.aio.insecure_channel(f"127.0.0.2:{port}")
        fresh = open_stream(new)
        await fresh.write(b"new")
        assert await fresh.read() == b"new"
        pending.clear()  # the migration ended: the old server stops
        await call.done_writing()
        await asyncio.wait_for(asyncio.gather(*server.draining), 10)
        retry = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            late = open_stream(retry)
            await late.write(b"late")
            await asyncio.wait_for(late.read(), 5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for channel in (old, new, retry):
            await channel.close()
        await server.close()

    asyncio.run(main())


# -- the agent: the endpoint and the Node status --------------------------------------------


class FakeNodes:
    def __init__(self, node: Obj) -> None:
        self.node = node
        self.synced = asyncio.Event()
        self.synced.set()
        self.handlers: list[Any] = []

    def add_handler(self, fn: Any) -> None:
        self.handlers.append(fn)

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.node if name == self.node["metadata"]["name"] else None

    def assign(self, a: NetworkAssignment | None) -> None:
        old = self.node
        annotations = {ASSIGNMENT_ANNOTATION: a.to_json()} if a is not None else {}
        self.node = {"metadata": {"name": "node1", "annotations": annotations}}
        for fn in self.handlers:
            fn(("", "node1"), old, self.node)


class Harness:
    def __init__(self, ip: FakeIp) -> None:
        self.ip = ip
        self.servers = Servers()
        self.server = self.servers.server()
        self.nodes = FakeNodes({"metadata": {"name": "node1"}})
        self.endpoint = MigrationEndpoint(MAIN, PORT)
        self.heartbeats: list[tuple[str, NodeNetworkStatus | None]] = []
        self.agent = NetworkAgent(
            "node1",
            self.nodes,
            self.endpoint,
            self.server,
            main_address=MAIN,
            on_change=self.heartbeat,
            ip=ip,
        )
        self.node_agent = NodeAgent(
            None,  # type: ignore[arg-type]
            NodeInfo("node1", {}, 2**30, "cpu", 2, MAIN),
            self.endpoint,
            heartbeat_seconds=2,
        )

    async def heartbeat(self) -> None:
        self.heartbeats.append((self.endpoint.address, self.endpoint.network))

    async def pass_(self, a: NetworkAssignment | None) -> None:
        self.nodes.assign(a)
        await self.agent.apply(self.agent.assignment())

    def status(self) -> Obj:
        return self.node_agent._status()


def addresses(status: Obj) -> dict[str, str]:
    return {a["type"]: a["address"] for a in status["addresses"]}


def condition(status: Obj, ctype: str) -> Obj | None:
    return next((c for c in status["conditions"] if c["type"] == ctype), None)


@pytest.mark.timeout(10)
def test_agent_moves_the_endpoint_to_the_network_and_back() -> None:
    async def main() -> None:
        h = Harness(FakeIp(lo=["127.0.0.1/8"], eth0=[f"{MAIN}/24"], eth1=[]))
        await h.server.start(MAIN)
        before = h.status()
        assert STATUS_FIELD not in before  # not settled: a restarted handler says nothing yet
        assert addresses(before)[MIGRATION_IP] == MAIN
        assert condition(before, NODE_CONDITION) is None

        await h.pass_(None)
        assert h.status()[STATUS_FIELD] is None  # removed by the merge patch
        assert h.heartbeats == [(MAIN, None)]

        await h.pass_(WHEREABOUTS)
        ready = NodeNetworkStatus(NAD, "eth1", "198.51.100.11", ready=True)
        assert h.endpoint.address == "198.51.100.11" and h.endpoint.network == ready
        assert h.server.address == "198.51.100.11"
        assert h.heartbeats[-1] == ("198.51.100.11", ready)  # pushed right after the change
        status = h.status()
        assert status[STATUS_FIELD] == ready.as_dict()
        assert status["migrationEndpoint"] == {"address": "198.51.100.11", "port": PORT}
        assert addresses(status) == {
            "InternalIP": MAIN,
            MIGRATION_IP: "198.51.100.11",
            "Hostname": addresses(status)["Hostname"],
        }
        cond = condition(status, NODE_CONDITION)
        assert cond is not None and cond["status"] == "True" and "198.51.100.11" in cond["message"]
        assert condition(status, "Ready") is not None
        since = cond["lastTransitionTime"]
        again = condition(h.status(), NODE_CONDITION)
        assert again is not None and again["lastTransitionTime"] == since

        # A pass with nothing changed: no new heartbeat, no new server.
        count, made = len(h.heartbeats), len(h.servers.made)
        await h.agent.apply(h.agent.assignment())
        assert len(h.heartbeats) == count and len(h.servers.made) == made

        # Removed: back on the configured address; the address added is removed once
        # the server that listened on it stopped.
        await h.pass_(None)
        assert h.endpoint.address == MAIN and h.endpoint.network is None
        assert h.status()[STATUS_FIELD] is None
        assert condition(h.status(), NODE_CONDITION) is None
        await asyncio.wait_for(asyncio.gather(*h.server.draining), 5)
        assert ["addr", "del", "198.51.100.11/24", "dev", "eth1"] in h.ip.changes()
        assert h.ip.links["eth1"]["addrs"] == []
        await h.server.close()

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_agent_not_ready_serves_on_the_configured_address_and_says_why() -> None:
    async def main() -> None:
        h = Harness(FakeIp(eth0=[f"{MAIN}/24"]))
        await h.server.start(MAIN)
        await h.pass_(WHEREABOUTS)
        assert h.endpoint.address == MAIN and h.server.address == MAIN
        status = h.status()
        assert status[STATUS_FIELD] == {
            "network": NAD,
            "interface": "eth1",
            "address": "",
            "ready": False,
            "message": "no network interface eth1 on this node",
        }
        cond = condition(status, NODE_CONDITION)
        assert cond is not None and cond["status"] == "False"
        assert cond["message"] == "no network interface eth1 on this node"
        assert addresses(status)[MIGRATION_IP] == MAIN
        await h.server.close()

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_agent_reports_a_failed_bind_as_not_ready() -> None:
    async def main() -> None:
        h = Harness(FakeIp(eth1=[]))
        await h.server.start(MAIN)
        h.servers.fail_next = True
        await h.pass_(WHEREABOUTS)
        assert h.endpoint.address == MAIN and h.endpoint.network is not None
        assert not h.endpoint.network.ready
        assert "cannot listen on 198.51.100.11:7444" in h.endpoint.network.message
        await h.server.close()

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_migration_advertise_overrides_the_published_endpoint() -> None:
    endpoint = MigrationEndpoint("198.51.100.11", PORT, advertise=("127.0.2.3", 9999))
    assert endpoint.published() == ("127.0.2.3", 9999)
    assert MigrationEndpoint(MAIN, PORT).published() == (MAIN, PORT)


@pytest.mark.timeout(10)
def test_agent_wakes_only_on_an_assignment_change() -> None:
    h = Harness(FakeIp())
    h.nodes.assign(WHEREABOUTS)
    assert h.agent._wake.is_set()
    h.agent._wake.clear()
    h.nodes.assign(WHEREABOUTS)  # a heartbeat: same annotation
    assert not h.agent._wake.is_set()


# -- the counters --------------------------------------------------------------------------


def fake_sysfs(root: Path, counters: dict[str, tuple[int, int]], loopback: str = "lo") -> None:
    for name, (tx, rx) in counters.items():
        stats = root / name / "statistics"
        stats.mkdir(parents=True, exist_ok=True)
        (stats / "tx_bytes").write_text(f"{tx}\n")
        (stats / "rx_bytes").write_text(f"{rx}\n")
        (root / name / "type").write_text("772\n" if name == loopback else "1\n")


@pytest.mark.timeout(10)
def test_counters_skip_loopback_and_sum_both_directions(tmp_path: Path) -> None:
    fake_sysfs(tmp_path, {"lo": (5, 5), "eth0": (100, 20), "eth1": (7, 3)})
    assert net_counters.read_counters(tmp_path) == {"eth0": 120, "eth1": 10}
    assert net_counters.read_counters(tmp_path / "missing") == {}
    assert net_counters.counter_delta(
        {"eth0": 120, "eth1": 10, "gone": 1}, {"eth0": 100, "eth1": 50, "new": 9}
    ) == {
        "eth0": 0,
        "eth1": 40,
    }


@pytest.mark.timeout(10)
def test_meter_records_the_interface_and_the_bytes_of_the_window(tmp_path: Path) -> None:
    async def main() -> None:
        fake_sysfs(tmp_path, {"lo": (0, 0), "eth0": (1000, 1000), "eth1": (0, 0)})
        ip = FakeIp()
        ip.routes["198.51.100.12"] = "eth1"
        now = [100.0]
        meter = net_counters.NetworkMeter(tmp_path, ip=ip, clock=lambda: now[0])
        assert await meter.sample() is None
        await meter.start("198.51.100.12")
        assert meter.interface == "eth1"
        fake_sysfs(tmp_path, {"lo": (9, 9), "eth0": (1100, 1050), "eth1": (2**30, 2**20)})
        now[0] = 102.5
        figures = await meter.sample()
        assert figures == net_counters.NetworkFigures(
            "eth1", {"eth0": 150, "eth1": 2**30 + 2**20}, 2.5
        )
        stats = Stats(network=figures)
        status = stats.as_status()
        assert status["networkInterface"] == "eth1"
        assert status["networkBytes"] == {"eth0": 150, "eth1": 2**30 + 2**20}
        assert status["networkSeconds"] == 2.5
        assert "networkBytes" not in Stats().as_status()

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_meter_without_a_route_still_counts(tmp_path: Path) -> None:
    async def main() -> None:
        fake_sysfs(tmp_path, {"eth0": (0, 0)})

        async def no_ip(args: Sequence[str]) -> str:
            raise iproute.IpError("the ip command (iproute2) is not installed on this node")

        meter = net_counters.NetworkMeter(tmp_path, ip=no_ip)
        await meter.start("198.51.100.12")
        figures = await meter.sample()
        assert figures is not None and figures.interface == "" and figures.bytes == {"eth0": 0}
        assert "networkInterface" not in figures.as_status()

    asyncio.run(main())


@pytest.mark.timeout(10)
def test_real_route_of_a_local_address_is_lo() -> None:
    """The real ``ip`` of this machine (read-only): a loopback address leaves by lo."""
    assert asyncio.run(net_counters.local_interface("127.0.0.1")) == "lo"
