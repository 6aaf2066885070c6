"""The schema DSL: declarative checkers for object fields, and the messages they write.

A :class:`Schema` node checks one value, reports every problem into :class:`Errors` under
its field path, and returns the value's normalized copy (see :mod:`vmferry.objects.schema`
for what normalization means). The nodes: :class:`Obj` (fixed fields, required fields,
cross-field :data:`Rule` s), :class:`Map`, :class:`List`, :class:`Str`, :class:`Int`,
:class:`Number`, :class:`Bool`, :class:`Quantity`, :class:`Timestamp`, :class:`Labels`,
:class:`Annotations`, :class:`Base64`, :class:`Name`, :class:`AnyObject` and
:class:`Anything`.

Messages name the path and the expected type the way ``kubectl`` does, and a little
more clearly: ``spec.domain.cpu.cores: expected integer, got string "two"``. The message
helpers (:func:`field_path`, :func:`quote`, :func:`describe`, :func:`expected_type`,
:func:`show`) are public for the rules and checks of the sibling modules.

Strings are never coerced (``"2"`` is not an integer, ``true`` is not a string), and a
boolean is never an integer.
"""

from __future__ import annotations

import abc
import copy
import datetime as dt
import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vmferry.objects import limits
from vmferry.objects.names import (
    dns1123_subdomain_problem,
    validate_label_key,
    validate_label_value,
)
from vmferry.objects.quantity import format_quantity, parse_quantity

__all__ = [
    "Annotations",
    "AnyObject",
    "Anything",
    "Base64",
    "Bool",
    "Errors",
    "Int",
    "Labels",
    "List",
    "Map",
    "Name",
    "Number",
    "Obj",
    "Quantity",
    "Rule",
    "Schema",
    "Str",
    "Timestamp",
    "describe",
    "expected_type",
    "field_path",
    "nested",
    "quantity_max_message",
    "quote",
    "show",
]

# --------------------------------------------------------------------------------------
# Error collection and message helpers
# --------------------------------------------------------------------------------------


class Errors:
    """Collects ``path: message`` lines; ``validate`` reports them all at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path}: {message}" if path else message)

    def __bool__(self) -> bool:
        return bool(self.lines)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def field_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _key_path(path: str, key: str) -> str:
    """Path of a map entry: ``a.b.key``, or ``a.b[kubevirt.io/env]`` for non-identifier keys."""
    if _IDENTIFIER.fullmatch(key):
        return field_path(path, key)
    return f"{path}[{limits.shorten(key, 64)}]"


def quote(text: str, limit: int = 80) -> str:
    return limits.echo(text, limit)


def describe(value: object) -> str:
    """``string "yes"``, ``integer 5``, ``boolean true``, ``null``, ``object``, ``list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dt.datetime | dt.date):
        return f"timestamp {value.isoformat()}"
    return type(value).__name__


def expected_type(what: str, value: object) -> str:
    return f"expected {what}, got {describe(value)}"


def show(value: object) -> str:
    """A value as it appears in a message: strings quoted, numbers bare."""
    return quote(value) if isinstance(value, str) else str(value)


def _range_message(minimum: float | None, maximum: float | None, value: object) -> str:
    if minimum is not None and maximum is not None:
        return f"must be between {minimum} and {maximum}, got {show(value)}"
    if minimum is not None:
        return f"must be at least {minimum}, got {show(value)}"
    return f"must be at most {maximum}, got {show(value)}"


# --------------------------------------------------------------------------------------
# The schema DSL
# --------------------------------------------------------------------------------------


class Schema(abc.ABC):
    """A node of the schema: checks one value and returns its normalized copy.

    ``check`` reports problems into ``errors`` under ``path`` and never raises; after a
    problem it returns the value unchanged (the caller raises once everything is checked).
    ``nullable`` fields keep an explicit ``null`` in the normalized copy; any other field
    given as ``null`` is treated as absent.
    """

    nullable = False
    type_name = "a value"  # as in "expected <type_name>, got ..."

    @abc.abstractmethod
    def check(self, value: object, path: str, errors: Errors) -> object:
        """Report problems of ``value`` into ``errors``; return its normalized copy."""


Rule = Callable[[dict[str, Any], str, Errors], None]
"""A cross-field check on a normalized object: ``rule(obj, path, errors)``.

Rules run even when a field of ``obj`` had an error, so they must check types before use.
"""


class Obj(Schema):
    """A mapping with a fixed set of fields; any other field is an error, unless
    ``open`` (a status other components extend): then it is kept unchecked."""

    type_name = "object"

    def __init__(
        self,
        fields: Mapping[str, Schema],
        *,
        required: Sequence[str] = (),
        rules: Sequence[Rule] = (),
        open: bool = False,
    ) -> None:
        unknown = set(required) - set(fields)
        if unknown:
            raise ValueError(f"required fields not declared: {sorted(unknown)}")
        self.fields = dict(fields)
        self.required = tuple(required)
        self.rules = tuple(rules)
        self.open = open

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, expected_type("object", value))
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"field names must be strings, got {describe(key)}")
                continue
            item_path = field_path(path, limits.shorten(key, 64))
            schema = self.fields.get(key)
            if schema is None:
                if self.open:
                    out[key] = copy.deepcopy(item)
                else:
                    errors.add(item_path, _unknown_field(key, self.fields))
                continue
            if item is None:
                if schema.nullable:
                    out[key] = None
                continue
            out[key] = schema.check(item, item_path, errors)
        for key in self.required:
            if out.get(key) is None:
                errors.add(field_path(path, key), "required field is missing")
        for rule in self.rules:
            rule(out, path, errors)
        return out


def _unknown_field(key: str, known: Mapping[str, Schema]) -> str:
    message = f"unknown field {quote(key)}"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    if not close:
        close = [name for name in known if name.lower() == key.lower()]
    if close:
        message += f' (did you mean "{close[0]}"?)'
    return message


class Str(Schema):
    """A string; optionally one of ``enum``, matching ``pattern``, or non-empty."""

    type_name = "string"

    def __init__(
        self,
        *,
        enum: Iterable[str] | None = None,
        pattern: str | None = None,
        nonempty: bool = False,
    ) -> None:
        # str(): a StrEnum's members give their values (the stored strings)
        self.enum = tuple(str(e) for e in enum) if enum is not None else None
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.nonempty = nonempty

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, str):
            errors.add(path, expected_type("string", value))
        elif self.nonempty and not value:
            errors.add(path, "must not be empty")
        elif self.enum is not None and value not in self.enum:
            supported = ", ".join(json.dumps(e) for e in self.enum)
            errors.add(path, f"unsupported value {quote(value)}: supported values: {supported}")
        elif self.pattern is not None and not self.pattern.fullmatch(value):
            errors.add(
                path, f"invalid value {quote(value)}: must match the regex {self.pattern.pattern}"
            )
        return value


class Number(Schema):
    """An integer or a finite float (not a boolean) in ``[min, max]``."""

    type_name = "number"

    def __init__(self, min: float | None = None, max: float | None = None) -> None:
        self.min = min
        self.max = max

    def _in_range(self, value: float, path: str, errors: Errors) -> None:
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            errors.add(path, _range_message(self.min, self.max, value))

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.add(path, expected_type("number", value))
        elif not math.isfinite(value):
            errors.add(path, f"must be a finite number, got {value!r}")
        else:
            self._in_range(value, path, errors)
        return value


class Int(Number):
    """An integer (not a boolean) in ``[min, max]``; an integral float is accepted."""

    type_name = "integer"

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        super().__init__(min, max)

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            errors.add(path, expected_type("integer", value))
        else:
            self._in_range(value, path, errors)
        return value


class Bool(Schema):
    """``true`` or ``false``; strings such as ``"yes"`` are rejected."""

    type_name = "boolean"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, bool):
            errors.add(path, expected_type("boolean", value))
        return value


class Quantity(Schema):
    """A Kubernetes quantity (``"2Gi"``, ``"500M"``, ``1024``), never negative.

    ``positive`` also rejects zero. The normalized copy keeps the spelling the user wrote.
    """

    type_name = "quantity"

    def __init__(self, *, positive: bool = False, max: int | None = None) -> None:
        self.positive = positive
        self.max = max

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            errors.add(path, expected_type('quantity (e.g. "2Gi" or 1024)', value))
            return value
        amount = _parse_quantity(value, path, errors)
        if amount is None:
            return value
        if self.positive and amount <= 0:
            errors.add(path, f"must be greater than zero, got {show(value)}")
        elif self.max is not None and amount > self.max:
            errors.add(path, quantity_max_message(self.max, value))
        return value


def quantity_max_message(maximum: int, value: object) -> str:
    return f"must be at most {format_quantity(maximum)} (the limit), got {show(value)}"


def _parse_quantity(value: str | int | float, path: str, errors: Errors) -> int | None:
    try:
        return parse_quantity(value)
    except ValueError as exc:
        errors.add(path, str(exc))  # names the quantity: 'invalid quantity "12Zi": ...'
        return None


class Timestamp(Schema):
    """An RFC 3339 timestamp string (or ``null``); a YAML-parsed ``datetime`` is converted."""

    nullable = True
    type_name = "timestamp"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if isinstance(value, str):
            return value
        if isinstance(value, dt.datetime):
            return _rfc3339(value)
        if isinstance(value, dt.date):
            return f"{value.isoformat()}T00:00:00Z"
        errors.add(path, expected_type('timestamp string (e.g. "2024-05-01T10:00:00Z")', value))
        return value


def _rfc3339(moment: dt.datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


class Map(Schema):
    """A mapping from string keys to values of ``value``."""

    type_name = "object"

    def __init__(self, value: Schema) -> None:
        self.value = value

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, expected_type("object", value))
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"keys must be strings, got {describe(key)}")
                continue
            if item is None and not self.value.nullable:
                errors.add(_key_path(path, key), expected_type(self.value.type_name, item))
                continue
            out[key] = self.value.check(item, _key_path(path, key), errors)
        return out


class Labels(Schema):
    """Kubernetes labels (or a label selector's ``matchLabels``): valid keys and values."""

    type_name = "object"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, expected_type("object", value))
            return value
        if len(value) > limits.MAX_LABELS:
            errors.add(path, f"{len(value)} labels, more than the {limits.MAX_LABELS} allowed")
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"keys must be strings, got {describe(key)}")
                continue
            try:
                validate_label_key(key)
            except ValueError as exc:
                errors.add(path, str(exc))  # 'invalid label key "Foo Bar": ...'
            item_path = _key_path(path, key)
            if not isinstance(item, str):
                hint = " (quote it in YAML)" if isinstance(item, bool | int | float) else ""
                errors.add(item_path, expected_type("string", item) + hint)
                continue
            try:
                validate_label_value(item)
            except ValueError as exc:
                errors.add(item_path, str(exc))
            out[key] = item
        return out


ANNOTATIONS_TOTAL_LIMIT = limits.MAX_ANNOTATIONS_BYTES


class Annotations(Schema):
    """Kubernetes annotations: keys are qualified names, values any strings (≤256 KiB total)."""

    type_name = "object"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, expected_type("object", value))
            return value
        out: dict[str, Any] = {}
        total = 0
        for key, item in value.items():
            if not isinstance(key, str):
                errors.add(path, f"keys must be strings, got {describe(key)}")
                continue
            try:
                validate_label_key(key)
            except ValueError as exc:
                errors.add(path, str(exc).replace("label key", "annotation key", 1))
            if not isinstance(item, str):
                hint = " (quote it in YAML)" if isinstance(item, bool | int | float) else ""
                errors.add(_key_path(path, key), expected_type("string", item) + hint)
                continue
            total += len(key.encode()) + len(item.encode())
            out[key] = item
        if total > ANNOTATIONS_TOTAL_LIMIT:
            errors.add(
                path,
                f"annotations are {total} bytes, more than the {ANNOTATIONS_TOTAL_LIMIT} allowed",
            )
        return out


class List(Schema):
    """A list whose items all match ``item``; paths name the index (``conditions[0]``)."""

    type_name = "list"

    def __init__(self, item: Schema) -> None:
        self.item = item

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, list | tuple):
            errors.add(path, expected_type("list", value))
            return value
        out: list[Any] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if item is None and not self.item.nullable:
                errors.add(item_path, expected_type(self.item.type_name, item))
                out.append(item)
                continue
            out.append(self.item.check(item, item_path, errors))
        return out


class AnyObject(Schema):
    """Any mapping, not looked into (e.g. ``spec.domain.devices``)."""

    type_name = "object"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, Mapping):
            errors.add(path, expected_type("object", value))
            return value
        return copy.deepcopy(dict(value))


class Anything(Schema):
    """Any value, not looked into (e.g. ``spec.affinity``)."""

    nullable = True

    def check(self, value: object, path: str, errors: Errors) -> object:
        return copy.deepcopy(value)


_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class Base64(Str):
    """A base64 string (a Secret's ``data`` value); padding and alphabet are checked."""

    type_name = "base64 string"

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, str):
            errors.add(path, expected_type("base64 string", value))
        elif len(value) % 4 or not _BASE64.fullmatch(value):
            errors.add(path, f"invalid base64 data {quote(value, 20)}: encode it (base64 -w0)")
        return value


class Name(Str):
    """A reference to another object by name: empty (unset) or a DNS-1123 subdomain, the
    rule of object names (:func:`~vmferry.objects.names.dns1123_subdomain_problem`)."""

    def check(self, value: object, path: str, errors: Errors) -> object:
        if not isinstance(value, str):
            errors.add(path, expected_type("string", value))
        elif value:
            problem = dns1123_subdomain_problem(value)
            if problem:
                errors.add(path, f"invalid value {quote(value)}: {problem}")
        return value


def nested(obj: object, *keys: str) -> object:
    """``obj[k1][k2]...`` or None when any step is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj
