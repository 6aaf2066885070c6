"""A sync controller announces itself, and the cluster's sync addresses are published.

Each ``vmferry-sync-controller`` renews a Lease (coordination.k8s.io/v1)
``virt-synchronization-controller-<id>`` in ``openshift-cnv`` every
:data:`~vmferry.decentralized.LEASE_RENEW_SECONDS`, holder = its id, annotation
:data:`~vmferry.decentralized.SYNC_ADDRESS_ANNOTATION` = the "host:port" peers dial. Every
sync controller keeps ``HyperConverged.status.synchronizationAddresses`` = the addresses of
the fresh leases (renewed within their ``leaseDurationSeconds``), sorted; it patches the
status only when that set changed, so several sync controllers agree without fighting.
On a clean stop a sync controller deletes its lease (its address goes at once); a killed
one's address goes when its lease expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from controller.objects import rfc3339
from vmferry.decentralized import (
    LEASE_RENEW_SECONDS,
    LEASE_SECONDS,
    SYNC_ADDRESS_ANNOTATION,
    SYNC_ADDRESSES_FIELD,
    SYNC_LEASE_PREFIX,
)
from vmferry.errors import ApiError, BadRequest, NotFound
from vmferry.objects.conditions import parse_time
from vmferry.objects.kinds import HYPERCONVERGED_NAME, SYSTEM_NAMESPACE

log = logging.getLogger("vmferry.sync.lease")

Obj = dict[str, Any]
LEASE_KIND = "Lease"
LEASE_API_VERSION = "coordination.k8s.io/v1"
HYPERCONVERGED_KIND = "HyperConverged"
ID_CHARS = 5  # like a pod name's suffix


class Api(Protocol):
    async def create(self, obj: Obj, *, dry_run: bool = False) -> Obj: ...
    async def get(self, kind: str, namespace: str | None, name: str) -> Obj: ...
    async def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], Any]: ...
    async def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: str = "merge",
        subresource: str = "",
        resource_version: str = "",
    ) -> Obj: ...
    async def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str = "",
        uid: str = "",
    ) -> Obj: ...


def default_id(cluster_name: str, advertise: str) -> str:
    """A stable id of the sync controller advertising ``advertise`` (a restart renews the
    same lease instead of leaving a stale one)."""
    digest = hashlib.sha256(f"{cluster_name}/{advertise}".encode()).hexdigest()
    return digest[:ID_CHARS]


def lease_name(sync_id: str) -> str:
    return f"{SYNC_LEASE_PREFIX}{sync_id}"


def lease_is_fresh(lease: Obj, now: float) -> bool:
    spec = lease.get("spec") or {}
    renewed = spec.get("renewTime")
    if not renewed:
        return False
    try:
        at = parse_time(str(renewed)).timestamp()
    except ValueError:
        return False
    return at + float(spec.get("leaseDurationSeconds") or LEASE_SECONDS) > now


def fresh_addresses(leases: list[Obj], now: float) -> list[str]:
    """The sync addresses of the fresh sync-controller leases, sorted, without repeats."""
    addresses = {
        str(address)
        for lease in leases
        if (lease.get("metadata") or {}).get("name", "").startswith(SYNC_LEASE_PREFIX)
        and lease_is_fresh(lease, now)
        and (
            address := ((lease.get("metadata") or {}).get("annotations") or {}).get(
                SYNC_ADDRESS_ANNOTATION
            )
        )
    }
    return sorted(addresses)


def _kind_not_served(e: ApiError) -> bool:
    """The API does not know the kind (the Lease kind is newer than some controllers)."""
    return isinstance(e, BadRequest) and (
        "resource type" in str(e) or f'no kind "{LEASE_KIND}"' in str(e)
    )


class SyncAnnouncer:
    """The lease of one sync controller and the HyperConverged's sync addresses."""

    def __init__(
        self,
        api: Api,
        sync_id: str,
        advertise: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.sync_id = sync_id
        self.advertise = advertise
        self.clock = clock  # wall clock: lease times are timestamps
        self.name = lease_name(sync_id)
        self._said: set[str] = set()  # problems logged once until they go away
        self._held = False  # the lease was written (a clean stop deletes it)

    def _once(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    def _clear(self, key: str) -> None:
        self._said.discard(key)

    def _lease(self, now: float) -> Obj:
        return {
            "apiVersion": LEASE_API_VERSION,
            "kind": LEASE_KIND,
            "metadata": {
                "name": self.name,
                "namespace": SYSTEM_NAMESPACE,
                "annotations": {SYNC_ADDRESS_ANNOTATION: self.advertise},
            },
            "spec": {
                "holderIdentity": self.sync_id,
                "leaseDurationSeconds": LEASE_SECONDS,
                "acquireTime": rfc3339(now, precise=True),
                "renewTime": rfc3339(now, precise=True),
            },
        }

    async def renew(self) -> bool:
        """Create or renew this sync controller's lease; False when it could not be."""
        now = self.clock()
        try:
            try:
                await self.api.get(LEASE_KIND, SYSTEM_NAMESPACE, self.name)
            except NotFound:
                await self.api.create(self._lease(now))
            else:
                fresh = self._lease(now)
                await self.api.patch(
                    LEASE_KIND,
                    SYSTEM_NAMESPACE,
                    self.name,
                    {
                        "metadata": {"annotations": fresh["metadata"]["annotations"]},
                        "spec": {
                            "holderIdentity": self.sync_id,
                            "leaseDurationSeconds": LEASE_SECONDS,
                            "renewTime": fresh["spec"]["renewTime"],
                        },
                    },
                )
        except ApiError as e:
            if _kind_not_served(e):
                self._once(
                    "kind",
                    "the API serves no %s yet: sync controller %s not announced (%s)",
                    LEASE_KIND,
                    self.name,
                    e,
                )
            else:
                self._once("renew", "cannot renew lease %s: %s", self.name, e)
            return False
        self._clear("kind")
        self._clear("renew")
        self._held = True
        return True

    async def publish_addresses(self) -> list[str] | None:
        """Set ``status.synchronizationAddresses`` of the HyperConverged to the addresses
        of the fresh leases when it differs; returns them (None: not known now)."""
        try:
            leases, _ = await self.api.list(LEASE_KIND, SYSTEM_NAMESPACE)
        except ApiError as e:
            if not _kind_not_served(e):
                self._once("list", "cannot list leases: %s", e)
            return None
        self._clear("list")
        addresses = fresh_addresses(leases, self.clock())
        try:
            hco = await self.api.get(HYPERCONVERGED_KIND, SYSTEM_NAMESPACE, HYPERCONVERGED_NAME)
            current = (hco.get("status") or {}).get(SYNC_ADDRESSES_FIELD)
            if current != addresses:
                await self.api.patch(
                    HYPERCONVERGED_KIND,
                    SYSTEM_NAMESPACE,
                    HYPERCONVERGED_NAME,
                    {"status": {SYNC_ADDRESSES_FIELD: addresses}},
                    subresource="status",
                )
                log.info("synchronizationAddresses: %s", ", ".join(addresses) or "(none)")
        except ApiError as e:
            self._once(
                "hco",
                "cannot publish synchronizationAddresses in %s/%s: %s",
                SYSTEM_NAMESPACE,
                HYPERCONVERGED_NAME,
                e,
            )
            return addresses
        self._clear("hco")
        return addresses

    async def step(self) -> None:
        await self.renew()
        await self.publish_addresses()

    async def run(self, period: float = LEASE_RENEW_SECONDS) -> None:
        """Renew and publish every ``period`` until cancelled; then withdraw."""
        try:
            while True:
                await self.step()
                await asyncio.sleep(period)
        finally:
            await asyncio.shield(self._withdraw())

    async def _withdraw(self) -> None:
        """A clean stop: delete the lease and publish the addresses without this one."""
        if not self._held:
            return
        try:
            await asyncio.wait_for(self.api.delete(LEASE_KIND, SYSTEM_NAMESPACE, self.name), 5)
            await asyncio.wait_for(self.publish_addresses(), 5)
        except (ApiError, TimeoutError) as e:
            log.info("lease %s not withdrawn: %s", self.name, e)
