"""The dedicated migration network (reference 12.5.2): the contract between the API's
validation, the controller's network reconciler and every handler.

- A ``NetworkAttachmentDefinition`` (``k8s.cni.cncf.io/v1``) in the system namespace
  carries a CNI configuration as a JSON string (``spec.config``); :func:`parse_nad_config`
  is the one place that reads and validates it.
- ``HyperConverged.spec.liveMigrationConfig.network`` names the NAD.
- The controller writes each node's :class:`NetworkAssignment` into the Node's annotation
  :data:`ASSIGNMENT_ANNOTATION` (with ``ipam.type: whereabouts`` it hands each node a free
  address from the range: :func:`allocate`); no annotation means "the main network".
- The handler brings the assignment up (the address on the NIC named by ``master``),
  serves migrations there and reports :class:`NodeNetworkStatus` in
  ``Node.status.migrationNetwork`` and the address in ``Node.status.addresses`` (type
  :data:`MIGRATION_IP`).
- The controller sums the nodes' reports into the HyperConverged condition
  :data:`HCO_CONDITION`; a migration touching a node that is not ready on the configured
  network fails with :func:`not_ready_reason` — never a silent fallback to another network.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from vmferry.errors import BadRequest
from vmferry.objects import limits
from vmferry.objects.kinds import SYSTEM_NAMESPACE

Obj = dict[str, Any]

NAD_KIND = "NetworkAttachmentDefinition"
NAD_API_VERSION = "k8s.cni.cncf.io/v1"
NAD_NAMESPACE = SYSTEM_NAMESPACE  # liveMigrationConfig.network names a NAD here
ASSIGNMENT_ANNOTATION = "vmferry.io/migration-network"  # on a Node, written by the controller
MIGRATION_IP = "MigrationIP"  # Node.status.addresses type of the migration address
NODE_CONDITION = "MigrationNetworkReady"  # on a Node, written by its handler
HCO_CONDITION = "MigrationNetworkReady"  # on the HyperConverged, written by the controller
STATUS_FIELD = "migrationNetwork"  # Node.status.migrationNetwork


class CniType(StrEnum):
    BRIDGE = "bridge"
    MACVLAN = "macvlan"


class IpamType(StrEnum):
    WHEREABOUTS = "whereabouts"  # the controller hands each node an address from the range
    STATIC = "static"  # the operator configured an address in the range on each node's NIC


class NadError(ValueError):
    """A NAD's config is not usable; ``path`` is the field path inside ``spec.config``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"spec.config: {path}: {message}" if path else f"spec.config: {message}")
        self.path = path


@dataclass(frozen=True)
class NadConfig:
    """The parts of a NAD's CNI configuration vmferry uses."""

    name: str
    cni_type: CniType
    master: str  # the NIC used for live migration
    ipam_type: IpamType
    network: ipaddress.IPv4Network  # ipam.range
    range_start: ipaddress.IPv4Address | None = None
    range_end: ipaddress.IPv4Address | None = None
    exclude: tuple[ipaddress.IPv4Network, ...] = ()

    def usable(self) -> Iterable[ipaddress.IPv4Address]:
        """Addresses a node may get, in order (network, broadcast and excluded ones never)."""
        for host in self.network.hosts():
            if self.range_start is not None and host < self.range_start:
                continue
            if self.range_end is not None and host > self.range_end:
                break
            if any(host in ex for ex in self.exclude):
                continue
            yield host


def _ipv4(path: str, value: Any) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise NadError(path, f"expected an IPv4 address string, got {value!r}")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise NadError(path, f"{value!r} is not an IPv4 address") from None


def _cidr(path: str, value: Any, *, for_nodes: bool = True) -> ipaddress.IPv4Network:
    """A CIDR; ``for_nodes``: one that leaves addresses for nodes (a range, not an
    exclusion, which may be a single address)."""
    if not isinstance(value, str):
        raise NadError(path, f"expected a CIDR string such as 198.51.100.0/24, got {value!r}")
    try:
        net = ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        raise NadError(path, f"{value!r} is not an IPv4 CIDR (e.g. 198.51.100.0/24)") from None
    if for_nodes and net.prefixlen > 30:
        raise NadError(path, f"{value!r} holds no addresses for nodes (prefix longer than /30)")
    return net


def _string(cfg: Mapping[str, Any], key: str, path: str = "") -> str:
    value = cfg.get(key)
    where = f"{path}.{key}" if path else key
    if value is None or value == "":
        raise NadError(where, "required")
    if not isinstance(value, str):
        raise NadError(where, f"expected a string, got {value!r}")
    return value


def parse_nad_config(config: Any, main_addresses: Iterable[str] = ()) -> NadConfig:
    """``spec.config`` of a NAD → NadConfig, or NadError naming the field that is wrong.

    ``main_addresses`` are the nodes' main-network addresses (``InternalIP``): the range
    must not hold any of them (reference 12.5.2: "must not overlap the IP addresses of
    the main network")."""
    if not isinstance(config, str):
        raise NadError("", "expected the CNI configuration as a JSON string")
    try:
        limits.check_json_depth(config, "JSON")
    except BadRequest as e:
        raise NadError("", str(e)) from None
    try:
        cfg = json.loads(config)
    except json.JSONDecodeError as e:
        raise NadError("", f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(cfg, dict):
        raise NadError("", "expected a JSON object")
    _string(cfg, "cniVersion")
    name = _string(cfg, "name")
    kind = _string(cfg, "type")
    try:
        cni_type = CniType(kind)
    except ValueError:
        allowed = ", ".join(t.value for t in CniType)
        raise NadError("type", f"unsupported CNI plugin {kind!r} (supported: {allowed})") from None
    master = _string(cfg, "master")
    ipam = cfg.get("ipam")
    if not isinstance(ipam, dict):
        raise NadError("ipam", "required: an object with type and range")
    ipam_kind = _string(ipam, "type", "ipam")
    try:
        ipam_type = IpamType(ipam_kind)
    except ValueError:
        allowed = ", ".join(t.value for t in IpamType)
        raise NadError(
            "ipam.type", f"unsupported IPAM {ipam_kind!r} (supported: {allowed})"
        ) from None
    network = _cidr("ipam.range", ipam.get("range"))
    start = _ipv4("ipam.range_start", ipam["range_start"]) if "range_start" in ipam else None
    end = _ipv4("ipam.range_end", ipam["range_end"]) if "range_end" in ipam else None
    for path, addr in (("ipam.range_start", start), ("ipam.range_end", end)):
        if addr is not None and addr not in network:
            raise NadError(path, f"{addr} is outside the range {network}")
    if start is not None and end is not None and start > end:
        raise NadError("ipam.range_end", f"{end} is before range_start {start}")
    exclude_raw = ipam.get("exclude", [])
    if not isinstance(exclude_raw, list):
        raise NadError("ipam.exclude", "expected a list of CIDRs")
    exclude = tuple(
        _cidr(f"ipam.exclude[{i}]", v, for_nodes=False) for i, v in enumerate(exclude_raw)
    )
    for address in main_addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip in network:
            raise NadError(
                "ipam.range",
                f"{network} overlaps the main network (node address {ip}); "
                "the migration network needs a range of its own",
            )
    nad = NadConfig(name, cni_type, master, ipam_type, network, start, end, exclude)
    if next(iter(nad.usable()), None) is None:
        raise NadError("ipam.range", f"{network} leaves no address for nodes")
    return nad


def nad_key(name: str) -> str:
    """``namespace/name`` of the NAD ``liveMigrationConfig.network`` names."""
    return f"{NAD_NAMESPACE}/{name}"


@dataclass(frozen=True)
class NetworkAssignment:
    """What the controller tells one node about the migration network (the Node's
    :data:`ASSIGNMENT_ANNOTATION`, JSON)."""

    network: str  # namespace/name of the NAD
    interface: str  # the NIC (``master``)
    range: str  # ipam.range, a CIDR
    address: str = ""  # "198.51.100.11/24" with whereabouts; "" = the NIC's own address

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetworkAssignment:
        data = json.loads(text)
        return cls(
            network=str(data["network"]),
            interface=str(data["interface"]),
            range=str(data["range"]),
            address=str(data.get("address") or ""),
        )

    @classmethod
    def of_node(cls, node: Mapping[str, Any]) -> NetworkAssignment | None:
        """The node's assignment, or None (no migration network; or an unreadable one)."""
        text = ((node.get("metadata") or {}).get("annotations") or {}).get(ASSIGNMENT_ANNOTATION)
        if not text:
            return None
        try:
            return cls.from_json(text)
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class NodeNetworkStatus:
    """``Node.status.migrationNetwork``, written by the node's handler: where it serves
    migrations on the assigned network, or why it cannot."""

    network: str  # namespace/name of the NAD
    interface: str
    address: str  # "" when not ready
    ready: bool
    message: str = ""

    def as_dict(self) -> Obj:
        return asdict(self)

    @classmethod
    def of_node(cls, node: Mapping[str, Any]) -> NodeNetworkStatus | None:
        data = (node.get("status") or {}).get(STATUS_FIELD)
        if not isinstance(data, dict):
            return None
        return cls(
            network=str(data.get("network", "")),
            interface=str(data.get("interface", "")),
            address=str(data.get("address", "")),
            ready=bool(data.get("ready")),
            message=str(data.get("message", "")),
        )


def allocate(nad: NadConfig, current: Mapping[str, str], nodes: Iterable[str]) -> dict[str, str]:
    """Whereabouts for one range: node → ``address/prefix``. A node keeps an address it
    has (still usable); the others get the lowest free ones; nodes not listed lose theirs.
    Raises NadError when the range is exhausted."""
    prefix = nad.network.prefixlen
    usable = set(nad.usable())
    out: dict[str, str] = {}
    taken: set[ipaddress.IPv4Address] = set()
    names = sorted(nodes)
    for node in names:
        held = current.get(node, "")
        try:
            ip = ipaddress.IPv4Interface(held).ip if held else None
        except ValueError:
            ip = None
        if ip is not None and ip in usable and ip not in taken:
            out[node] = f"{ip}/{prefix}"
            taken.add(ip)
    free = (ip for ip in nad.usable() if ip not in taken)
    for node in names:
        if node in out:
            continue
        ip = next(free, None)
        if ip is None:
            raise NadError("ipam.range", f"{nad.network} has no free address for node {node}")
        out[node] = f"{ip}/{prefix}"
        taken.add(ip)
    return out


def not_ready_reason(network: str, node: str, status: NodeNetworkStatus | None) -> str | None:
    """Why ``node`` cannot take part in a migration over ``network`` (a NAD name), or None
    when it can: one sentence naming the node, the network and what is missing."""
    key = nad_key(network)
    if status is None or status.network != key:
        return (
            f"node {node} is not on migration network {key} yet (its handler has not reported it)"
        )
    if not status.ready:
        return f"node {node} cannot use migration network {key}: {status.message}"
    return None
