"""The restart record: what a target handler restarted after the hand-off resumes from.

Both target services (memvm Transfer, QEMU Tunnel) write one JSON file per incoming
migration, ``<record dir>/<migration uid>.json``, before they report the memory verified:
the incoming guest's vm id, its device state (empty for QEMU, whose device state is in
its own stream) and whether it is a post-copy hand-off. A handler that restarts finds the
guest (adopted, still waiting) and settles it through the arbiter: Committed and a record
→ resume from the record; anything else → destroy. A post-copy record (``postcopy``)
instead makes the guest's receiver registered again (handler/vm_postcopy.py): the guest,
resumed in post-copy if it was still waiting, keeps its present bitmap, and the source's
reconnect brings the pages it lacks. Every end of the migration removes it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RestartRecord:
    vm_id: str
    device_state: bytes
    postcopy: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "vmId": self.vm_id,
                "deviceState": base64.b64encode(self.device_state).decode(),
                "postcopy": self.postcopy,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RestartRecord:
        """ValueError when ``text`` is not a record."""
        data: Any = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("vmId"), str):
            raise ValueError("not a restart record")
        return cls(
            data["vmId"],
            base64.b64decode(data.get("deviceState") or ""),
            bool(data.get("postcopy")),
        )


class RestartRecords:
    """The records of one handler, in ``directory`` (None: records are not kept, as in
    tests that run a service alone: writes do nothing, reads find nothing)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def path(self, migration_uid: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{migration_uid}.json"

    def write(self, migration_uid: str, record: RestartRecord) -> None:
        """Blocking (a worker's): write atomically (a temporary file, then a rename)."""
        path = self.path(migration_uid)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.to_json())
        tmp.replace(path)

    def write_soon(self, migration_uid: str, record: RestartRecord) -> asyncio.Future[None] | None:
        """Start write() in a worker; None when no records are kept. A failure nobody
        awaits (the source went away first) is not reported as never retrieved."""
        if self.directory is None:
            return None
        written = asyncio.ensure_future(asyncio.to_thread(self.write, migration_uid, record))
        written.add_done_callback(consume_failure)
        return written

    def read(self, migration_uid: str) -> RestartRecord | None:
        """Blocking (a small file): the record, or None when there is none (or it is
        unreadable: a record half written by a crash is no record)."""
        path = self.path(migration_uid)
        if path is None:
            return None
        try:
            return RestartRecord.from_json(path.read_text())
        except (OSError, ValueError):
            return None

    def remove(self, migration_uid: str) -> None:
        path = self.path(migration_uid)
        if path is not None:
            path.unlink(missing_ok=True)


def consume_failure(future: asyncio.Future[Any]) -> None:
    """Done-callback: retrieve a future's exception so that an unawaited failure is not
    logged as never retrieved; whoever awaits the future still gets it raised."""
    if not future.cancelled():
        future.exception()
