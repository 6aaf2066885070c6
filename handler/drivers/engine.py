"""What a driver's source engine is to the VM manager (``Driver.source_engine``).

The VM manager runs one engine per outgoing migration and knows it only through
:class:`SourceEngine`: which VMI and migration it serves, the abort request, whether it
committed (the VM now belongs to the target), and its progress (``Stats``, reported
through ``on_progress`` and read by the metrics collector).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from handler.migration_source import Stats

__all__ = ["ProgressCallback", "SourceEngine", "Stats"]

Obj = dict[str, Any]

ProgressCallback = Callable[[Obj, Stats], None]
"""``on_progress(vmi, stats)``: the engine's latest figures (a copy of its VMI)."""


class SourceEngine(Protocol):
    """One outgoing migration of one guest, whatever its driver."""

    uid: str  # the migration's uid
    ns: str
    name: str
    vmi: Obj  # the VMI as the engine started from (a copy)
    abort_requested: asyncio.Event  # set: cancel (abortRequested, or the VMI is deleted)
    committed: bool  # the hand-off is recorded: the VM belongs to the target
    stats: Stats

    async def run(self) -> None:
        """Migrate, until the migration ends (succeeded or failed, recorded in the VMI);
        it never raises for a failed migration."""
        ...
