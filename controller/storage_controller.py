"""The volume provisioner: binds PersistentVolumeClaims (the contract is
:mod:`vmferry.volumes`).

Level-triggered over the claims and the StorageClasses: every claim event queues that
claim; a StorageClass event queues every Pending claim (a class created after its claims
binds them). One pass over a Pending claim:

1. its class (``spec.storageClassName``, else the class annotated
   ``storageclass.kubernetes.io/is-default-class: "true"``) must exist and accept it
   (:func:`~vmferry.volumes.class_problem`): otherwise the claim stays Pending with the
   condition ``Provisioning=False`` naming why, retried every ``RETRY_S``;
2. a ``dataSource`` claim must exist, be Bound, be used by no VMI (a running guest's
   disk changes under the copy) and be readable where the work runs;
3. ``vmferry.io/shared``: the controller creates the image on the shared directory
   (:func:`~vmferry.disk_image.create_image` in a thread) and binds the claim;
   ``vmferry.io/local``: the claim is bound to its node (``status.nodeName``) at once and
   that node's handler creates the image when a guest first attaches it (the controller
   cannot reach another host's directory);
4. Bound: ``status.phase``, ``accessModes``, ``capacity.storage``, ``imagePath``,
   ``nodeName``, and ``Provisioning=True``.

A deleted claim of a shared class with ``reclaimPolicy: Delete`` (the default) has its
image removed (a local claim's: by its node's handler, ``handler.volumes``). The claim's spec is not re-read once Bound (as Kubernetes: a bound claim's
class and size do not change here).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from controller.objects import write_status
from controller.store import Store
from vmferry.disk_image import ImageError, create_image, remove_image
from vmferry.errors import Conflict, NotFound
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.objects import conditions
from vmferry.volumes import (
    CONDITION_PROVISIONING,
    DEFAULT_CLASS_ANNOTATION,
    PVC_KIND,
    Claim,
    ClaimPhase,
    Provisioner,
    StorageClass,
    claim_volumes,
    class_problem,
    image_path,
)

log = logging.getLogger(__name__)
Obj = dict[str, Any]

RETRY_S = 3.0  # a claim that cannot be provisioned yet is tried again after this


class ProvisionError(Exception):
    """The claim cannot be bound now (``reason`` for the condition; message says why)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class StorageController:
    def __init__(self, store: Store, claims: Informer, classes: Informer) -> None:
        self.store = store
        self.claims = claims
        self.classes = classes
        self.queue = WorkQueue()
        self._deleted: dict[Key, Obj] = {}  # claims whose image is released on the next pass
        claims.add_handler(self._on_claim)
        classes.add_handler(self._on_class)

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "storage-controller")

    def _on_claim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if new is None and old is not None:
            self._deleted[key] = old
        self.queue.add(key)

    def _on_class(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        for claim in self.claims.items():
            if (claim.get("status") or {}).get("phase") != ClaimPhase.BOUND:
                self.queue.add((claim["metadata"]["namespace"], claim["metadata"]["name"]))

    def storage_class(self, claim: Claim) -> StorageClass:
        """The claim's class (or the default class); ProvisionError when there is none."""
        if claim.storage_class:
            obj = self.classes.get("", claim.storage_class)
            if obj is None:
                raise ProvisionError(
                    "StorageClassNotFound",
                    f'storageclass.storage.k8s.io "{claim.storage_class}" not found',
                )
            return StorageClass.of(obj)
        for obj in self.classes.items():
            annotations = obj["metadata"].get("annotations") or {}
            if annotations.get(DEFAULT_CLASS_ANNOTATION) == "true":
                return StorageClass.of(obj)
        raise ProvisionError(
            "NoStorageClass",
            "spec.storageClassName is not set and no StorageClass is annotated "
            f'{DEFAULT_CLASS_ANNOTATION}: "true"',
        )

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            obj = await self.store.get(PVC_KIND, ns, name)
        except NotFound:
            deleted = self._deleted.pop(key, None)
            if deleted is not None:
                await self._release(deleted)
            return
        if obj["metadata"].get("deletionTimestamp"):
            return
        claim = Claim.of(obj)
        if claim.phase == ClaimPhase.BOUND:
            return
        status = obj.setdefault("status", {})
        try:
            sc = self.storage_class(claim)
            problem = class_problem(sc, claim)
            if problem is not None:
                raise ProvisionError("ProvisioningFailed", problem)
            await self._refuse_source_in_use(claim)
            source = self._source_path(sc, claim)
            path = image_path(sc, claim)
            node = ""
            if sc.provisioner == Provisioner.SHARED:
                created = await asyncio.to_thread(
                    create_image, Path(path), claim.size_bytes, source
                )
                if created:
                    log.info(
                        "pvc %s: image %s created (%d bytes)", claim.key, path, claim.size_bytes
                    )
            else:
                node = claim.selected_node or sc.node
        except ProvisionError as e:
            await self._pending(obj, e.reason, e.message)
            self.queue.add_after(key, RETRY_S)
            return
        except ImageError as e:
            await self._pending(obj, "ProvisioningFailed", str(e))
            self.queue.add_after(key, RETRY_S)
            return
        status["phase"] = ClaimPhase.BOUND
        status["accessModes"] = [str(m) for m in claim.access_modes]
        requested = obj["spec"]["resources"]["requests"]["storage"]
        status["capacity"] = {"storage": str(requested)}  # as requested: "1Gi"
        status["imagePath"] = path
        if node:
            status["nodeName"] = node
        how = f"bound on node {node}" if node else "image on the shared directory"
        conditions.set_condition(status, CONDITION_PROVISIONING, True, "Provisioned", how)
        try:
            await write_status(self.store, obj)
        except Conflict:
            self.queue.add(key)
            return
        log.info("pvc %s: Bound (%s, %s)", claim.key, sc.name, how)

    async def _refuse_source_in_use(self, claim: Claim) -> None:
        """A claim is copied only while no VMI uses it: a running guest's disk changes
        under the copy, which would be neither its old nor its new content."""
        if not claim.source.claim:
            return
        vmis, _ = await self.store.list("VirtualMachineInstance", claim.namespace)
        for vmi in vmis:
            if any(r.claim == claim.source.claim for r in claim_volumes(vmi.get("spec") or {})):
                raise ProvisionError(
                    "DataSourceInUse",
                    f'spec.dataSource: PersistentVolumeClaim "{claim.source.claim}" is in use '
                    f'by VirtualMachineInstance "{vmi["metadata"]["name"]}": it is copied once '
                    "no VM uses it",
                )

    def _source_path(self, sc: StorageClass, claim: Claim) -> Path | None:
        if claim.source.file:
            if sc.provisioner == Provisioner.LOCAL:
                return None  # the node's handler reads it (handler.volumes)
            return Path(claim.source.file)
        if not claim.source.claim:
            return None
        src_obj = self.claims.get(claim.namespace, claim.source.claim)
        if src_obj is None:
            raise ProvisionError(
                "DataSourceNotFound",
                f'spec.dataSource: PersistentVolumeClaim "{claim.source.claim}" does not exist',
            )
        src = Claim.of(src_obj)
        if src.phase != ClaimPhase.BOUND or not src.image_path:
            raise ProvisionError(
                "DataSourceNotBound",
                f'spec.dataSource: PersistentVolumeClaim "{src.name}" is not bound yet',
            )
        local_target = sc.provisioner == Provisioner.LOCAL
        target_node = claim.selected_node or sc.node
        if src.node_name and (not local_target or src.node_name != target_node):
            raise ProvisionError(
                "DataSourceUnreachable",
                f'spec.dataSource: PersistentVolumeClaim "{src.name}" is local to node '
                f"{src.node_name}: it can only be copied to a local claim on that node",
            )
        return None if local_target else Path(src.image_path)

    async def _pending(self, obj: Obj, reason: str, message: str) -> None:
        status = obj.setdefault("status", {})
        changed = status.get("phase") != ClaimPhase.PENDING
        status["phase"] = ClaimPhase.PENDING
        changed |= conditions.set_condition(status, CONDITION_PROVISIONING, False, reason, message)
        if changed:
            log.warning(
                "pvc %s/%s: %s", obj["metadata"]["namespace"], obj["metadata"]["name"], message
            )
            try:
                await write_status(self.store, obj)
            except (Conflict, NotFound):
                pass

    async def _release(self, obj: Obj) -> None:
        claim = Claim.of(obj)
        if not claim.image_path or claim.node_name:
            return  # never provisioned, or on a node (its handler's directory)
        sc_obj = self.classes.get("", claim.storage_class) if claim.storage_class else None
        if sc_obj is not None and sc_obj.get("reclaimPolicy") == "Retain":
            return
        if await asyncio.to_thread(remove_image, Path(claim.image_path)):
            log.info("pvc %s: deleted, image %s removed", claim.key, claim.image_path)


__all__ = ["StorageController"]
