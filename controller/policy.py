"""Migration configuration: the cluster's ``liveMigrationConfig`` overlaid by the
MigrationPolicy that wins for a VMI (reference 12.2.4).

A policy applies when every label of its ``virtualMachineInstanceSelector`` is on the
VMI and every label of its ``namespaceSelector`` is on the VMI's namespace. Among the
policies that apply, the one with the most matching labels wins; on a tie, policies are
ordered by the alphabetical order of their matching label keys and the first wins, and
then by name, so the choice is always deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vmferry.migration_state import LIVE_MIGRATION_DEFAULTS

Obj = dict[str, Any]

# Fields a MigrationPolicy may override; everything else comes from the cluster config.
POLICY_FIELDS = (
    "allowAutoConverge",
    "bandwidthPerMigration",
    "completionTimeoutPerGiB",
    "allowPostCopy",
)
# What the hand-off carries to the handlers.
HANDOFF_FIELDS = (
    "bandwidthPerMigration",
    "completionTimeoutPerGiB",
    "progressTimeout",
    "allowAutoConverge",
    "allowPostCopy",
    "downtimeBudgetMilliseconds",
    "parallelStreams",
    "network",
    "postCopyRecoveryWindowSeconds",
    "compression",
)


def matching_keys(
    policy: Obj, vmi_labels: Mapping[str, str], ns_labels: Mapping[str, str]
) -> list[str] | None:
    """The label keys through which ``policy`` matches (sorted), or None if it does not apply."""
    selectors = (policy.get("spec") or {}).get("selectors") or {}
    keys: list[str] = []
    for wanted, have in (
        (selectors.get("virtualMachineInstanceSelector") or {}, vmi_labels),
        (selectors.get("namespaceSelector") or {}, ns_labels),
    ):
        for key, value in wanted.items():
            if have.get(key) != value:
                return None
            keys.append(key)
    return sorted(keys)


def select_policy(
    policies: Iterable[Obj], vmi_labels: Mapping[str, str], ns_labels: Mapping[str, str]
) -> Obj | None:
    """The winning policy for a VMI with these labels, or None."""
    candidates = []
    for policy in policies:
        keys = matching_keys(policy, vmi_labels, ns_labels)
        if keys is not None:
            candidates.append((-len(keys), keys, policy["metadata"]["name"], policy))
    if not candidates:
        return None
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    return candidates[0][3]


def effective_config(
    cluster: Mapping[str, Any] | None,
    policies: Iterable[Obj],
    vmi_labels: Mapping[str, str],
    ns_labels: Mapping[str, str],
) -> tuple[Obj, str | None]:
    """(configuration for the hand-off, name of the policy applied or None)."""
    config: Obj = dict(LIVE_MIGRATION_DEFAULTS)
    config.update(cluster or {})
    policy = select_policy(policies, vmi_labels, ns_labels)
    if policy is not None:
        spec = policy.get("spec") or {}
        for field in POLICY_FIELDS:
            if field in spec:
                config[field] = spec[field]
    handoff = {k: config[k] for k in HANDOFF_FIELDS if config.get(k) is not None}
    return handoff, policy["metadata"]["name"] if policy else None
