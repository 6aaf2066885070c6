"""Cells of the CLI's tables: reading fields of unstructured objects and formatting
them as kubectl does (ages, durations, Go's ``%v``, tabwriter alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from vmferry.objects import jsonpath
from vmferry.objects.kinds import Kind

Obj = dict[str, Any]


def field(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def cell_text(value: Any) -> str:
    """A table cell: None is empty, booleans as ``true``/``false`` (kubectl's columns)."""
    if value is None:
        return ""
    return jsonpath.format_value(value)


def condition(obj: Obj, condition_type: str) -> Obj | None:
    for condition in field(obj, "status", "conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == condition_type:
            return condition
    return None


def condition_status(obj: Obj, condition_type: str, default: str = "") -> str:
    found = condition(obj, condition_type)
    if found is None:
        return default
    return cell_text(found.get("status"))


def resource_name(kind: Kind) -> str:
    """``-o name``'s prefix: ``virtualmachineinstancemigration.kubevirt.io``, ``node``."""
    return f"{kind.singular}.{kind.group}" if kind.group else kind.singular


# ---------------------------------------------------------------------------------------
# Age


def human_duration(seconds: float) -> str:
    """kubectl's ``duration.HumanDuration``: ``5s``, ``3m20s``, ``15m``, ``5h3m``, ``2d4h``,
    ``45d``, ``2y100d``."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        rest = whole % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        years = hours // 24 // 365
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{hours // 24 // 365}y"


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_age(timestamp: Any, now: datetime) -> str:
    """The AGE column for an RFC 3339 ``timestamp``; ``<unknown>`` when there is none."""
    created = parse_time(timestamp)
    if created is None:
        return "<unknown>"
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return human_duration((now - created).total_seconds())


# ---------------------------------------------------------------------------------------
# Tables


_TABLE_MIN_WIDTH = 6  # kubectl's tabwriter: minimal cell width, padding included
_TABLE_PADDING = 3


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Align cells as kubectl's tabwriter does: every column but the last is as wide as
    its widest cell plus 3 spaces (at least 6). Lines end with a newline, without
    trailing spaces."""
    if not rows:
        return ""
    columns = max(len(row) for row in rows)
    widths = [
        max(_TABLE_MIN_WIDTH, *(len(row[i]) + _TABLE_PADDING for row in rows if i < len(row)))
        for i in range(columns - 1)
    ]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row)]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def go_value(value: Any) -> str:
    """Go's ``%v`` of an unstructured value."""
    if value is None:
        return "<nil>"
    if isinstance(value, list | dict):
        return jsonpath.to_compact_json(value)
    return jsonpath.format_value(value)
