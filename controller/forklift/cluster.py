"""What the orchestrator needs of a cluster's API, this cluster's API, and the singleton.

A :class:`ClusterApi` is :class:`vmferry.client.ApiClient` (a provider's cluster, through
its token) or :class:`LocalApi` (this cluster, in the controller); unit tests pass
``tests.support.fake_api.StoreApi``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

from controller.admission import Admission
from controller.store import Store
from vmferry.errors import AlreadyExists
from vmferry.objects import kinds, schema
from vmferry.objects.schema.forklift import FEATURE_OCP_LIVE_MIGRATION, truthy

Obj = dict[str, Any]


class ClusterApi(Protocol):
    async def get(self, kind: str, namespace: str | None, name: str) -> Obj: ...

    async def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> Obj: ...

    async def update(self, obj: Mapping[str, Any], *, subresource: str = "") -> Obj: ...

    async def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str = "",
        uid: str = "",
    ) -> Obj: ...


class LocalApi:
    """This cluster's API inside the controller: writes are validated, defaulted and
    admitted as the API server does (the controller's own identity: no RBAC)."""

    def __init__(self, store: Store, admission: Admission | None = None) -> None:
        self.store = store
        self.admission = admission or Admission(store)

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj:
        return await self.store.get(kind, namespace or "", name)

    async def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> Obj:
        checked = schema.validate(dict(obj))
        schema.fill_defaults(checked)
        await self.admission.admit_create(checked)
        if dry_run:
            return checked
        return await self.store.create(checked)

    async def update(self, obj: Mapping[str, Any], *, subresource: str = "") -> Obj:
        checked = schema.validate(dict(obj), server_managed=True)
        if not subresource:
            schema.fill_defaults(checked)
            meta = checked["metadata"]
            current = await self.store.get(checked["kind"], meta.get("namespace", ""), meta["name"])
            await self.admission.admit_update(current, checked, subresource)
        return await self.store.update(checked, subresource=subresource or None)

    async def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str = "",
        uid: str = "",
    ) -> Obj:
        current = await self.store.get(kind, namespace or "", name)
        await self.admission.admit_delete(current)
        return await self.store.delete(
            kind, namespace or "", name, resource_version=resource_version or None, uid=uid or None
        )


def forklift_controller_manifest() -> Obj:
    """The ForkliftController singleton as the controller creates it (feature off)."""
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "ForkliftController",
        "metadata": {"name": kinds.FORKLIFT_CONTROLLER_NAME, "namespace": kinds.MTV_NAMESPACE},
        "spec": {FEATURE_OCP_LIVE_MIGRATION: "false"},
    }


async def bootstrap_forklift(store: Store) -> None:
    """Create the namespace ``openshift-mtv`` and ``ForkliftController/forklift-controller``
    (as the MTV operator's installation does), when absent."""
    with contextlib.suppress(AlreadyExists):
        await store.create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": kinds.MTV_NAMESPACE}}
        )
    with contextlib.suppress(AlreadyExists):
        await store.create(forklift_controller_manifest())


def live_migration_feature(forklift_controller: Mapping[str, Any]) -> bool:
    """``spec.feature_ocp_live_migration`` of a ForkliftController (12.4.2)."""
    return truthy((forklift_controller.get("spec") or {}).get(FEATURE_OCP_LIVE_MIGRATION))


def feature_off_message(where: str) -> str:
    return (
        f"the MTV feature gate {FEATURE_OCP_LIVE_MIGRATION} is not enabled on {where}: "
        f"vmferry patch ForkliftController {kinds.FORKLIFT_CONTROLLER_NAME} -n "
        f'{kinds.MTV_NAMESPACE} --type json -p \'[{{"op": "add", "path": '
        f'"/spec/{FEATURE_OCP_LIVE_MIGRATION}", "value": "true"}}]\''
    )
