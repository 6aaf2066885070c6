"""Schema of the migration network's objects: the NetworkAttachmentDefinition's shape,
``liveMigrationConfig.network`` as an object name, and a Node's ``migrationNetwork``."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.test_schema import VALID
from vmferry.errors import Invalid
from vmferry.migration_network import NAD_KIND, STATUS_FIELD, NodeNetworkStatus
from vmferry.migration_state import ConfigKey
from vmferry.objects.schema import validate

pytestmark = pytest.mark.timeout(10)


def nad(**spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(VALID[NAD_KIND])
    if spec:
        obj["spec"] = spec
    return obj


def problem(obj: dict[str, Any]) -> str:
    with pytest.raises(Invalid) as info:
        validate(obj)
    return str(info.value)


def test_a_nad_needs_spec_config_as_a_string() -> None:
    no_spec = nad()
    del no_spec["spec"]
    assert "spec: required field is missing" in problem(no_spec)
    assert "spec.config: required field is missing" in problem(nad(other="x"))
    assert 'spec.other: unknown field "other"' in problem(nad(config="{}", other="x"))
    assert "spec.config: expected string, got object" in problem(nad(config={"a": 1}))
    assert "spec.config: must not be empty" in problem(nad(config=""))
    # What the string holds is the admission's business (it needs the Nodes).
    assert validate(nad(config="not even json"))["spec"] == {"config": "not even json"}


def test_a_nad_is_namespaced_and_named_as_objects_are() -> None:
    bad = nad()
    bad["metadata"]["name"] = "Migration_Net"
    assert 'metadata.name: invalid value "Migration_Net"' in problem(bad)


def hco(network: object) -> dict[str, Any]:
    obj = copy.deepcopy(VALID["HyperConverged"])
    obj["spec"]["liveMigrationConfig"][ConfigKey.NETWORK] = network
    return obj


def test_live_migration_network_is_an_object_name_when_set() -> None:
    assert validate(hco("migration-network.v2"))
    assert validate(hco(""))  # "" = the main network, as when absent
    message = problem(hco("Migration Network"))
    assert 'spec.liveMigrationConfig.network: invalid value "Migration Network": ' in message
    assert "RFC 1123 subdomain" in message
    assert "spec.liveMigrationConfig.network: expected string, got integer 5" in problem(hco(5))


def test_a_nodes_migration_network_report_is_part_of_its_status() -> None:
    node = copy.deepcopy(VALID["Node"])
    report = NodeNetworkStatus("openshift-cnv/mig", "eth1", "198.51.100.1", True).as_dict()
    node["status"][STATUS_FIELD] = report
    assert validate(node)["status"][STATUS_FIELD] == report
    node["status"][STATUS_FIELD] = {**report, "ready": "yes"}
    assert f"status.{STATUS_FIELD}.ready: expected boolean" in problem(node)
