"""The netns lab's names, addresses, link specs and configuration files (no namespaces
are made here: tests/integration/test_lab_netns.py builds real ones)."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from vmferry.lab import Lab, LabError, netns


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "rate", "delay_us"),
    [
        ("1gbit,2ms", 10**9, 2000),
        ("10gbit,0.2ms", 10**10, 200),
        ("100mbit", 10**8, 0),
        ("1.5gbit, 150us", 1_500_000_000, 150),
        ("64kbit,1s", 64_000, 1_000_000),
        ("1GBIT,2MS", 10**9, 2000),
    ],
)
def test_link_specs_parse(text: str, rate: int, delay_us: int) -> None:
    spec = netns.parse_link("--migration-link", text)
    assert (spec.rate_bits, spec.delay_us) == (rate, delay_us)
    assert spec.rate == f"{rate}bit"
    assert spec.as_dict() == {"rateBitsPerSecond": rate, "delayMicroseconds": delay_us}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1gbt", "--migration-link '1gbt': rate must look like 100mbit, 1gbit, 10gbit"),
        ("", "rate must look like"),
        ("gbit", "rate must look like"),
        ("1gbit,2", "--migration-link '1gbit,2': delay must look like 200us, 0.2ms, 2ms"),
        ("1gbit,", "delay must look like"),
        ("1gbit,20s", "delay must be at most 10s"),
        ("1kbit", "rate must be at least 8kbit"),
        ("-1gbit", "rate must look like"),
    ],
)
def test_bad_link_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^--migration-link ") as e:
        netns.parse_link("--migration-link", text)
    assert message in str(e.value)


@pytest.mark.timeout(10)
def test_names_derive_from_the_lab_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    prefix = netns.prefix_for(a)
    assert prefix == netns.prefix_for(a) == Lab(a).netns_prefix
    assert prefix != netns.prefix_for(b)
    assert prefix.startswith("vmf") and len(prefix) == 9
    # relative and absolute spellings of one directory are one lab
    assert netns.prefix_for(tmp_path / "x" / ".." / "a") == prefix

    topo = netns.Topology(prefix, ("node1", "node2", "node3"))
    assert topo.lab_ns == f"{prefix}-lab"
    assert topo.node_ns("node2") == f"{prefix}-node2"
    assert [topo.main_address(n) for n in topo.nodes] == ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
    assert topo.peer("node3", netns.MAIN_NIC) == "v3-main"
    assert topo.peer("node3", netns.MIGRATION_NIC) == "v3-mig"
    assert topo.as_dict() == {
        "lab": f"{prefix}-lab",
        "nodes": {n: f"{prefix}-{n}" for n in topo.nodes},
        "main": "192.0.2.0/24",
        "migration": "198.51.100.0/24",
        "migrationBridgeNs": f"{prefix}-lab",
        "gateway": "192.0.2.1",
        "addresses": {"node1": "192.0.2.11", "node2": "192.0.2.12", "node3": "192.0.2.13"},
    }


@pytest.mark.timeout(10)
def test_names_fit_the_kernel_limits() -> None:
    topo = netns.Topology("vmfabcdef", tuple(f"node{i}" for i in range(1, netns.MAX_NODES + 1)))
    last = topo.nodes[-1]
    assert len(topo.peer(last, netns.MIGRATION_NIC)) <= 15  # IFNAMSIZ - 1
    assert ipaddress.IPv4Address(topo.main_address(last)) in netns.MAIN_NETWORK
    with pytest.raises(ValueError, match="at most"):
        netns.Topology("vmfabcdef", tuple(f"node{i}" for i in range(netns.MAX_NODES + 1)))


@pytest.mark.timeout(10)
def test_addresses_are_documentation_ranges_only() -> None:
    for net in (netns.MAIN_NETWORK, netns.MIGRATION_NETWORK):
        assert any(
            net.subnet_of(ipaddress.IPv4Network(r))
            for r in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
        )
    assert ipaddress.IPv4Address(netns.GATEWAY_ADDRESS) in netns.MAIN_NETWORK


@pytest.mark.timeout(10)
def test_queue_limits_hold_a_10gbit_link() -> None:
    fast = netns.parse_link("--migration-link", "10gbit,0.2ms")
    # 100 ms of queue at full rate in 1500-byte packets (plus the delay's worth)
    assert netns._queue_packets(fast) >= 10**10 / 8 * 0.1 / 1500
    assert netns._queue_packets(netns.parse_link("--main-link", "1mbit")) == 1000
    args = netns._netem_args(fast, delay=True)
    assert args[:3] == ["netem", "rate", "10000000000bit"] and args[-2:] == ["delay", "200us"]
    assert "delay" not in netns._netem_args(fast, delay=False)
    tbf = netns._tbf_args(fast)
    burst = int(tbf[tbf.index("burst") + 1])
    assert burst >= 10**10 / 8 / 250  # at least one tick's worth at HZ=250


@pytest.mark.timeout(30)
def test_netns_config_files(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    topo = netns.Topology(lab.netns_prefix, ("node1", "node2"))
    lab.write(2, "1Gi", topo)
    info = lab.info()
    assert info["netns"] == topo.as_dict()
    assert lab.components() == ["controller", "gateway", "node1", "node2"]
    assert lab.netns_of("node2") == f"{lab.netns_prefix}-node2"
    assert lab.netns_of("node9") is None
    assert lab.netns_exec("node1", ["ip", "-br", "addr"]) == [
        "ip",
        "netns",
        "exec",
        f"{lab.netns_prefix}-node1",
        "ip",
        "-br",
        "addr",
    ]
    cfg = tomllib.loads((lab.dir / "nodes" / "node2" / "handler.toml").read_text())
    assert cfg["api_server"] == f"192.0.2.1:{info['apiPort']}"
    assert cfg["main_address"] == cfg["migration_address"] == "192.0.2.12"
    assert cfg["metrics_listen"] == f"192.0.2.12:{info['metricsPorts']['node2']}"
    # the handlers verify the controller at the gateway's address: its certificate names it
    controller = tomllib.loads((lab.dir / "controller.toml").read_text())
    cert = x509.load_pem_x509_certificate(Path(controller["cert"]).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.IPv4Address("192.0.2.1") in sans.get_values_for_type(x509.IPAddress)
    node_cert = x509.load_pem_x509_certificate(Path(cfg["cert"]).read_bytes())
    node_sans = node_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.IPv4Address("192.0.2.12") in node_sans.get_values_for_type(x509.IPAddress)
    # a node started without its namespace says what to do
    with pytest.raises(LabError, match="does not exist: run 'vmferry lab down'"):
        lab.start("node1")


@pytest.mark.timeout(30)
def test_loopback_config_has_no_netns(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    lab.write(2, "1Gi")
    assert "netns" not in lab.info()
    assert lab.components() == ["controller", "node1", "node2"]
    assert lab.netns_of("node1") is None
    assert lab.netns_exec("node1", ["true"]) == ["true"]
    cfg = tomllib.loads((lab.dir / "nodes" / "node1" / "handler.toml").read_text())
    assert cfg["migration_address"] == "127.0.1.1"
    assert json.loads((lab.dir / "lab.json").read_text())["nodes"] == ["node1", "node2"]


@pytest.mark.timeout(10)
def test_links_need_netns(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    with pytest.raises(LabError, match="add --netns"):
        lab.up(2, migration_link=netns.parse_link("--migration-link", "1gbit"))
