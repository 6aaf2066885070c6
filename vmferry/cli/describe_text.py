"""``vmferry describe``: an object as ``oc describe`` shows a custom resource."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from vmferry.cli import events_view
from vmferry.cli.cells import Obj, cell_text, go_value
from vmferry.objects.kinds import Kind

_ACRONYMS = frozenset({"API", "URL", "UID", "OSB", "GUID"})


def _camel_split(text: str) -> list[str]:
    """fatih/camelcase.Split, which kubectl's describe uses."""
    runs: list[list[str]] = []
    last_class = 0
    for ch in text:
        if ch.islower():
            char_class = 1
        elif ch.isupper():
            char_class = 2
        elif ch.isdigit():
            char_class = 3
        else:
            char_class = 4
        if char_class == last_class:
            runs[-1].append(ch)
        else:
            runs.append([ch])
        last_class = char_class
    for i in range(len(runs) - 1):  # "PDFL", "oader" -> "PDF", "Loader"
        if runs[i] and runs[i][0].isupper() and runs[i + 1] and runs[i + 1][0].islower():
            runs[i + 1].insert(0, runs[i].pop())
    return ["".join(run) for run in runs if run]


def smart_label(field: str) -> str:
    """A field name as ``describe`` shows it: ``migrationState`` -> ``Migration State``,
    ``apiVersion`` -> ``API Version``, ``uid`` -> ``UID``; names with characters other
    than letters and ``-`` (label keys, ``ca.crt``) stay as they are."""
    if not field or any(not (ch.isalpha() or ch == "-") for ch in field):
        return field
    words = []
    for part in _camel_split(field):
        if part == "_":
            continue
        words.append(part.upper() if part.upper() in _ACRONYMS else part[:1].upper() + part[1:])
    return " ".join(words)


class _DescribeWriter:
    """Lines of ``Key:<tab>value`` as kubectl's tabwriter aligns them: consecutive
    key/value lines form a block whose values start 2 spaces after its longest key."""

    PADDING = 2

    def __init__(self) -> None:
        self.lines: list[tuple[str, str | None]] = []  # (cell, value) or (line, None)

    def pair(self, level: int, key: str, value: str) -> None:
        first, *rest = value.split("\n")
        self.lines.append(("  " * level + key, first))
        for line in rest:
            self.lines.append((line, None))

    def line(self, level: int, text: str) -> None:
        self.lines.append(("  " * level + text, None))

    def render(self) -> str:
        out: list[str] = []
        i = 0
        while i < len(self.lines):
            j = i
            while j < len(self.lines) and self.lines[j][1] is not None:
                j += 1
            if j == i:
                out.append(self.lines[i][0].rstrip())
                i += 1
                continue
            width = max(len(cell) for cell, _ in self.lines[i:j]) + self.PADDING
            for cell, value in self.lines[i:j]:
                out.append((cell.ljust(width) + (value or "")).rstrip())
            i = j
        return "".join(line + "\n" for line in out)


_CONDITION_COLUMNS = (
    ("Type", "type"),
    ("Status", "status"),
    ("Reason", "reason"),
    ("Message", "message"),
)


def _is_condition_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(c, dict) and "type" in c for c in value)
    )


def _describe_conditions(w: _DescribeWriter, level: int, conditions: list[Obj]) -> None:
    rows = [[header for header, _ in _CONDITION_COLUMNS]]
    rows.append(["-" * len(header) for header, _ in _CONDITION_COLUMNS])
    for condition in conditions:
        rows.append([cell_text(condition.get(key)) for _, key in _CONDITION_COLUMNS])
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(_CONDITION_COLUMNS) - 1)]
    for row in rows:
        text = "".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + row[-1]
        w.line(level, text.rstrip())


def _describe_content(w: _DescribeWriter, level: int, content: Obj, skip: frozenset[str]) -> None:
    for key in sorted(content, key=str):
        if key in skip:
            continue
        value = content[key]
        label = smart_label(str(key))
        if isinstance(value, dict):
            w.line(level, f"{label}:")
            _describe_content(w, level + 1, value, frozenset())
        elif key == "conditions" and _is_condition_list(value):
            w.line(level, f"{label}:")
            _describe_conditions(w, level + 1, value)
        elif isinstance(value, list):
            w.line(level, f"{label}:")
            for child in value:
                if isinstance(child, dict):
                    _describe_content(w, level + 1, child, frozenset())
                else:
                    w.line(level + 1, go_value(child))
        else:
            w.pair(level, f"{label}:", go_value(value))


_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _describe_map(w: _DescribeWriter, title: str, entries: list[str]) -> None:
    if not entries:
        w.pair(0, f"{title}:", "<none>")
        return
    w.pair(0, f"{title}:", entries[0])
    for entry in entries[1:]:
        w.pair(0, "", entry)


def describe(obj: Obj, kind: Kind, events: Sequence[Obj] = (), now: datetime | None = None) -> str:
    """``vmferry describe``: the object as ``oc describe`` shows a custom resource.

    Name, Namespace (namespaced kinds), Labels and Annotations first, then every other
    top-level field in sorted order (API Version, Kind, Metadata, Spec, Status, ...) as
    indented ``Key:  value`` blocks with kubectl's labels (``Migration State``), any
    ``conditions`` list as a Type/Status/Reason/Message table, and the ``events`` about
    it (``Events:  <none>`` without).
    """
    metadata = obj.get("metadata") or {}
    w = _DescribeWriter()
    w.pair(0, "Name:", cell_text(metadata.get("name")))
    if kind.namespaced:
        w.pair(0, "Namespace:", cell_text(metadata.get("namespace")))
    labels = metadata.get("labels") or {}
    _describe_map(w, "Labels", [f"{k}={cell_text(labels[k])}" for k in sorted(labels)])
    annotations = metadata.get("annotations") or {}
    _describe_map(
        w,
        "Annotations",
        [f"{k}: {cell_text(annotations[k])}" for k in sorted(annotations) if k != _LAST_APPLIED],
    )
    content = dict(obj)
    content["metadata"] = {
        k: v
        for k, v in metadata.items()
        if k not in ("name", "namespace", "labels", "annotations", "managedFields")
    }
    _describe_content(w, 0, content, frozenset())
    return w.render() + events_view.describe_section(events_view.for_object(events, obj), now)
