"""What ``vmferry get`` and ``vmferry describe`` print, formatted as ``oc``/``kubectl`` do.

Every function returns the text to write to stdout, with kubectl's trailing newline
conventions (tables, YAML, JSON and names end with a newline; a JSONPath result does
not), so the caller writes it with ``sys.stdout.write``. The one exception is the "No
resources found" notice, which kubectl writes to stderr: ``print_objects`` returns it
for an empty table (see its docstring) and ``empty_message`` builds it on its own.

Output formats (``-o``): table (None), ``wide``, ``yaml``, ``json``, ``name``,
``jsonpath=<template>``, ``jsonpath-as-json=<template>``, ``jsonpath-file=<path>`` and
``custom-columns=<HEADER>:<path>,...``. ``validate_output`` checks one before any
request is made.

The parts live in their own modules and are re-exported here: the cells (accessors,
ages, tabwriter alignment) in ``cells``, each kind's columns in ``columns``, and
``describe`` in ``describe_text``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from vmferry.cli.cells import (
    Obj,
    format_age,
    format_table,
    go_value,
    human_duration,
    resource_name,
)
from vmferry.cli.columns import columns_for, object_name
from vmferry.cli.describe_text import describe, smart_label
from vmferry.objects import jsonpath
from vmferry.objects.kinds import Kind

__all__ = [
    "OUTPUT_FORMATS",
    "OutputFormatError",
    "describe",
    "empty_message",
    "format_age",
    "format_table",
    "has_header",
    "header_line",
    "human_duration",
    "is_empty_notice",
    "print_objects",
    "relaxed_template",
    "resource_name",
    "smart_label",
    "to_json",
    "to_yaml",
    "validate_output",
]


OUTPUT_FORMATS = (
    "custom-columns",
    "json",
    "jsonpath",
    "jsonpath-as-json",
    "jsonpath-file",
    "name",
    "wide",
    "yaml",
)


class OutputFormatError(ValueError):
    """An ``-o`` value that names no printer, or a template that is missing."""


# ---------------------------------------------------------------------------------------
# Serialisation


class _YamlDumper(yaml.SafeDumper):
    """Block style, no anchors/aliases, multi-line strings as ``|`` blocks and quoted
    strings in double quotes, as kubectl's YAML looks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def choose_scalar_style(self) -> str:
        style: str = super().choose_scalar_style()
        return '"' if style == "'" else style


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_YamlDumper.add_representer(str, _represent_str)


def to_yaml(obj: Any) -> str:
    """YAML in block style, keys in insertion order, never aliases; ends with a newline."""
    text: str = yaml.dump(
        obj,
        Dumper=_YamlDumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=True,
        width=1 << 30,
    )
    return text


def to_json(obj: Any) -> str:
    """JSON indented by 4 spaces (as kubectl), keys in insertion order; ends with a newline."""
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def _as_list(objs: Sequence[Obj]) -> Obj:
    """The ``List`` kubectl wraps several objects in (keys in kubectl's order)."""
    return {
        "apiVersion": "v1",
        "items": list(objs),
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


def has_header(output: str | None) -> bool:
    """The format prints a table with a header line (default, wide, custom-columns)."""
    return _parse_format(output).name in ("table", "wide", "custom-columns")


def header_line(
    kind: Kind, output: str | None, all_namespaces: bool = False, show_labels: bool = False
) -> str:
    """The header ``get -w`` prints before the first change of an empty list."""
    fmt = _parse_format(output)
    if fmt.name == "custom-columns":
        return format_table([[header for header, _ in fmt.columns]])
    columns = columns_for(
        kind,
        wide=fmt.name == "wide",
        all_namespaces=all_namespaces,
        show_labels=show_labels,
        name_prefix=False,
    )
    return format_table([[c.header for c in columns]])


def _table(
    objs: Sequence[Obj],
    kind: Kind,
    *,
    wide: bool,
    all_namespaces: bool,
    no_headers: bool,
    now: datetime,
    show_labels: bool = False,
    name_prefix: bool = False,
) -> str:
    columns = columns_for(
        kind,
        wide=wide,
        all_namespaces=all_namespaces,
        show_labels=show_labels,
        name_prefix=name_prefix,
    )
    rows = [] if no_headers else [[c.header for c in columns]]
    rows.extend([c.value(obj, now) for c in columns] for obj in objs)
    return format_table(rows)


def empty_message(kind: Kind, namespace: str | None) -> str:
    """kubectl's notice for an empty list (no newline): ``No resources found in <ns>
    namespace.`` for a namespaced kind listed in one namespace, else ``No resources
    found``."""
    if kind.namespaced and namespace:
        return f"No resources found in {namespace} namespace."
    return "No resources found"


def is_empty_notice(text: str) -> bool:
    """Whether ``print_objects`` returned the "No resources found" notice (for stderr)."""
    return text.startswith("No resources found")


# ---------------------------------------------------------------------------------------
# Output formats


@dataclass(frozen=True)
class _Format:
    name: str  # "table", "wide", "yaml", "json", "name", "jsonpath", "custom-columns"
    template: jsonpath.Template | None = None
    as_json: bool = False
    columns: tuple[tuple[str, jsonpath.Template], ...] = ()


def _relaxed_path(path: str) -> str:
    """kubectl's RelaxedJSONPathExpression: ``a.b``, ``.a.b``, ``{a.b}``, ``{.a.b}``."""
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if not path or "{" in path or "}" in path:
        raise OutputFormatError(
            f"unexpected path string {path!r}, expected a 'name1.name2' or '.name1.name2' "
            "or '{name1.name2}' or '{.name1.name2}'"
        )
    return "{" + (path if path.startswith(".") else "." + path) + "}"


def relaxed_template(path: str) -> jsonpath.Template:
    """A kubectl relaxed JSONPath (``--sort-by``, custom columns) as a template."""
    return jsonpath.parse(_relaxed_path(path))


def _parse_format(output: str | None) -> _Format:
    if output is None or output == "":
        return _Format("table")
    if output in ("wide", "yaml", "json", "name"):
        return _Format(output)
    name, sep, argument = output.partition("=")
    if name in ("jsonpath", "jsonpath-as-json", "jsonpath-file"):
        if not sep or not argument:
            raise OutputFormatError(
                f"{name} format specified but no template given "
                f"(use -o {name}='{{.metadata.name}}')"
            )
        template = argument
        if name == "jsonpath-file":
            try:
                template = Path(argument).read_text()
            except OSError as e:
                raise OutputFormatError(f"error reading --template {argument}: {e}") from None
        return _Format(
            "jsonpath", template=jsonpath.parse(template), as_json=name == "jsonpath-as-json"
        )
    if name == "custom-columns":
        if not sep or not argument:
            raise OutputFormatError(
                "custom-columns format specified but no custom columns given "
                "(use -o custom-columns=NAME:.metadata.name,PHASE:.status.phase)"
            )
        columns = []
        for spec in argument.split(","):
            header, colon, path = spec.partition(":")
            if not colon or not header:
                raise OutputFormatError(
                    f"unexpected custom-columns spec: {spec}, expected <header>:<json-path-expr>"
                )
            columns.append((header, jsonpath.parse(_relaxed_path(path))))
        return _Format("custom-columns", columns=tuple(columns))
    raise OutputFormatError(
        f'unable to match a printer suitable for the output format "{output}", '
        f"allowed formats are: {','.join(OUTPUT_FORMATS)}"
    )


def validate_output(output: str | None) -> None:
    """Raise OutputFormatError (or jsonpath.JsonPathError, both ValueError) if ``output``
    is not a format ``print_objects`` accepts, before anything is fetched."""
    _parse_format(output)


def _customcolumns_for(
    docs: Sequence[Obj], columns: Sequence[tuple[str, jsonpath.Template]], no_headers: bool
) -> str:
    rows = [] if no_headers else [[header for header, _ in columns]]
    for obj in docs:
        row = []
        for _, template in columns:
            results = template.find_results(obj, allow_missing_keys=True)
            values = [go_value(v) for values in results for v in values]
            row.append(",".join(values) if values else "<none>")
        rows.append(row)
    return format_table(rows)


def print_objects(
    objs: Sequence[Obj],
    kind: Kind,
    output: str | None,
    *,
    single: bool = False,
    namespace: str | None = None,
    all_namespaces: bool = False,
    no_headers: bool = False,
    now: datetime | None = None,
    allow_missing_keys: bool = True,
    show_labels: bool = False,
    name_prefix: bool = False,
) -> str:
    """Format ``objs`` (all of ``kind``) for ``vmferry get -o <output>``.

    ``single`` means one object was asked for by name: YAML, JSON and JSONPath then see
    the object itself, otherwise a ``List`` of all of them (as kubectl). ``namespace``
    (the namespace listed) is only used for the empty-list notice; ``all_namespaces``
    adds the NAMESPACE column for namespaced kinds; ``now`` is the reference time for
    AGE (default: the current time). ``allow_missing_keys`` is kubectl's
    ``--allow-missing-template-keys`` (default true: a missing key prints nothing).
    ``show_labels`` adds the LABELS column; ``name_prefix`` prints NAME as ``TYPE/NAME``
    (several types in one ``get``).

    For an empty table (default or wide) this returns the notice of ``empty_message``
    plus a newline, which belongs on stderr (check with ``is_empty_notice``); ``-o name``
    of nothing is empty. Raises OutputFormatError for an unknown format and
    jsonpath.JsonPathError for a template that does not parse or fails on the data.
    """
    fmt = _parse_format(output)
    if now is None:
        now = datetime.now(UTC)
    if fmt.name in ("table", "wide", "custom-columns") and not objs:
        return empty_message(kind, None if all_namespaces else namespace) + "\n"
    if fmt.name in ("table", "wide"):
        return _table(
            objs,
            kind,
            wide=fmt.name == "wide",
            all_namespaces=all_namespaces,
            no_headers=no_headers,
            now=now,
            show_labels=show_labels,
            name_prefix=name_prefix,
        )
    if fmt.name == "custom-columns":
        return _customcolumns_for(objs, fmt.columns, no_headers)
    if fmt.name == "name":
        prefix = resource_name(kind)
        return "".join(f"{prefix}/{object_name(obj, now)}\n" for obj in objs)
    document: Any = objs[0] if single and len(objs) == 1 else _as_list(objs)
    if fmt.name == "yaml":
        return to_yaml(document)
    if fmt.name == "json":
        return to_json(document)
    assert fmt.template is not None
    return fmt.template.execute(
        document, allow_missing_keys=allow_missing_keys, as_json=fmt.as_json
    )
