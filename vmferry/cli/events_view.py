"""Events as kubectl shows them: the ``Events:`` section of ``describe`` and the columns of
``get events``; ``--field-selector``, which the CLI applies to what the API lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmferry.cli.cells import format_age
from vmferry.errors import BadRequest
from vmferry.events import involves

Obj = dict[str, Any]

_DESCRIBE_PADDING = 2  # describe's tabwriter pads columns by 2 (get's by 3)


def last_seen(event: Obj) -> str:
    return str(event.get("lastTimestamp") or event.get("firstTimestamp") or "")


def describe_age(event: Obj, now: datetime) -> str:
    """kubectl's describe Age: ``5s``, or ``3s (x4 over 40s)`` for a repeated event."""
    count = int(event.get("count") or 1)
    first = event.get("firstTimestamp") or event.get("lastTimestamp")
    if count > 1:
        return f"{format_age(last_seen(event), now)} (x{count} over {format_age(first, now)})"
    return format_age(first, now)


def source(event: Obj) -> str:
    """``From``: the component, then the host (``vmferry-handler, node1``)."""
    src = event.get("source") or {}
    parts = [
        str(src.get("component") or event.get("reportingComponent") or ""),
        str(src.get("host") or ""),
    ]
    return ", ".join(p for p in parts if p)


def involved_object(event: Obj) -> str:
    """``get events``' OBJECT column: ``virtualmachineinstance/vm1``."""
    ref = event.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def for_object(events: Sequence[Obj], obj: Obj) -> list[Obj]:
    """The events about ``obj``, oldest last-seen first (kubectl's order)."""
    return sorted((e for e in events if involves(e, obj)), key=last_seen)


def describe_section(events: Sequence[Obj], now: datetime | None = None) -> str:
    """The ``Events:`` block that ends ``describe`` (``Events:  <none>`` when empty)."""
    if not events:
        return "Events:  <none>\n"
    now = now or datetime.now(UTC)
    rows = [
        ["Type", "Reason", "Age", "From", "Message"],
        ["----", "------", "----", "----", "-------"],
    ]
    rows += [
        [
            str(e.get("type", "")),
            str(e.get("reason", "")),
            describe_age(e, now),
            source(e),
            " ".join(str(e.get("message", "")).split("\n")),
        ]
        for e in events
    ]
    widths = [max(len(row[i]) for row in rows) + _DESCRIBE_PADDING for i in range(4)]
    lines = ["Events:"]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:4])] + [row[4]]
        lines.append(("  " + "".join(cells)).rstrip())
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class FieldRequirement:
    path: tuple[str, ...]
    value: str
    equal: bool

    def matches(self, obj: Obj) -> bool:
        current: Any = obj
        for part in self.path:
            current = current.get(part) if isinstance(current, dict) else None
        text = "" if current is None else str(current)
        return (text == self.value) == self.equal


def parse_field_selector(text: str) -> list[FieldRequirement]:
    """kubectl's ``--field-selector``: ``a.b=v``, ``a.b==v`` or ``a.b!=v``, comma-separated."""
    requirements = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        op = "!=" if "!=" in term else "==" if "==" in term else "="
        field, sep, value = term.partition(op)
        if not sep:
            raise BadRequest(
                f'invalid field selector: "{term}": expected FIELD=VALUE or FIELD!=VALUE'
            )
        if not field or not all(field.split(".")):
            raise BadRequest(f'invalid field selector: "{term}": the field is empty')
        requirements.append(FieldRequirement(tuple(field.split(".")), value, op != "!="))
    return requirements


def select(objs: Sequence[Obj], requirements: Sequence[FieldRequirement]) -> list[Obj]:
    return [o for o in objs if all(r.matches(o) for r in requirements)]
