"""Migration policy selection (reference 12.2.4) and the effective configuration."""

from __future__ import annotations

from typing import Any

from controller.policy import effective_config, select_policy
from vmferry.migration_state import LIVE_MIGRATION_DEFAULTS


def policy(
    name: str, vmi: dict[str, str] | None = None, ns: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    selectors: dict[str, Any] = {}
    if vmi:
        selectors["virtualMachineInstanceSelector"] = vmi
    if ns:
        selectors["namespaceSelector"] = ns
    return {"metadata": {"name": name}, "spec": {"selectors": selectors, **spec}}


def test_a_policy_applies_only_when_all_its_labels_match() -> None:
    p = policy("p", vmi={"env": "prod", "size": "big"})
    assert select_policy([p], {"env": "prod"}, {}) is None
    assert select_policy([p], {"env": "prod", "size": "big", "x": "y"}, {}) is p


def test_namespace_labels_count_too() -> None:
    p = policy("p", vmi={"env": "prod"}, ns={"hpc": "true"})
    assert select_policy([p], {"env": "prod"}, {}) is None
    assert select_policy([p], {"env": "prod"}, {"hpc": "true"}) is p


def test_most_matching_labels_wins() -> None:
    small = policy("a-small", vmi={"env": "prod"})
    big = policy("z-big", vmi={"env": "prod"}, ns={"hpc": "true"})
    assert select_policy([small, big], {"env": "prod"}, {"hpc": "true"}) is big


def test_tie_is_broken_by_the_alphabetical_order_of_matching_keys_then_name() -> None:
    by_b = policy("alpha", vmi={"b-key": "1"})
    by_a = policy("zeta", vmi={"a-key": "1"})
    labels = {"a-key": "1", "b-key": "1"}
    assert select_policy([by_b, by_a], labels, {}) is by_a
    same_keys_1 = policy("beta", vmi={"a-key": "1"})
    assert select_policy([by_a, same_keys_1], labels, {}) is same_keys_1  # then by name


def test_effective_config_overlays_only_the_policy_fields() -> None:
    p = policy("fast", vmi={"env": "prod"}, bandwidthPerMigration="1Gi", allowAutoConverge=True)
    cluster = {**LIVE_MIGRATION_DEFAULTS, "progressTimeout": 99}
    config, name = effective_config(cluster, [p], {"env": "prod"}, {})
    assert name == "fast"
    assert config["bandwidthPerMigration"] == "1Gi" and config["allowAutoConverge"] is True
    assert config["progressTimeout"] == 99
    assert config["completionTimeoutPerGiB"] == 150
    config, name = effective_config(cluster, [p], {"env": "dev"}, {})
    assert name is None and config["bandwidthPerMigration"] == "0"
