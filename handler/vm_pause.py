"""A user's pause (``vmferry pause vmi X``, virtctl's verb): the handler running the guest
keeps it paused while the VMI carries :data:`vmferry.objects.kinds.PAUSE_ANNOTATION`, and reports it as
KubeVirt does — the condition ``Paused: True`` (reason ``PausedByUser``) and an Event.

The desired state is the annotation (metadata: a user may change it on a running VMI);
the actual one is the guest's (``handle.status().state``), asked only when the VMI is,
or should be, paused. A guest the user did not pause is never resumed here (a migration
pauses its source at the switchover: the manager does not call this while one runs).
A paused guest that migrates is paused again on its target by that node's handler.
"""

from __future__ import annotations

import logging
from typing import Any

from handler.drivers.base import VMHandle
from vmferry.client import ApiClient
from vmferry.errors import Conflict
from vmferry.events import EventRecorder, Reason
from vmferry.objects import conditions
from vmferry.objects.kinds import PAUSE_ANNOTATION

log = logging.getLogger(__name__)
Obj = dict[str, Any]

PAUSED_CONDITION = "Paused"
PAUSED_BY_USER = "PausedByUser"  # KubeVirt's reason


def wants_pause(vmi: Obj) -> bool:
    annotations = (vmi.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(PAUSE_ANNOTATION, "")).lower() == "true"


class PauseKeeper:
    def __init__(self, api: ApiClient, events: EventRecorder) -> None:
        self.api = api
        self.events = events

    async def reconcile(self, vmi: Obj, handle: VMHandle) -> None:
        want = wants_pause(vmi)
        shown = conditions.is_true(vmi, PAUSED_CONDITION)
        if not want and not shown:
            return  # the common case: no call to the guest
        paused = (await handle.status()).state == "paused"
        if want and not paused:
            await handle.pause()
            self.events.normal(vmi, Reason.PAUSED, "VirtualMachineInstance paused by user.")
        elif not want and paused:
            await handle.resume()
            self.events.normal(vmi, Reason.RESUMED, "VirtualMachineInstance unpaused by user.")
        await self._report(vmi, want)

    async def _report(self, vmi: Obj, paused: bool) -> None:
        status = vmi.setdefault("status", {})
        if paused:
            changed = conditions.set_condition(
                status, PAUSED_CONDITION, True, PAUSED_BY_USER, "VMI was paused by user"
            )
        else:  # KubeVirt removes the condition on unpause
            before = len(status.get("conditions") or [])
            status["conditions"] = [
                c for c in status.get("conditions") or [] if c.get("type") != PAUSED_CONDITION
            ]
            changed = len(status["conditions"]) != before
        if not changed:
            return
        try:
            await self.api.update(vmi, subresource="status")
        except Conflict:  # the next pass (every few seconds) reports it
            log.debug("vmi %s: pause condition not written (conflict)", vmi["metadata"]["name"])
