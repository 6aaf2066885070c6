"""The migration-network contract (vmferry.migration_network): a NAD's config parsed with
errors that name the field, the main network's addresses refused, the whereabouts
allocation stable and bounded, the assignment and the node's report round-tripped, and
the readiness reasons."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from vmferry.migration_network import (
    ASSIGNMENT_ANNOTATION,
    NAD_API_VERSION,
    NAD_KIND,
    NAD_NAMESPACE,
    STATUS_FIELD,
    CniType,
    IpamType,
    NadError,
    NetworkAssignment,
    NodeNetworkStatus,
    allocate,
    nad_key,
    not_ready_reason,
    parse_nad_config,
)
from vmferry.objects import kinds

pytestmark = pytest.mark.timeout(10)

MAIN = ["192.0.2.11", "192.0.2.12", "192.0.2.13"]


def config(**overrides: Any) -> str:
    """The reference's example (12.5.2) with ``overrides`` (None removes a key; ``ipam``
    is merged)."""
    cfg: dict[str, Any] = {
        "cniVersion": "0.3.1",
        "name": "migration-bridge",
        "type": "macvlan",
        "master": "eth1",
        "mode": "bridge",
        "ipam": {"type": "whereabouts", "range": "198.51.100.0/24"},
    }
    if "ipam" in overrides:
        ipam = overrides.pop("ipam")
        if ipam is None:
            del cfg["ipam"]
        else:
            cfg["ipam"] = {**cfg["ipam"], **ipam}
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return json.dumps(cfg)


def error_of(text: Any, main: list[str] | None = None) -> NadError:
    with pytest.raises(NadError) as info:
        parse_nad_config(text, MAIN if main is None else main)
    return info.value


def test_the_references_example_parses() -> None:
    nad = parse_nad_config(config(), MAIN)
    assert nad.name == "migration-bridge"
    assert nad.cni_type == CniType.MACVLAN
    assert nad.master == "eth1"
    assert nad.ipam_type == IpamType.WHEREABOUTS
    assert nad.network == ipaddress.IPv4Network("198.51.100.0/24")
    assert next(iter(nad.usable())) == ipaddress.IPv4Address("198.51.100.1")


def test_the_kind_is_registered_as_the_contract_names_it() -> None:
    kind = kinds.by_kind(NAD_KIND)
    assert kind.api_version == NAD_API_VERSION
    assert kind.namespaced
    assert kinds.resolve("net-attach-def") is kind
    assert kinds.resolve("network-attachment-definitions") is kind
    assert kinds.resolve("network-attachment-definitions.k8s.cni.cncf.io") is kind
    assert NAD_NAMESPACE == kinds.SYSTEM_NAMESPACE
    assert nad_key("mig") == f"{kinds.SYSTEM_NAMESPACE}/mig"


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("{not json", "", "invalid JSON"),
        ('["a list"]', "", "expected a JSON object"),
        (config(master=None), "master", "required"),
        (config(master=""), "master", "required"),
        (config(master=5), "master", "expected a string"),
        (config(cniVersion=None), "cniVersion", "required"),
        (config(type="ipvlan"), "type", "unsupported CNI plugin 'ipvlan'"),
        (config(ipam={"type": "dhcp"}), "ipam.type", "unsupported IPAM 'dhcp'"),
        (config(ipam={"range": "not-a-cidr"}), "ipam.range", "is not an IPv4 CIDR"),
        (config(ipam={"range": 7}), "ipam.range", "expected a CIDR string"),
        (config(ipam={"range": "198.51.100.0/31"}), "ipam.range", "holds no addresses"),
        (
            config(ipam={"range_start": "203.0.113.5"}),
            "ipam.range_start",
            "outside the range 198.51.100.0/24",
        ),
        (
            config(ipam={"range_start": "198.51.100.20", "range_end": "198.51.100.10"}),
            "ipam.range_end",
            "before range_start",
        ),
        (config(ipam={"exclude": ["bad"]}), "ipam.exclude[0]", "is not an IPv4 CIDR"),
        (config(ipam={"exclude": "198.51.100.0/25"}), "ipam.exclude", "expected a list"),
        (
            config(ipam={"exclude": ["198.51.100.0/24"]}),
            "ipam.range",
            "leaves no address for nodes",
        ),
    ],
)
def test_errors_name_the_field_inside_spec_config(text: str, path: str, words: str) -> None:
    e = error_of(text)
    assert e.path == path
    prefix = f"spec.config: {path}: " if path else "spec.config: "
    assert str(e).startswith(prefix), str(e)
    assert words in str(e)


def test_ipam_must_be_an_object() -> None:
    e = error_of(config(ipam=None))
    assert (e.path, str(e)) == (
        "ipam",
        "spec.config: ipam: required: an object with type and range",
    )
    cfg = json.loads(config())
    cfg["ipam"] = "whereabouts"
    assert error_of(json.dumps(cfg)).path == "ipam"


def test_config_must_be_a_string() -> None:
    e = error_of({"cniVersion": "0.3.1"})
    assert str(e) == "spec.config: expected the CNI configuration as a JSON string"


def test_a_range_overlapping_the_main_network_is_refused() -> None:
    e = error_of(config(ipam={"range": "192.0.2.0/24"}))
    assert e.path == "ipam.range"
    assert "overlaps the main network (node address 192.0.2.11)" in str(e)
    # Addresses that are not IPs (a hostname) are ignored; other networks are fine.
    assert parse_nad_config(config(), ["node1.example", "203.0.113.7"]).master == "eth1"


def whereabouts(range_: str = "198.51.100.0/24", **ipam: Any) -> Any:
    return parse_nad_config(config(ipam={"range": range_, **ipam}), MAIN)


def test_allocate_hands_out_the_lowest_free_addresses_in_name_order() -> None:
    got = allocate(whereabouts(), {}, ["node2", "node1", "node3"])
    assert got == {
        "node1": "198.51.100.1/24",
        "node2": "198.51.100.2/24",
        "node3": "198.51.100.3/24",
    }


def test_allocate_keeps_addresses_stable_as_nodes_come_and_go() -> None:
    nad = whereabouts()
    first = allocate(nad, {}, ["node1", "node2", "node3"])
    without_node1 = allocate(nad, first, ["node2", "node3"])
    assert without_node1 == {k: first[k] for k in ("node2", "node3")}
    # A new node takes the freed address; the others keep theirs.
    joined = allocate(nad, without_node1, ["node0", "node2", "node3"])
    assert joined["node0"] == "198.51.100.1/24"
    assert {k: joined[k] for k in ("node2", "node3")} == without_node1
    # An address that is no longer usable (range moved, excluded, duplicate) is replaced.
    moved = allocate(whereabouts("198.51.100.128/25"), first, ["node1"])
    assert moved == {"node1": "198.51.100.129/25"}
    dup = allocate(nad, {"node1": "198.51.100.7/24", "node2": "198.51.100.7/24"}, first)
    assert dup["node1"] == "198.51.100.7/24" and dup["node2"] != dup["node1"]
    garbage = allocate(nad, {"node1": "not an address"}, ["node1"])
    assert garbage == {"node1": "198.51.100.1/24"}


def test_allocate_honours_start_end_and_exclude() -> None:
    nad = whereabouts(
        range_start="198.51.100.10",
        range_end="198.51.100.17",
        exclude=["198.51.100.12/30"],
    )
    got = allocate(nad, {}, ["a", "b", "c"])
    assert got == {"a": "198.51.100.10/24", "b": "198.51.100.11/24", "c": "198.51.100.16/24"}


def test_a_single_address_can_be_excluded() -> None:
    nad = whereabouts(exclude=["198.51.100.1/32"])
    assert allocate(nad, {}, ["a"]) == {"a": "198.51.100.2/24"}


def test_allocate_raises_when_the_range_is_exhausted() -> None:
    nad = whereabouts("198.51.100.0/30")  # two usable addresses
    assert len(allocate(nad, {}, ["a", "b"])) == 2
    with pytest.raises(NadError) as info:
        allocate(nad, {}, ["a", "b", "c"])
    assert info.value.path == "ipam.range"
    assert "no free address for node c" in str(info.value)


def test_assignment_round_trips_through_the_node_annotation() -> None:
    assignment = NetworkAssignment(
        "openshift-cnv/mig", "eth1", "198.51.100.0/24", "198.51.100.1/24"
    )
    node = {"metadata": {"annotations": {ASSIGNMENT_ANNOTATION: assignment.to_json()}}}
    assert NetworkAssignment.of_node(node) == assignment
    assert NetworkAssignment.of_node({"metadata": {}}) is None
    broken = {"metadata": {"annotations": {ASSIGNMENT_ANNOTATION: "{"}}}
    assert NetworkAssignment.of_node(broken) is None


def test_node_status_round_trips_and_readiness_reasons() -> None:
    ready = NodeNetworkStatus("openshift-cnv/mig", "eth1", "198.51.100.1", True)
    node = {"status": {STATUS_FIELD: ready.as_dict()}}
    assert NodeNetworkStatus.of_node(node) == ready
    assert not_ready_reason("mig", "node1", ready) is None
    assert not_ready_reason("mig", "node1", None) == (
        "node node1 is not on migration network openshift-cnv/mig yet "
        "(its handler has not reported it)"
    )
    other = NodeNetworkStatus("openshift-cnv/old", "eth1", "198.51.100.1", True)
    assert "not on migration network openshift-cnv/mig" in (
        not_ready_reason("mig", "node1", other) or ""
    )
    missing = NodeNetworkStatus(
        "openshift-cnv/mig", "eth1", "", False, "no network interface eth1 on this node"
    )
    assert not_ready_reason("mig", "node2", missing) == (
        "node node2 cannot use migration network openshift-cnv/mig: "
        "no network interface eth1 on this node"
    )


def test_a_config_nested_too_deep_is_refused_without_recursing() -> None:
    with pytest.raises(NadError) as info:
        parse_nad_config("[" * 200_000 + "]" * 200_000)
    assert "nesting deeper than 100 levels" in str(info.value)
