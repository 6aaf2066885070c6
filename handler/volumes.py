"""A guest's disks on this node: its VMI's claim volumes resolved to image files.

The controller binds claims (``controller.storage_controller``); a shared class's image
is already on the shared directory, which this node mounts at the same path. A local
claim is bound to this node and its image is created here, on first attach (raw,
sparse; copied from ``spec.dataSource`` when one is named), by :meth:`VolumeResolver.disks`,
and removed here when the claim is deleted (:class:`LocalReclaimer`; unless its class says
``reclaimPolicy: Retain``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

from handler.drivers.base import GuestStartError
from handler.drivers.qemu_handle import DiskSpec
from vmferry.disk_image import ImageError, create_image, remove_image
from vmferry.errors import NotFound
from vmferry.informer import Key
from vmferry.volumes import (
    PVC_KIND,
    STORAGE_CLASS_KIND,
    Claim,
    attach_problem,
    claim_volumes,
    live_migratable,
)

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class VolumeUnavailable(GuestStartError):
    """A volume cannot be attached here now (the message names it and why); the guest
    is not started, the VMI says why (condition ``VolumesReady=False``), and the handler
    tries again on its next pass."""


class ClaimReader(Protocol):
    async def list(
        self, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> tuple[list[Obj], str]: ...

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj: ...


class VolumeResolver:
    def __init__(self, api: ClaimReader, node: str) -> None:
        self.api = api
        self.node = node

    async def claims(self, vmi: Obj) -> dict[str, Obj]:
        """The PVCs of the VMI's namespace, by name (none read when it has no claim volume)."""
        if not claim_volumes(vmi.get("spec") or {}):
            return {}
        items, _ = await self.api.list(PVC_KIND, vmi["metadata"]["namespace"])
        return {c["metadata"]["name"]: c for c in items}

    async def live_migratable(self, vmi: Obj) -> tuple[bool, str, str]:
        """The LiveMigratable condition of the VMI (the RWX rule, vmferry.volumes)."""
        return live_migratable(vmi.get("spec") or {}, await self.claims(vmi))

    async def disks(self, vmi: Obj) -> tuple[DiskSpec, ...]:
        """The VMI's disks here; VolumeUnavailable naming the volume when one cannot be used."""
        claims = await self.claims(vmi)
        out = []
        for ref in claim_volumes(vmi.get("spec") or {}):
            obj = claims.get(ref.claim)
            problem = attach_problem(ref, obj, self.node)
            if problem is not None or obj is None:
                raise VolumeUnavailable(problem or f"volume {ref.name}: no claim")
            claim = Claim.of(obj)
            path = Path(claim.image_path)
            if claim.node_name:  # local: this node provisions it
                source = self._local_source(claim, claims)
                try:
                    if await asyncio.to_thread(create_image, path, claim.size_bytes, source):
                        log.info("pvc %s: local image %s created", claim.key, path)
                except ImageError as e:
                    raise VolumeUnavailable(f'volume "{ref.name}": {e}') from None
            elif not await asyncio.to_thread(path.is_file):
                raise VolumeUnavailable(
                    f'volume "{ref.name}": the image {path} of PersistentVolumeClaim '
                    f'"{claim.name}" is not on node {self.node}: is the shared directory '
                    "mounted here?"
                )
            try:
                disk = DiskSpec(name=ref.name, path=str(path), bus=ref.bus, shared=claim.shared)
            except ValueError as e:
                raise VolumeUnavailable(str(e)) from None
            out.append(disk)
        return tuple(out)

    @staticmethod
    def _local_source(claim: Claim, claims: dict[str, Obj]) -> Path | None:
        if claim.source.file:
            return Path(claim.source.file)
        if claim.source.claim and claim.source.claim in claims:
            return Path(Claim.of(claims[claim.source.claim]).image_path)
        return None


class LocalReclaimer:
    """Removes this node's images of deleted local claims (an informer handler on the
    PersistentVolumeClaims). A claim deleted while the handler was down keeps its image
    until removed by hand; a claim in use cannot be deleted (controller.admission)."""

    def __init__(self, api: ClaimReader, node: str) -> None:
        self.api = api
        self.node = node
        self._tasks: set[asyncio.Task[None]] = set()

    def on_claim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if new is not None or old is None:
            return
        claim = Claim.of(old)
        if claim.node_name != self.node or not claim.image_path:
            return
        task = asyncio.get_running_loop().create_task(self.reclaim(claim))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reclaim(self, claim: Claim) -> None:
        if claim.storage_class:
            try:
                sc = await self.api.get(STORAGE_CLASS_KIND, None, claim.storage_class)
            except NotFound:
                sc = {}
            if sc.get("reclaimPolicy") == "Retain":
                return
        if await asyncio.to_thread(remove_image, Path(claim.image_path)):
            log.info("pvc %s: deleted, local image %s removed", claim.key, claim.image_path)
