"""The netns lab (``vmferry lab up --netns``): every node in its own network namespace with
eth0 (main) and eth1 (migration) on bridges in a lab namespace, the handlers reaching the
controller through the gateway, a VM migrating between namespaces, shaped links, and
``lab down`` leaving no namespace behind (also after a half-built lab).

Needs root and network namespaces; skips and says why otherwise."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import LabHarness, vm_manifest
from vmferry.lab import free_port, gateway, netns


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the netns lab needs root"
    if shutil.which("ip") is None:
        return "the netns lab needs iproute2's `ip`"
    probe = f"vmfprobe-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`ip netns add` fails here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


REASON = _netns_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


def nic_bytes(ns: str, nic: str) -> int:
    def read(what: str) -> int:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{nic}/statistics/{what}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return int(proc.stdout)

    return read("tx_bytes") + read("rx_bytes")


def root_links() -> set[str]:
    return {
        str(link["ifname"]) for link in json.loads(subprocess.check_output(["ip", "-j", "link"]))
    }


@pytest.mark.timeout(120)
def test_without_ip_netns_the_lab_says_why_and_runs_on_loopback(tmp_path: Path) -> None:
    harness = LabHarness(tmp_path)
    harness.env["PATH"] = str(tmp_path / "no-such-bin")  # no `ip`: no netns lab here
    try:
        proc = harness.up(nodes=2, netns=True, migration_link="1gbit")
        assert (
            "warning: cannot build the netns lab (the `ip` command (iproute2) is not installed)"
            in proc.stderr
        )
        assert "falling back to loopback mode, links NOT shaped" in proc.stderr
        assert "netns" not in harness.info()
        assert harness.lab.netns_of("node1") is None
        node = harness.get("node", "node1")
        assert {a["address"] for a in node["status"]["addresses"]} >= {"127.0.0.1"}
    finally:
        harness.down()


@pytest.mark.timeout(60)
def test_bad_link_spec_is_refused(tmp_path: Path) -> None:
    harness = LabHarness(tmp_path)
    proc = harness.cli("lab", "up", "--netns", "--migration-link", "1gbt", check=False)
    assert proc.returncode == 1  # kubectl's exit code for a bad flag
    assert "--migration-link '1gbt': rate must look like 100mbit, 1gbit, 10gbit" in proc.stderr
    assert not netns.namespaces(harness.lab.netns_prefix)


@pytest.mark.timeout(60)
def test_down_cleans_up_a_half_built_lab(tmp_path: Path) -> None:
    """What a crash in the middle of `lab up` leaves: the lab namespace, one node's
    namespace with a link, a process inside it, and no lab.json."""
    harness = LabHarness(tmp_path)
    prefix = harness.lab.netns_prefix
    lab_ns, node_ns = f"{prefix}-lab", f"{prefix}-node1"
    orphan: subprocess.Popen[bytes] | None = None
    try:
        for ns in (lab_ns, node_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            [
                "ip",
                "-n",
                lab_ns,
                "link",
                "add",
                "v1-main",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                node_ns,
            ],
            check=True,
        )
        orphan = subprocess.Popen(["ip", "netns", "exec", node_ns, "sleep", "300"])
        time.sleep(0.2)
        assert not (harness.lab.dir / "lab.json").exists()
        out = harness.cli("lab", "down").stdout
        assert f"namespace {lab_ns}" in out and f"namespace {node_ns}" in out
        assert netns.namespaces(prefix) == []
        assert orphan.wait(timeout=10) != 0, "the process left inside the namespace was stopped"
    finally:
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
        for ns in netns.namespaces(prefix):
            subprocess.run(["ip", "netns", "delete", ns])


@pytest.mark.timeout(60)
def test_gateway_forwards_between_namespaces_with_half_close(tmp_path: Path) -> None:
    """The gateway's listener in a lab namespace forwards to the host: 8 MiB up, then the
    client's half-close reaches the server, whose answer still comes back."""
    lab_ns = f"{netns.prefix_for(tmp_path)}-lab"
    subprocess.run(["ip", "netns", "add", lab_ns], check=True)
    try:
        subprocess.run(["ip", "-n", lab_ns, "link", "set", "lo", "up"], check=True)
        asyncio.run(_half_close_round_trip(lab_ns))
    finally:
        subprocess.run(["ip", "netns", "delete", lab_ns])


async def _half_close_round_trip(lab_ns: str) -> None:
    payload = os.urandom(8 << 20)

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # to EOF: the client's half-close came through
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()
        writer.close()

    host = await asyncio.start_server(server, "127.0.0.1", 0)
    host_port = host.sockets[0].getsockname()[1]
    gw = gateway.Gateway(lab_ns)
    try:
        lab_port = free_port("127.0.0.1")
        await gw.listen(("127.0.0.1", lab_port), ("127.0.0.1", host_port), listen_in_lab=True)
        client = (
            "import socket,sys\n"
            f"s=socket.create_connection(('127.0.0.1',{lab_port}))\n"
            "s.sendall(sys.stdin.buffer.read()); s.shutdown(socket.SHUT_WR)\n"
            "out=b''\n"
            "while (b:=s.recv(65536)): out+=b\n"
            "print(out.decode())\n"
        )
        proc = await asyncio.create_subprocess_exec(
            *netns.exec_prefix(lab_ns),
            sys.executable,
            "-c",
            client,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(payload), 30)
        assert proc.returncode == 0
        assert out.decode().strip() == hashlib.sha256(payload).hexdigest()
    finally:
        await gw.close()
        host.close()


@pytest.fixture(scope="module")
def netlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    harness = LabHarness(Path(tmp_path_factory.mktemp("netlab")))
    try:
        harness.up(nodes=3, netns=True, migration_link="1gbit,2ms", main_link="10gbit")
        yield harness
    finally:
        harness.down()


@pytest.mark.timeout(60)
def test_every_node_has_its_own_network_stack(netlab: LabHarness) -> None:
    info = netlab.info()
    prefix = netlab.lab.netns_prefix
    assert info["netns"]["lab"] == f"{prefix}-lab"
    assert info["netns"]["main"] == "192.0.2.0/24"
    assert info["netns"]["migration"] == "198.51.100.0/24"
    assert set(netns.namespaces(prefix)) == {
        f"{prefix}-lab",
        *(f"{prefix}-node{i}" for i in (1, 2, 3)),
    }
    before_links = root_links()
    for i, node in enumerate(netlab.lab.node_names(), start=1):
        ns = netlab.lab.netns_of(node)
        assert ns == f"{prefix}-{node}" == info["netns"]["nodes"][node]
        links = {str(link["ifname"]): link for link in ip_json(ns, "addr", "show")}
        assert set(links) == {"lo", "eth0", "eth1"}
        for name in links:
            assert "UP" in links[name]["flags"]
        v4 = {
            name: [
                f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"
            ]
            for name, link in links.items()
        }
        assert v4["eth0"] == [f"192.0.2.{10 + i}/24"]
        assert v4["eth1"] == []  # the migration NIC waits for a NAD's address
        # the handler runs inside it (the pid recorded is the handler's own)
        pid = netlab.lab.pid(node)
        assert pid is not None
        assert "handler.main" in Path(f"/proc/{pid}/cmdline").read_text()
        identify = subprocess.run(
            ["ip", "netns", "identify", str(pid)], capture_output=True, text=True
        )
        assert identify.stdout.strip() == ns
        addresses = {
            a["type"]: a["address"] for a in netlab.get("node", node)["status"]["addresses"]
        }
        assert addresses["InternalIP"] == f"192.0.2.{10 + i}"
        # the host still scrapes the node's metrics (through the gateway)
        assert "# TYPE vmferry_" in netlab.fetch_metrics(node)[1]
    bridges = {str(link["ifname"]): link for link in ip_json(f"{prefix}-lab", "addr", "show")}
    assert {"br-main", "br-mig", "v1-main", "v1-mig", "v3-mig"} <= set(bridges)
    assert netlab.lab.pid("gateway") is not None
    # nothing of the lab in the root namespace
    assert not {n for n in before_links if n.startswith(("v1-", "v2-", "v3-", "br-mig"))}


@pytest.mark.timeout(60)
def test_links_are_shaped(netlab: LabHarness) -> None:
    prefix = netlab.lab.netns_prefix
    links = netlab.info()["netns"]["links"]
    assert links["migration"] == {"rateBitsPerSecond": 10**9, "delayMicroseconds": 2000}
    assert links["main"] == {"rateBitsPerSecond": 10**10, "delayMicroseconds": 0}
    for node in netlab.lab.node_names():
        i = node.removeprefix("node")
        for ns, dev, rate in (
            (f"{prefix}-{node}", "eth1", 10**9),
            (f"{prefix}-lab", f"v{i}-mig", 10**9),
            (f"{prefix}-{node}", "eth0", 10**10),
        ):
            [qdisc] = [q for q in ip_json_tc(ns, dev) if q.get("root")]
            assert qdisc["kind"] in ("netem", "tbf")
            assert int(qdisc["options"]["rate"]) * 8 == rate
            if qdisc["kind"] == "netem" and dev == "eth1":
                assert netlab.info()["netns"]["delayApplied"] is True


def ip_json_tc(ns: str, dev: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


@pytest.mark.timeout(60)
def test_a_restarted_handler_comes_back_in_its_namespace(netlab: LabHarness) -> None:
    old = netlab.lab.pid("node2")
    netlab.restart("node2")
    pid = netlab.lab.pid("node2")
    assert pid is not None and pid != old
    identify = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
    assert identify.stdout.strip() == netlab.lab.netns_of("node2")
    assert "handler.main" in Path(f"/proc/{pid}/cmdline").read_text()


@pytest.mark.timeout(180)
def test_vm_migrates_between_namespaces(netlab: LabHarness) -> None:
    netlab.apply(
        vm_manifest("netvm", memory="128Mi", dirty_rate="4Mi", hot_set="16Mi", content="random")
    )
    vmi = netlab.wait_vmi_running("netvm")
    source = vmi["status"]["nodeName"]
    source_ns = netlab.lab.netns_of(source)
    assert source_ns is not None
    before = nic_bytes(source_ns, "eth0")
    out = netlab.cli("migrate", "netvm", "--wait", timeout=150)
    assert "succeeded" in out.stdout, out.stdout
    ms = netlab.get("vmi", "netvm")["status"]["migrationState"]
    assert ms["sourceNode"] == source and ms["targetNode"] != source
    target_address = ipaddress.IPv4Address(ms["targetNodeAddress"])
    assert target_address in netns.MAIN_NETWORK  # no NAD configured: the main network
    assert ms["transfer"]["digestVerified"] is True
    # the guest's memory really left the source's namespace over its main NIC
    assert nic_bytes(source_ns, "eth0") - before >= 128 << 20


@pytest.mark.timeout(120)
def test_down_removes_every_namespace(netlab: LabHarness) -> None:
    prefix = netlab.lab.netns_prefix
    pids = [netlab.lab.pid(c) for c in netlab.lab.components()]
    assert all(pids)
    netlab.down()
    assert netns.namespaces(prefix) == []
    for pid in pids:
        assert pid is not None and gone(pid), f"pid {pid} still runs after lab down"


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
