"""The lab's real networks (``vmferry lab up --netns``): one network namespace per node,
two bridges in a lab namespace, veth pairs between them, optional link shaping.

Layout (``h`` = 6 hex chars of the lab directory's hash, so two labs never collide and
``lab down`` finds a lab's namespaces from its directory alone, even without lab.json):

- ``vmf<h>-lab``: bridges ``br-main`` (192.0.2.1/24, where the gateway listens for the
  handlers' API connections) and ``br-mig`` (no address);
- ``vmf<h>-nodeI``: ``eth0`` = 192.0.2.(10+I)/24 on br-main (the main network), ``eth1``
  on br-mig without an address (the migration network: a NAD's IPAM gives it one), ``lo``.
  The bridge side of each pair is ``vI-main`` / ``vI-mig`` in the lab namespace.

Two clusters (``vmferry lab up --clusters 2 --netns``, :mod:`vmferry.lab.multi`): each has
its own namespaces and main network (cluster1 192.0.2.0/24, cluster2 203.0.113.0/24, each
with its own gateway at .1), but ONE migration network: cluster2 builds no br-mig of its
own, its nodes' ``eth1`` join cluster1's br-mig (``Topology.migration_ns``), the bridge
side named ``c2vI-mig`` there.

Every link and address lives inside a namespace the lab made (RFC 5737 ranges only);
nothing is created in the root namespace, nothing is routed out. Deleting the namespaces
removes every link and bridge with them.

Shaping (``--main-link`` / ``--migration-link RATE[,DELAY]``): the node-side NIC's egress
gets rate and delay (netem), the bridge-side peer's egress the rate only; so traffic from
one node to another crosses one delay per direction (round trip = 2 x DELAY) and every
node port is capped at RATE both ways, as on a switched network. A kernel without netem
(``CONFIG_NET_SCH_NETEM``) gets the rate from tbf and the delay is reported as not applied.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MAIN_NETWORK = ipaddress.IPv4Network("192.0.2.0/24")  # RFC 5737 TEST-NET-1
MIGRATION_NETWORK = ipaddress.IPv4Network("198.51.100.0/24")  # RFC 5737 TEST-NET-2
# A second cluster's main network (RFC 5737 TEST-NET-3): see vmferry.lab.multi.
SECOND_MAIN_NETWORK = ipaddress.IPv4Network("203.0.113.0/24")
GATEWAY_ADDRESS = "192.0.2.1"  # br-main in the lab namespace (the first host of the main network)
NODE_ADDRESS_BASE = 10  # nodeI's main address is 192.0.2.(10 + I)
MAX_NODES = 200
MAIN_BRIDGE = "br-main"
MIGRATION_BRIDGE = "br-mig"
MAIN_NIC = "eth0"
MIGRATION_NIC = "eth1"
NETNS_RUN_DIR = Path("/run/netns")
GATEWAY_READY_FILE = "gateway.ready"  # in the lab's run directory, once the gateway listens
IP_TIMEOUT = 15.0  # s for one ip/tc command

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_RATE_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_DELAY_UNITS = {"us": 1, "ms": 1000, "s": 1_000_000}
MAX_DELAY_US = 10_000_000  # 10 s


class NetnsError(Exception):
    """The lab's networks cannot be built or shaped; the message says which command and why."""


@dataclass(frozen=True)
class LinkSpec:
    """A link's shape, from ``RATE[,DELAY]`` (e.g. ``1gbit,2ms``)."""

    rate_bits: int  # bits per second
    delay_us: int  # one-way delay added by the node-side egress; 0 = none

    @property
    def rate(self) -> str:
        """The rate as tc reads it (bits per second)."""
        return f"{self.rate_bits}bit"

    @property
    def delay(self) -> str:
        return f"{self.delay_us}us"

    def as_dict(self) -> dict[str, int]:
        return {"rateBitsPerSecond": self.rate_bits, "delayMicroseconds": self.delay_us}


def parse_link(option: str, text: str) -> LinkSpec:
    """``--migration-link 1gbit,2ms`` → LinkSpec; ValueError naming the option otherwise."""
    rate_text, sep, delay_text = text.strip().lower().partition(",")
    m = _RATE.match(rate_text.strip())
    if not m:
        raise ValueError(f"{option} {text!r}: rate must look like 100mbit, 1gbit, 10gbit")
    rate_bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if rate_bits < 8000:
        raise ValueError(f"{option} {text!r}: rate must be at least 8kbit")
    delay_us = 0
    if sep:
        d = _DELAY.match(delay_text.strip())
        if not d:
            raise ValueError(f"{option} {text!r}: delay must look like 200us, 0.2ms, 2ms")
        delay_us = round(float(d.group(1)) * _DELAY_UNITS[d.group(2)])
        if delay_us > MAX_DELAY_US:
            raise ValueError(f"{option} {text!r}: delay must be at most 10s")
    return LinkSpec(rate_bits, delay_us)


def dir_hash(lab_dir: Path) -> str:
    """The hex hash naming what a lab keeps outside its directory (namespaces, RAM files)."""
    return hashlib.sha1(str(Path(lab_dir).resolve()).encode()).hexdigest()


def prefix_for(lab_dir: Path) -> str:
    """``vmf<h>``: the namespace prefix of the lab in ``lab_dir``."""
    return "vmf" + dir_hash(lab_dir)[:6]


@dataclass(frozen=True)
class Topology:
    """Names and addresses of one netns lab."""

    prefix: str
    nodes: tuple[str, ...]
    main_network: ipaddress.IPv4Network = MAIN_NETWORK
    # The namespace whose br-mig the nodes' eth1 join ("" = this lab's own); a second
    # cluster of a multi-cluster lab joins the first one's.
    migration_ns: str = ""
    peer_tag: str = ""  # prefix of the bridge-side link names ("c2": c2v1-mig)

    def __post_init__(self) -> None:
        if len(self.nodes) > MAX_NODES:
            raise ValueError(f"a netns lab holds at most {MAX_NODES} nodes")

    @property
    def lab_ns(self) -> str:
        return f"{self.prefix}-lab"

    @property
    def gateway(self) -> str:
        """br-main's address in the lab namespace: the main network's first host."""
        return str(self.main_network.network_address + 1)

    def bridge_ns(self, nic: str) -> str:
        """The namespace holding the bridge ``nic`` is attached to."""
        return self.migration_ns if nic == MIGRATION_NIC and self.migration_ns else self.lab_ns

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def index(self, node: str) -> int:
        return self.nodes.index(node) + 1

    def main_address(self, node: str) -> str:
        return str(self.main_network.network_address + NODE_ADDRESS_BASE + self.index(node))

    def peer(self, node: str, nic: str) -> str:
        """The bridge-side end (in :meth:`bridge_ns`) of ``node``'s ``nic``."""
        return f"{self.peer_tag}v{self.index(node)}-{'main' if nic == MAIN_NIC else 'mig'}"

    def as_dict(self) -> dict[str, object]:
        """The ``netns`` block of lab.json."""
        return {
            "lab": self.lab_ns,
            "nodes": {n: self.node_ns(n) for n in self.nodes},
            "main": str(self.main_network),
            "migration": str(MIGRATION_NETWORK),
            "migrationBridgeNs": self.bridge_ns(MIGRATION_NIC),
            "gateway": self.gateway,
            "addresses": {n: self.main_address(n) for n in self.nodes},
        }


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"`{' '.join(argv)}` failed: {e}") from None


def _ip(*args: str) -> None:
    proc = _run(["ip", *args])
    if proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")


def unsupported_reason() -> str | None:
    """Why this machine cannot run a netns lab (None: it can, as far as we can tell
    without trying; :func:`build` reports what fails after that)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or without --netns)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces (/proc/self/ns/net is missing)"
    return None


def exec_prefix(ns: str) -> list[str]:
    """argv prefix running a command in namespace ``ns`` (``ip netns exec`` execs it: the
    pid of the process started is the command's own)."""
    return ["ip", "netns", "exec", ns]


def _disable_ipv6(ns: str) -> None:
    """No IPv6 link-local chatter in the lab (it would blur per-NIC byte counts)."""
    if shutil.which("sysctl"):
        _run(
            [
                *exec_prefix(ns),
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )


def build(topo: Topology) -> None:
    """Create the namespaces, bridges and links of ``topo``; NetnsError on the first
    failure (the caller tears down what was made)."""
    lab = topo.lab_ns
    bridges = [MAIN_BRIDGE] if topo.migration_ns else [MAIN_BRIDGE, MIGRATION_BRIDGE]
    _ip("netns", "add", lab)
    _disable_ipv6(lab)
    _ip("-n", lab, "link", "set", "lo", "up")
    for bridge in bridges:
        _ip("-n", lab, "link", "add", bridge, "type", "bridge")
    prefixlen = topo.main_network.prefixlen
    _ip("-n", lab, "addr", "add", f"{topo.gateway}/{prefixlen}", "dev", MAIN_BRIDGE)
    for bridge in bridges:
        _ip("-n", lab, "link", "set", bridge, "up")
    for node in topo.nodes:
        ns = topo.node_ns(node)
        _ip("netns", "add", ns)
        _disable_ipv6(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        for nic, bridge in ((MAIN_NIC, MAIN_BRIDGE), (MIGRATION_NIC, MIGRATION_BRIDGE)):
            peer, where = topo.peer(node, nic), topo.bridge_ns(nic)
            # Both ends are born inside namespaces: the peer in the bridge's, the NIC in the node's.
            _ip("-n", where, "link", "add", peer, "type", "veth", "peer", "name", nic, "netns", ns)
            _ip("-n", where, "link", "set", peer, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{topo.main_address(node)}/{prefixlen}", "dev", MAIN_NIC)
        for nic in (MAIN_NIC, MIGRATION_NIC):
            _ip("-n", ns, "link", "set", nic, "up")


def _queue_packets(spec: LinkSpec) -> int:
    """netem's queue limit (packets): the bandwidth-delay product plus 100 ms of queue at
    full rate, in MTU-sized packets, so a 10gbit link does not drop at its own rate."""
    seconds = spec.delay_us / 1e6 + 0.1
    return max(1000, math.ceil(spec.rate_bits / 8 * seconds / 1500))


def _tbf_args(spec: LinkSpec) -> list[str]:
    rate_bytes = spec.rate_bits / 8
    burst = max(64 * 1024, math.ceil(rate_bytes / 250) * 2)  # >= rate/HZ (HZ up to 1000)
    return ["tbf", "rate", spec.rate, "burst", str(burst), "latency", "100ms"]


def _netem_args(spec: LinkSpec, delay: bool) -> list[str]:
    args = ["netem", "rate", spec.rate, "limit", str(_queue_packets(spec))]
    if delay and spec.delay_us:
        args += ["delay", spec.delay]
    return args


def _qdisc(ns: str, dev: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *args])


def shape(topo: Topology, nic: str, spec: LinkSpec) -> list[str]:
    """Shape every node's ``nic`` (rate and delay on its egress, the rate on its bridge
    peer's egress). Returns warnings (the delay not applied without netem); NetnsError
    when tc cannot shape at all."""
    if shutil.which("tc") is None:
        raise NetnsError("cannot shape links: the `tc` command (iproute2) is not installed")
    warnings: list[str] = []
    use_netem = True
    for node in topo.nodes:
        for ns, dev, delay in (
            (topo.node_ns(node), nic, True),
            (topo.bridge_ns(nic), topo.peer(node, nic), False),
        ):
            proc = _qdisc(ns, dev, _netem_args(spec, delay)) if use_netem else None
            if proc is None or proc.returncode != 0:
                if use_netem and proc is not None and "unknown" not in proc.stderr.lower():
                    raise NetnsError(f"tc netem on {dev} in {ns} failed: {proc.stderr.strip()}")
                if use_netem and spec.delay_us:
                    warnings.append(
                        f"this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): {nic} is "
                        f"shaped to {spec.rate_bits / 1e6:g} Mbit/s with tbf, but its delay "
                        f"({spec.delay_us / 1000:g} ms) is NOT applied"
                    )
                use_netem = False
                proc = _qdisc(ns, dev, _tbf_args(spec))
                if proc.returncode != 0:
                    raise NetnsError(f"tc tbf on {dev} in {ns} failed: {proc.stderr.strip()}")
    return warnings


def delay_supported(warnings: list[str]) -> bool:
    return not any("NOT applied" in w for w in warnings)


def namespaces(prefix: str) -> list[str]:
    """Every namespace whose name starts with ``<prefix>-`` (a lab's, also a half-built one)."""
    names = set()
    if shutil.which("ip"):
        proc = _run(["ip", "netns", "list"])
        for line in proc.stdout.splitlines():
            if line.strip():
                names.add(line.split()[0])
    if NETNS_RUN_DIR.is_dir():
        names.update(p.name for p in NETNS_RUN_DIR.iterdir())
    return sorted(n for n in names if n.startswith(f"{prefix}-"))


def pids_in(ns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", ns])
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete(ns: str) -> None:
    """Remove namespace ``ns`` (its links and bridges go with it once no process is inside)."""
    _ip("netns", "delete", ns)


def nic_bytes(ns: str) -> dict[str, int]:
    """{nic: rx_bytes + tx_bytes} of every NIC but ``lo`` in namespace ``ns`` (now)."""
    proc = _run(["ip", "-n", ns, "-s", "-j", "link", "show"])
    if proc.returncode != 0:
        raise NetnsError(f"cannot read the NIC counters of {ns}: {proc.stderr.strip()}")
    counts = {}
    for link in json.loads(proc.stdout):
        if link.get("ifname") != "lo" and "stats64" in link:
            stats = link["stats64"]
            counts[link["ifname"]] = int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])
    return counts
