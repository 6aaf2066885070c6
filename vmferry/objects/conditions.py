"""Kubernetes-style status conditions and timestamps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes it (second precision, ``Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_precise() -> str:
    """UTC time with microseconds, for phase transitions that happen in quick succession."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Parse either timestamp form above into an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def get(obj: Obj, ctype: str) -> Obj | None:
    """The condition of type ``ctype`` in ``obj.status.conditions``, or None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            result: Obj = cond
            return result
    return None


def is_true(obj: Obj, ctype: str) -> bool:
    cond = get(obj, ctype)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    status: Obj, ctype: str, value: bool, reason: str = "", message: str = "", **extra: str
) -> bool:
    """Set a condition in a status dict; returns True when something changed.

    ``lastTransitionTime`` moves only when the status value flips.
    """
    conds: list[Obj] = status.setdefault("conditions", [])
    new_status = "True" if value else "False"
    for cond in conds:
        if cond.get("type") == ctype:
            changed = cond.get("status") != new_status
            before = dict(cond)
            if changed:
                cond["lastTransitionTime"] = now_rfc3339()
            cond.update(status=new_status, reason=reason, message=message, **extra)
            return changed or before != cond
    conds.append(
        {
            "type": ctype,
            "status": new_status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_rfc3339(),
            **extra,
        }
    )
    return True


def set_phase(status: Obj, phase: str) -> None:
    """Set ``status.phase`` and record the transition in ``phaseTransitionTimestamps``
    (once per phase: a migration attempt passes each phase once)."""
    status["phase"] = phase
    stamps: list[Obj] = status.setdefault("phaseTransitionTimestamps", [])
    if not any(s.get("phase") == phase for s in stamps):
        stamps.append({"phase": phase, "phaseTransitionTimestamp": now_precise()})
