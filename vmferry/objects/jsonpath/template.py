"""Evaluating a parsed JSONPath template, and printing its values as kubectl does.

:class:`Template` (what :func:`parse` returns) walks the syntax tree over the data and
prints each action's values: strings raw, numbers as Go's ``%v``, objects and lists as
Go's ``encoding/json`` writes them (sorted keys).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from vmferry.objects.jsonpath.syntax import (
    ActionNode,
    Field,
    Filter,
    Index,
    JsonPathError,
    Node,
    ParseError,
    Recursive,
    Step,
    TextNode,
    Union,
    Wildcard,
    parse_nodes,
)


class _EvalError(Exception):
    """Raised inside evaluation; wrapped into a JsonPathError naming the template."""


class _MissingKey(_EvalError):
    pass


# ---------------------------------------------------------------------------------------
# Evaluation


class _Evaluator:
    def __init__(self, allow_missing_keys: bool) -> None:
        self.allow_missing_keys = allow_missing_keys

    def nodes(self, nodes: Sequence[Node], data: Any, out: list[list[Any]]) -> None:
        for node in nodes:
            if isinstance(node, TextNode):
                out.append([node.text])
            elif isinstance(node, ActionNode):
                out.append(self.steps(node.steps, [data]))
            else:
                for value in self.steps(node.steps, [data]):
                    self.nodes(node.body, value, out)

    def steps(self, steps: Sequence[Step], values: list[Any]) -> list[Any]:
        after_recursive = False
        for step in steps:
            values = self.step(step, values, after_recursive)
            after_recursive = isinstance(step, Recursive)
        return values

    def step(self, step: Step, values: list[Any], after_recursive: bool) -> list[Any]:
        if isinstance(step, Field):
            return self.field(step, values)
        if isinstance(step, Index):
            out: list[Any] = []
            for value in values:
                if value is None or (after_recursive and not isinstance(value, list)):
                    continue
                out.extend(_eval_index(step, value))
            return out
        if isinstance(step, Filter):
            out = []
            for value in values:
                if value is None or (after_recursive and not isinstance(value, list)):
                    continue
                out.extend(self.filter(step, value))
            return out
        if isinstance(step, Wildcard):
            out = []
            for value in values:
                if isinstance(value, dict):
                    out.extend(value.values())
                elif isinstance(value, list):
                    out.extend(value)
            return out
        if isinstance(step, Recursive):
            out = []
            for value in values:
                _descend(value, out)
            return out
        if isinstance(step, Union):
            out = []
            for alternative in step.alternatives:
                out.extend(self.steps(alternative, values))
            return out
        if step.per_input:
            return [step.value for _ in values]
        return [step.value]

    def field(self, step: Field, values: list[Any]) -> list[Any]:
        if not values:
            return []
        if step.name == "":
            return [v for v in values if v is not None]
        found = [v[step.name] for v in values if isinstance(v, dict) and step.name in v]
        if not found and not self.allow_missing_keys:
            raise _MissingKey(f"key {json.dumps(step.name)} not found")
        return found

    def filter(self, step: Filter, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _EvalError(f"{_type_name(value)} is not an array and cannot be filtered")
        strict = _Evaluator(allow_missing_keys=False)
        out = []
        for element in value:
            try:
                lefts = strict.steps(step.left, [element])
            except _MissingKey:
                lefts = []
            if step.operator == "exists":
                if lefts:
                    out.append(element)
                continue
            try:
                rights = strict.steps(step.right, [element])
            except _MissingKey:
                rights = []
            if not lefts or not rights:
                continue
            if len(lefts) > 1 or len(rights) > 1:
                raise _EvalError("can only compare one element at a time")
            if _compare(lefts[0], step.operator, rights[0]):
                out.append(element)
        return out


def _eval_index(step: Index, value: Any) -> list[Any]:
    """kubectl's ``evalArray``: negative indexes count from the end; an index outside the
    list is an error (``[0]`` of an empty list too), except for an empty selection."""
    if not isinstance(value, list):
        raise _EvalError(f"{_type_name(value)} is not an array; [ ] needs an array")
    length = len(value)
    start = step.start if step.start is not None else 0
    if start < 0:
        start += length
    end = step.end if step.end is not None else length
    if end < 0 or (step.end_derived and end == 0):
        end += length
    if end == start:
        return []
    if start >= length or start < 0:
        raise _EvalError(f"array index out of bounds: index {start}, length {length}")
    if end > length or end < 0:
        raise _EvalError(f"array index out of bounds: index {end - 1}, length {length}")
    if start > end:
        raise _EvalError(f"starting index {start} is greater than ending index {end}")
    step_size = 1
    if step.step is not None:
        if step.step <= 0:
            raise _EvalError("step must be > 0")
        step_size = step.step
    return value[start:end:step_size]


def _descend(value: Any, out: list[Any]) -> None:
    """Pre-order: every non-empty object or list, starting with ``value`` itself."""
    if isinstance(value, dict) and value:
        out.append(value)
        for child in value.values():
            _descend(child, out)
    elif isinstance(value, list) and value:
        out.append(value)
        for child in value:
            _descend(child, out)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compare(left: Any, operator: str, right: Any) -> bool:
    comparable = (_is_number(left) and _is_number(right)) or (
        type(left) is type(right) and isinstance(left, str | bool)
    )
    if operator in ("==", "!="):
        equal = comparable and left == right
        return equal if operator == "==" else not equal
    if not comparable or isinstance(left, bool):
        raise _EvalError(
            f"cannot compare {_type_name(left)} {_short(left)} {operator} "
            f"{_type_name(right)} {_short(right)}"
        )
    if operator == "<":
        return bool(left < right)
    if operator == ">":
        return bool(left > right)
    if operator == "<=":
        return bool(left <= right)
    return bool(left >= right)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if _is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _short(value: Any) -> str:
    text = to_compact_json(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------
# Output formatting (Go's fmt %v and encoding/json, as kubectl prints)


def _float_digits(value: float) -> tuple[str, int, bool]:
    """Shortest round-trip digits ``d1d2...``, decimal exponent ``x`` (value is
    ``d1.d2... * 10**x``) and the sign."""
    sign, digits, exponent = Decimal(repr(value)).as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).rstrip("0") or "0"
    exponent += len(digits) - len(text)
    return text, len(text) - 1 + exponent if text != "0" else 0, bool(sign)


def _fixed(digits: str, point: int) -> str:
    """``digits`` with the decimal point after ``point`` digits (may be <= 0 or > len)."""
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def _scientific(digits: str, exponent: int, min_exp_digits: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sign = "-" if exponent < 0 else "+"
    return f"{mantissa}e{sign}{abs(exponent):0{min_exp_digits}d}"


def _go_float(value: float, *, json_style: bool) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    digits, exponent, negative = _float_digits(value)
    prefix = "-" if negative else ""
    if json_style:  # encoding/json: 'f' format unless 1e-6 > |v| or |v| >= 1e21
        if value != 0 and (abs(value) < 1e-6 or abs(value) >= 1e21):
            return prefix + _scientific(digits, exponent, 1 if exponent < 0 else 2)
        return prefix + _fixed(digits, exponent + 1)
    # fmt %v: shortest 'g' with the exponent threshold 21
    if digits != "0" and (exponent < -4 or exponent >= 21):
        return prefix + _scientific(digits, exponent, 2)
    return prefix + _fixed(digits, exponent + 1)


def format_value(value: Any) -> str:
    """One value as kubectl's JSONPath prints it: strings raw, ``true``/``false``,
    ``null``, numbers as Go's ``%v``, objects and lists as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value, json_style=False)
    return to_compact_json(value)


def _json(value: Any, indent: str | None, level: int) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value, json_style=True)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = sorted((str(k), v) for k, v in value.items())
        parts = [
            f"{json.dumps(k, ensure_ascii=False)}:{'' if indent is None else ' '}"
            f"{_json(v, indent, level + 1)}"
            for k, v in items
        ]
        return _join_json("{", parts, "}", indent, level)
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        return _join_json("[", [_json(v, indent, level + 1) for v in value], "]", indent, level)
    raise _EvalError(f"cannot print a value of type {type(value).__name__}")


def _join_json(open_: str, parts: list[str], close: str, indent: str | None, level: int) -> str:
    if indent is None:
        return open_ + ",".join(parts) + close
    inner = "\n" + indent * (level + 1)
    return open_ + inner + ("," + inner).join(parts) + "\n" + indent * level + close


def to_compact_json(value: Any) -> str:
    """Compact JSON with sorted keys, as Go's ``json.Marshal`` writes unstructured data."""
    return _json(value, None, 0)


def to_indented_json(value: Any) -> str:
    """JSON indented by 4 spaces with sorted keys (Go's ``json.MarshalIndent``)."""
    return _json(value, "    ", 0)


# ---------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class Template:
    """A parsed template; ``execute`` may be called any number of times."""

    source: str
    nodes: tuple[Node, ...]

    def execute(self, data: Any, *, allow_missing_keys: bool = False, as_json: bool = False) -> str:
        """Render ``data``.

        ``allow_missing_keys`` makes a missing key print nothing instead of raising (what
        ``kubectl get`` does by default, ``--allow-missing-template-keys=true``).
        ``as_json`` is ``-o jsonpath-as-json``: each action's values as an indented JSON
        array. Raises JsonPathError on a missing key, an index out of bounds, or a value
        of the wrong type for the step applied to it.
        """
        results = self.find_results(data, allow_missing_keys=allow_missing_keys)
        try:
            if as_json:
                return "".join(to_indented_json(values) + "\n" for values in results)
            return "".join(" ".join(format_value(v) for v in values) for values in results)
        except _EvalError as e:
            raise self._execution_error(e) from None

    def find_results(self, data: Any, *, allow_missing_keys: bool = False) -> list[list[Any]]:
        """The values of each text node and action, in template order (a range's body
        contributes once per iteration); what ``execute`` prints. Raises JsonPathError."""
        results: list[list[Any]] = []
        try:
            _Evaluator(allow_missing_keys).nodes(self.nodes, data, results)
        except _EvalError as e:
            raise self._execution_error(e) from None
        return results

    def _execution_error(self, error: _EvalError) -> JsonPathError:
        return JsonPathError(f"error executing jsonpath {json.dumps(self.source)}: {error}")


def parse(template: str) -> Template:
    """Parse a template; raise JsonPathError saying what is wrong and where."""
    try:
        return Template(template, parse_nodes(template))
    except ParseError as e:
        raise JsonPathError(
            f"error parsing jsonpath {json.dumps(template)}: {e.message} "
            f"(at position {e.position + 1})",
            position=e.position,
        ) from None


def render(
    template: str, data: Any, *, allow_missing_keys: bool = False, as_json: bool = False
) -> str:
    """Parse ``template`` and render ``data`` with it (see ``Template.execute``)."""
    return parse(template).execute(data, allow_missing_keys=allow_missing_keys, as_json=as_json)
