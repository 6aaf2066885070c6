"""Plans: what a ``live`` Plan needs before a Migration can run it, and its ``Ready``
condition.

A plan is run by the orchestrator of its *source* cluster (the sending VMIMs are created
here), so its source provider is this cluster (a provider without url, MTV's ``host``);
its destination provider is another cluster, reached through its token. Both providers
must be Ready, and every VM must exist here. :func:`resolve_plan` is the one check, used
by :class:`PlanReconciler` (the condition) and by the Migration reconciler (before it
starts).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.forklift.cluster import ClusterApi
from controller.forklift.provider import READY, provider_ready
from vmferry.errors import NotFound
from vmferry.informer import Key
from vmferry.objects import conditions, schema
from vmferry.objects.schema.forklift import PlanType

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class PlanError(Exception):
    """A plan cannot run; the message says which rule failed."""


class PlanPending(PlanError):
    """A plan cannot run *yet*: a provider has not been checked since it changed."""


@dataclass(frozen=True)
class PlanVM:
    namespace: str
    name: str


@dataclass(frozen=True)
class ResolvedPlan:
    plan: Obj
    source: Obj  # the source Provider
    destination: Obj  # the destination Provider
    target_namespace: str
    vms: tuple[PlanVM, ...]

    @property
    def name(self) -> str:
        meta = self.plan["metadata"]
        return f"{meta.get('namespace', '')}/{meta['name']}"


def plan_vms(plan: Mapping[str, Any]) -> tuple[PlanVM, ...]:
    ns = plan["metadata"].get("namespace", "")
    return tuple(
        PlanVM(str(vm.get("namespace") or ns), str(vm["name"]))
        for vm in (plan.get("spec") or {}).get("vms") or []
    )


async def _provider(home: ClusterApi, plan: Mapping[str, Any], role: str) -> Obj:
    ref = ((plan.get("spec") or {}).get("provider") or {}).get(role) or {}
    ns = ref.get("namespace") or plan["metadata"].get("namespace", "")
    try:
        provider = await home.get("Provider", ns, ref.get("name", ""))
    except NotFound:
        raise PlanError(
            f'the {role} provider "{ns}/{ref.get("name", "")}" does not exist'
        ) from None
    generation = provider["metadata"].get("generation", 0)
    if (provider.get("status") or {}).get("observedGeneration") != generation:
        raise PlanPending(f'the {role} provider "{ns}/{ref.get("name", "")}" is being checked')
    ready, why = provider_ready(provider)
    if not ready:
        raise PlanError(f'the {role} provider "{ns}/{ref.get("name", "")}" is not {READY}: {why}')
    return provider


async def resolve_plan(home: ClusterApi, plan: Mapping[str, Any]) -> ResolvedPlan:
    """The plan's providers and VMs, checked; PlanError naming the rule that failed."""
    spec = plan.get("spec") or {}
    if spec.get("type") != PlanType.LIVE:
        raise PlanError(
            f'plan type "{spec.get("type")}" is not supported: only "{PlanType.LIVE}" '
            "(cross-cluster live migration)"
        )
    source = await _provider(home, plan, "source")
    destination = await _provider(home, plan, "destination")
    if (source.get("spec") or {}).get("url"):
        raise PlanError(
            f'the source provider "{source["metadata"]["name"]}" must be this cluster (a '
            "provider without url, MTV's host provider): a plan runs where its VMs are"
        )
    if not (destination.get("spec") or {}).get("url"):
        raise PlanError(
            f'the destination provider "{destination["metadata"]["name"]}" is this cluster: '
            "a live plan moves VMs to another cluster (give its url and secret)"
        )
    vms = plan_vms(plan)
    for vm in vms:
        try:
            await home.get("VirtualMachine", vm.namespace, vm.name)
        except NotFound:
            raise PlanError(f'VM "{vm.namespace}/{vm.name}" does not exist') from None
    return ResolvedPlan(dict(plan), source, destination, str(spec["targetNamespace"]), vms)


class PlanReconciler:
    """Sets a Plan's ``Ready`` condition from :func:`resolve_plan`."""

    def __init__(self, home: ClusterApi) -> None:
        self.home = home

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            plan = await self.home.get("Plan", ns, name)
        except NotFound:
            return
        try:
            resolved = await resolve_plan(self.home, plan)
        except PlanError as e:
            ready, reason, message = False, "NotReady", str(e)
        else:
            ready, reason = True, "Ready"
            message = (
                f"{len(resolved.vms)} VM(s) to {resolved.destination['metadata']['name']}"
                f"/{resolved.target_namespace}"
            )
        status = plan.setdefault("status", {})
        if conditions.set_condition(status, READY, ready, reason, message):
            await self.home.update(schema.validate(plan, server_managed=True), subresource="status")
            log.info("plan %s/%s: %s %s: %s", ns, name, READY, ready, message)
